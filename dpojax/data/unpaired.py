"""Unpaired rows (prompt, completion, label) for KTO: the KL completions and the class balance, as TRL 1.16's
KTOTrainer prepares them (`trl/trainer/kto_trainer.py::_prepare_dataset`).

KTO's reference point z0 is estimated from mismatched (prompt, completion) pairs. TRL builds them once, in data set
order: the rows are cut into chunks of `per_device_train_batch_size` and each chunk's completions are rotated by
one, (x_1, y_1), ..., (x_n, y_n) -> (x_1, y_n), (x_2, y_1), ..., (x_n, y_{n-1}), the token ids of y_j reused after
x_i's prompt (nothing is tokenized again). `with_kl_completions` does the same with chunks of the training
micro-batch (`train.micro_batch_size`, default `train.batch_size`: the rows of one forward, what a TRL device batch
is on one device) and stores y' as each row's second response, so a batch is [N rows, K = 2, T] and packing, the
log-prob head and the reference precompute carry the KL sequences like any response.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging

import numpy as np

from dpojax.data.tokenize import TokenizedData
from dpojax.errors import DataError

log = logging.getLogger(__name__)


def with_kl_completions(data: TokenizedData, chunk: int) -> TokenizedData:
    """`data` (unpaired rows, one response each) with each row's KL completion as its second response: row i of
    each chunk of `chunk` rows (data set order) gets the completion of row i - 1 of its chunk (the first row: the
    chunk's last), as TRL. The fingerprint (the reference cache key) changes with `chunk`."""
    if data.labels is None:
        raise ValueError("internal: KL completions are built for unpaired rows only")
    own = [responses[0] for responses in data.response_ids]
    responses = []
    for start in range(0, len(own), chunk):
        block = own[start : start + chunk]
        responses += [[y, y_kl] for y, y_kl in zip(block, block[-1:] + block[:-1], strict=True)]
    key = hashlib.sha256(f"{data.fingerprint}:kl-chunk-{chunk}".encode()).hexdigest()[:40]
    return dataclasses.replace(data, response_ids=responses, ranks=[np.array([0, 1], np.int32)] * len(own),
                               fingerprint=key)


def check_balance(data: TokenizedData, desirable_weight: float, undesirable_weight: float) -> None:
    """Training rows of both classes, or one DataError naming the file; TRL's warning (its Eq. 8 bounds, 1 to 4/3
    of the class ratio) when the weights do not balance the classes."""
    n_desirable = int(np.sum(data.labels))
    n_undesirable = len(data.labels) - n_desirable
    for count, word, label, weight, other in ((n_desirable, "desirable", "true", desirable_weight, "undesirable"),
                                              (n_undesirable, "undesirable", "false", undesirable_weight, "desirable")):
        if count == 0 and weight > 0:
            raise DataError(
                f"{data.source}: none of its {len(data)} rows is {word} (label {label}), so KTO's {word} term "
                f"(loss.{word}_weight = {weight}) has nothing to learn from and only the {other} rows train (TRL "
                f"would run and only warn about the weights): add {word} rows, or set loss.{word}_weight=0 to train "
                f"on the {other} rows alone.")
    if n_desirable == n_undesirable or min(n_desirable, n_undesirable) == 0:
        return
    des, und = max(n_desirable, 1), max(n_undesirable, 1)
    des_lo, des_hi = round(und * undesirable_weight / des, 2), round(und * undesirable_weight / des * 1.33, 2)
    und_lo, und_hi = round(des * desirable_weight / und / 1.33, 2), round(des * desirable_weight / und, 2)
    if not (des_lo <= desirable_weight <= des_hi or und_lo <= undesirable_weight <= und_hi):
        log.warning(
            "%s: %d desirable and %d undesirable rows, but loss.desirable_weight = %s and loss.undesirable_weight = "
            "%s do not balance them (KTO paper Eq. 8, as TRL warns): set EITHER desirable_weight in [%s, %s] OR "
            "undesirable_weight in [%s, %s] (not both)", data.source, n_desirable, n_undesirable, desirable_weight,
            undesirable_weight, des_lo, des_hi, und_lo, und_hi)
