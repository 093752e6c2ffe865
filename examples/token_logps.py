"""What DPO changed, token by token: per-token log-probs of a trained policy and its reference on one pair.

    python examples/token_logps.py                          # ~30 s on 2 CPU cores: train 30 demo steps, show pair 0
    python examples/token_logps.py --run runs/demo --index 3 --pairs configs/demo/eval.jsonl

For the chosen and the rejected completion of pair `--index` it prints each completion token with log pi(token),
log pi_ref(token) and their difference; the differences sum to the sequence log-ratio that DPO's loss and
implicit reward use (reward = beta * sum). It runs the model's forward directly (`Decoder(ids, positions,
segments)` -> hidden states, `logits(hidden)`) on the parameters `examples/score_pairs.py` loads from a run folder.
Expect (30 demo steps) positive differences on the sentiment words of the chosen review and negative ones on the
rejected review's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import numpy as np
from flax import nnx

import dpojax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from score_pairs import REPO, load_run, train_demo  # noqa: E402  (the sibling example: training and run loading)


def token_table(run: Path, pairs: Path, index: int) -> dict[str, list[tuple[str, float, float]]]:
    """{"chosen" | "rejected": [(token text, policy logp, reference logp)] over the completion's tokens}."""
    cfg, policy, reference = load_run(run)
    data = dpojax.load_preferences(str(pairs), policy.tokenizer, split="eval", max_length=cfg.data.max_length)
    batch = next(b for i, b in enumerate(dpojax.eval_batches(data, 1)) if i == index)  # [1 prompt, 2, T]

    def token_logps(graphdef, params, ids_BxT, positions_BxT, segments_BxT):  # [B, T-1]: log p(ids[t+1] | ids[:t+1])
        model = nnx.merge(graphdef, params)
        logits_BxTxV = model.logits(model(ids_BxT, positions_BxT, segments_BxT))
        logps_BxTxV = jax.nn.log_softmax(logits_BxTxV[:, :-1], axis=-1)
        return np.take_along_axis(logps_BxTxV, ids_BxT[:, 1:, None], axis=-1)[..., 0]

    rows = [x[0] for x in (batch.input_ids_NxKxT, batch.positions_NxKxT, batch.segment_ids_NxKxT)]  # [2, T] each
    logp = jax.jit(token_logps, static_argnums=0)(policy.policy_graphdef, policy.policy_params, *rows)
    ref = jax.jit(token_logps, static_argnums=0)(reference.policy_graphdef, reference.policy_params, *rows)
    out = {}
    for k, name in enumerate(("chosen", "rejected")):
        scored = np.nonzero(batch.completion_mask_NxKxT[0, k, 1:])[0]  # completion tokens (the first is never scored)
        ids = rows[0][k, 1:]
        out[name] = [(policy.tokenizer.decode([int(ids[t])]), float(logp[k, t]), float(ref[k, t])) for t in scored]
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, help="a finished run folder (config.yaml, export/); default: train one")
    p.add_argument("--steps", type=int, default=30, help="demo training steps when --run is not given")
    p.add_argument("--out", type=Path, default=Path("runs/token_logps"), help="run folder to train into")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for training")
    p.add_argument("--pairs", type=Path, default=REPO / "configs/demo/eval.jsonl", help="jsonl of pairs")
    p.add_argument("--index", type=int, default=0, help="which pair of --pairs")
    args = p.parse_args(argv)
    run = args.run or train_demo(args.steps, args.out, args.set)
    table = token_table(run, args.pairs, args.index)
    for name, tokens in table.items():
        print(f"\n{name} completion of pair {args.index}: log pi, log pi_ref and their difference per token")
        print(f"{'token':<16}{'policy':>10}{'reference':>11}{'diff':>10}")
        for text, lp, lr in tokens:
            print(f"{text!r:<16}{lp:>10.4f}{lr:>11.4f}{lp - lr:>+10.4f}")
        print(f"{'sum':<16}{sum(t[1] for t in tokens):>10.4f}{sum(t[2] for t in tokens):>11.4f}"
              f"{sum(t[1] - t[2] for t in tokens):>+10.4f}   (the sequence log-ratio)")
    return table


if __name__ == "__main__":
    main()
