#!/usr/bin/env python3
"""Run one dpojax command as N cooperating CPU processes on this machine (a multi-host rehearsal).

    python launch/local_cpu.py --processes 2 --devices-per-process 4 train configs/demo.yaml train.steps=20

Each process gets `--devices-per-process` fake CPU devices, joins the group through JAX's coordination
service on 127.0.0.1 (process 0 hosts it; the DPOJAX_COORDINATOR/NUM_PROCESSES/PROCESS_ID variables read by
`dpojax.distributed`), and exchanges collectives with gloo. Output lines are prefixed with `[pN]`.
If a process fails, the others get `--grace` seconds to stop on their own (JAX's heartbeat stops them),
then are terminated; the exit code is the first failure's, 0 if all succeed.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(process_id: int, num_processes: int, coordinator: str, devices: int, base=None) -> dict[str, str]:
    """The environment of process `process_id`: its place in the group and its number of CPU devices."""
    env = dict(os.environ if base is None else base)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env.update(
        DPOJAX_COORDINATOR=coordinator,
        DPOJAX_NUM_PROCESSES=str(num_processes),
        DPOJAX_PROCESS_ID=str(process_id),
        JAX_PLATFORMS="cpu",
        JAX_NUM_CPU_DEVICES=str(devices),
        XLA_FLAGS=" ".join([*flags, f"--xla_force_host_platform_device_count={devices}"]),
        JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
        PYTHONUNBUFFERED="1",
    )
    return env


def spawn(args: list[str], num_processes: int, devices: int, *, port: int | None = None, **popen_kw):
    """Start `python -m dpojax.cli ARGS` as processes 0..num_processes-1; returns the Popen objects."""
    coordinator = f"127.0.0.1:{port or free_port()}"
    return [
        subprocess.Popen([sys.executable, "-m", "dpojax.cli", *args],
                         env=process_env(i, num_processes, coordinator, devices), **popen_kw)
        for i in range(num_processes)
    ]


def _pump(proc: subprocess.Popen, prefix: str) -> None:
    for line in iter(proc.stdout.readline, b""):
        sys.stdout.write(f"{prefix} {line.decode(errors='replace')}")
        sys.stdout.flush()


def run(args: list[str], num_processes: int, devices: int, grace: float) -> int:
    procs = spawn(args, num_processes, devices, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    pumps = [threading.Thread(target=_pump, args=(p, f"[p{i}]"), daemon=True) for i, p in enumerate(procs)]
    for t in pumps:
        t.start()

    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    failed_at, code = None, 0
    while any(p.poll() is None for p in procs):
        time.sleep(0.2)
        bad = [p.returncode for p in procs if p.returncode not in (None, 0)]
        if bad and failed_at is None:
            failed_at, code = time.monotonic(), bad[0]
        if failed_at is not None and time.monotonic() - failed_at > grace:
            for p in procs:
                if p.poll() is None:
                    p.kill()
    for t in pumps:
        t.join(timeout=5)
    return code or next((p.returncode for p in procs if p.returncode), 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2, help="number of processes (simulated hosts)")
    parser.add_argument("--devices-per-process", type=int, default=4, help="fake CPU devices in each process")
    parser.add_argument("--grace", type=float, default=60.0, help="seconds the others get after one fails")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="dpojax arguments, e.g. train CONFIG k=v ...")
    ns = parser.parse_args(argv)
    if not ns.command:
        parser.error("give the dpojax command to run, e.g. train configs/demo.yaml")
    return run(ns.command, ns.processes, ns.devices_per_process, ns.grace)


if __name__ == "__main__":
    sys.exit(main())
