"""The train loop's batches: built (packing, reference log-probs), counted (real tokens, model FLOPs) and sent to the
devices ahead of the loop by a producer thread, one dispatch's worth at a time (`ReadyBatch`)."""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
from typing import Iterator

import jax
import numpy as np

from dpojax import flops as F
from dpojax.data.batching import PreferenceBatch, train_batches
from dpojax.data.packing import PackedBatch
from dpojax.data.tokenize import TokenizedData
from dpojax.trainer import reference
from dpojax.trainer.build import Run, batch_kw, to_device
from dpojax.trainer.step import batch_sharding, stacked_batch_sharding

log = logging.getLogger("dpojax")

PREFETCH = 2  # ready batches the producer thread keeps ahead of the loop (0: the loop thread builds them)


def host_batches(run: Run, data: TokenizedData, start: int, stop: int) -> Iterator[PreferenceBatch | PackedBatch]:
    """The host batches (this process's rows) of steps start+1 .. stop."""
    cfg = run.cfg
    return train_batches(data, cfg.train.batch_size, cfg.train.seed, start_step=start, stop_step=stop,
                         **batch_kw(cfg, run.spec, run.sharder, train=True))


def model_flops(run: Run, batch: PreferenceBatch | PackedBatch) -> float:
    """Model FLOPs of one step on this process's rows (dpojax.flops: policy forward+backward, reference forward;
    under LoRA the backward computes no base-weight gradients)."""
    return F.batch_flops(run.models.policy_cfg, batch, reference=run.models.ref_graphdef is not None,
                         weight_grads=run.models.lora is None).model


@dataclasses.dataclass(frozen=True)
class ReadyBatch:
    """One dispatch's batch, on the devices, with what the host counts of each of its steps: one step's batch, or
    the batches of K steps stacked on a leading axis (`TrainStep.many`)."""

    batch: PreferenceBatch | PackedBatch  # global jax.Arrays
    tokens: tuple[int, ...]  # this process's real tokens, per step
    flops: tuple[float, ...]  # model FLOPs of this process's rows, per step

    @property
    def steps(self) -> int:
        return len(self.tokens)


def ready_batches(run: Run, data: TokenizedData, start: int, table) -> Iterator[ReadyBatch]:
    """Batches of steps start+1 .. total_steps, built (packing, reference log-probs), counted and sent to the
    devices (collective-free: each process places its own rows); `Prefetch` runs it in a thread. With
    train.steps_per_dispatch = K > 1, the steps k*K+1 .. (k+1)*K go as one stacked batch when their batches have
    one shape (one length bucket, one packed layout); otherwise, and for steps outside such a run of K (a resume
    at a step that is not a multiple of K, the last steps), a batch goes alone."""
    single, stacked = batch_sharding(run.sharder), stacked_batch_sharding(run.sharder)
    k, total, group = run.cfg.train.steps_per_dispatch, run.total_steps, []

    def alone(batch) -> ReadyBatch:
        return ReadyBatch(to_device(batch, single), (batch.real_tokens(),), (model_flops(run, batch),))

    for step, batch in enumerate(host_batches(run, data, start, total), start + 1):
        batch = reference.attach(batch, table)
        if k == 1 or (not group and ((step - 1) % k or step + k - 1 > total)):
            yield alone(batch)
            continue
        group.append(batch)
        if len(group) < k:
            continue
        batches, group = group, []
        if one_shape(batches):
            yield ReadyBatch(to_device(jax.tree.map(lambda *xs: np.stack(xs), *batches), stacked),
                             tuple(b.real_tokens() for b in batches), tuple(model_flops(run, b) for b in batches))
        else:
            yield from (alone(b) for b in batches)


def one_shape(batches: list) -> bool:
    """Whether host batches can be stacked: one tree structure, one shape and dtype per leaf."""
    first = jax.tree.structure(batches[0])
    shapes = [(x.shape, x.dtype) for x in jax.tree.leaves(batches[0])]
    return all(jax.tree.structure(b) == first and [(x.shape, x.dtype) for x in jax.tree.leaves(b)] == shapes
               for b in batches[1:])


@dataclasses.dataclass(frozen=True)
class _Failed:
    error: BaseException


class Prefetch:
    """The items of `items` (here `ready_batches`), made by a background thread up to `depth` ahead of the loop
    and taken in order, so the loop thread spends no time building, counting or sending batches. An error in the
    producer is raised by `next` in the loop thread (the same exception, after the items made before it);
    `close` (end of training, SIGTERM stop, an error in the loop) stops the thread and joins it."""

    _END = object()

    def __init__(self, items: Iterator, depth: int = PREFETCH):
        self._items, self._queue, self._closed = items, queue.Queue(maxsize=depth), threading.Event()
        self._finished = False
        self._thread = threading.Thread(target=self._produce, name="dpojax-batches", daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        try:
            for item in self._items:
                if not self._put(item):
                    return
            self._put(self._END)
        except BaseException as e:  # noqa: BLE001 - re-raised in the loop thread
            self._put(_Failed(e))
        finally:
            self._items = None  # the generator is closed here, in its own thread

    def _put(self, item) -> bool:
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def __iter__(self):
        return self

    def __next__(self) -> ReadyBatch:
        if self._finished:
            raise StopIteration
        item = self._queue.get()
        if item is self._END or isinstance(item, _Failed):
            self._finished = True
            if isinstance(item, _Failed):
                raise item.error
            raise StopIteration
        return item

    def close(self, timeout: float = 60.0) -> None:
        self._closed.set()
        self._finished = True
        self._thread.join(timeout)
        if self._thread.is_alive():  # a batch build that takes minutes; the thread is a daemon, so exit still works
            log.warning("the batch thread did not stop within %.0f s; leaving it", timeout)
        while not self._queue.empty():  # drop ready batches: free their device memory now
            self._queue.get_nowait()


def upcoming(run: Run, data: TokenizedData, start: int, table) -> Iterator[ReadyBatch]:
    """The ready batches of steps start+1 .. total_steps, made `PREFETCH` ahead by a producer thread (or, with
    PREFETCH 0, by the loop thread as it takes them); close it (`close()`) when the loop ends."""
    items = ready_batches(run, data, start, table)
    return Prefetch(items, PREFETCH) if PREFETCH else items
