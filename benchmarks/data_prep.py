"""Tokenization throughput: dpojax's data preparation (validate, normalize, tokenize with the batched fast tokenizer
on `num_proc` workers: threads up to 2, processes beyond; write the token store) against TRL 1.16's own
(`DPOTrainer._prepare_dataset`: `datasets.map` of its per-row tokenizer, at its default `dataset_num_proc`), on the
same synthetic rows, the same tokenizer and the same CPU, one after the other.

Data: UltraFeedback-shaped chat rows (a ~150-token user prompt, 4 responses of ~250 tokens; TRL tokenizes pairs,
so both tokenize the pair best vs worst, and dpojax also the whole 4-response ranking) and short chat pairs
(~20-token prompt, ~30-token responses).

    python -m benchmarks.data_prep --rows 40000 --short-rows 100000 [--tokenizer DIR] [--num-proc 2] [--repeats 2]

(~10 minutes on a quiet 2-core machine, about half of it TRL's.)

Wall-clock rows/s depend on what else runs on the machine (and on a loaded one a 2-thread process gets a larger
share than TRL's one thread); rows per CPU-second (this process and its worker processes, user + system) much
less so, and they give the single-core ratio. dpojax runs at 1 and `--num-proc`
processes, TRL at its default (`dataset_num_proc` None: one process).

The tokenizer defaults to SmolLM2-135M-Instruct's (a 49k BPE vocabulary with a chat template), as converted in
~/.cache/dpojax by `tests/test_smollm2.py`. Prints one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import tempfile
import time
import types
from pathlib import Path

from benchmarks import harness  # sets the benchmark environment first
from dpojax.data import tokenize_rows  # noqa: E402 - after the environment set-up above

DEFAULT_TOKENIZER = Path.home() / ".cache" / "dpojax" / "smollm2-135m-instruct"
SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "ta", "shi", "po", "ve", "dra", "qua", "ex", "ion", "ment", "er"]


def _words(rng: random.Random, n: int) -> str:
    return " ".join("".join(rng.choices(SYLLABLES, k=rng.randint(1, 3))) for _ in range(n))


def chat_rows(n: int, prompt_words: int, response_words: int, responses: int, seed: int = 0) -> list[dict]:
    """Synthetic chat rows (prompt, responses best first); about 2.2 tokens per word with SmolLM2's BPE."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = [{"role": "user", "content": _words(rng, prompt_words)}]
        out.append({"prompt": prompt, "responses": [[{"role": "assistant", "content": _words(rng, response_words)}]
                                                    for _ in range(responses)]})
    return out


def as_pairs(rows: list[dict]) -> list[dict]:
    return [{"prompt": r["prompt"], "chosen": r["responses"][0], "rejected": r["responses"][-1]} for r in rows]


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the tokenizer workers), user + system."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def dpojax_prep(rows: list[dict], tok, num_proc: int) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds) of `tokenize_rows` (a fresh cache folder: nothing reused), and its tokens."""
    with tempfile.TemporaryDirectory() as cache:
        t0, c0 = time.perf_counter(), cpu_seconds()
        data = tokenize_rows(rows, tok, max_length=None, cache_dir=cache, num_proc=num_proc)
        seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
        tokens = int(data.lengths_MxK.sum())
    return seconds, cpu, tokens


def trl_prep(rows: list[dict], tok, num_proc: int | None) -> tuple[float, float]:
    """Seconds of TRL 1.16's DPOTrainer._prepare_dataset on a datasets.Dataset of the pairs (built outside)."""
    import datasets  # the reference's own input type
    from trl import DPOConfig, DPOTrainer  # the reference implementation

    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(output_dir=out, max_length=None, dataset_num_proc=num_proc, report_to=[], use_cpu=True)
        dataset = datasets.Dataset.from_list(rows)
        trainer = types.SimpleNamespace(_tokenizer=tok)  # what _prepare_dataset reads of the trainer
        t0, c0 = time.perf_counter(), cpu_seconds()
        prepared = DPOTrainer._prepare_dataset(trainer, dataset, tok, args, "train")
        seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    assert len(prepared) == len(rows)
    return seconds, cpu


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.data_prep")
    ap.add_argument("--rows", type=int, default=100_000, help="UltraFeedback-shaped rows")
    ap.add_argument("--short-rows", type=int, default=100_000, help="short chat pairs")
    ap.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER))
    ap.add_argument("--num-proc", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    from transformers import AutoTokenizer  # the tokenizer both sides use

    datasets_log = __import__("datasets").logging
    datasets_log.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    sets = {"ultrafeedback-shaped pairs": as_pairs(chat_rows(args.rows, 68, 113, 4, seed=1)),
            "short chat pairs": as_pairs(chat_rows(args.short_rows, 6, 10, 2, seed=2))}
    ranked = chat_rows(args.rows, 68, 113, 4, seed=1)
    print(json.dumps({"machine": harness.machine()}))
    for name, rows in sets.items():
        for _ in range(args.repeats):  # alternated: a shared machine's load drifts
            ours = {n: dpojax_prep(rows, tok, n) for n in sorted({1, args.num_proc})}
            wall, cpu = trl_prep(rows, tok, None)
            tokens = ours[1][2]
            print(json.dumps({
                "data": name, "rows": len(rows), "tokens_per_row": round(tokens / len(rows), 1),
                "trl_rows_per_s": round(len(rows) / wall), "trl_rows_per_cpu_s": round(len(rows) / cpu),
                **{f"dpojax_num_proc_{n}_rows_per_s": round(len(rows) / w) for n, (w, _, _) in ours.items()},
                **{f"dpojax_num_proc_{n}_rows_per_cpu_s": round(len(rows) / c) for n, (_, c, _) in ours.items()},
                "ratio_per_cpu_s_num_proc_1": round(cpu / ours[1][1], 2),
                **{f"ratio_wall_num_proc_{n}": round(wall / w, 2) for n, (w, _, _) in ours.items()}}), flush=True)
    wall, cpu, tokens = dpojax_prep(ranked, tok, 1)
    print(json.dumps({"data": "ultrafeedback-shaped, 4 responses (dpojax only)", "rows": len(ranked),
                      "tokens_per_row": round(tokens / len(ranked), 1), "dpojax_num_proc_1_rows_per_s":
                      round(len(ranked) / wall), "dpojax_num_proc_1_rows_per_cpu_s": round(len(ranked) / cpu)}))

if __name__ == "__main__":
    main()
