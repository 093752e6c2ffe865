"""dpojax.data.batching: TRL collator parity, buckets, deterministic resumable order, eval coverage."""

import dataclasses

import jax
import numpy as np
import pytest
from tiny_tokenizer import load_tiny_tokenizer, make_pref_rows

from dpojax.data import (
    PreferenceBatch,
    collate,
    default_buckets,
    epoch_order,
    eval_batches,
    pick_bucket,
    steps_per_epoch,
    tokenize_rows,
    train_batches,
)
from dpojax.errors import DataError

MAX_LEN = 14


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def pairs(tok):
    return tokenize_rows(make_pref_rows(23, "standard", seed=4), tok, max_length=MAX_LEN)


def batch_list(batches):
    def listed(x):
        return None if x is None else x.tolist()

    return [[listed(getattr(b, f.name)) for f in dataclasses.fields(b)] for b in batches]


# ------------------------------------------------------------------------------------------------- TRL parity
@pytest.mark.parametrize("fmt", ["standard", "conversational"])
@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_collate_matches_trl_collator(fmt, mode, tok):
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    tp = tokenize_rows(make_pref_rows(12, fmt, seed=5), tok, max_length=MAX_LEN, truncation_mode=mode)
    assert tp.lengths_MxK.max() > MAX_LEN  # truncation is exercised
    idx = np.arange(len(tp))
    ours = collate(tp, idx, length=MAX_LEN + 2, max_length=MAX_LEN, truncation_mode=mode)
    examples = [
        {"prompt_ids": tp.prompt_ids[k].tolist(), "chosen_ids": tp.response_ids[k][0].tolist(),
         "rejected_ids": tp.response_ids[k][1].tolist()} for k in idx
    ]
    theirs = DataCollatorForPreference(pad_token_id=tok.pad_token_id, max_length=MAX_LEN, truncation_mode=mode)(
        examples
    )
    t = theirs["input_ids"].shape[1]

    def stacked(x_NxKxT):  # ours [N, 2, T] -> TRL's [chosen; rejected] [2N, T]
        assert not x_NxKxT[:, :, t:].any()
        return np.concatenate([x_NxKxT[:, 0, :t], x_NxKxT[:, 1, :t]])

    pad_tail = ours.input_ids_NxKxT[:, :, t:]
    assert (pad_tail == tok.pad_token_id).all()
    np.testing.assert_array_equal(np.concatenate([ours.input_ids_NxKxT[:, 0, :t], ours.input_ids_NxKxT[:, 1, :t]]),
                                  theirs["input_ids"].numpy())
    np.testing.assert_array_equal(stacked(ours.segment_ids_NxKxT), theirs["attention_mask"].numpy())
    np.testing.assert_array_equal(stacked(ours.completion_mask_NxKxT), theirs["completion_mask"].numpy())


def test_batch_fields_and_pytree(pairs):
    b = collate(pairs, [0, 1, 2], length=16, max_length=MAX_LEN, truncation_mode="keep_start")
    assert b.shape == (3, 2, 16)
    for name in ("input_ids_NxKxT", "segment_ids_NxKxT", "positions_NxKxT", "completion_mask_NxKxT"):
        assert getattr(b, name).dtype == np.int32 and getattr(b, name).shape == (3, 2, 16)
    assert b.prompt_mask_N.dtype == np.float32 and b.prompt_index_N.tolist() == [0, 1, 2]
    lengths = b.segment_ids_NxKxT.sum(-1)
    expected_pos = np.where(b.segment_ids_NxKxT > 0, np.arange(16), 0)
    np.testing.assert_array_equal(b.positions_NxKxT, expected_pos)
    assert (b.completion_mask_NxKxT <= b.segment_ids_NxKxT).all()
    np.testing.assert_array_equal(lengths, np.minimum(pairs.lengths_MxK[:3], MAX_LEN))
    assert len(jax.tree_util.tree_leaves(b)) == 8  # + response_mask_NxK, rank_NxK (no precomputed reference)
    summed = jax.jit(lambda x: jax.tree_util.tree_map(lambda a: a.sum(), x))(b)
    assert isinstance(summed, PreferenceBatch) and int(summed.segment_ids_NxKxT) == int(lengths.sum())


