"""`dpojax generate MODEL_OR_RUN --prompts FILE.jsonl [...]`: completions as JSONL.

MODEL_OR_RUN is a Hugging Face folder (or hub id), a run folder (its newest checkpoint, else its `export/`), or
one checkpoint folder `RUN/checkpoints/<step>`. Each line of the prompts file is a JSON object with "prompt" (a
string, or a list of {"role", "content"} messages that goes through the chat template) or "messages" (the
same list). Each output line: {"prompt": as given, "completion": text, "tokens": [generated ids],
"finish_reason": "eos" | "stop" | "length"}, in the order of the prompts.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpojax.errors import DataError, UserError

if TYPE_CHECKING:
    from dpojax.generate import Completion, Generator

log = logging.getLogger(__name__)


def add_arguments(s) -> None:
    s.add_argument("source", help="HF model folder or hub id, a run folder (output_dir), or one checkpoint folder")
    s.add_argument("--prompts", required=True, help="JSONL file: one {\"prompt\": ...} or {\"messages\": [...]} a line")
    s.add_argument("--output", help="JSONL file to write (default: standard output)")
    s.add_argument("--max-new-tokens", type=int, default=128, help="most tokens generated per prompt (default 128)")
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    s.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    s.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (1 = off)")
    s.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    s.add_argument("--stop", action="append", default=[], help="stop string (repeatable); cut before it")
    s.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (default 8)")
    s.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")


def read_prompts(path: str | Path) -> list[Any]:
    """The "prompt" (or "messages") of each line of a JSONL file; one clear error per bad line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--prompts: no such file '{path}'.")
    prompts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {n} is not JSON ({e.msg}).") from None
        prompt = row.get("prompt", row.get("messages")) if isinstance(row, dict) else None
        ok = isinstance(prompt, str) and prompt != "" or (
            isinstance(prompt, list) and prompt and all(isinstance(m, dict) and "role" in m for m in prompt))
        if not ok:
            raise DataError(f"{path}: line {n} needs a non-empty \"prompt\" (text, or a list of {{\"role\", "
                            f"\"content\"}} messages) or \"messages\" field.")
        prompts.append(prompt)
    if not prompts:
        raise DataError(f"{path}: no prompts (the file is empty); write one JSON object per line.")
    return prompts


def load_generator(source: str, *, dtype: str = "float32", batch_size: int = 8) -> Generator:
    """A Generator for a HF folder/hub id, a run folder or a checkpoint folder (module docstring); the batch is
    split over every local device (a data-parallel mesh), the parameters replicated."""
    import jax.numpy as jnp

    from dpojax.models.hf import load_pretrained, resolve_model_dir
    from dpojax.sharding import Sharder, make_mesh
    from dpojax.trainer import checkpoint as ckpt
    from dpojax.trainer.build import _import_transformers_quietly

    found = ckpt.find_checkpoint(source) if Path(source).is_dir() else None
    if found is not None:
        return _from_checkpoint(found, dtype, batch_size)
    folder = Path(source)
    if folder.is_dir() and not (folder / "config.json").is_file() and (folder / "export" / "config.json").is_file():
        folder = folder / "export"
    if folder.is_dir() and not (folder / "config.json").is_file():
        raise UserError(f"generate: '{source}' is neither a HF model folder (config.json) nor a run folder with "
                        "checkpoints/ or export/.")
    _import_transformers_quietly()
    from transformers import AutoTokenizer

    model_dir = resolve_model_dir(str(folder) if folder.is_dir() else source)
    model, cfg = load_pretrained(model_dir, dtype=getattr(jnp, dtype), sharder=Sharder(make_mesh()))
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    return _generator(model, cfg, tokenizer, model_dir, batch_size)


def _from_checkpoint(found, dtype: str, batch_size: int) -> Generator:
    from flax import nnx

    from dpojax.config import load_config
    from dpojax.trainer.build import build_models, make_sharder
    from dpojax.trainer.loop import _restore_policy

    run_dir = found.path.parent.parent
    cfg = load_config(run_dir / "config.yaml", [f"output_dir={run_dir}", f"model.dtype={dtype}"])
    models = build_models(cfg, make_sharder(cfg), policy_from_checkpoint=True, with_reference=False)
    models = _restore_policy(cfg, models, found.step)
    log.info("generating with step %d of %s", found.step, run_dir)
    model = nnx.merge(models.policy_graphdef, models.policy_params)
    return _generator(model, models.policy_cfg, models.tokenizer, models.tokenizer_dir, batch_size)


def _generator(model, cfg, tokenizer, model_dir, batch_size: int) -> Generator:
    from dpojax.data.tokenize import pad_token_id
    from dpojax.generate import Generator, eos_token_ids

    return Generator(model, cfg, tokenizer, eos_ids=eos_token_ids(model_dir, tokenizer),
                     pad_id=pad_token_id(tokenizer), batch_size=batch_size)


def output_row(prompt: Any, c: Completion) -> dict:
    return {"prompt": prompt, "completion": c.text, "tokens": c.tokens, "finish_reason": c.finish_reason}


def generate_from_cli(args) -> None:
    if args.batch_size < 1:
        raise UserError(f"generate: --batch-size must be >= 1, got {args.batch_size}.")
    from dpojax.generate import Sampling, encode_prompt

    sampling = Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p, seed=args.seed, stop=tuple(args.stop))
    prompts = read_prompts(args.prompts)
    gen = load_generator(args.source, dtype=args.dtype, batch_size=args.batch_size)
    from tqdm.auto import tqdm

    prompt_ids = [encode_prompt(gen.tokenizer, p) for p in prompts]
    gen.check_prompts(prompt_ids)
    with tqdm(total=len(prompts), desc="generate", unit="prompt", file=sys.stderr) as bar:
        completions = gen.generate_ids(prompt_ids, sampling, progress=bar.update)
    lines = "".join(json.dumps(output_row(p, c), ensure_ascii=False) + "\n" for p, c in zip(prompts, completions,
                                                                                             strict=True))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(lines, encoding="utf-8")
        reasons = {r: sum(c.finish_reason == r for c in completions) for r in ("eos", "stop", "length")}
        print(f"wrote {len(completions)} completions to {args.output} "
              f"({', '.join(f'{k}: {v}' for k, v in reasons.items() if v)})", file=sys.stderr)
    else:
        sys.stdout.write(lines)
