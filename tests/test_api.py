"""The public Python API: `dpojax.__all__` is exactly what docs/python-api.md documents, `import dpojax` stays
cheap, that page's first snippet runs, and losses defined outside the package train (from Python and via `loss.import`)
with the same inputs and metrics as the built-in ones; a bad one fails with one line naming it."""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from trl_harness import dpojax_overrides, make_assets

import dpojax
from dpojax.cli import main
from dpojax.losses import core
from dpojax.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]


API_PAGE = REPO / "docs" / "python-api.md"


def _api_page() -> str:
    return API_PAGE.read_text()


def _names_section() -> str:
    """The "Public names" section of docs/python-api.md: one "- `name(...)`: text" line per public name."""
    return _api_page().split("\n## Public names\n", 1)[1].split("\n## ", 1)[0]


@pytest.fixture
def user_losses():
    """Whatever a test registers (and the user modules it imports) is gone afterwards."""
    before = dict(core.LOSSES)
    yield
    core.LOSSES.clear()
    core.LOSSES.update(before)
    core._validated.cache_clear()
    for name in [m for m in sys.modules if m.startswith("dpojax_user_losses") or m == "my_losses"]:
        del sys.modules[name]


# ------------------------------------------------------------------------------------------------ names
def test_all_is_exactly_the_documented_names():
    items = [line for line in _names_section().splitlines() if line.startswith("- `")]
    documented = set()
    for line in items:  # "- `a(...)`, `B`: text": the names before the first ': ' are the ones documented
        head = line[2:].split("`: ", 1)[0] + "`"
        documented.update(re.findall(r"`([A-Za-z_]\w*)", head))
    assert documented == set(dpojax.__all__)
    assert len(dpojax.__all__) == len(set(dpojax.__all__))
    namespace: dict = {}
    exec(f"from dpojax import {', '.join(dpojax.__all__)}", namespace)  # noqa: S102 - executes the documented snippet on purpose
    for name in dpojax.__all__:
        value = namespace[name]
        if not isinstance(value, dict):  # LOSSES is the registry (a dict); everything else says what it is
            doc = (value.__doc__ or "").strip()
            assert doc and not doc.startswith(f"{name}("), f"{name} has no docstring of its own"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        dpojax.nope  # noqa: B018 - the access itself must raise


def test_import_is_cheap_and_train_is_the_function():
    out = subprocess.run([sys.executable, "-c", "import dpojax, sys; print('jax' in sys.modules)"],
                         capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "False"  # the public names load on first use
    assert dpojax.train is dpojax.api.train  # the public function, not a subpackage


def test_api_page_snippet_runs(monkeypatch):
    code = re.search(r"```python\n(.*?)```", _api_page(), re.S).group(1)
    monkeypatch.chdir(REPO)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "docs/python-api.md", "exec"), {})  # noqa: S102 - executes the documented snippet on purpose
    lines = [line.split() for line in out.getvalue().splitlines()]
    assert [int(step) for step, _ in lines] == [1, 2, 3, 4, 5]
    losses = [float(loss) for _, loss in lines]
    assert abs(losses[0] - np.log(2)) < 1e-5 and losses[-1] < losses[0]  # policy == reference at step 0


# ------------------------------------------------------------------------------------------- user losses
def _inputs(n: int, k: int, seed: int) -> dpojax.LossInputs:
    rng = np.random.default_rng(seed)
    logps = jnp.asarray(-rng.uniform(5, 30, (n, k)), jnp.float32)
    rank = np.broadcast_to(np.arange(k), (n, k)).copy()
    rank[0, 1] = 0  # a tie between the two best responses of prompt 0
    return dpojax.LossInputs(logps_NxK=logps, ref_logps_NxK=logps + jnp.asarray(rng.normal(0, 2, (n, k)), jnp.float32),
                             tokens_NxK=jnp.asarray(rng.integers(3, 20, (n, k)), jnp.float32),
                             rank_NxK=jnp.asarray(rank, jnp.int32))


def _loss_cfg(loss_type: str):
    return dpojax.config_from_dict({"model": {"name_or_path": "x"}, "loss": {"type": loss_type, "beta": 0.3}}).loss