# ---------------------------------------------------------------------------------------------------- buckets
def test_default_buckets():
    assert default_buckets(300) == (64, 128, 256, 300)
    assert default_buckets(256) == (64, 128, 256)
    assert default_buckets(64) == (64,)
    assert default_buckets(20) == (16, 20)
    assert default_buckets(1) == (1,)
    assert pick_bucket(65, (64, 128)) == 128 and pick_bucket(64, (128, 64)) == 64
    with pytest.raises(ValueError):
        pick_bucket(129, (64, 128))


def test_batches_padded_to_buckets(pairs):
    buckets = (4, 8, MAX_LEN)
    lengths = np.minimum(pairs.lengths_MxK, MAX_LEN)
    seen = set()
    for b in train_batches(pairs, 2, seed=0, stop_step=30, buckets=buckets):
        t = b.shape[2]
        longest = int(lengths[b.prompt_index_N].max())
        assert t == pick_bucket(longest, buckets)
        seen.add(t)
    assert seen <= set(buckets) and len(seen) >= 2
    assert {b.shape[2] for b in train_batches(pairs, 4, seed=0, stop_step=5)} <= set(default_buckets(MAX_LEN))


# ------------------------------------------------------------------------------------------------------ order
def test_epoch_order_deterministic_and_distinct():
    a = epoch_order(50, seed=3, epoch=0)
    assert sorted(a.tolist()) == list(range(50))
    np.testing.assert_array_equal(a, epoch_order(50, seed=3, epoch=0))
    assert a.tolist() != epoch_order(50, seed=3, epoch=1).tolist()
    assert a.tolist() != epoch_order(50, seed=4, epoch=0).tolist()


def test_train_batches_epochs_drop_last_and_resume(pairs):
    bp = 5
    spe = steps_per_epoch(len(pairs), bp)
    assert len(pairs) == 22 and spe == 4  # 2 pairs left out of each epoch
    full = list(train_batches(pairs, bp, seed=7, stop_step=3 * spe))
    assert len(full) == 3 * spe
    for e in range(3):
        used = np.concatenate([b.prompt_index_N for b in full[e * spe : (e + 1) * spe]])
        assert len(set(used.tolist())) == spe * bp
        np.testing.assert_array_equal(used, epoch_order(len(pairs), 7, e)[: spe * bp])
    assert all(b.prompt_mask_N.tolist() == [1.0] * bp for b in full)
    resumed = list(train_batches(pairs, bp, seed=7, start_step=6, stop_step=3 * spe))
    assert batch_list(resumed) == batch_list(full[6:])
    assert batch_list(train_batches(pairs, bp, seed=7, stop_step=3 * spe)) == batch_list(full)  # deterministic
    with pytest.raises(DataError, match="fewer than one batch"):
        next(train_batches(pairs, 100, seed=0))


def test_host_slices_assemble_the_global_batch(pairs):
    glob = list(train_batches(pairs, 6, seed=1, stop_step=4))
    hosts = [list(train_batches(pairs, 6, seed=1, stop_step=4, process_index=i, process_count=3)) for i in range(3)]
    for step, g in enumerate(glob):
        parts = [h[step] for h in hosts]
        assert all(p.shape == (2, 2, g.shape[2]) for p in parts)
        np.testing.assert_array_equal(np.concatenate([p.input_ids_NxKxT for p in parts]), g.input_ids_NxKxT)
    with pytest.raises(DataError, match="split evenly"):
        next(train_batches(pairs, 5, seed=0, process_count=2))


# ------------------------------------------------------------------------------------------------------- eval
def test_eval_batches_cover_each_pair_once(pairs):
    batches = list(eval_batches(pairs, 5))
    n = len(pairs)
    assert n == 22 and len(batches) == 5 and all(b.shape[:2] == (5, 2) for b in batches)
    idx = np.concatenate([b.prompt_index_N for b in batches])
    mask = np.concatenate([b.prompt_mask_N for b in batches])
    assert idx[mask > 0].tolist() == list(range(len(pairs)))
    assert mask.tolist() == [1.0] * n + [0.0] * 3 and idx[-3:].tolist() == [-1] * 3
    last = batches[-1]
    np.testing.assert_array_equal(last.input_ids_NxKxT[4], last.input_ids_NxKxT[0])  # filler = copy of a real pair
    assert last.completion_mask_NxKxT[2:].sum(-1).min() > 0
