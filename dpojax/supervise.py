"""A multi-process `dpojax train` runs its work in a child process (the worker) under a small supervisor, so that a
lost peer ends this process with one clear line instead of a native crash.

Why a second process: when a peer dies, JAX's coordination client ends the survivors from a native thread (a
fatal log and `abort()`, with a C++ stack trace): at once when the coordinator (process 0) is gone, after
`distributed.heartbeat_timeout` seconds when another process is. No Python code runs in between (JAX 0.10's
`missed_heartbeat_callback` cannot be a Python function: calling it aborts too), so only a parent can report it.

The supervisor (`run`) starts the same command as the worker (env DPOJAX_WORKER=1) and waits for it:
  - the worker's file descriptor 2, where the native runtime writes (gloo, the coordination service, a fatal
    error's stack trace), goes to `output_dir/logs/<host>-<pid>.log` (a `gs://` output_dir: a local file, uploaded
    at the end); the worker's Python output (logging, progress bar, errors) goes to the console (`console`) and
    to that log too;
  - SIGTERM, SIGINT and SIGHUP to the supervisor are passed to the worker once each (the worker runs in its own
    session, so a terminal's Ctrl-C reaches it once, through here); the worker dies with the supervisor;
  - when the worker ends on a lost peer, the supervisor prints one line: the lost process (rank and host), the
    last complete checkpoint, the command that resumes, the log; and exits with PEER_LOST. Any other native
    crash gets the same line without the peer; a Python-level exit (an error message already printed) keeps its
    status.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from dpojax import distributed, paths
from dpojax.config import Config
from dpojax.trainer import checkpoint as ckpt

WORKER_ENV = "DPOJAX_WORKER"
CONSOLE_ENV = "DPOJAX_CONSOLE_FD"  # the worker's console: the supervisor's stderr, passed as this descriptor
SUPERVISOR_ENV = "DPOJAX_SUPERVISOR_PID"
PEER_LOST = 75  # exit status when a peer was lost (EX_TEMPFAIL: run the same command again)
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_UNHEALTHY = re.compile(r"tasks are unhealthy[^:]*:\s*((?:\d+[\s,]*)+)")
_TASK = re.compile(r"/job:[^/\s]+/replica:\d+/task:(\d+)")
_LEADER_GONE = ("Failed to send RPC to coordination service", "leader task was preempted")


@dataclasses.dataclass(frozen=True)
class Verdict:
    """Why the worker ended, as read from its log."""

    lost: int | None  # the rank of the lost process, when the coordination service named one
    host: str | None  # its host, from the worker's `distributed: hosts` line
    peer: bool  # the worker was ended by the coordination service (a peer, or the coordinator, is gone)
    error: str | None = None  # the last line of a Python traceback in the log (the exception), if any


def supervised(cfg: Config) -> bool:
    """Whether `dpojax train` with this config runs under a supervisor here: a multi-process run, not in the worker."""
    return os.environ.get(WORKER_ENV) != "1" and distributed.joins(cfg.distributed)


def console():
    """In the worker: the console stream its Python output goes to (the supervisor's stderr), else None. The
    worker also dies with its supervisor from here on (Linux: prctl PR_SET_PDEATHSIG), and at once if the
    supervisor is already gone."""
    fd = os.environ.get(CONSOLE_ENV)
    if os.environ.get(WORKER_ENV) != "1" or not fd:
        return None
    _die_with(int(os.environ.get(SUPERVISOR_ENV, "0")))
    return os.fdopen(int(fd), "w", buffering=1, closefd=False)


def _die_with(supervisor: int) -> None:
    import ctypes  # only for prctl

    try:
        ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: a worker outlives a killed supervisor
        return
    if supervisor and os.getppid() != supervisor:  # it died before the line above
        os._exit(128 + signal.SIGKILL)


def read_verdict(text: str) -> Verdict:
    """The verdict from the worker's log text (pure: tests/faults feed it recorded logs)."""
    hosts = {}
    for line in text.splitlines():
        if line.startswith(distributed.HOSTS_LINE):
            hosts = dict(item.split("=", 1) for item in line[len(distributed.HOSTS_LINE):].split())
    fatal = "JAX distributed service detected fatal errors" in text
    lost = None
    if m := _UNHEALTHY.search(text):
        lost = int(re.split(r"[\s,]+", m.group(1).strip())[0])
    elif any(s in text for s in _LEADER_GONE):
        lost = 0  # the coordinator (process 0) no longer answers
    elif fatal and (m := _TASK.search(text)):
        lost = int(m.group(1))
    peer = lost is not None or fatal
    errors = re.findall(r"^Traceback \(most recent call last\):\n(?:[ \t].*\n)*(\S.*)$", text, re.M)
    return Verdict(lost, hosts.get(str(lost)) if lost is not None else None, peer, errors[-1] if errors else None)


def resume_command(argv: list[str]) -> str:
    return shlex.join(["dpojax", *argv])


def message(verdict: Verdict, returncode: int, rank: int | None, out_dir, argv: list[str], log_path: str) -> str:
    """The supervisor's one line about a worker that ended with `returncode` (< 0: killed by that signal)."""
    me = "this process" if rank is None else f"process {rank}"
    if verdict.peer:
        who = "a peer" if verdict.lost is None else f"process {verdict.lost}" + (
            f" (host {verdict.host})" if verdict.host else "")
        what = f"lost {who}: {me} stopped"
    elif returncode < 0:
        what = f"{me} crashed ({signal.Signals(-returncode).name})"
    else:
        what = f"{me} failed ({verdict.error or f'status {returncode}'})"
    return (f"dpojax train: {what}; last complete checkpoint: {ckpt.describe_newest(out_dir)}; the steps after it "
            f"are redone. Resume on every process with: {resume_command(argv)}  (details: {log_path})")


def worker_command(argv: list[str]) -> list[str]:
    """The command that runs `dpojax ARGV` again as the worker: the same program when it was started with these
    arguments (a console script, `python -m dpojax.cli`, a wrapper script), else `python -m dpojax.cli`."""
    if sys.argv[1:] == argv and len(sys.orig_argv) > len(argv):
        return [sys.executable, *sys.orig_argv[1:]]
    return [sys.executable, "-m", "dpojax.cli", *argv]


def log_file(cfg: Config) -> tuple[Path, str]:
    """(the local file the worker's log goes to, where it ends up): in output_dir/logs/, or staged for gs://."""
    name = f"{socket.gethostname()}-{os.getpid()}.log"
    final = paths.absolute(cfg.output_dir) / "logs" / name
    if paths.is_remote(cfg.output_dir):
        return Path(tempfile.mkdtemp(prefix="dpojax-log-")) / name, str(final)
    paths.makedirs(final.parent)
    return Path(str(final)), str(final)


def run(cfg: Config, argv: list[str]) -> int:
    """Run `dpojax ARGV` (a `train` command of config `cfg`) as the supervised worker; its exit status, or
    PEER_LOST with one line on stderr."""
    local, final = log_file(cfg)
    console_fd = os.dup(2)
    env = {**os.environ, WORKER_ENV: "1", CONSOLE_ENV: str(console_fd), SUPERVISOR_ENV: str(os.getpid())}
    with open(local, "ab") as log:
        proc = subprocess.Popen(worker_command(argv), env=env, stderr=log, pass_fds=(console_fd,),
                                start_new_session=True)
    previous = {s: signal.signal(s, lambda signum, _frame: proc.poll() is None and proc.send_signal(signum))
                for s in _FORWARDED}
    try:
        code = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        os.close(console_fd)
    if local != Path(final):
        paths.copy_file(local, final)
    if code == 0:
        return 0
    verdict = read_verdict(local.read_text(errors="replace"))
    if code > 1 and not verdict.peer:  # a user error (2) or an interrupt (130): its message is on the console
        return code
    rank = distributed.explicit_group(cfg.distributed).process_id
    print(message(verdict, code, rank, cfg.output_dir, argv, final), file=sys.stderr, flush=True)
    return PEER_LOST if verdict.peer else code if code > 0 else 128 - code
