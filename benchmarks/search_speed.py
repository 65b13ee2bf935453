"""Times the planner's full search (every knob open) and prints the figures.

    python benchmarks/search_speed.py [--out benchmarks/results/search_speed.json]

Cases: llama-2-70b on 1,024 H100s (global batch 1,024) and llama-2-7b on 8 H100s; each is
timed in-process (search only, best of 5, caches cleared before each run so every run does
the full work), then ``plan --model 7b --gpus 8`` end to end as a subprocess (process start
to exit, best of 5), and the 70B search the same way. The screen forks one child for a large
search on a machine with two cores (planner/search.py, ``_screen``); the single-process figure
(``TRAINPLAN_SEARCH_WORKERS=1``) is printed beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path


def time_search(model_name: str, gpus: int, global_batch: int | None, repeats: int = 5) -> tuple[float, int, int]:
    from planner import clear_caches
    from planner.catalog import load_gpu, load_model
    from planner.search import SearchSpace, search

    best, result = float("inf"), None
    for _ in range(repeats):
        clear_caches()
        start = time.perf_counter()
        model, gpu = load_model(model_name), load_gpu("h100-sxm-80gb")
        space = SearchSpace(gpus=gpus, gpus_per_node=min(8, gpus), global_batch=global_batch)
        result = search(model, gpu, space, top=10)
        best = min(best, time.perf_counter() - start)
    return best, result.num_candidates, result.num_fitting


def time_cli(args: list[str], repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "trainplan.cli", *args], check=True, capture_output=True)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    from planner.search import PARALLEL_SCREEN_MIN

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None, help="also write the figures as JSON")
    out = parser.parse_args().out
    machine = f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} cores"
    print(machine)
    lines = []
    for model, gpus, batch in (("llama-2-70b", 1024, 1024), ("llama-2-7b", 8, None)):
        seconds, candidates, fitting = time_search(model, gpus, batch)
        one = ""
        if candidates >= PARALLEL_SCREEN_MIN:  # smaller searches run in one process anyway
            os.environ["TRAINPLAN_SEARCH_WORKERS"] = "1"
            one = f" ({time_search(model, gpus, batch)[0] * 1e3:.0f} ms in one process)"
            del os.environ["TRAINPLAN_SEARCH_WORKERS"]
        lines.append(f"search {model} on {gpus} GPUs (global batch {batch or gpus}): {candidates:,} candidates "
                     f"evaluated, {fitting:,} fit, {seconds * 1e3:.0f} ms{one}")
        print(lines[-1])
    for args in (["plan", "--model", "7b", "--gpus", "8"],
                 ["plan", "--model", "llama-2-70b", "--gpus", "1024", "--global-batch", "1024"]):
        seconds = time_cli(args)
        lines.append(f"`{' '.join(args)}` end to end (process start to exit): {seconds * 1e3:.0f} ms")
        print(lines[-1])
    if out:
        from strategies.files import write_atomic

        Path(out).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out, json.dumps({"machine": machine, "date": time.strftime("%Y-%m-%d"), "lines": lines},
                                     indent=1) + "\n")


if __name__ == "__main__":
    main()
