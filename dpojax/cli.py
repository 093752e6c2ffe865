"""`dpojax` command line: every entry point, a thin shell over the library (dpojax.trainer, dpojax.aot,
dpojax.generate) that parses arguments, calls it and reports.

    dpojax train CONFIG.yaml [section.key=value ...]
    dpojax eval CONFIG.yaml [section.key=value ...]
    dpojax export RUN_DIR_OR_CHECKPOINT OUT_DIR [--merged]
    dpojax generate MODEL_OR_RUN --prompts FILE.jsonl [--max-new-tokens N --temperature T --top-k K --top-p P
                    --seed S --stop STR --output OUT.jsonl]
    dpojax compile CONFIG.yaml --topology v5p:2x2x1 [--search-batch] [--model-config config.json] [key=value ...]

A user mistake (config, data, model files) prints one paragraph and exits 2; never a traceback.

`dpojax generate`: MODEL_OR_RUN is a Hugging Face folder (or hub id), a run folder (its newest checkpoint, else its
`export/`), or one checkpoint folder `RUN/checkpoints/<step>`. Each line of the prompts file is a JSON object with
"prompt" (a string, or a list of {"role", "content"} messages that goes through the chat template) or "messages"
(the same list). Each output line: {"prompt": as given, "completion": text, "tokens": [generated ids],
"finish_reason": "eos" | "stop" | "length"}, in the order of the prompts.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from tqdm.auto import tqdm

from dpojax import aot, paths, supervise
from dpojax.config import Config, load_config
from dpojax.data.tokenize import pad_token_id
from dpojax.errors import DataError, StorageError, UserError
from dpojax.generate import Completion, Generator, Sampling, encode_prompt, eos_token_ids
from dpojax.models.hf import load_pretrained, resolve_model_dir
from dpojax.sharding import Sharder, make_mesh
from dpojax.trainer import checkpoint as ckpt
from dpojax.trainer.build import DTYPES, build_models, import_transformers_quietly, make_sharder
from dpojax.trainer.evaluation import evaluate, restore_policy_params
from dpojax.trainer.export import export_checkpoint
from dpojax.trainer.loop import train

log = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dpojax", description="DPO and preference losses in JAX for HF causal LMs.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, text in (("train", "train a policy"), ("eval", "evaluate a policy against its reference")):
        s = sub.add_parser(name, help=text)
        s.add_argument("config", help="YAML config file")
        s.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. optim.lr=1e-5")
    s = sub.add_parser("export", help="write a Hugging Face folder from a run folder or checkpoint")
    s.add_argument("source", help="run folder (output_dir) or one checkpoint folder")
    s.add_argument("out_dir", help="folder to write config.json, *.safetensors and tokenizer files to")
    s.add_argument("--merged", action="store_true",
                   help="LoRA runs: write the base with the adapters merged in (default: a PEFT adapter folder)")
    s = sub.add_parser("generate", help="complete prompts (JSONL) with a HF model, a run or a checkpoint")
    add_generate_arguments(s)
    s = sub.add_parser("compile", help="AOT-compile the train step for a TPU topology: memory, FLOPs, fits?")
    s.add_argument("config", help="YAML config file (the model needs only its config.json)")
    s.add_argument("--topology", required=True, help="TPU topology, e.g. v5p:2x2x1, v5e:2x4 or v5p-8")
    s.add_argument("--slices", type=int, default=1, help="number of such slices (multi-slice over DCN)")
    s.add_argument("--search-batch", action="store_true", help="also find the largest batch that fits")
    s.add_argument("--model-config", help="a local config.json of the policy (no hub access needed)")
    s.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
        args.overrides += extra  # overrides after an option: compile CONFIG --topology T key=value
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    console = supervise.console()
    if console is not None:  # a supervised worker: Python output to the console, native output to the log only
        sys.stderr = console
    _log_to_stderr()
    if console is not None:
        logging.getLogger().addHandler(logging.StreamHandler(sys.__stderr__))  # Python logs in the log file too
    for name in ("absl", "jax._src", "orbax", "datasets", "httpx", "filelock", "gcsfs", "fsspec"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return _command(args, argv if argv is not None else sys.argv[1:])
    except UserError as e:
        _close_progress_bars()  # the message on a line of its own, not after a bar the error left open
        print(f"dpojax {args.command}: error: {e}", file=sys.stderr)
        if isinstance(e, StorageError) and argv is None:  # the program's own command: end it now (below)
            _exit_now(2)
        return 2
    except KeyboardInterrupt:
        print(f"dpojax {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception:
        if console is None:
            raise
        traceback.print_exc(file=sys.__stderr__)  # to the log: the supervisor reports it in one line
        return 1


def _exit_now(code: int) -> None:
    """End the process without waiting for its threads: after a full disk or a store gone, the storage clients'
    threads still retry their writes (TensorStore: up to ~15 minutes) and print tracebacks as they fail."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _close_progress_bars() -> None:
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def _log_to_stderr() -> None:
    """INFO and up, as bare messages, on stderr (unless the host program set logging up). absl's first log call
    installs a bare `logging.basicConfig()` when the root logger has no handler, and orbax logs through it while
    this module's imports run: that default handler gives way to this one."""
    handlers = logging.getLogger().handlers
    absl_default = len(handlers) == 1 and type(handlers[0]) is logging.StreamHandler and \
        handlers[0].stream in (sys.stderr, sys.__stderr__) and \
        getattr(handlers[0].formatter, "_fmt", None) == logging.BASIC_FORMAT
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=absl_default)
    for handler in logging.getLogger().handlers:
        if getattr(handler, "stream", None) is sys.stderr and _quiet_library_tracebacks not in handler.filters:
            handler.addFilter(_quiet_library_tracebacks)


