"""Shared set-up for end-to-end comparisons with TRL 1.16: a tiny policy/reference pair, a tokenizer,
preference files, a dpojax config for them, and a TRL DPOTrainer over the same inputs."""

from __future__ import annotations

import json
from pathlib import Path

from tiny_models import make_tiny_checkpoint
from tiny_tokenizer import load_tiny_tokenizer, make_pref_rows, make_tokenizer

from dpojax.losses import TRL_METRICS  # noqa: F401 - the one list of TRL's metric names, for the parity tests


def make_assets(root: Path, *, family: str = "llama", n_rows: int = 16) -> dict[str, Path]:
    """Policy A (seed 0), a different reference B (seed 1), a tokenizer and data files in every format."""
    root = Path(root)
    tok = make_tokenizer(root / "tok")
    out = {
        "tok": tok,
        "policy": make_tiny_checkpoint(root / "policy", family, seed=0),
        "ref": make_tiny_checkpoint(root / "ref", family, seed=1),
    }
    for fmt in ("standard", "conversational"):
        path = root / f"{fmt}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in make_pref_rows(n_rows, fmt, seed=3)))
        out[fmt] = path
    return out


def dpojax_overrides(assets: dict[str, Path], data: Path, out_dir: Path, **extra) -> dict:
    cfg = {
        "model": {"name_or_path": str(assets["policy"]), "tokenizer": str(assets["tok"])},
        "ref_model": {"name_or_path": str(assets["ref"])},
        "data": {"train": str(data), "eval": str(data), "max_length": 48, "cache_dir": str(out_dir / "cache")},
        "output_dir": str(out_dir),
    }
    for dotted, value in extra.items():
        section, _, key = dotted.partition("__")
        if key:
            cfg.setdefault(section, {})[key] = value
        else:
            cfg[section] = value
    return cfg


def trl_trainer(assets: dict[str, Path], data: Path, out_dir: Path, *, adapter: Path | None = None, tokenizer=None,
                **dpo_args):
    """A TRL DPOTrainer on the same models, tokenizer and rows (CPU, fp32, no reporting). `tokenizer`: a loaded
    tokenizer for a real model (default: the tiny one in assets["tok"]). `adapter`: a PEFT adapter
    folder whose config and weights become the trainer's new LoRA adapter (TRL's reference is then the base with the
    adapters disabled; a PeftModel passed in would instead get a frozen copy of its adapter as the reference)."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    rows = [json.loads(line) for line in Path(data).read_text().splitlines()]
    ds = datasets.Dataset.from_list(rows)
    policy = AutoModelForCausalLM.from_pretrained(assets["policy"], dtype=torch.float32, attn_implementation="eager")
    ref = AutoModelForCausalLM.from_pretrained(assets["ref"], dtype=torch.float32, attn_implementation="eager")
    args = dict(
        output_dir=str(out_dir),
        report_to=[],
        max_length=48,
        beta=0.1,
        use_cpu=True,
        bf16=False,
        fp16=False,
        save_strategy="no",
        dataloader_drop_last=False,
        seed=0,
        disable_tqdm=True,
    )
    args.update(dpo_args)
    peft_config = None
    if adapter is not None:
        import peft

        peft_config, ref = peft.LoraConfig.from_pretrained(str(adapter)), None
        peft_config.inference_mode = False
    trainer = DPOTrainer(
        model=policy,
        ref_model=ref,
        args=DPOConfig(**args),
        train_dataset=ds,
        eval_dataset=ds,
        processing_class=tokenizer if tokenizer is not None else load_tiny_tokenizer(assets["tok"]),
        peft_config=peft_config,
    )
    if adapter is not None:
        from safetensors.torch import load_file

        peft.set_peft_model_state_dict(trainer.model, load_file(str(Path(adapter) / "adapter_model.safetensors")))
    return trainer


def make_unpaired_rows(n: int, fmt: str, seed: int = 3) -> list[dict]:
    """n unpaired rows (prompt, completion, label) from `make_pref_rows`: row i keeps its chosen response with label
    true unless i % 3 == 0, where it keeps the rejected one with label false (both classes, unbalanced)."""
    rows = []
    for i, row in enumerate(make_pref_rows(n, fmt, seed=seed)):
        label = i % 3 != 0
        rows.append({"prompt": row["prompt"], "completion": row["chosen" if label else "rejected"], "label": label})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return Path(path)


def kto_trainer(assets: dict[str, Path], data: Path, out_dir: Path, *, adapter: Path | None = None, **kto_args):
    """A TRL KTOTrainer on the same models, tokenizer and rows as `trl_trainer` (CPU, fp32, no reporting)."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM
    from trl import KTOConfig, KTOTrainer

    torch.manual_seed(0)
    rows = [json.loads(line) for line in Path(data).read_text().splitlines()]
    ds = datasets.Dataset.from_list(rows)
    policy = AutoModelForCausalLM.from_pretrained(assets["policy"], dtype=torch.float32, attn_implementation="eager")
    ref = AutoModelForCausalLM.from_pretrained(assets["ref"], dtype=torch.float32, attn_implementation="eager")
    args = dict(output_dir=str(out_dir), report_to=[], max_length=48, beta=0.1, use_cpu=True, bf16=False, fp16=False,
                save_strategy="no", dataloader_drop_last=False, seed=0, disable_tqdm=True)
    args.update(kto_args)
    peft_config = None
    if adapter is not None:
        import peft

        peft_config, ref = peft.LoraConfig.from_pretrained(str(adapter)), None
        peft_config.inference_mode = False
    trainer = KTOTrainer(model=policy, ref_model=ref, args=KTOConfig(**args), train_dataset=ds, eval_dataset=ds,
                         processing_class=load_tiny_tokenizer(assets["tok"]), peft_config=peft_config)
    if adapter is not None:
        from safetensors.torch import load_file

        peft.set_peft_model_state_dict(trainer.model, load_file(str(Path(adapter) / "adapter_model.safetensors")))
    return trainer


