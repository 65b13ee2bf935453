"""One rank of a profiled run: ``strategies.worker`` with the profiler's per-phase memory
tracker injected (the strategy layer runs the steps; this layer measures them).

    torchrun --nproc-per-node 2 -m profiler.worker run.json result.json
"""

from __future__ import annotations

from profiler.alloc_trace import AllocationTrace
from profiler.memory import fix_mmap_threshold, phase_memory
from strategies.worker import exit_now, main

if __name__ == "__main__":
    fix_mmap_threshold()  # before the run allocates: compiled runs are measured by high-water mark
    exit_now(main(phase_tracker=phase_memory, alloc_tracer=AllocationTrace))