def _quiet_library_tracebacks(record: logging.LogRecord) -> bool:
    """Orbax logs the traceback of a failed save (a full disk...) from each of its threads, asyncio those of its
    writes left unawaited, and gcsfs that of each request out of retries, before the same error reaches the main
    thread, which reports it in one message: those records stay off the screen."""
    return not (record.exc_info and record.name.partition(".")[0] in ("absl", "orbax", "asyncio", "gcsfs"))


def _command(args, argv: list[str]) -> int:
    """Run the parsed command (`argv`, as given); its exit status."""
    if args.command == "compile":
        return compile_from_cli(args.config, args.topology, args.overrides, slices=args.slices,
                                search_batch=args.search_batch, model_config=args.model_config)
    if args.command == "generate":
        generate_from_cli(args)
    elif args.command == "train":
        return train_from_cli(args.config, args.overrides, argv)
    elif args.command == "eval":
        eval_from_cli(args.config, args.overrides)
    else:
        export_from_cli(args.source, args.out_dir, merged=args.merged)
    return 0


# --------------------------------------------------------------------------------------- train, eval, export
def use_compilation_cache(cfg: Config) -> str | None:
    """Point JAX's persistent compilation cache at `train.compilation_cache` (a process-wide setting, so the CLI does
    it, not `train`); JAX_COMPILATION_CACHE_DIR in the environment wins. Returns the folder in use, or None."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    where = cfg.train.compilation_cache
    if where is None:
        return None
    where = where if paths.is_remote(where) else os.path.expanduser(where)
    jax.config.update("jax_compilation_cache_dir", where)
    return where


def train_from_cli(config_path: str, overrides: list[str], argv: list[str] | None = None) -> int:
    """`dpojax train`; a multi-process run works in a supervised child process (`dpojax.supervise`)."""
    cfg = load_config(config_path, overrides)
    if supervise.supervised(cfg):
        return supervise.run(cfg, argv or ["train", config_path, *overrides])
    use_compilation_cache(cfg)
    try:
        train(cfg)
    except StorageError:  # its message says it all already
        raise
    except Exception as e:
        full, store = paths.no_space(e, cfg.output_dir), paths.store_failure(e, cfg.output_dir)
        if full is None and store is None:
            raise
        if store:
            raise StorageError(ckpt.store_down(store, cfg.output_dir)) from None
        raise StorageError(
            f"{full}. Nothing past the newest complete checkpoint is kept: {ckpt.describe_newest(cfg.output_dir)}. "
            "Free space there (or move the run folder and point output_dir at it), then run the same command again: "
            "it resumes from that checkpoint."
        ) from None
    return 0


def eval_from_cli(config_path: str, overrides: list[str]) -> None:
    cfg = load_config(config_path, overrides)
    use_compilation_cache(cfg)
    evaluate(cfg)


def export_from_cli(source: str, out_dir: str, merged: bool = False) -> None:
    """`dpojax export`: the newest checkpoint of a run folder (or one checkpoint folder) as a HF folder (a LoRA run:
    a PEFT adapter folder, or with `merged` the merged model; `trainer.export.export_checkpoint`)."""
    done = export_checkpoint(source, out_dir, merged=merged)
    print(f"exported step {done.step} of {done.run_dir} to {done.path}")


# ------------------------------------------------------------------------------------------------- compile
def compile_from_cli(config_path: str, topology: str, overrides: list[str], *, slices: int = 1,
                     search_batch: bool = False, model_config: str | None = None) -> int:
    """`dpojax compile`: print the report; exit 0 when the step fits, 1 when it does not."""
    if "JAX_PLATFORMS" not in os.environ:  # no local accelerator needed: compile on the host CPU for the topology
        os.environ["JAX_PLATFORMS"] = "cpu"
        jax.config.update("jax_platforms", "cpu")  # jax was imported (with this module) before the line above
    cfg = load_config(config_path, overrides)
    report = aot.compile_for_topology(cfg, topology, slices=slices, model_config=model_config)
    print(report.format())
    if search_batch:
        best, _ = aot.largest_batch(cfg, topology, slices=slices, model_config=model_config)
        print(f"largest batch       {best} pairs without accumulation" if best else "largest batch       none fits")
    return 0 if report.fits else 1


# ------------------------------------------------------------------------------------------------ generate
def add_generate_arguments(s) -> None:
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
    s.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="compute dtype")


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
    found = ckpt.find_checkpoint(source) if Path(source).is_dir() else None
    if found is not None:
        return _from_checkpoint(found, dtype, batch_size)
    folder = Path(source)
    if folder.is_dir() and not (folder / "config.json").is_file() and (folder / "export" / "config.json").is_file():
        folder = folder / "export"
    if folder.is_dir() and not (folder / "config.json").is_file():
        raise UserError(f"generate: '{source}' is neither a HF model folder (config.json) nor a run folder with "
                        "checkpoints/ or export/.")
    import_transformers_quietly()
    from transformers import AutoTokenizer  # heavy; imported after the quiet set-up above, only for a HF folder

    model_dir = resolve_model_dir(str(folder) if folder.is_dir() else source)
    model, cfg = load_pretrained(model_dir, dtype=getattr(jnp, dtype), sharder=Sharder(make_mesh()))
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    return _generator(model, cfg, tokenizer, model_dir, batch_size)


def _from_checkpoint(found, dtype: str, batch_size: int) -> Generator:
    run_dir = found.path.parent.parent
    cfg = load_config(run_dir / "config.yaml", [f"output_dir={run_dir}", f"model.dtype={dtype}"])
    models = build_models(cfg, make_sharder(cfg), policy_from_checkpoint=True, with_reference=False)
    params = restore_policy_params(cfg, models, found.step)
    log.info("generating with step %d of %s", found.step, run_dir)
    model = nnx.merge(models.policy_graphdef, params)
    return _generator(model, models.policy_cfg, models.tokenizer, models.tokenizer_dir, batch_size)


def _generator(model, cfg, tokenizer, model_dir, batch_size: int) -> Generator:
    return Generator(model, cfg, tokenizer, eos_ids=eos_token_ids(model_dir, tokenizer),
                     pad_id=pad_token_id(tokenizer), batch_size=batch_size)


def output_row(prompt: Any, c: Completion) -> dict:
    return {"prompt": prompt, "completion": c.text, "tokens": c.tokens, "finish_reason": c.finish_reason}


def generate_from_cli(args) -> None:
    if args.batch_size < 1:
        raise UserError(f"generate: --batch-size must be >= 1, got {args.batch_size}.")
    sampling = Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p, seed=args.seed, stop=tuple(args.stop))
    prompts = read_prompts(args.prompts)
    gen = load_generator(args.source, dtype=args.dtype, batch_size=args.batch_size)
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


if __name__ == "__main__":
    sys.exit(main())
