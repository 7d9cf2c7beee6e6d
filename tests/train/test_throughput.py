import time

import pytest
import torch

import tml.train.throughput as throughput
from tml.train.throughput import (
    CPU_PROBE_SIZE,
    SLOW_BF16_PROBE_SIZE,
    ThroughputMeter,
    flops_rate,
    gpu_peak_flops,
    measure_cpu_peak_flops,
    mfu,
    peak_flops,
    precision_dtype,
    probe_side,
    slow_cpu_bf16_warning,
)


@pytest.mark.parametrize(
    ("name", "dtype", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989.4e12),
        ("NVIDIA H100 PCIe", "fp16", 756.5e12),
        ("NVIDIA H200", "fp16", 989.4e12),
        ("NVIDIA H200 NVL", "bf16", 835.5e12),
        ("NVIDIA A100-SXM4-80GB", "bf16", 312e12),
        ("NVIDIA A10G", "fp16", 70e12),
        ("NVIDIA L40S", "bf16", 362.05e12),
        ("NVIDIA GeForce RTX 4090", "fp32", 82.6e12),
        ("Tesla V100-SXM2-16GB", "fp16", 125e12),
    ],
)
def test_peak_table_picks_the_most_specific_gpu(name, dtype, peak):
    assert gpu_peak_flops(name, dtype) == peak


def test_unknown_gpu_or_unsupported_dtype_gives_no_peak():
    assert gpu_peak_flops("Some Future GPU", "bf16") is None
    assert gpu_peak_flops("Tesla V100-SXM2-16GB", "bf16") is None


def test_precision_names_map_to_matmul_dtypes():
    assert [precision_dtype(p) for p in ("16-mixed", "bf16-mixed", "32-true")] == ["fp16", "bf16", "fp32"]


def test_mfu_is_achieved_over_peak_flops():
    assert mfu(1000.0, 6_000_000, 1e12, world_size=2) == pytest.approx(1000 * 6e6 / 2e12)
    assert mfu(1000.0, 6_000_000, None) is None


def test_cpu_peak_is_measured_and_plausible():
    peak = measure_cpu_peak_flops("fp32", seconds=0.05)
    assert 1e8 < peak < 1e14


def test_cpu_peak_is_the_fastest_matmul_call_not_the_mean_of_calls_slowed_by_other_work(monkeypatch):
    monkeypatch.setattr("tml.train.throughput.probe_side", lambda torch_dtype, seconds, largest: largest)
    # start, then per call: the loop's check, began, ended; the last check ends the probe
    clock = iter([0.0, 0.0, 0.0, 0.010, 0.010, 0.010, 0.012, 1.0])
    monkeypatch.setattr("tml.train.throughput.time.perf_counter", lambda: next(clock))
    assert measure_cpu_peak_flops("fp32", seconds=0.5) == pytest.approx(2 * CPU_PROBE_SIZE**3 / 0.002)


@pytest.mark.parametrize(("call_seconds", "side"), [(1e-5, CPU_PROBE_SIZE), (1.9e-3, 320), (2.0, 128)])
def test_the_probe_s_side_shrinks_where_this_cpu_is_slow_at_the_dtype(monkeypatch, call_seconds, side):
    """128-wide: 4.2 MFLOP. In 10 us (420 GFLOP/s) the full side fits; at 2.2 GFLOP/s (bf16 emulated) 320; at 2 MFLOP/s
    the smallest side, never a 1024-wide call that would take hours."""
    clock = iter([0.0, call_seconds])
    monkeypatch.setattr("tml.train.throughput.time.perf_counter", lambda: next(clock))
    assert probe_side(torch.float32, 0.25) == side


def test_an_emulated_bf16_probe_stays_within_its_time():
    began = time.perf_counter()
    measure_cpu_peak_flops("bf16", seconds=0.1)
    assert time.perf_counter() - began < 3  # a 1024-wide bf16 warm-up alone took 2.5 s on a CPU without native bf16


