"""Multi-process runs: one `jax.distributed.initialize` per process, before anything touches a device.

JAX's multi-controller runtime is the whole protocol: every process runs the same `dpojax train`, process 0
hosts the coordination service, and each process then sees all devices of all processes (`jax.devices()`)
and feeds only its own rows of each global batch (`jax.make_array_from_process_local_data`).

Where the process group comes from, first match wins:
  1. the `distributed:` config section (`coordinator`, `num_processes`, `process_id`);
  2. environment variables DPOJAX_COORDINATOR, DPOJAX_NUM_PROCESSES, DPOJAX_PROCESS_ID (launch/local_cpu.py
     sets these), or JAX's own JAX_COORDINATOR_ADDRESS;
  3. JAX's cluster detection (Cloud TPU VM pods and GKE, SLURM `srun`, Open MPI `mpirun`), used with
     `distributed.mode: on`, or in `auto` mode when the environment shows a job of more than one process.
`mode: off` never initializes; a single process needs nothing.

A dead peer never hangs the others: each process's runtime sends heartbeats to the coordinator from a
background thread, every `heartbeat_timeout` / 2 seconds (JAX 0.10's `jax.distributed.initialize` takes only
the timeout, no interval or miss count), so a long compile, a checkpoint write or a busy Python thread does not
delay them. A process silent for `heartbeat_timeout` seconds is declared dead and every other process is then
terminated by JAX's runtime (a fatal error and a native stack trace); when process 0, which hosts the service, is
the one lost, the others are terminated at once. With the default, 30 s (JAX's is 100 s), the survivors stop 15 to
30 s after a peer dies (tests/test_multihost.py and tests/faults/ measure it). `dpojax train` runs a multi-process
job's work under a supervisor (`dpojax.supervise`) that turns that end into one line naming the lost process
(its host from the `distributed: hosts` line logged here at start-up), the last complete checkpoint and the
command that resumes.

SIGTERM belongs to `dpojax.trainer.preemption`: JAX's preemption service is switched off because it installs
its own SIGTERM handler, which would swallow a SIGTERM that arrives before the training loop starts.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket

import jax

from dpojax.config import DistributedSection
from dpojax.errors import ConfigError

log = logging.getLogger("dpojax")

ENV_COORDINATOR = "DPOJAX_COORDINATOR"
ENV_NUM_PROCESSES = "DPOJAX_NUM_PROCESSES"
ENV_PROCESS_ID = "DPOJAX_PROCESS_ID"
HOSTS_LINE = "distributed: hosts "  # then `rank=host` for each process, on one log line


@dataclasses.dataclass(frozen=True)
class Group:
    """Explicit process-group settings; None fields are left to JAX's cluster detection."""

    coordinator: str | None
    num_processes: int | None
    process_id: int | None


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"distributed: environment variable {name}={value!r} must be an integer.") from None


def explicit_group(cfg: DistributedSection) -> Group:
    """Config keys, else DPOJAX_* environment variables, else JAX_COORDINATOR_ADDRESS."""
    coordinator = cfg.coordinator or os.environ.get(ENV_COORDINATOR) or os.environ.get("JAX_COORDINATOR_ADDRESS")
    num = cfg.num_processes if cfg.num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    pid = cfg.process_id if cfg.process_id is not None else _env_int(ENV_PROCESS_ID)
    if coordinator is not None and ":" not in coordinator:
        raise ConfigError(f"distributed: coordinator {coordinator!r} must be host:port (process 0's address).")
    if num is not None and pid is not None and not 0 <= pid < num:
        raise ConfigError(f"distributed: process_id={pid} must be in [0, num_processes={num}).")
    return Group(coordinator, num, pid)


def detected_cluster() -> str | None:
    """The name of a multi-process job environment JAX can bootstrap from, judged from its variables."""
    env = os.environ
    if "SLURM_JOB_ID" in env and "SLURM_STEP_NODELIST" in env and _env_int("SLURM_NTASKS") not in (None, 1):
        return "slurm"
    if "OMPI_MCA_orte_hnp_uri" in env and _env_int("OMPI_COMM_WORLD_SIZE") not in (None, 1):
        return "openmpi"
    if "," in env.get("TPU_WORKER_HOSTNAMES", "") or "MEGASCALE_COORDINATOR_ADDRESS" in env:
        return "tpu"
    return None


def joins(cfg: DistributedSection) -> bool:
    """Whether `initialize` would join a process group (from the config, the environment and the cluster alone)."""
    if cfg.mode == "off":
        return False
    group = explicit_group(cfg)
    if cfg.mode == "auto" and group.coordinator is None and detected_cluster() is None:
        return False
    return group.num_processes != 1


def initialize(cfg: DistributedSection) -> bool:
    """Join the process group when the config, the environment or the cluster asks for one. Idempotent;
    returns whether this run is multi-process. Must run before the first JAX computation."""
    if jax.distributed.is_initialized():
        return cfg.mode != "off"
    if not joins(cfg):
        return False
    group = explicit_group(cfg)
    cluster = detected_cluster()
    # CPU processes exchange collectives over TCP with gloo (no effect on TPU/GPU devices).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_enable_preemption_service", False)  # see the module doc: SIGTERM is ours
    try:
        jax.distributed.initialize(
            coordinator_address=group.coordinator,
            num_processes=group.num_processes,
            process_id=group.process_id,
            initialization_timeout=cfg.initialization_timeout,
            heartbeat_timeout_seconds=cfg.heartbeat_timeout,
            shutdown_timeout_seconds=cfg.shutdown_timeout,
        )
    except (ValueError, RuntimeError) as e:
        where = group.coordinator or cluster or "JAX's cluster detection"
        raise ConfigError(
            f"distributed: could not join the process group via {where} "
            f"(num_processes={group.num_processes}, process_id={group.process_id}): {e}. Set "
            "distributed.coordinator/num_processes/process_id (or DPOJAX_COORDINATOR/NUM_PROCESSES/PROCESS_ID), "
            "or distributed.mode=off for a single process."
        ) from None
    log.info(
        "distributed: process %d of %d (%s), %d local / %d global devices",
        jax.process_index(), jax.process_count(), group.coordinator or cluster or "detected",
        jax.local_device_count(), jax.device_count(),
    )
    log.info("%s%s", HOSTS_LINE, " ".join(f"{rank}={host}" for rank, host in _exchange_hosts(cfg).items()))
    return True


def _exchange_hosts(cfg: DistributedSection) -> dict[int, str]:
    """Every process's host name, posted to the coordination service's key-value store: the line logged from it
    lets a supervisor name the host of a process that is lost later (`dpojax.supervise`)."""
    from jax._src.distributed import global_state  # JAX's process-group client; no public handle in JAX 0.10

    client = global_state.client
    client.key_value_set(f"dpojax/hosts/{jax.process_index()}", socket.gethostname(), allow_overwrite=True)
    client.wait_at_barrier("dpojax/hosts", cfg.initialization_timeout * 1000)
    return dict(sorted((int(key.rsplit("/", 1)[-1]), host) for key, host in client.key_value_dir_get("dpojax/hosts/")))
