"""The documentation stays true: every relative link and #anchor in README.md, docs/ and benchmarks/RESULTS.md
resolves inside the repository, docs/configuration.md is what docs/make_config.py renders from dpojax/config.py, the
losses page names every built-in loss, the troubleshooting table names tests that exist, and the README's config
examples validate. No JAX compile: these read files and import the config and loss modules only."""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

import pytest
import yaml

import dpojax
from dpojax.losses import core

REPO = Path(__file__).resolve().parents[1]
PAGES = sorted([REPO / "README.md", REPO / "benchmarks" / "RESULTS.md", *(REPO / "docs").glob("*.md")])


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "docs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------- markdown parsing
def _prose(text: str) -> list[str]:
    """The lines outside fenced code blocks, with inline code spans blanked (links in code are not links)."""
    lines, fence = [], None
    for line in text.splitlines():
        mark = re.match(r"\s*(```+|~~~+)", line)
        if mark and (fence is None or mark.group(1)[0] == fence[0] and len(mark.group(1)) >= len(fence)):
            fence = mark.group(1) if fence is None else None
            continue
        if fence is None:
            lines.append(re.sub(r"(`+)(.+?)\1", lambda m: " " * len(m.group(0)), line))
    return lines


def github_anchor(heading: str) -> str:
    """GitHub's anchor of a heading: markup dropped, lower case, punctuation but - and _ removed, spaces to -."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text
    text = text.replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The anchors of a page's headings (outside code blocks), duplicates numbered as GitHub does."""
    seen: dict[str, int] = {}
    out = set()
    fence = None
    for line in text.splitlines():
        mark = re.match(r"\s*(```+|~~~+)", line)
        if mark and (fence is None or mark.group(1)[0] == fence[0] and len(mark.group(1)) >= len(fence)):
            fence = mark.group(1) if fence is None else None
            continue
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line) if fence is None else None
        if m:
            base = github_anchor(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(text: str) -> list[str]:
    found = []
    for line in _prose(text):
        found += re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", line)
        found += re.findall(r"^\s*\[[^\]]+\]:\s*(\S+)", line)  # reference-style definitions
    return found


def broken_links(page: Path, text: str) -> list[str]:
    """What is wrong with each relative link of `text`, the contents of `page`."""
    bad = []
    for target in links(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...: not a file of this repository
            continue
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / path_part).resolve() if path_part else page
        if REPO not in dest.parents:
            bad.append(f"{target}: outside the repository")
        elif not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix != ".md":
            bad.append(f"{target}: an anchor into a file that is not markdown")
        elif anchor and anchor not in anchors(text if dest == page else dest.read_text()):
            bad.append(f"{target}: no heading with anchor #{anchor} in {dest.relative_to(REPO)}")
    return bad


def test_anchor_rules_match_github():
    assert github_anchor("Compile ahead of time: does it fit?") == "compile-ahead-of-time-does-it-fit"
    assert github_anchor("`model.lora`") == "modellora"
    assert github_anchor("Small steps: `train.steps_per_dispatch`") == "small-steps-trainsteps_per_dispatch"
    assert github_anchor("Memory per chip (`dpojax compile`)") == "memory-per-chip-dpojax-compile"
    assert github_anchor("Object storage (`gs://`)") == "object-storage-gs"


# --------------------------------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_and_anchor_resolves(page):
    bad = broken_links(page, page.read_text())
    assert not bad, "\n".join(bad)


def test_link_check_catches_broken_links():
    """The check can fail: a missing page, a missing anchor, a path outside the repository, an anchor of this page."""
    page = REPO / "docs" / "losses.md"
    text = ("# T\n\n[a](nope.md) [b](data.md#no-such-heading) [c](../../outside.md) [d](#t) [e](#u) `[f](code.md)`\n"
            "```\n# U\n[g](in-a-code-block.md)\n```\n[h](data.md#tokenization) [i](https://example.com/x.md)\n")
    assert links(text) == ["nope.md", "data.md#no-such-heading", "../../outside.md", "#t", "#u",
                           "data.md#tokenization", "https://example.com/x.md"]
    assert broken_links(page, text) == [
        "nope.md: no such file",
        "data.md#no-such-heading: no heading with anchor #no-such-heading in docs/data.md",
        "../../outside.md: outside the repository",
        "#u: no heading with anchor #u in docs/losses.md"]


def test_docs_cite_no_file_outside_the_repository():
    """Every Markdown file a page or a module docstring names, linked or not, is one of the repository's: the docs
    stand alone."""
    ours = {p.name for p in REPO.rglob("*.md") if ".venv" not in p.parts}
    sources = [*PAGES, *REPO.joinpath("dpojax").rglob("*.py"), *REPO.joinpath("benchmarks").glob("*.py")]
    for source in sources:
        for name in re.findall(r"[\w.-]+\.md\b", source.read_text()):
            assert Path(name).name in ours, f"{source.relative_to(REPO)} names {name}, which is not in the repository"


def test_readme_is_a_short_users_guide():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    for command in ("make demo", "make test", "make smollm2", "pip install -e ."):
        assert command in text
    docs = {p.name for p in (REPO / "docs").glob("*.md")}
    linked = {Path(t.partition("#")[0]).name for t in links(text) if t.startswith("docs/")}
    assert docs <= linked, f"pages the README does not link: {sorted(docs - linked)}"


def test_every_docs_page_opens_with_the_command_or_config_that_uses_it():
    for page in (REPO / "docs").glob("*.md"):
        body = [line for line in page.read_text().splitlines()[1:] if line.strip()]
        assert body[0].startswith("```"), f"{page.name}: the first thing after the title is not a code block"


# ------------------------------------------------------------------------------------------ configuration page
def test_configuration_page_is_current():
    make_config = _load("make_config")
    assert (REPO / "docs" / "configuration.md").read_text() == make_config.render(), "run: python docs/make_config.py"


def test_configuration_page_lists_every_key():
    from dpojax.config import Config, to_dict

    page = (REPO / "docs" / "configuration.md").read_text()

    def keys(d: dict, prefix: str = ""):
        for key, value in d.items():
            yield from keys(value, f"{prefix}{key}.") if isinstance(value, dict) else [(prefix, key)]

    for prefix, key in keys(to_dict(Config())):
        section = f"## `{prefix.rstrip('.')}`\n" if prefix else "## Top level\n"
        assert section in page, section
        body = page.split(section, 1)[1].split("\n## ", 1)[0]
        assert f"| `{key}` |" in body, f"{prefix}{key} is not on docs/configuration.md"


def test_field_comments_are_attributed_like_a_reader_would():
    make_config = _load("make_config")
    source = '''
class S:
    """Doc."""

    a: int = 1  # trailing of a; it goes on
    # on the next line, still a
    b: int = 2  # trailing of b
    # above c, which has no trailing comment
    c: str = ""
    d: bool = False
    e: int = 3  # one line
'''
    got = make_config.field_comments(source)
    assert got[("S", "a")] == "trailing of a; it goes on on the next line, still a"
    assert got[("S", "b")] == "trailing of b"
    assert got[("S", "c")] == "above c, which has no trailing comment"
    assert got[("S", "d")] == ""
    assert got[("S", "e")] == "one line"


def test_allowed_values_come_from_the_config_namespace():
    import dataclasses

    make_config = _load("make_config")

    @dataclasses.dataclass
    class X:
        remat: str = "none"
        kind: str = "a"

    f_remat, f_kind = dataclasses.fields(X)
    namespace = {"REMAT_POLICIES": {"none": None, "full": 1}, "OTHER": ("x",)}
    assert make_config._allowed(namespace, "one of REMAT_POLICIES", f_remat) == "allowed: `none`, `full`"
    assert make_config._allowed(namespace, "see the docs", f_kind) == ""
    with_choices = dataclasses.field(default="a", metadata={"choices": ("a", "b")})
    assert make_config._allowed(namespace, "", with_choices) == "allowed: `a`, `b`"


# ----------------------------------------------------------------------------------------------- other pages
def test_losses_page_names_every_built_in_loss():
    page = (REPO / "docs" / "losses.md").read_text()
    table = page.split("## The losses", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `(\w+)` \|", table, re.M))
    built_in = {name for name, loss in core.LOSSES.items() if loss.fn.__module__.startswith("dpojax.losses.")}
    assert documented == built_in


def test_troubleshooting_names_tests_that_exist():
    page = (REPO / "docs" / "troubleshooting.md").read_text()
    named = set(re.findall(r"`(test_\w+\.py)::(test_\w+)`", page))
    assert len(named) > 20
    missing = []
    for file, test in sorted(named):
        path = REPO / "tests" / file
        functions = {n.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.FunctionDef)} \
            if path.is_file() else set()
        if test not in functions:
            missing.append(f"{file}::{test}")
    assert not missing, missing


def test_full_config_examples_validate():
    """Every YAML block on the pages that opens with `# dpojax train` is a valid config."""
    checked = 0
    for page in PAGES:
        for block in re.findall(r"```yaml\n(.*?)```", page.read_text(), re.S):
            if block.startswith("# dpojax train"):
                dpojax.config_from_dict(yaml.safe_load(block))
                checked += 1
    assert checked >= 2
