"""Launching the ranks of a run and watching them.

One process per rank (``python -m strategies.worker``) with torchrun's environment variables.
If a rank exits non-zero, the others are killed at once (their process groups), so a failed
or out-of-memory rank never leaves the rest hung in a collective; the failing rank's one-line
message becomes the error. A timeout ends everything the same way.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
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


RUN_FOLDER_PREFIX = "trainplan-run-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_run_folders(root: str | None = None) -> list[str]:
    """Folders of runs whose launcher is gone (killed with SIGKILL, say): removed at the start
    of the next run. A folder is named ``trainplan-run-<launcher pid>-<random>``."""
    removed = []
    for folder in Path(root or tempfile.gettempdir()).glob(f"{RUN_FOLDER_PREFIX}*"):
        owner = folder.name[len(RUN_FOLDER_PREFIX):].split("-", 1)[0]
        if folder.is_dir() and owner.isdigit() and not _alive(int(owner)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(str(folder))
    return removed


def _die_with_parent() -> None:
    """In each rank, before it runs: a new session (its own process group, so the launcher can
    stop it and its children at once), and SIGKILL when the launcher dies, however it dies
    (Linux's PR_SET_PDEATHSIG; a killed launcher cannot clean up after itself)."""
    os.setsid()
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1


@contextlib.contextmanager
def _terminate_as_interrupt():
    """SIGTERM on the launcher stops its ranks and removes the run folder like Ctrl-C does."""
    def stop(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _watch(procs: list[subprocess.Popen], logs: list[Path], deadline: float, timeout_s: float) -> None:
    """Until every rank exits 0; the first failed rank's own error (or a timeout) is raised."""
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
            return
        if time.time() > deadline:
            raise RunFailedError(f"run timed out after {timeout_s:.0f} s; all ranks were stopped")
        time.sleep(0.05)


def launch(config_json: str, nproc: int, timeout_s: float = 600.0, threads_per_rank: int | None = None,
           worker: str = "strategies.worker"):
    """Runs ``nproc`` ranks of the run described by ``config_json`` (a RunConfig) as ``python -m
    <worker>`` (``profiler.worker`` for a profiled run); returns the RunResult JSON text written
    by rank 0. Raises RunFailedError, or ConfigError for a layout the strategy layer does not
    execute (before any rank starts). The ranks never outlive the launcher: SIGTERM or Ctrl-C
    stops them, and a SIGKILLed launcher takes them along (``_die_with_parent``)."""
    from strategies.nvml import device_count
    from strategies.train import RunConfig, check_runnable

    config = RunConfig.model_validate_json(config_json)
    check_runnable(config, cuda=device_count() > 0)
    remove_stale_run_folders()
    with _terminate_as_interrupt(), tempfile.TemporaryDirectory(prefix=f"{RUN_FOLDER_PREFIX}{os.getpid()}-") as tmp:
        folder = Path(tmp)
        config_path, result_path = folder / "run.json", folder / "result.json"
        config_path.write_text(config_json)
        port = free_port()
        procs, logs = [], []
        threads = threads_per_rank or max(1, (os.cpu_count() or 1) // nproc)
        try:
            for rank in range(nproc):
                env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                           LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                           OMP_NUM_THREADS=str(threads))
                log = folder / f"rank{rank}.log"
                logs.append(log)
                with log.open("w") as stderr:
                    procs.append(subprocess.Popen([sys.executable, "-m", worker, str(config_path), str(result_path)],
                                                  env=env, stdout=subprocess.DEVNULL, stderr=stderr,
                                                  preexec_fn=_die_with_parent))
            _watch(procs, logs, time.time() + timeout_s, timeout_s)
        except BaseException:  # Ctrl-C, SIGTERM, a failed rank, a timeout: no rank outlives this
            _kill(procs)
            raise
        if not result_path.exists():
            raise RunFailedError("run finished without a result (rank 0 wrote nothing)")
        return result_path.read_text()