def reward_overrides(model: Path, assets: dict[str, Path], data: Path, out_dir: Path, **extra) -> dict:
    """A dpojax `task: reward` config of a reward model (a *ForSequenceClassification folder or a causal LM) on the
    harness's tokenizer and a data file; `extra` as `dpojax_overrides` takes it."""
    cfg = dpojax_overrides(assets, data, out_dir, **extra)
    cfg.pop("ref_model")
    cfg["task"] = "reward"
    cfg["model"]["name_or_path"] = str(model)
    return cfg


def trl_reward_trainer(model: Path, assets: dict[str, Path], data: Path, out_dir: Path, *, adapter: Path | None = None,
                       **reward_args):
    """A TRL RewardTrainer on the reward model folder `model` (CPU, fp32, no reporting), the tiny tokenizer and the
    rows of `data` (train and eval). `adapter`: a PEFT LoRA folder whose config and weights become the trainer's
    adapter, as PEFT's SEQ_CLS task (the score head trained whole: modules_to_save)."""
    import datasets
    import torch
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    torch.manual_seed(0)
    rows = [json.loads(line) for line in Path(data).read_text().splitlines()]
    ds = datasets.Dataset.from_list(rows)
    rm = AutoModelForSequenceClassification.from_pretrained(model, dtype=torch.float32, attn_implementation="eager")
    args = dict(output_dir=str(out_dir), report_to=[], max_length=48, use_cpu=True, bf16=False, fp16=False,
                save_strategy="no", dataloader_drop_last=False, seed=0, disable_tqdm=True,
                gradient_checkpointing=False)
    args.update(reward_args)
    peft_config = None
    if adapter is not None:
        import peft

        peft_config = peft.LoraConfig.from_pretrained(str(adapter))
        peft_config.inference_mode, peft_config.task_type = False, "SEQ_CLS"
    trainer = RewardTrainer(model=rm, args=RewardConfig(**args), train_dataset=ds, eval_dataset=ds,
                            processing_class=load_tiny_tokenizer(assets["tok"]), peft_config=peft_config)
    if adapter is not None:
        from safetensors.torch import load_file

        state = load_file(str(Path(adapter) / "adapter_model.safetensors"))
        state.setdefault("base_model.model.score.weight", rm.score.weight.detach().clone())  # the head: unchanged
        peft.set_peft_model_state_dict(trainer.model, state)
    return trainer
