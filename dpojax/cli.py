"""`dpojax` command line: a thin shell over dpojax.trainer.loop.

    dpojax train CONFIG.yaml [section.key=value ...]
    dpojax eval CONFIG.yaml [section.key=value ...]
    dpojax export RUN_DIR_OR_CHECKPOINT OUT_DIR [--merged]
    dpojax generate MODEL_OR_RUN --prompts FILE.jsonl [--max-new-tokens N --temperature T --top-k K --top-p P
                    --seed S --stop STR --output OUT.jsonl]
    dpojax compile CONFIG.yaml --topology v5p:2x2x1 [--search-batch] [--model-config config.json] [key=value ...]

A user mistake (config, data, model files) prints one paragraph and exits 2; never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from dpojax import generate_cli
from dpojax.errors import UserError


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
    generate_cli.add_arguments(s)
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
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("absl", "jax._src", "orbax", "datasets", "httpx", "filelock", "gcsfs", "fsspec"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        if args.command == "compile":  # no local accelerator needed: compile on the host CPU for the topology
            os.environ.setdefault("JAX_PLATFORMS", "cpu")
            from dpojax import aot

            return aot.compile_from_cli(args.config, args.topology, args.overrides, slices=args.slices,
                                        search_batch=args.search_batch, model_config=args.model_config)
        if args.command == "generate":
            return generate_cli.generate_from_cli(args) or 0
        from dpojax.trainer import loop

        if args.command == "train":
            loop.train_from_cli(args.config, args.overrides)
        elif args.command == "eval":
            loop.eval_from_cli(args.config, args.overrides)
        else:
            loop.export_from_cli(args.source, args.out_dir, merged=args.merged)
    except UserError as e:
        print(f"dpojax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dpojax {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
