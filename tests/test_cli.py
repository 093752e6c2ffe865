"""The `dpojax` CLI end to end: the demo config learns (held-out reward accuracy > 0.9), the run folder holds
what the contract promises, `eval`/`export` reuse the run, and user mistakes give one clear line and exit 2."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from tiny_models import make_tiny_checkpoint
from tiny_tokenizer import make_tokenizer

from dpojax.cli import main
from dpojax.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"


def _demo_args(out: Path, *extra: str) -> list[str]:
    return [str(DEMO), f"output_dir={out}", f"data.cache_dir={out}/cache", *extra]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """A short demo run (40 steps, eval every 20) shared by the tests below."""
    out = tmp_path_factory.mktemp("demo") / "run"
    args = _demo_args(
        out, "model.name_or_path=" + str(REPO / "configs/demo/model"), "train.steps=40", "train.eval_every=20",
        "checkpoint.every=20", "train.eval_samples=2", "train.eval_sample_tokens=8",
        "data.train=" + str(REPO / "configs/demo/train.jsonl"),
        "data.eval=" + str(REPO / "configs/demo/eval.jsonl"),
    )
    assert main(["train", *args]) == 0
    return out


def test_demo_learns_held_out_preference(demo_run):
    records = read_metrics(demo_run / "metrics.jsonl")
    evals = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [20, 40]
    assert evals[-1]["rewards/accuracies"] >= 0.9, evals[-1]
    assert evals[-1]["rewards/margins"] > 0
    train = [r for r in records if r["split"] == "train"]
    assert train[0]["loss"] > train[-1]["loss"]
    for key in ("learning_rate", "grad_norm", "tokens_per_second", "logits/chosen", "logps/rejected"):
        assert key in train[-1]


def test_run_folder_contract(demo_run):
    for name in ("config.yaml", "metrics.jsonl", "training_curves.png", "export/config.json",
                 "export/model.safetensors"):
        assert (demo_run / name).is_file(), name
    assert sorted(p.name for p in (demo_run / "checkpoints").iterdir() if p.name.isdigit()) == ["20", "40"]


def test_eval_and_export_from_the_run(demo_run, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    last_eval = [r for r in read_metrics(demo_run / "metrics.jsonl") if r["split"] == "eval"][-1]
    assert main(["eval", str(demo_run / "config.yaml")]) == 0
    again = read_metrics(demo_run / "metrics.jsonl")[-1]
    assert again["split"] == "eval" and again["step"] == 40
    np.testing.assert_allclose(again["loss"], last_eval["loss"], rtol=1e-5)

    out = tmp_path / "hf"
    assert main(["export", str(demo_run), str(out)]) == 0
    ours = AutoModelForCausalLM.from_pretrained(out)
    final = AutoModelForCausalLM.from_pretrained(demo_run / "export")
    ids = torch.tensor([[1, 5, 9, 12, 30]])
    torch.testing.assert_close(ours(ids).logits, final(ids).logits)


def test_samples_and_generate_from_the_run(demo_run, tmp_path, capsys):
    rows = [json.loads(line) for line in (demo_run / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [20, 20, 40, 40]
    assert set(rows[0]) == {"step", "prompt", "policy", "reference", "chosen"}
    assert rows[0]["reference"] == rows[2]["reference"] and rows[0]["chosen"] and rows[0]["prompt"]
    prompts = _write(tmp_path / "prompts.jsonl", [{"prompt": rows[0]["prompt"]}, {"prompt": "a movie"}])
    runs = {}
    for source in (demo_run, demo_run / "export"):  # the newest checkpoint, then the HF export of the same weights
        out = tmp_path / f"{source.name}.jsonl"
        assert main(["generate", str(source), "--prompts", str(prompts), "--max-new-tokens", "8",
                     "--output", str(out)]) == 0
        runs[source.name] = [json.loads(line) for line in out.read_text().splitlines()]
    got = runs["run"]
    assert got == runs["export"] and [set(r) for r in got] == [{"prompt", "completion", "tokens", "finish_reason"}] * 2
    assert got[0]["prompt"] == rows[0]["prompt"] and all(r["finish_reason"] in ("eos", "length") for r in got)
    assert all(1 <= len(r["tokens"]) <= 8 for r in got)
    # user errors: one line, exit 2
    for bad_file, message in ((_write(tmp_path / "empty.jsonl", []), "no prompts"),
                              (_write(tmp_path / "long.jsonl", [{"prompt": "good " * 200}]), "prompt 0 has")):
        capsys.readouterr()
        assert main(["generate", str(demo_run / "export"), "--prompts", str(bad_file)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("dpojax generate: error: ") and message in err and err.count("\n") == 1, err
    with pytest.raises(SystemExit) as e:
        main(["generate", str(demo_run), "--prompts", str(prompts), "--temprature", "1"])
    assert e.value.code == 2 and "--temprature" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- user errors
@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    tok = make_tokenizer(root / "tok")
    nochat = make_tokenizer(root / "nochat", chat_template=False)
    rows = [{"prompt": "the sky is", "chosen": " blue.", "rejected": " red."}] * 8
    good = root / "good.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in rows))
    small_vocab = make_tiny_checkpoint(root / "small", vocab_size=64)
    policy = make_tiny_checkpoint(root / "policy", vocab_size=128)
    ref = make_tiny_checkpoint(root / "ref", vocab_size=160, seed=1)
    return {"root": root, "tok": tok, "nochat": nochat, "good": good, "small": small_vocab, "policy": policy,
            "ref": ref}


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run(capsys, bad, *overrides: str, data: Path | None = None, tok: Path | None = None) -> str:
    args = [
        "train", str(DEMO), f"output_dir={bad['root']}/out", f"data.cache_dir={bad['root']}/cache",
        f"model.name_or_path={bad['policy']}", f"model.tokenizer={tok or bad['tok']}", "model.init=pretrained",
        f"data.train={data or bad['good']}", "data.eval=null", "train.batch_size=8", "train.steps=1",
        *overrides,
    ]
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert err.startswith("dpojax train: error: ")
    return err


def test_error_missing_column(capsys, bad):
    path = _write(bad["root"] / "nocol.jsonl", [{"prompt": "the sky is", "chosen": " blue."}] * 8)
    err = _run(capsys, bad, data=path)
    assert "nocol.jsonl" in err and "rejected" in err


def test_error_wrong_type(capsys, bad):
    rows = [{"prompt": "the sky is", "chosen": " blue.", "rejected": " red."}] * 8
    rows[3] = {"prompt": "the sky is", "chosen": 7, "rejected": " red."}
    err = _run(capsys, bad, data=_write(bad["root"] / "type.jsonl", rows))
    assert "type.jsonl" in err and "row 3" in err and "chosen" in err


def test_error_empty_completion(capsys, bad):
    rows = [{"prompt": "the sky is", "chosen": " blue.", "rejected": " red."}] * 8
    rows[5] = {"prompt": "the sky is", "chosen": " blue.", "rejected": ""}
    err = _run(capsys, bad, data=_write(bad["root"] / "empty.jsonl", rows))
    assert "row 5" in err and "rejected" in err


def test_no_pytorch_warning_without_torch(bad):
    """dpojax uses transformers for configs and tokenizers only: without torch installed (as in `make demo`'s venv)
    transformers' "PyTorch was not found" warning must not be the first thing a user reads."""
    import subprocess
    import sys

    hide_torch = "import sys; sys.modules['torch'] = None\nfrom dpojax.cli import main\nsys.exit(main(sys.argv[1:]))"
    args = ["train", str(DEMO), f"output_dir={bad['root']}/quiet", f"model.name_or_path={bad['policy']}",
            f"model.tokenizer={bad['tok']}", "model.init=pretrained", f"data.train={bad['root']}/missing.jsonl",
            "data.eval=null", "train.batch_size=8", "train.steps=1"]  # fails after the tokenizer and model load
    env = {**__import__("os").environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", hide_torch, *args], capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "PyTorch was not found" not in result.stderr and "missing.jsonl: data file not found" in result.stderr


def test_error_no_chat_template(capsys, bad):
    conv = [
        {
            "prompt": [{"role": "user", "content": "what color is the sky?"}],
            "chosen": [{"role": "assistant", "content": "blue."}],
            "rejected": [{"role": "assistant", "content": "red."}],
        }
    ] * 8
    err = _run(capsys, bad, data=_write(bad["root"] / "conv.jsonl", conv), tok=bad["nochat"])
    assert "chat template" in err


def test_error_tokenizer_larger_than_model_vocab(capsys, bad):
    err = _run(capsys, bad, f"model.name_or_path={bad['small']}")
    assert "vocab" in err and "64" in err


def test_error_policy_reference_vocab_mismatch(capsys, bad):
    err = _run(capsys, bad, f"ref_model.name_or_path={bad['ref']}")
    assert "reference" in err and "160" in err and "128" in err


def test_error_unknown_loss(capsys, bad):
    err = _run(capsys, bad, "loss.type=sigmod")
    assert "sigmod" in err and "sigmoid" in err


def test_error_batch_not_divisible(capsys, bad):
    err = _run(capsys, bad, "train.batch_size=12")  # 8 data-parallel devices in tests
    assert "batch_size" in err and "8" in err


def test_error_micro_batch_not_dividing(capsys, bad):
    err = _run(capsys, bad, "train.micro_batch_size=3")
    assert "micro_batch_size" in err


def test_error_unknown_key_suggests(capsys, bad):
    err = _run(capsys, bad, "optim.lrr=1e-5")
    assert "optim.lrr" in err and "optim.lr" in err


def test_error_bin_checkpoint_refused(capsys, bad):
    folder = bad["root"] / "pickled"
    folder.mkdir(exist_ok=True)
    shutil.copy(bad["policy"] / "config.json", folder / "config.json")
    (folder / "pytorch_model.bin").write_bytes(b"not read")
    err = _run(capsys, bad, f"model.name_or_path={folder}")
    assert "safetensors" in err


def test_identical_pairs_and_long_prompts_are_counted(capsys, bad, caplog):
    """chosen == rejected: kept with a warning and a count; a prompt filling max_length: dropped and counted."""
    rows = [{"prompt": "the sky is", "chosen": " blue.", "rejected": " red."}] * 8
    rows += [{"prompt": "the sky is", "chosen": " blue.", "rejected": " blue."}] * 2
    rows += [{"prompt": "the big cat likes fish in the sea " * 4, "chosen": " yes.", "rejected": " no."}] * 3
    path = _write(bad["root"] / "mixed.jsonl", rows)
    with caplog.at_level(logging.WARNING):
        code = main([
            "train", str(DEMO), f"output_dir={bad['root']}/mixed", f"data.cache_dir={bad['root']}/cache",
            f"model.name_or_path={bad['policy']}", f"model.tokenizer={bad['tok']}", "model.init=pretrained",
            f"data.train={path}", "data.eval=null", "train.batch_size=8", "train.steps=1", "data.max_length=24",
        ])
    assert code == 0
    text = caplog.text
    assert "2 row(s) have chosen == rejected" in text
    assert "dropped 3 row(s)" in text
