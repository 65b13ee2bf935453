"""Launching the ranks of a run and watching them.

One process per rank (``python -m strategies.worker``) with torchrun's environment variables.
If a rank exits non-zero, the others are killed at once (their process groups), so a failed
or out-of-memory rank never leaves the rest hung in a collective; the failing rank's one-line
message becomes the error. A timeout ends everything the same way.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from planner.errors import TrainplanError


class RunFailedError(TrainplanError):
    kind = "run_failed"
    user_mistake = False

    def __init__(self, message: str, rank: int | None = None, oom: bool = False):
        self.rank, self.oom = rank, oom
        super().__init__(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
    deadline = time.time() + 5
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def _last_line(path: Path) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("rank "):
            return line
    return lines[-1] if lines else ""


# What a rank reports when another rank died under it, not why the run failed.
_PEER_FAILURE = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "remote process exited",
                 "NCCL communicator was aborted", "Socket Timeout", "Connection refused")


def _root_cause(failed: list[int], logs: list[Path]) -> int:
    """The failed rank whose message is its own error rather than a lost peer."""
    for rank in failed:
        if not any(marker in _last_line(logs[rank]) for marker in _PEER_FAILURE):
            return rank
    return failed[0]


def launch(config_json: str, nproc: int, timeout_s: float = 600.0, threads_per_rank: int | None = None,
           worker: str = "strategies.worker"):
    """Runs ``nproc`` ranks of the run described by ``config_json`` (a RunConfig) as ``python -m
    <worker>`` (``profiler.worker`` for a profiled run); returns the RunResult JSON text written
    by rank 0. Raises RunFailedError."""
    with tempfile.TemporaryDirectory(prefix="trainplan-run-") as tmp:
        folder = Path(tmp)
        config_path, result_path = folder / "run.json", folder / "result.json"
        config_path.write_text(config_json)
        port = free_port()
        procs, logs = [], []
        threads = threads_per_rank or max(1, (os.cpu_count() or 1) // nproc)
        for rank in range(nproc):
            env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                       LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                       OMP_NUM_THREADS=str(threads))
            log = folder / f"rank{rank}.log"
            logs.append(log)
            procs.append(subprocess.Popen([sys.executable, "-m", worker, str(config_path),
                                           str(result_path)], env=env, stdout=subprocess.DEVNULL,
                                          stderr=log.open("w"), start_new_session=True))
        deadline = time.time() + timeout_s
        try:
            while True:
                codes = [p.poll() for p in procs]
                failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
                if failed:
                    _kill(procs)
                    rank = _root_cause(failed, logs)
                    code = procs[rank].returncode
                    line = _last_line(logs[rank]) or f"rank {rank} exited with code {code}"
                    raise RunFailedError(f"run failed: {line}", rank=rank, oom=code == 3)
                if all(c == 0 for c in codes):
                    break
                if time.time() > deadline:
                    _kill(procs)
                    raise RunFailedError(f"run timed out after {timeout_s:.0f} s; all ranks were stopped")
                time.sleep(0.05)
        except KeyboardInterrupt:
            _kill(procs)
            raise
        if not result_path.exists():
            raise RunFailedError("run finished without a result (rank 0 wrote nothing)")
        return result_path.read_text()
