"""Sample generations during training (`train.eval_samples: N`).

At each eval, the policy's greedy completion of the first N eval prompts is appended to `output_dir/samples.jsonl`,
one line per prompt: {"step": int, "prompt": text, "policy": text, "reference": text | null, "chosen": text}.
`prompt` is the tokenized prompt decoded back (chat template included), `chosen` the preferred response. The
reference's completion is generated once (greedy decoding of fixed weights is deterministic) from the reference
weights; it is null, with a note in the log and the summary, when the loss is reference-free or the reference
log-probs are precomputed (no reference weights are loaded). The end-of-run summary shows the last samples of two
prompts, reference and policy side by side.
"""

from __future__ import annotations

import json
import logging
import textwrap
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from dpojax import paths
from dpojax.data.tokenize import TokenizedData, pad_token_id
from dpojax.generate import Generator, Sampling, eos_token_ids
from dpojax.losses import reference_free

log = logging.getLogger("dpojax")
COLUMN = 48  # characters per column of the side-by-side summary


class Samples:
    """Writes greedy samples of the first `cfg.train.eval_samples` eval prompts at each call (module docstring)."""

    def __init__(self, cfg, models, eval_data: TokenizedData, out_dir: Path):
        self.models = models
        # appended on local disks, rewritten whole on object storage (dpojax.paths); process 0 only
        self.out = paths.LineAppender(paths.path(out_dir) / "samples.jsonl", enabled=jax.process_index() == 0)
        tok, n = models.tokenizer, min(cfg.train.eval_samples, len(eval_data))
        self.prompts = [eval_data.prompt_ids[i].tolist() for i in range(n)]
        self.prompt_text = [tok.decode(p) for p in self.prompts]
        self.chosen = [tok.decode(eval_data.response_ids[i][0], skip_special_tokens=True) for i in range(n)]
        self.sampling = Sampling(max_new_tokens=cfg.train.eval_sample_tokens)
        self.kw = dict(eos_ids=eos_token_ids(models.tokenizer_dir, tok), pad_id=pad_token_id(tok),
                       batch_size=min(8, max(n, 1)))
        self.reference: list[str | None] | None = None
        why = "the loss is reference-free" if reference_free(cfg.loss) else \
            "its log-probs are precomputed (ref_model.precompute), so no reference weights are loaded"
        self.note = "" if models.ref_graphdef is not None else f"reference samples left out: {why}"
        self.last: list[dict[str, Any]] = []

    def _complete(self, graphdef, params) -> list[str]:
        gen = Generator(nnx.merge(graphdef, params), self.models.policy_cfg, self.models.tokenizer, **self.kw)
        return [c.text for c in gen.generate_ids(self.prompts, self.sampling)]

    def __call__(self, step: int, params) -> None:
        if not self.prompts:
            return
        if self.reference is None:
            if self.models.ref_graphdef is not None:
                self.reference = self._complete(self.models.ref_graphdef, self.models.ref_params)
            else:
                self.reference = [None] * len(self.prompts)
                log.info("samples: %s", self.note)
        if self.models.lora is not None:  # LoRA: the params are adapters on the frozen base
            params = nnx.merge_state(self.models.ref_params, params)
        policy = self._complete(self.models.policy_graphdef, params)
        self.last = [{"step": step, "prompt": p, "policy": y, "reference": r, "chosen": c}
                     for p, y, r, c in zip(self.prompt_text, policy, self.reference, self.chosen, strict=True)]
        for row in self.last:
            self.out.add(json.dumps(row, ensure_ascii=False))
        self.out.flush()

    def summary(self, count: int = 2) -> str:
        """The last samples of `count` prompts: the prompt, then reference | policy in two columns."""
        blocks = []
        for row in self.last[:count]:
            ref = "(left out)" if row["reference"] is None else row["reference"]
            left, right = (textwrap.wrap(text, COLUMN) or ["(empty)"] for text in (ref, row["policy"]))
            lines = [f"prompt: {row['prompt'].strip()}", f"{'reference':<{COLUMN}} | policy (step {row['step']})",
                     f"{'-' * COLUMN}-+-{'-' * COLUMN}"]
            lines += [f"{a:<{COLUMN}} | {b}" for a, b in zip(left + [""] * (len(right) - len(left)),
                                                             right + [""] * (len(left) - len(right)), strict=True)]
            blocks.append("\n".join(lines))
        tail = f"\n({self.note})" if self.note else ""
        return "\n\n".join(blocks) + tail + f"\nsamples: {self.out.path}"


def make_samples(cfg, models, eval_data: TokenizedData | None, out_dir: Path) -> Samples | None:
    """The Samples writer when `train.eval_samples` > 0 and there is an eval set (single-process runs)."""
    if not cfg.train.eval_samples or eval_data is None:
        return None
    if jax.process_count() > 1:
        log.warning("train.eval_samples: sample generation runs in single-process runs only; left out")
        return None
    return Samples(cfg, models, eval_data, out_dir)
