"""On-policy preference optimization (docs/online.md): the policy samples K responses per prompt (`sampler`), a
reward scores them (`rewards`), and the scored samples become the preference rows the offline path batches
(`pairs`); `stage` puts one step's (or one round's) host work together. The train loop that drives it lives in
`dpojax.trainer.online`."""
