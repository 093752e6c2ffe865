"""Peak host memory of `dpojax train` start-up and first steps against the data set's size: the token store is
memory-mapped and read lazily, so the peak RSS should grow by less than the token data itself.

For each row count: a JSONL of standard pairs of one shape (`--shape long`: a 150-token prompt, two 250-token
responses, 652 stored tokens per row; `--shape short`: a 30-token prompt, two 50-token responses, 132 stored tokens
per row; word-level tokenizer: one token per word), a tiny random model, `dpojax train` for 2 steps as a child
process, twice: cold (an empty cache: read, validate, tokenize, write the store) and warm (the store exists: no
row is parsed). The peak RSS is the child's `ru_maxrss` (`os.wait4`); tokenizer worker processes are not counted
(their own peaks are below the parent's). `--repo DIR` runs another checkout's code (e.g. the main branch) for
comparison (the child runs in DIR: `python -m` imports from its working directory before PYTHONPATH).

    python -m benchmarks.data_memory --rows 10000 100000 [--shape short] [--num-proc N] [--repo /work/main]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks import harness

VOCAB = 1000
SHAPES = {"long": (150, 250), "short": (30, 50)}  # (prompt, response) words = tokens of the word-level tokenizer


def write_pairs(path: Path, n: int, shape: str = "long", seed: int = 0) -> int:
    """n pairs of one shape; returns the tokens dpojax stores per row (prompt + 2 responses + 2 EOS)."""
    prompt, response = SHAPES[shape]
    harness.word_pairs(path, n, prompt, response, VOCAB, seed)
    return prompt + 2 * (response + 1)


def peak_rss_of(cmd: list[str], env: dict, cwd: str) -> tuple[float, float, float]:
    """(peak RSS in MiB, seconds, CPU seconds) of a child process run in `cwd` (`python -m` imports from there
    first); the CPU seconds count the child alone (not its own tokenizer worker processes)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise RuntimeError(f"{cmd} failed: {proc.stderr.read().decode()[-2000:]}")
    return usage.ru_maxrss / 1024, time.perf_counter() - t0, usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.data_memory")
    ap.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="long")
    ap.add_argument("--num-proc", type=int, default=None, help="data.num_proc (default: the config's default)")
    ap.add_argument("--repo", default=str(Path(__file__).resolve().parents[1]))
    args = ap.parse_args(argv)
    env = {**os.environ, "PYTHONPATH": args.repo, "JAX_PLATFORMS": "cpu"}
    print(json.dumps({"machine": harness.machine(), "repo": args.repo, "shape": args.shape,
                      "num_proc": args.num_proc}))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = harness.synthetic_model_dir(root / "model", {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB, "hidden_size": 32,
            "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
            "max_position_embeddings": 1024, "tie_word_embeddings": False})
        for n in args.rows:
            data = root / f"pairs-{n}.jsonl"
            per_row = write_pairs(data, n, args.shape)
            cache = root / f"cache-{n}"
            for phase in ("cold", "warm"):
                cfg = {"model": {"name_or_path": str(model), "init": "random"},
                       "data": {"train": str(data), "max_length": 1024, "cache_dir": str(cache), "packing": "none",
                                **({"num_proc": args.num_proc} if args.num_proc is not None else {})},
                       "train": {"batch_size": 4, "steps": 2, "log_every": 1},
                       "output_dir": str(root / f"run-{n}-{phase}")}
                (root / "run.yaml").write_text(yaml.safe_dump(cfg))
                cmd = [sys.executable, "-m", "dpojax.cli", "train", str(root / "run.yaml")]
                rss, seconds, cpu = peak_rss_of(cmd, env, args.repo)
                print(json.dumps({"rows": n, "shape": args.shape, "phase": phase, "peak_rss_mib": round(rss),
                                  "seconds": round(seconds), "cpu_s": round(cpu), "load": round(os.getloadavg()[0], 1),
                                  "token_data_mib": round(n * per_row * 4 / 2**20),
                                  "jsonl_mib": round(data.stat().st_size / 2**20)}), flush=True)
            data.unlink()


if __name__ == "__main__":
    main()