def test_pair_and_kwise_losses_from_user_code(user_losses):
    @dpojax.register_loss("user_sigmoid")
    def user_sigmoid(t, hp):
        return -jax.nn.log_sigmoid(hp.beta * (t.w.logratios - t.l.logratios))

    @dpojax.register_loss("user_listwise", kwise=True)
    def user_listwise(t, hp):  # Plackett-Luce, written from its formula (with ties: compare only strictly below)
        u = hp.beta * t.logratios_NxK
        below = (t.x.rank_NxK[:, None, :] > t.x.rank_NxK[:, :, None]) | jnp.eye(u.shape[1], dtype=bool)
        return -jnp.sum(u - jax.nn.logsumexp(jnp.where(below, u[:, None, :], -jnp.inf), axis=-1), axis=-1)

    for mine, builtin, k in (("user_sigmoid", "sigmoid", 2), ("user_listwise", "plackett_luce", 4)):
        x = _inputs(6, k, seed=k)
        got_sum, got = dpojax.preference_loss(x, _loss_cfg(mine))
        want_sum, want = dpojax.preference_loss(x, _loss_cfg(builtin))
        np.testing.assert_allclose(got_sum, want_sum, rtol=1e-6)
        assert set(got) == set(core.BASE_METRICS) - {"logits/chosen", "logits/rejected"}  # the step adds logits
        for name, (s, c) in got.items():
            np.testing.assert_allclose((s, c), want[name], rtol=1e-6, err_msg=name)
        # the same config machinery: weights, combination with another pair loss, a jitted beta as data
        hp = dpojax.LossParams.of(_loss_cfg(mine))
        fn = jax.jit(lambda beta, x=x, mine=mine, hp=hp: dpojax.preference_loss(x, _loss_cfg(mine),
                                                                               hp.replace(beta=beta))[0])
        np.testing.assert_allclose(fn(0.3), got_sum, rtol=1e-6)


def test_bad_user_losses_fail_with_one_line(user_losses):
    @dpojax.register_loss("per_response")
    def per_response(t, hp):
        return -jax.nn.log_sigmoid(hp.beta * t.logratios_NxK)  # [N, K], not [N]

    @dpojax.register_loss("int_loss")
    def int_loss(t, hp):
        return jnp.zeros(t.mask_N.shape, jnp.int32)

    x = _inputs(3, 2, seed=0)
    with pytest.raises(core.LossOutputError,
                       match=r"loss 'per_response' returned shape \(3, 2\).*shape \[N\] = \(3,\)"):
        jax.jit(lambda x: dpojax.preference_loss(x, _loss_cfg("per_response")))(x)
    with pytest.raises(core.LossOutputError, match="loss 'int_loss' returned shape .3,. and dtype int32"):
        dpojax.preference_loss(x, _loss_cfg("int_loss"))
    with pytest.raises(TypeError, match=r"unknown traits \['kwize'\]; valid traits: reference_free, kwise"):
        dpojax.register_loss("typo", kwize=True)
    with pytest.raises(ValueError, match="'sigmoid' is already registered"):
        dpojax.register_loss("sigmoid")(per_response)


USER_MODULE = '''
import jax
from dpojax import register_loss

@register_loss("test_user_margin")
def test_user_margin(t, hp):
    return -jax.nn.log_sigmoid(hp.beta * t.delta_score - 0.5)
'''


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("api"), n_rows=16)


def test_cli_trains_a_loss_from_loss_import(assets, tmp_path, user_losses, capsys):
    (tmp_path / "my_losses.py").write_text(USER_MODULE)
    out = tmp_path / "run"
    cfg = dpojax_overrides(assets, assets["standard"], out, loss={"type": "test_user_margin", "beta": 0.1},
                           train={"batch_size": 8, "steps": 2, "log_every": 1})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path), f"loss.import=[{tmp_path / 'my_losses.py'}]"]) == 0
    records = read_metrics(out / "metrics.jsonl")
    assert [r["split"] for r in records] == ["train", "train", "eval"]
    assert np.isfinite(records[-1]["loss"]) and records[-1]["rewards/accuracies"] >= 0
    assert yaml.safe_load((out / "config.yaml").read_text())["loss"]["import"] == [str(tmp_path / "my_losses.py")]
    # a module name is found in the current directory too; a failing import names the entry and the fix
    core.LOSSES.pop("test_user_margin")
    with contextlib.chdir(tmp_path):
        assert dpojax.load_config(path, ["loss.import=[my_losses]"]).loss.type == ("test_user_margin",)
        capsys.readouterr()
        assert main(["eval", str(path), "loss.import=[not_a_module_xyz]"]) == 2
    err = capsys.readouterr().err
    assert "'loss.import' entry 'not_a_module_xyz' could not be imported: no module named" in err
    assert len(err.strip().splitlines()) == 1


def test_api_reference_page_is_current():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_api", REPO / "docs" / "make_api.py")
    make_api = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_api)
    assert (REPO / "docs" / "api.md").read_text() == make_api.render(), "run: python docs/make_api.py"
