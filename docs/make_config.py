"""Write docs/configuration.md, the reference of every config key, from `dpojax/config.py`.

    python docs/make_config.py     # after adding, renaming or documenting a config key (tests/test_docs.py checks)

Everything comes from the code: the sections and keys are the fields of `dpojax.config.Config` and its nested
dataclasses, the types their annotations (evaluated in config.py's namespace, so a `Literal` built from a tuple of
allowed values lists those values), the defaults the dataclasses' defaults, the YAML key names `config.to_dict`'s,
and the text each section's docstring and each field's comment. A field's comment is its trailing comment plus the
comment lines that follow it up to the next field, or, for a field with no trailing comment, the comment lines just
above it. A comment that names an upper-case tuple of config.py's namespace (`one of REMAT_POLICIES`), or a field's
`metadata={"choices": ...}`, adds "allowed: ..." with that tuple's values.
"""

from __future__ import annotations

import ast
import dataclasses
import io
import re
import sys
import tokenize
import types
import typing
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere: this checkout's dpojax
from dpojax import config  # noqa: E402 - after the sys.path set-up above

OUT = Path(__file__).with_name("configuration.md")
HEADER = """# Configuration reference

```bash
dpojax train CONFIG.yaml [section.key=value ...]     # also: dpojax eval, dpojax compile
```

A config is a YAML file of the sections below; every key has a default, so a config names only what it changes (a
model and a data set at least). Any key can be overridden on the command line as `section.key=value`
(`optim.lr=1e-5`, `model.lora.enabled=true`, `loss.type=[sigmoid,sft]`); values are parsed as YAML, then checked
against the key's type. An unknown key fails with the closest valid name, a wrong value names the key, the value and
what was expected (see [Troubleshooting](troubleshooting.md)). The run folder gets the resolved config as
`output_dir/config.yaml`. From Python: `dpojax.config_from_dict(dict, overrides)` and `dpojax.load_config(path,
overrides)` (see [the Python API](python-api.md)).

The topics behind the keys: `model` ([models](models.md), [LoRA](lora.md)), `data` ([data formats](data.md),
[packing](packing.md), [rankings](rankings.md)), `loss` and `ref_model` ([losses](losses.md)), `train`
([metrics](metrics.md), [performance](performance.md)), `mesh` and `distributed` ([scaling out](scaling-out.md)),
`checkpoint` ([fault tolerance](fault-tolerance.md)), `task` and `reward` ([training a reward
model](reward-models.md#training-a-reward-model)).

This page is generated from `dpojax/config.py` by `python docs/make_config.py`; `tests/test_docs.py` fails when
the two disagree. `null` is YAML's None; a list may be given as `[a, b]` or, for one item, as a plain value.
"""


# ----------------------------------------------------------------------------------------- comments of fields
def _comments(source: str) -> dict[int, tuple[str, bool]]:
    """line -> (comment text without '#', whether code precedes it on that line)."""
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            row, col = tok.start
            own_line = not tok.line[:col].strip()
            out[row] = (tok.string.lstrip("#").strip(), not own_line)
    return out


def field_comments(source: str) -> dict[tuple[str, str], str]:
    """(class name, field name) -> the field's comment, for every annotated field of every class in `source`."""
    comments = _comments(source)
    out: dict[tuple[str, str], str] = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ClassDef):
            continue
        fields = [s for s in node.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)]
        texts: dict[str, list[str]] = {}
        for i, stmt in enumerate(fields):
            name = stmt.target.id
            trailing = [comments[r][0] for r in range(stmt.lineno, stmt.end_lineno + 1) if comments.get(r, ("", 0))[1]]
            above = []  # own-line comments directly above this field, after the previous statement
            row = stmt.lineno - 1
            while row in comments and not comments[row][1]:
                above.insert(0, comments[row][0])
                row -= 1
            if trailing or i == 0:
                texts[name] = above + trailing if i == 0 else trailing
                if above and i > 0:  # no own-line comment belongs to a field that has its own trailing one
                    texts[fields[i - 1].target.id] += above
            else:
                texts[name] = above
        for name, parts in texts.items():
            out[(node.name, name)] = " ".join(p for p in parts if p)
    return out


# ------------------------------------------------------------------------------------------------ rendering
def _value(value) -> str:
    """A default as it would be written in YAML."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, str):
        return value if value else '""'
    return repr(value)


def _type(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(_value(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        text = " or ".join(_type(a) for a in args if a is not type(None))
        return text + " or null" if type(None) in args else text
    if origin is tuple:
        item = typing.get_args(tp)[0]
        return f"list of ({_type(item)})" if typing.get_origin(item) else f"list of {_type(item)}"
    return getattr(tp, "__name__", str(tp))


def _allowed(namespace: dict, comment: str, field: dataclasses.Field) -> str:
    """'allowed: ...' from a field's `choices` metadata, or from an upper-case tuple of strings its comment names."""
    choices = field.metadata.get("choices")
    if choices is None:
        for word in re.findall(r"\b[A-Z][A-Z0-9_]{2,}\b", comment):
            value = namespace.get(word)
            if isinstance(value, (tuple, list, frozenset, dict)) and value and all(isinstance(v, str) for v in value):
                choices = value
                break
    if choices is None:
        return ""
    return "allowed: " + ", ".join(f"`{c}`" for c in (sorted(choices) if isinstance(choices, frozenset) else choices))


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _default(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        return field.default
    return field.default_factory()  # type: ignore[misc]


def _doc(cls) -> str:
    """A section's docstring on one line ("" for the one dataclasses writes)."""
    doc = cls.__doc__ or ""
    return "" if doc.startswith(f"{cls.__name__}(") else " ".join(doc.split())


def _section(comments: dict, cls, yaml_names: dict, prefix: str) -> list[str]:
    """The heading, docstring and key table of one section (`prefix`: its dotted YAML path), then its subsections."""
    hints = typing.get_type_hints(cls, vars(config))
    doc = _doc(cls)
    lines = [f"## `{prefix.rstrip('.')}`", ""] if prefix else []
    if doc:
        lines += [doc, ""]
    rows, nested = [], []
    for f in dataclasses.fields(cls):
        key = yaml_names[f.name]
        tp = hints[f.name]
        comment = comments.get((cls.__name__, f.name), "")
        if dataclasses.is_dataclass(tp):
            nested.append((f, tp, key))
            comment = comment or _doc(tp).split(". ")[0].rstrip(".")
            rows.append(f"| `{key}` | section | see [`{prefix}{key}`](#{_anchor(prefix + key)}) | {_cell(comment)} |")
            continue
        text = " ".join(t for t in (comment, _allowed(vars(config), comment, f)) if t)
        rows.append(f"| `{key}` | {_cell(_type(tp))} | `{_cell(_value(_default(f)))}` | {_cell(text)} |")
    if rows:
        lines += ["| key | type | default | meaning |", "|---|---|---|---|", *rows, ""]
    for f, tp, key in nested:
        names = dict(zip((g.name for g in dataclasses.fields(tp)), config.to_dict(_default(f)), strict=True))
        lines += _section(comments, tp, names, f"{prefix}{key}.")
    return lines


def _anchor(heading: str) -> str:
    """GitHub's anchor of a `## `heading`` (lower case, punctuation but - and _ dropped)."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def render() -> str:
    comments = field_comments(Path(config.__file__).read_text())
    names = dict(zip((f.name for f in dataclasses.fields(config.Config)), config.to_dict(config.Config()), strict=True))
    lines = [HEADER, "## Top level", ""]
    return "\n".join(lines + _section(comments, config.Config, names, "")).rstrip() + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}")
