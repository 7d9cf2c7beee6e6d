"""Tokens per second and model FLOPs utilisation (MFU) against the hardware's dense peak.

MFU = achieved training FLOP/s / peak FLOP/s, with training FLOPs per token from `model.flops_per_token()`
(6N + attention). GPUs are looked up in a table of vendor datasheet peaks (dense, no sparsity); on CPU the peak
is a matmul measured briefly at start-up, so CPU MFU says how close the loop gets to what this machine's matmul
can do, not to a marketing figure.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

# Dense peak FLOP/s per device by dtype, from the vendor datasheets. "fp32" is the non-tensor-core FP32 peak, what
# torch's fp32 matmuls run at by default; "tf32" the tensor-core peak they run at once TF32 is allowed
# (torch.set_float32_matmul_precision("high"), as Lightning suggests on every Ampere or newer GPU); None: no TF32.
# Order matters: the first substring of the device name that matches wins, so "H100 PCIe" precedes "H100" and
# "A100" precedes "A10".
GPU_PEAK_FLOPS: tuple[tuple[str, dict[str, float | None]], ...] = (
    ("GH200", {"bf16": 989.4e12, "fp16": 989.4e12, "fp32": 66.9e12, "tf32": 494.7e12}),
    ("H200 NVL", {"bf16": 835.5e12, "fp16": 835.5e12, "fp32": 60.0e12, "tf32": 417.5e12}),
    ("H200", {"bf16": 989.4e12, "fp16": 989.4e12, "fp32": 66.9e12, "tf32": 494.7e12}),  # SXM
    ("H100 PCIe", {"bf16": 756.5e12, "fp16": 756.5e12, "fp32": 51.2e12, "tf32": 378e12}),
    ("H100 NVL", {"bf16": 835.5e12, "fp16": 835.5e12, "fp32": 60.0e12, "tf32": 417.5e12}),
    ("H100", {"bf16": 989.4e12, "fp16": 989.4e12, "fp32": 66.9e12, "tf32": 494.7e12}),  # SXM
    ("A100", {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12, "tf32": 156e12}),
    ("L40S", {"bf16": 362.05e12, "fp16": 362.05e12, "fp32": 91.6e12, "tf32": 183e12}),
    ("L40", {"bf16": 181.05e12, "fp16": 181.05e12, "fp32": 90.5e12, "tf32": 90.5e12}),
    ("L4", {"bf16": 121e12, "fp16": 121e12, "fp32": 30.3e12, "tf32": 60e12}),
    ("RTX 4090", {"bf16": 165.2e12, "fp16": 165.2e12, "fp32": 82.6e12, "tf32": 82.6e12}),  # fp32 accumulate
    ("RTX 3090", {"bf16": 71e12, "fp16": 71e12, "fp32": 35.6e12, "tf32": 35.6e12}),
    ("A6000", {"bf16": 154.8e12, "fp16": 154.8e12, "fp32": 38.7e12, "tf32": 77.4e12}),
    ("A10G", {"bf16": 70e12, "fp16": 70e12, "fp32": 31.2e12, "tf32": 35e12}),
    ("A10", {"bf16": 125e12, "fp16": 125e12, "fp32": 31.2e12, "tf32": 62.5e12}),
    ("V100", {"bf16": None, "fp16": 125e12, "fp32": 15.7e12, "tf32": None}),  # no bf16 tensor cores
    ("T4", {"bf16": None, "fp16": 65e12, "fp32": 8.1e12, "tf32": None}),
)

CPU_PROBE_SIZE = 1024  # largest square matmul side: as large as the big training matmuls, so the peak is a fair one
CPU_PROBE_SECONDS = 0.25  # per dtype; start-up cost stays well under a second
CPU_PROBE_SMALLEST = 128  # the side that sizes the probe: milliseconds even where bf16 is emulated


def precision_dtype(precision: str) -> str:
    """The dtype the matmuls run in for a Fabric precision string."""
    if precision.startswith("bf16"):
        return "bf16"
    if precision.startswith("16"):
        return "fp16"
    return "fp32"


def gpu_peak_flops(device_name: str, dtype: str) -> float | None:
    for key, peaks in GPU_PEAK_FLOPS:
        if key.lower() in device_name.lower():
            return peaks.get(dtype)
    return None


def probe_side(torch_dtype: torch.dtype, seconds: float, largest: int = CPU_PROBE_SIZE) -> int:
    """The matmul side that fits several calls into `seconds`: `largest` on a CPU that runs this dtype natively, less
    where it is emulated. A 1024-wide bf16 matmul took 2.5 s on an AMD EPYC without native bf16, so a fixed side made
    each run's start-up probe (a warm-up and two timed calls) cost 7.5 s there."""
    a = torch.ones(CPU_PROBE_SMALLEST, CPU_PROBE_SMALLEST, dtype=torch_dtype)
    a @ a  # first call pays for kernel selection
    began = time.perf_counter()
    a @ a
    rate = 2 * CPU_PROBE_SMALLEST**3 / max(time.perf_counter() - began, 1e-9)
    fitting = (rate * seconds / 8 / 2) ** (1 / 3)  # a warm-up and about seven timed calls in `seconds`
    return int(min(largest, max(CPU_PROBE_SMALLEST, fitting // 64 * 64)))


def measure_cpu_peak_flops(dtype: str = "fp32", seconds: float = CPU_PROBE_SECONDS, size: int = CPU_PROBE_SIZE) -> float:
    """FLOP/s of a square matmul (side `size`, smaller where this CPU emulates the dtype: `probe_side`) on this CPU
    with the current torch thread count: its fastest call in `seconds`.

    The fastest call, not the mean: on a machine other work shares, the mean would count that work's time against
    the CPU, and two runs of one model would report MFUs far apart (15% and 30% were seen); the fastest call is
    the one that had the cores to itself.
    """
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.bfloat16, "fp32": torch.float32}[dtype]
    size = probe_side(torch_dtype, seconds, size)
    # Its own generator: the global one was just restored from a checkpoint, and dropout must draw from it as the
    # uninterrupted run did (exact resume).
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, dtype=torch_dtype, generator=generator)
    b = torch.randn(size, size, dtype=torch_dtype, generator=generator)
    a @ b  # warm-up: first call pays for kernel selection
    fastest, calls = math.inf, 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or calls < 2:
        began = time.perf_counter()
        a @ b
        fastest = min(fastest, time.perf_counter() - began)
        calls += 1
    return 2 * size**3 / fastest


def flops_rate(flops_per_s: float) -> str:
    """`0.41 TFLOP/s`, or `31.4 GFLOP/s` / `0.8 GFLOP/s` where TFLOP/s would keep one digit or none (a CPU, and one
    without fast bf16)."""
    if flops_per_s >= 0.1e12:
        return f"{flops_per_s / 1e12:,.2f} TFLOP/s"
    return f"{flops_per_s / 1e9:.3g} GFLOP/s"


# A CPU whose bf16 matmul is slower than this fraction of its fp32 one has no native bf16 (AVX512-BF16 or AMX): torch
# converts every bf16 product, 65-75x slower than fp32 on one AMD EPYC here, where one with AMX ran bf16 2.3x faster.
SLOW_BF16_FRACTION = 0.5
# Both dtypes at one size on one thread: a ratio is wanted, and small matmuls on every thread stall on their barrier
# whenever another process holds a core (fp32 at this size read 2.5 GFLOP/s on all threads of a busy machine, 80 on one).
SLOW_BF16_PROBE_SIZE = 256


def slow_cpu_bf16_warning(precision: str, muon: bool) -> str | None:
    """A warning when this CPU has no native bf16 and the run would use it: a bf16 precision (the CPU configs' choice,
    right only where the CPU has it), or Muon, whose Newton-Schulz iterations torch runs in bf16 whatever the
    precision. Costs about half a second, only for such runs."""
    bf16 = precision_dtype(precision) in ("bf16", "fp16")  # CPU: 16-mixed autocasts to bf16
    if not (bf16 or muon):
        return None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        bf16_peak, fp32_peak = (measure_cpu_peak_flops(dtype, size=SLOW_BF16_PROBE_SIZE) for dtype in ("bf16", "fp32"))
    finally:
        torch.set_num_threads(threads)
    if bf16_peak >= SLOW_BF16_FRACTION * fp32_peak:
        return None
    measured = (f"warning: this CPU multiplies bf16 matrices about {fp32_peak / bf16_peak:,.0f}x slower than fp32 ones "
                f"({bf16_peak / 1e9:.3g} against {fp32_peak / 1e9:.3g} GFLOP/s on one core): it has no native bf16 "
                "(AVX512-BF16 or AMX)")
    if bf16:
        shown = f"{precision} (bf16 on a CPU)" if precision_dtype(precision) == "fp16" else precision
        return (f"{measured}, so train.precision {shown} would train faster here as --train.precision 32-true"
                + (" (Muon's Newton-Schulz iterations stay in bf16 either way)" if muon else ""))
    return (f"{measured}, and torch's Muon runs its Newton-Schulz iterations in bf16 whatever train.precision is, "
            "which slows each step here (train.optimizer adamw has no such cost)")


def peak_flops(device: torch.device, precision: str) -> float | None:
    """Peak FLOP/s of one device for this precision; None when unknown (MFU is then not reported)."""
    dtype = precision_dtype(precision)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if dtype == "fp32" and torch.get_float32_matmul_precision() != "highest":  # fp32 matmuls run as TF32
            return gpu_peak_flops(name, "tf32") or gpu_peak_flops(name, "fp32")  # no TF32 (V100, T4): plain fp32
        return gpu_peak_flops(name, dtype)
    if device.type == "cpu":
        return measure_cpu_peak_flops(dtype)
    return None


@dataclass
class ThroughputMeter:
    """Tokens/s and MFU over the steps since the last `measure()`; counts all ranks' tokens.

    Time spent `paused()` (validation, checkpoint saves) is left out, so the figures after a validation are the
    training step's speed, not a dip that depends on val_interval and the disk.
    """

    flops_per_token: int
    peak_flops_per_device: float | None
    world_size: int = 1
    _tokens: int = 0
    _start: float | None = None
    _paused_seconds: float = 0.0
    _windows: list[float] = field(default_factory=list)  # tokens/s of every window measured

    def start(self) -> None:
        self._tokens = 0
        self._paused_seconds = 0.0
        self._start = time.perf_counter()

    def add(self, tokens: int) -> None:
        self._tokens += tokens

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Work inside that is not training: its wall time does not count towards the window."""
        began = time.perf_counter()
        try:
            yield
        finally:
            self._paused_seconds += time.perf_counter() - began

    def measure(self) -> tuple[float, float | None]:
        """(tokens/s, MFU or None) since the last call, then restart the window."""
        if self._start is None:
            self.start()
            return 0.0, None
        elapsed = max(time.perf_counter() - self._start - self._paused_seconds, 1e-9)
        tokens_per_s = self._tokens / elapsed
        self._windows.append(tokens_per_s)
        self.start()
        return tokens_per_s, mfu(tokens_per_s, self.flops_per_token, self.peak_flops_per_device, self.world_size)

    def median_tokens_per_s(self) -> float | None:
        """The training speed to quote: the median window (None before the first)."""
        return statistics.median(self._windows) if self._windows else None


def mfu(tokens_per_s: float, flops_per_token: int, peak_per_device: float | None, world_size: int = 1) -> float | None:
    if not peak_per_device:
        return None
    return tokens_per_s * flops_per_token / (peak_per_device * world_size)
