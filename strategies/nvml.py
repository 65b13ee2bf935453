"""NVML (``nvidia-ml-py``): what the driver says about the GPUs, without initialising CUDA.

Without an NVIDIA driver every query fails the same clear way: ``NvmlUnavailable("no NVIDIA
driver: ...")``; ``device_count()`` then answers 0.
"""

from __future__ import annotations

from contextlib import contextmanager

from planner.errors import TrainplanError


class NvmlUnavailable(TrainplanError):
    kind = "no_gpu"
    user_mistake = False


@contextmanager
def nvml():
    try:
        import pynvml
    except ImportError:
        raise NvmlUnavailable("no NVIDIA driver: the nvidia-ml-py package is not installed") from None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        raise NvmlUnavailable(f"no NVIDIA driver: NVML cannot start ({exc})") from None
    try:
        yield pynvml
    finally:
        pynvml.nvmlShutdown()


def device_count() -> int:
    try:
        with nvml() as pynvml:
            return pynvml.nvmlDeviceGetCount()
    except NvmlUnavailable:
        return 0


def device_info(index: int = 0) -> dict:
    """Name, total and used memory (bytes) and driver version of one GPU."""
    with nvml() as pynvml:
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
        name = pynvml.nvmlDeviceGetName(handle)
        driver = pynvml.nvmlSystemGetDriverVersion()
        return {
            "name": name.decode() if isinstance(name, bytes) else name,
            "memory_total": int(memory.total),
            "memory_used": int(memory.used),
            "driver": driver.decode() if isinstance(driver, bytes) else driver,
        }


def process_used_memory(index: int = 0, pid: int | None = None) -> int | None:
    """Device memory NVML attributes to one process (includes the CUDA context and NCCL
    buffers, which the caching allocator does not see); None where the driver does not say."""
    import os

    pid = os.getpid() if pid is None else pid
    with nvml() as pynvml:
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        for getter in ("nvmlDeviceGetComputeRunningProcesses_v3", "nvmlDeviceGetComputeRunningProcesses"):
            fn = getattr(pynvml, getter, None)
            if fn is None:
                continue
            try:
                for proc in fn(handle):
                    if proc.pid == pid and proc.usedGpuMemory is not None:
                        return int(proc.usedGpuMemory)
            except pynvml.NVMLError:
                continue
        return None
