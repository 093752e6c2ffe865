"""One process of tests/test_multihost_data.py: join the group (DPOJAX_* variables), load a data set through the
trainer's `data_hosts` (each process tokenizes its share into the shared cache) and save this process's share of
the first training batches. argv: tokenizer folder, data path, cache folder, output .npz."""

import logging
import sys

import numpy as np
from tiny_tokenizer import load_tiny_tokenizer

from dpojax import distributed
from dpojax.config import DistributedSection
from dpojax.data import load_preferences, train_batches
from dpojax.trainer.build import data_hosts

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)  # the test reads which rows this process tokenized
    tok_dir, data_path, cache, out = sys.argv[1:5]
    distributed.initialize(DistributedSection())
    import jax  # after initialize

    tok = load_tiny_tokenizer(tok_dir)
    data = load_preferences(data_path, tok, max_length=14, cache_dir=cache, num_proc=1, hosts=data_hosts())
    batches = list(train_batches(data, 8, 3, stop_step=6, process_index=jax.process_index(), process_count=2))
    np.savez(out, ids=np.stack([b.input_ids_NxKxT for b in batches]),
             index=np.stack([b.prompt_index_N for b in batches]), fingerprint=np.array(data.fingerprint))
    print("done", jax.process_index(), flush=True)