def test_meter_counts_tokens_over_the_window():
    meter = ThroughputMeter(flops_per_token=100, peak_flops_per_device=1e6)
    meter.start()
    meter.add(500)
    tokens_per_s, utilisation = meter.measure()
    assert tokens_per_s > 0 and utilisation == pytest.approx(tokens_per_s * 100 / 1e6)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_time_paused_for_validation_and_saving_is_not_counted(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr("tml.train.throughput.time.perf_counter", clock)
    meter = ThroughputMeter(flops_per_token=1, peak_flops_per_device=None)
    meter.start()
    meter.add(1000)
    clock.now += 2.0  # two seconds of training
    with meter.paused():
        clock.now += 30.0  # a validation and a checkpoint save
    assert meter.measure() == (pytest.approx(500.0), None)
    meter.add(300)
    clock.now += 3.0  # the next window starts afresh: no pause carried over
    assert meter.measure()[0] == pytest.approx(100.0)


@pytest.mark.parametrize(("name", "matmul_precision", "peak"), [
    ("NVIDIA H200", "highest", 66.9e12),  # torch's default: full fp32, no tensor cores
    ("NVIDIA H200", "high", 494.7e12),  # TF32 allowed: the tensor-core peak, or MFU would read far above 100%
    ("NVIDIA A100-SXM4-40GB", "medium", 156e12),
    ("Tesla V100-SXM2-16GB", "high", 15.7e12),  # no TF32 on Volta: the setting changes nothing
])
def test_fp32_runs_are_measured_against_the_tf32_peak_once_tf32_is_allowed(monkeypatch, name, matmul_precision, peak):
    import torch

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(matmul_precision)
    try:
        assert peak_flops(torch.device("cuda", 0), "32-true") == peak
        assert peak_flops(torch.device("cuda", 0), "bf16-mixed") == gpu_peak_flops(name, "bf16")  # unaffected
    finally:
        torch.set_float32_matmul_precision(before)


def test_rates_print_in_tflops_and_in_gflops_where_tflops_would_read_zero():
    assert flops_rate(0.412e12) == "0.41 TFLOP/s" and flops_rate(989.4e12) == "989.40 TFLOP/s"
    assert flops_rate(0.81e9) == "0.81 GFLOP/s" and flops_rate(31.42e9) == "31.4 GFLOP/s"


def test_a_cpu_without_native_bf16_is_told_that_fp32_runs_faster(monkeypatch):
    measured = {"bf16": 1.2e9, "fp32": 84e9}  # one core of an AMD EPYC without AVX512 here: bf16 matmuls 70x slower
    calls = []

    def probe(dtype="fp32", size=0):
        calls.append((dtype, size, torch.get_num_threads()))
        return measured[dtype]

    monkeypatch.setattr(throughput, "measure_cpu_peak_flops", probe)
    start = ("warning: this CPU multiplies bf16 matrices about 70x slower than fp32 ones (1.2 against 84 GFLOP/s on one "
             "core): it has no native bf16 (AVX512-BF16 or AMX)")
    threads = torch.get_num_threads()
    assert slow_cpu_bf16_warning("bf16-mixed", muon=False) == (
        f"{start}, so train.precision bf16-mixed would train faster here as --train.precision 32-true")
    assert calls == [("bf16", SLOW_BF16_PROBE_SIZE, 1), ("fp32", SLOW_BF16_PROBE_SIZE, 1)]  # one size, one thread
    assert torch.get_num_threads() == threads  # given back
    assert "so train.precision 16-mixed (bf16 on a CPU) would train faster" in slow_cpu_bf16_warning("16-mixed", False)
    assert slow_cpu_bf16_warning("bf16-mixed", muon=True).endswith(
        "(Muon's Newton-Schulz iterations stay in bf16 either way)")
    assert slow_cpu_bf16_warning("32-true", muon=True) == (
        f"{start}, and torch's Muon runs its Newton-Schulz iterations in bf16 whatever train.precision is, which slows "
        "each step here (train.optimizer adamw has no such cost)")
    calls.clear()
    assert slow_cpu_bf16_warning("32-true", muon=False) is None and calls == []  # nothing in bf16: nothing measured
    for bf16_figure in (190e9, 50e9):  # AMX: bf16 2.3x fp32; a little slower than fp32: not worth a warning
        measured["bf16"] = bf16_figure
        assert slow_cpu_bf16_warning("bf16-mixed", muon=True) is None
