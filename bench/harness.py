"""Shared benchmark plumbing: device choice, peak memory, and the extra_info every
benchmark records so bench/report.py can write CSV rows and ratio tables.

SCORE_FAST_BENCH_DEVICE=cpu|cuda picks the device (default: cuda when available).
SCORE_FAST_BENCH_QUICK=1 shrinks every shape to a smoke test (tests/test_bench_smoke.py)."""
import ctypes
import ctypes.util
import os
import re
import subprocess

import torch

QUICK = os.environ.get("SCORE_FAST_BENCH_QUICK") == "1"


def _fixed_mmap_threshold(nbytes: int = 1 << 20) -> None:
    """CPU peak memory is the RSS high-water mark. glibc raises its mmap threshold after each
    large free (up to 32 MB), after which big tensors come from the heap and reuse pages an
    earlier provider left resident: a later provider's peak would read as ~0. A fixed 1 MB
    threshold keeps every tensor >= 1 MB in its own mapping, returned to the OS on free
    (tests/conftest.py does the same for the memory tests)."""
    name = ctypes.util.find_library("c")
    if name:
        try:
            ctypes.CDLL(name).mallopt(-3, nbytes)  # M_MMAP_THRESHOLD (glibc)
        except (OSError, AttributeError):
            pass


_fixed_mmap_threshold()


def bench_device() -> str:
    return os.environ.get("SCORE_FAST_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        model = re.search(r"model name\s*:\s*(.*)", open("/proc/cpuinfo").read()).group(1)
    except (OSError, AttributeError):
        model = "cpu"
    return f"{model} x{os.cpu_count()}"


def _status(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024


def peak_memory(fn, device: str) -> int:
    """Bytes allocated by one call of fn above what was live before it. CUDA: the caching
    allocator's peak. CPU: the resident-set high-water mark, reset through
    /proc/self/clear_refs, so numpy, torch and C++ allocations all count."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status("VmRSS")
        fn()
        return _status("VmHWM") - base
    except OSError:
        return -1  # no procfs: unknown, reported as such


def run(benchmark, fn, *, device, provider, shape, dtype="", baseline=None, bytes_moved=0,
        flops=0, rounds=5, warmup=1, **extra):
    """Time fn with pytest-benchmark (device-synchronised) and record what the reporter
    needs. `baseline` names the provider that speed ratios in the table are taken against."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    peak = peak_memory(fn, device)

    def timed():
        fn()
        sync()

    benchmark.extra_info.update(
        provider=provider, shape=shape, dtype=dtype, baseline=baseline or "",
        bytes=bytes_moved, flops=flops, peak_mem=peak, device=device_name(device), **extra)
    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=warmup, iterations=1)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=os.path.dirname(__file__)).stdout.strip() or "unknown"
    except OSError:
        return "unknown"
