"""One rank of a run. torchrun-compatible: reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT from the environment, so both work:

    trainplan run --model tiny-llama --nproc 4 --strategy zero3 ...
    torchrun --nproc-per-node 4 -m strategies.worker run.json result.json

NCCL when CUDA is present, gloo otherwise. Rank 0 gathers every rank's record and writes the
result atomically. A failure prints one line ("rank R: ...") on stderr and exits non-zero
(3 for out-of-memory), so the launcher can end the other ranks.
"""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

EXIT_FAILED, EXIT_OOM = 1, 3


def main(argv: list[str] | None = None, phase_tracker=None, alloc_tracer=None) -> int:
    """``phase_tracker``: measures a profiled step per phase; ``alloc_tracer``: builds the
    allocation tracer of a traced run from the device type (``profiler.worker`` passes both)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m strategies.worker RUN_CONFIG.json RESULT.json", file=sys.stderr)
        return 2
    config_path, result_path = argv
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    try:
        return _run(config_path, result_path, rank, world, local_rank, phase_tracker, alloc_tracer)
    except Exception as exc:  # one line for the launcher; the traceback is not the user's problem
        oom = type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower()
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if oom and not message.startswith("out of memory"):
            message = f"out of memory: {message}"
        print(f"rank {rank}: {message if oom else f'{type(exc).__name__}: {message}'}", file=sys.stderr, flush=True)
        if os.environ.get("TRAINPLAN_TRACEBACK"):
            import traceback

            traceback.print_exc()
        # Leave at once: the other ranks may sit in a collective this one will never join, and
        # tearing the process group down politely would wait for them.
        os._exit(EXIT_OOM if oom else EXIT_FAILED)


def _run(config_path: str, result_path: str, rank: int, world: int, local_rank: int, phase_tracker=None,
         alloc_tracer=None) -> int:
    import torch
    import torch.distributed as dist

    from planner.params import total_params
    from strategies.files import write_atomic
    from strategies.train import RunConfig, RunResult, run_rank

    config = RunConfig.model_validate_json(Path(config_path).read_text())
    if config.train.alloc_conf == "expandable_segments":  # read by the caching allocator at its first use
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if config.simulate_world:
        # One process stands in for rank 0 of a larger world: collectives are no-ops.
        from torch.testing._internal.distributed.fake_pg import FakeStore

        rank, world, backend = 0, config.simulate_world, "fake"
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    elif world > 1 or "MASTER_ADDR" in os.environ:
        dist.init_process_group(backend, rank=rank, world_size=world,
                                device_id=device if device.type == "cuda" else None)
    tracer = alloc_tracer(device.type) if config.trace_allocations and alloc_tracer is not None else None
    records, bytes_record = run_rank(config, rank, world, device, phase_tracker, tracer)
    try:
        gathered = [None] * world
        if dist.is_initialized() and not config.simulate_world:
            dist.all_gather_object(gathered, bytes_record)
        else:
            gathered = [bytes_record]
        if rank == 0:
            # a profiled run's last step carries the memory tracker: not a timing
            untracked = records[:-1] if config.profile else records
            timed = [r.step_time_s for r in untracked[config.warmup:]] or [r.step_time_s for r in untracked]
            median = statistics.median(timed)
            result = RunResult(
                model_name=config.model.name,
                num_params=total_params(config.model),
                train=config.train,
                world=world,
                backend=backend,
                device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                torch_version=torch.__version__,
                steps=records,
                ranks=gathered,
                median_step_time_s=median,
                tokens_per_s=config.train.global_batch * config.train.seq_len / median,
                simulated_world=config.simulate_world,
                allocations=[list(event) for event in tracer.events] if tracer is not None else None,
            )
            write_atomic(result_path, result.model_dump_json(indent=2))
    finally:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
    return 0


def exit_now(code: int) -> None:
    """Skip interpreter teardown: with gloo, destructors of background threads sometimes call
    std::terminate after a clean destroy_process_group(), turning a finished rank into a crash.
    Everything the run produced is written by now."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
