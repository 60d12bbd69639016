"""Measurement helpers for benchmarks/run.py: interleaved paired timing, peak-memory sampling, machine facts.

The CPUs these runs share are noisy, so every comparison runs its contenders alternately in one process
(A, B, C, A, B, C, ...), reports per-contender medians, and gives speed-ups as the median of the per-round
ratios (paired rounds cancel slow drifts in machine load).
"""

from __future__ import annotations

import ctypes
import os
import platform
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timings:
    """Seconds per call for each contender, one entry per interleaved round."""

    seconds: dict[str, list[float]] = field(default_factory=dict)

    def median(self, name: str) -> float:
        return statistics.median(self.seconds[name])

    def best(self, name: str) -> float:
        return min(self.seconds[name])

    def speedup(self, ours: str, theirs: str) -> float:
        """Median over rounds of theirs/ours (> 1: ours is faster)."""
        return statistics.median(t / o for o, t in zip(self.seconds[ours], self.seconds[theirs]))

    def summary(self) -> dict[str, dict[str, float]]:
        return {name: {"median_s": self.median(name), "min_s": self.best(name), "rounds": len(values)}
                for name, values in self.seconds.items()}


def interleaved(contenders: dict[str, Callable[[], object]], rounds: int, device: torch.device,
                warmup: int = 1, setup: Callable[[str], None] | None = None, lead_in: int = 0,
                new_round: Callable[[], None] | None = None) -> Timings:
    """Time each contender `rounds` times, alternating between them; `setup(name)` runs untimed before a call.
    With `lead_in`, each timed call follows that many untimed calls of the same contender, so it runs in the
    cache and allocator state its own previous call left (as consecutive training steps do), not another's.
    `new_round()` runs before each round (e.g. to draw that round's batch, the same for every contender)."""
    for _ in range(warmup):
        for name, fn in contenders.items():
            if setup is not None:
                setup(name)
            fn()
    timings = Timings({name: [] for name in contenders})
    for _ in range(rounds):
        if new_round is not None:
            new_round()
        for name, fn in contenders.items():
            for _ in range(lead_in):
                if setup is not None:
                    setup(name)
                fn()
            if setup is not None:
                setup(name)
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            timings.seconds[name].append(time.perf_counter() - start)
    return timings


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _malloc_in_use() -> Callable[[], int] | None:
    """Bytes currently allocated through glibc malloc (heap in use + mmapped chunks), or None off glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        return None

    def in_use() -> int:
        info = libc.mallinfo2()
        return info.uordblks + info.hblkhd

    return in_use


def _rss_anon() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakMemory:
    """Peak memory a block allocates above its starting level: CUDA allocator statistics; on CPU glibc's count of
    allocated bytes (mallinfo2, which torch's CPU allocator goes through; RssAnon elsewhere), sampled every
    millisecond by a thread, so very short peaks can be missed."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_bytes = 0
        self._running = False
        self._read = _malloc_in_use() or _rss_anon

    def _sample(self) -> None:
        while self._running:
            self._peak = max(self._peak, self._read())
            time.sleep(0.001)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            self._start = self._peak = self._read()
            self._running = True
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._start
        else:
            self._running = False
            self._thread.join()
            self.peak_bytes = max(self._peak, self._read()) - self._start


def _cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat."""
    with open("/proc/stat") as handle:
        fields = [int(v) for v in handle.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def others_cpu_use(seconds: float = 2.0) -> float:
    """Fraction of all CPUs busy over `seconds` while this process sleeps: other jobs' load (0 = quiet)."""
    try:
        busy0, total0 = _cpu_times()
        time.sleep(seconds)
        busy1, total1 = _cpu_times()
    except OSError:
        return float("nan")
    return (busy1 - busy0) / max(total1 - total0, 1)


def wait_for_quiet(max_busy: float, timeout: float) -> float:
    """Sleep until other jobs use at most `max_busy` of the CPUs (or `timeout` seconds pass); returns the last
    measured fraction. On a shared machine this keeps a part from running through someone else's burst."""
    deadline = time.time() + timeout
    busy = others_cpu_use()
    while busy > max_busy and time.time() < deadline:
        busy = others_cpu_use()
    return busy


def machine(device: torch.device) -> dict[str, object]:
    """What ran the benchmark: CPU model and cores (lscpu), threads, torch/transformers versions, GPU name."""
    info: dict[str, object] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in lscpu.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("Model name", "CPU(s)", "Thread(s) per core", "Core(s) per socket", "Flags"):
                value = value.strip()
                if key.strip() == "Flags":  # only the vector extensions that matter for GEMM speed
                    value = " ".join(f for f in value.split() if f.startswith(("avx", "amx", "fma")))
                info[f"lscpu {key.strip()}"] = value
    except (OSError, subprocess.CalledProcessError):
        info["cpu"] = platform.processor()
    if device.type == "cuda":
        from gpu_bench import gpu_facts

        info.update(gpu_facts(device))
    return info


def matmul_size(device: torch.device) -> int:
    """Side of the plain square matmul that gives the GEMM ceiling: 2048 on CPU, 8192 on a GPU (a 2048^3
    product takes ~20 us there, too little to fill the chip past launch overhead)."""
    return 8192 if device.type == "cuda" else 2048


def matmul_flops(device: torch.device, dtype: torch.dtype, size: int | None = None) -> tuple[dict[str, Callable[[], object]], float]:
    """Plain square matmuls ("matmul_<size>") and their FLOP count: torch.mm and, on CPU fp32 where torch has it,
    the same product through oneDNN (on some CPUs, AMD's among them, far faster than torch.mm's MKL path). The
    faster of the two is the machine's practical GEMM ceiling. Random operands (zeros run faster on GPUs)."""
    from hf_moe.kernels.cpu import gemm

    size = size or matmul_size(device)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    contenders: dict[str, Callable[[], object]] = {f"matmul_{size}": lambda: torch.mm(a, b)}
    if device.type == "cpu" and dtype == torch.float32 and gemm.onednn_available():
        contenders[f"matmul_{size}_onednn"] = lambda: gemm.onednn_mm(a, b)
    return contenders, 2.0 * size**3


def matmul_ceiling(timings: Timings, flops: float) -> tuple[float, str]:
    """(FLOP/s, name) of the fastest plain matmul ("matmul_<size>[_onednn]") timed in `timings`."""
    names = [name for name in timings.seconds if name.startswith("matmul_")]
    best = min(names, key=timings.median)
    return flops / timings.median(best), best


def copy_bandwidth(device: torch.device, megabytes: int = 256, rounds: int = 5) -> float:
    """Bytes/s of a large tensor copy (read + write): the practical memory-bandwidth ceiling. On a GPU: 1 GiB,
    timed with CUDA events (`gpu_bench.copy_bandwidth_cuda`)."""
    if device.type == "cuda":
        from gpu_bench import copy_bandwidth_cuda

        return copy_bandwidth_cuda(device)
    src = torch.empty(megabytes * 2**20 // 4, device=device, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(rounds):
        synchronize(device)
        start = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * src.element_size() / best
