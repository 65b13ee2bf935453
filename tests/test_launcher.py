"""The ranks of a run never outlive the command that started them (issue 10): SIGTERM stops
them and removes the run's folder; after a SIGKILL the kernel kills them (PR_SET_PDEATHSIG)
and the next run removes the folder left behind."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest

pytestmark = [pytest.mark.dist]


def _children(pid: int) -> list[int]:
    found = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = open(stat).read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.split("/")[2]))
    return found


def _alive(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_killing_run_leaves_no_rank_alive(sig):
    cli = subprocess.Popen([sys.executable, "-m", "trainplan.cli", "run", "--model", "tiny-llama", "--nproc", "2",
                            "--steps", "100000", "--seq-len", "64"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while len(ranks := _children(cli.pid)) < 2 and time.time() < deadline:
            time.sleep(0.1)
        assert len(ranks) == 2, "the ranks did not start"
        time.sleep(1)
        folders = glob.glob(os.path.join(tempfile.gettempdir(), f"trainplan-run-{cli.pid}-*"))
        assert len(folders) == 1
        os.kill(cli.pid, sig)
        cli.wait(timeout=30)
        time.sleep(5)
        assert [pid for pid in ranks if _alive(pid)] == []
        if sig == signal.SIGTERM:
            assert cli.returncode == 1 and "interrupted" in cli.stderr.read().decode()
            assert not os.path.exists(folders[0])
        else:
            from strategies.launch import remove_stale_run_folders

            assert folders[0] in remove_stale_run_folders()  # what the next run does first
            assert not os.path.exists(folders[0])
    finally:
        if cli.poll() is None:
            cli.kill()
