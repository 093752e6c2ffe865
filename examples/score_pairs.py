"""Score a file of preference pairs with a trained policy: DPO's implicit reward model.

    python examples/score_pairs.py                          # ~30 s on 2 CPU cores: train the demo 30 steps, then score
    python examples/score_pairs.py --run runs/demo --pairs configs/demo/eval.jsonl   # score with a finished run

DPO's policy defines a reward, r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)), up to a per-prompt constant that
cancels in a pair. This prints r for the chosen and the rejected response of each pair of `--pairs` and the share
of pairs where chosen scores higher: the same number as `dpojax.evaluate`'s `rewards/accuracies` on that file.
Expect (30 demo steps, configs/demo/eval.jsonl) an accuracy near 1.0 and margins of ~1 nat.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import numpy as np

import dpojax

REPO = Path(__file__).resolve().parents[1]


def train_demo(steps: int, out: Path, overrides: list[str] = ()) -> Path:
    """Train the demo config for `steps` steps into `out` (a run folder with config.yaml, checkpoints/ and export/),
    with extra `section.key=value` overrides."""
    config = dpojax.load_config(REPO / "configs/demo.yaml", [
        f"train.steps={steps}", f"train.log_every={steps}", "train.eval_every=null", "checkpoint.every=null",
        "data.eval=null", f"output_dir={out}", f"data.cache_dir={out / 'cache'}",
        f"model.name_or_path={REPO / 'configs/demo/model'}", f"data.train={REPO / 'configs/demo/train.jsonl'}",
        *overrides,
    ])
    dpojax.train(config)
    return out


def load_run(run: Path, mesh=None) -> tuple[dpojax.Config, dpojax.ModelPair, dpojax.ModelPair]:
    """(the run's config, its exported policy, its frozen reference) from a finished run folder."""
    cfg = dpojax.load_config(run / "config.yaml")
    policy = dpojax.load_policy_and_reference(run / "export", with_reference=False, mesh=mesh)
    # the reference as training had it: the policy's initial random weights (model.init: random) or a HF folder
    same = cfg.ref_name_or_path == cfg.model.name_or_path
    reference = dpojax.load_policy_and_reference(cfg.ref_name_or_path, with_reference=False, mesh=mesh,
                                                 init=cfg.model.init if same else "pretrained", seed=cfg.model.seed)
    return cfg, policy, reference


def score(run: Path, pairs: Path, batch_size: int = 16) -> dict:
    """Implicit rewards of every pair of `pairs`: {"chosen": [M], "rejected": [M], "accuracy": float}."""
    cfg, policy, reference = load_run(run)
    spec = dpojax.make_spec(cfg, policy.policy_graphdef, reference.policy_graphdef, policy.sharder, total_steps=1)
    data = dpojax.load_preferences(str(pairs), policy.tokenizer, split="eval", max_length=cfg.data.max_length)

    @jax.jit
    def logratios(batch):  # [N, 2]: log pi(y|x) - log pi_ref(y|x) of each response
        logps = dpojax.sequence_logps(spec.policy_graphdef, policy.policy_params, batch, spec).logps_B
        ref = dpojax.sequence_logps(spec.ref_graphdef, reference.policy_params, batch, spec).logps_B
        return (logps - ref).reshape(batch.response_mask_NxK.shape)

    rewards = np.zeros((len(data), 2), np.float32)
    for batch in dpojax.eval_batches(data, batch_size):
        real = batch.prompt_mask_N > 0
        rewards[batch.prompt_index_N[real]] = cfg.loss.beta * np.asarray(logratios(batch))[real]
    accuracy = float(np.mean(rewards[:, 0] > rewards[:, 1]))  # TRL's rewards/accuracies: strictly greater
    return {"chosen": rewards[:, 0], "rejected": rewards[:, 1], "accuracy": accuracy, "beta": cfg.loss.beta}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, help="a finished run folder (config.yaml, export/); default: train one")
    p.add_argument("--steps", type=int, default=30, help="demo training steps when --run is not given")
    p.add_argument("--out", type=Path, default=Path("runs/score_pairs"), help="run folder to train into")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for training")
    p.add_argument("--pairs", type=Path, default=REPO / "configs/demo/eval.jsonl", help="jsonl of pairs to score")
    p.add_argument("--show", type=int, default=10, help="pairs to print")
    args = p.parse_args(argv)
    run = args.run or train_demo(args.steps, args.out, args.set)
    result = score(run, args.pairs)
    chosen, rejected = result["chosen"], result["rejected"]
    print(f"\nimplicit rewards beta * (log pi - log pi_ref), beta {result['beta']}, of {run} on {args.pairs}")
    print(f"{'pair':>6}{'chosen':>12}{'rejected':>12}{'margin':>12}  prefers chosen")
    for i in range(min(args.show, len(chosen))):
        margin = chosen[i] - rejected[i]
        print(f"{i:>6}{chosen[i]:>12.4f}{rejected[i]:>12.4f}{margin:>12.4f}  {margin > 0}")
    print(f"accuracy {result['accuracy']:.4f} over {len(chosen)} pairs "
          f"(mean margin {np.mean(chosen - rejected):.4f})")
    return result


if __name__ == "__main__":
    main()
