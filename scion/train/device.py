"""Devices, precision and the peak throughput that MFU is measured against."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

import torch

from scion.cache import cache_root
from scion.errors import ScionError

try:
    import resource  # peak resident memory; not on Windows
except ImportError:
    resource = None

# Dense peak FLOP/s from the datasheets: bf16 tensor cores; "fp32", matrix products of fp32
# tensors as scion runs them on GPUs (TF32 tensor cores where the GPU has them, see train.tf32);
# "fp32-ieee", the same with TF32 switched off. A missing entry means no MFU, never a guess.
GPU_PEAKS = {
    "GH200": {"bf16": 989e12, "fp32": 494e12, "fp32-ieee": 67e12},
    "H200": {"bf16": 989e12, "fp32": 494e12, "fp32-ieee": 67e12},
    "H100 SXM": {"bf16": 989e12, "fp32": 494e12, "fp32-ieee": 67e12},
    "H100 NVL": {"bf16": 835e12, "fp32": 418e12, "fp32-ieee": 60e12},
    "H100 PCIe": {"bf16": 756e12, "fp32": 378e12, "fp32-ieee": 51e12},
    "H100": {"bf16": 989e12, "fp32": 494e12, "fp32-ieee": 67e12},
    "A100": {"bf16": 312e12, "fp32": 156e12, "fp32-ieee": 19.5e12},
    "A10G": {"bf16": 70e12, "fp32": 35e12},
    "L4": {"bf16": 121e12, "fp32": 60e12, "fp32-ieee": 30.3e12},
    "L40S": {"bf16": 362e12, "fp32": 183e12, "fp32-ieee": 91.6e12},
    "RTX 4090": {"bf16": 165e12, "fp32": 83e12},
    "RTX 3090": {"bf16": 71e12, "fp32": 36e12},
    "V100": {"bf16": 0.0, "fp32": 15.7e12, "fp32-ieee": 15.7e12},  # no TF32: the same either way
}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ScionError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ScionError(f"device {name!r} asked for, but CUDA is not available here; use --device cpu")
    return device


def _cpuinfo() -> str:
    """Linux's description of the CPU (empty elsewhere)."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


CPU_BF16_ENV = "SCION_CPU_BF16"  # 1 or 0: override what `--precision auto` picks on a CPU


def cpu_native_bf16() -> bool:
    """Whether the CPU multiplies bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated
    and several times slower than fp32."""
    flags = _cpuinfo()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_has_fast_bf16() -> bool:
    """Whether `--precision auto` trains in bf16 on this CPU: where bf16 is native, unless
    SCION_CPU_BF16 says otherwise (1 makes any CPU take the bf16 path, as a Xeon with AMX does;
    0 keeps fp32 on one)."""
    forced = os.environ.get(CPU_BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    if forced:
        raise ScionError(f"{CPU_BF16_ENV}={forced!r}: set it to 1 (bf16) or 0 (fp32), or unset it")
    return cpu_native_bf16()


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "fp8":  # float8 Linear layers through torchao (scion.train.float8), bf16 elsewhere
        from scion.train.float8 import check_supported

        check_supported(device)
        return precision
    if precision != "auto":
        if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ScionError("this GPU has no bf16 support; use --precision fp32")
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    return "fp32"


def autocast(device: torch.device, precision: str):
    if precision in ("bf16", "fp8"):  # fp8: what is not a converted Linear runs as in bf16
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def peak_flops(device: torch.device, precision: str, refresh: bool = False,
               tf32: bool | None = None) -> tuple[float, str] | None:
    """(peak FLOP/s, label) for MFU, or None for an unknown device (no MFU rather than a wrong one).
    `refresh` measures a CPU's peak again rather than taking the cached figure; `tf32` says whether
    a GPU's fp32 products run on TF32 tensor cores (by default, as PyTorch is set now). An fp8
    run's MFU is counted against the bf16 peak, so that it compares with a bf16 run's: only its
    Linear layers' products run in float8 (up to twice as fast), attention and the rest do not."""
    if precision == "fp8":
        precision = "bf16"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if tf32 is None:
            tf32 = torch.backends.cuda.matmul.allow_tf32
        column = precision
        if precision == "fp32" and not tf32:
            column = "fp32-ieee"
        for key, peaks in GPU_PEAKS.items():
            # The model as a whole word of the name: "L4" is not the "L40S", nor "H200" the "GH200".
            if re.search(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![A-Za-z0-9])", name):
                on_tensor_cores = column == "fp32" and peaks.get("fp32-ieee") != peaks.get("fp32")
                label = "TF32" if on_tensor_cores else column.removesuffix("-ieee")
                return (peaks[column], f"{key} {label} datasheet peak") if peaks.get(column) else None
        return None
    if device.type == "cpu":
        flops = measured_cpu_peak(precision, refresh)
        return flops, f"CPU {precision} matmul peak, measured ({torch.get_num_threads()} threads)"
    return None


def describe_machine(device: torch.device | None = None) -> str:
    """One line naming what a figure was measured on: the CPU (and the GPU, where one is used),
    whether its bf16 is native, what `--precision auto` trains in, threads and torch version."""
    device = device or torch.device("cpu")
    auto = resolve_precision("auto", device)
    line = (f"CPU {cpu_model()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads), "
            f"native bf16: {'yes' if cpu_native_bf16() else 'no'}")
    if device.type == "cuda":
        line += f"; GPU {torch.cuda.get_device_name(device)}"
    forced = f", forced by {CPU_BF16_ENV}" if device.type == "cpu" and os.environ.get(CPU_BF16_ENV) else ""
    return f"{line}; --precision auto trains in {auto}{forced}; torch {torch.__version__}"


def cpu_model() -> str:
    """The CPU's model name: a measured peak belongs to it (a cache can outlive a machine)."""
    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def measured_cpu_peak(precision: str, refresh: bool = False) -> float:
    """The CPU's matmul FLOP/s in `precision` at this thread count, measured once per CPU model,
    thread count and torch version and cached on disk; `refresh` measures again.

    The probe grows square products (512, 1024, ... 8192) until the rate stops rising: small
    products understate what the cores do (a bf16 product on a Xeon with AMX runs at a third of
    its plateau at 512 x 512), and MFU is against what the hardware can do. It stops early where
    one product takes long (emulated bf16), since larger ones only take longer. At each size it
    takes the faster of PyTorch's two products, `a @ b` and `F.linear` (nn.Linear's, with the
    weight transposed): in bf16 on a CPU without native bf16 they differ by an order of
    magnitude, and a peak below the model's own products would give an MFU above 100%. The cache
    keeps the highest figure measured, since a busy machine can only measure too low.
    """
    threads = torch.get_num_threads()
    cache = cache_root() / "cpu_peak.json"
    key = f"{precision} {threads} threads, plateau probe, torch {torch.__version__}, {cpu_model()}"
    try:
        known = json.loads(cache.read_text())
    except (OSError, json.JSONDecodeError):
        known = {}
    if key in known and not refresh:
        return known[key]
    measured = _matmul_plateau(torch.bfloat16 if precision == "bf16" else torch.float32)
    known[key] = max(known.get(key, 0.0), measured)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(known, indent=1))
    except OSError:
        pass
    return known[key]


def _matmul_plateau(dtype: torch.dtype, sizes=(512, 1024, 2048, 4096, 8192), slow_s: float = 0.25) -> float:
    """The highest square-matmul rate over growing sizes: stops once a size gains under 5% on the
    best so far, or once one product took over `slow_s` (the next size takes 8 times longer)."""
    products = [torch.matmul, torch.nn.functional.linear]
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        rates, seconds = {}, {}
        for product in products:
            product(a, b)  # warm-up: first-touch allocation, kernel selection
            start = time.perf_counter()
            product(a, b)
            seconds[product] = time.perf_counter() - start
            rates[product] = 2 * n**3 / seconds[product]
        rate = max(rates.values())
        gained = rate > 1.05 * best
        best = max(best, rate)
        # Keep only the products near the fastest (drops an emulated path ten times slower).
        products = [p for p in products if rates[p] >= 0.5 * rate]
        if not gained or min(seconds[p] for p in products) > slow_s:
            break
    return best


def memory_record(device: torch.device) -> dict:
    """Peak memory so far, for metrics.jsonl: the process's resident set (host memory) and, on a
    GPU, the most memory PyTorch's tensors held on this rank's device at once."""
    record = {}
    if resource is not None:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        record["max_rss_GiB"] = rss / (2**30 if sys.platform == "darwin" else 2**20)  # bytes on macOS, KiB on Linux
    if device.type == "cuda":
        record["max_memory_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
    return record


def micro_batch_hint(peak_gib: float, held_gib: float, total_gib: float, micro: int, accum: int) -> str | None:
    """A line suggesting twice the micro-batch when it would fit with room to spare, and the
    accumulation can halve to keep the global batch. `held_gib` is what stays allocated between
    steps (weights, optimizer state); the rest of the peak, activations above all, grows with the
    micro-batch, so twice the micro-batch needs about 2 x peak - held."""
    if accum % 2 or 2 * peak_gib - held_gib > 0.9 * total_gib:
        return None
    return (f"peak GPU memory {peak_gib:.1f} of {total_gib:.1f} GiB at micro-batch {micro}: "
            f"--micro-batch-size {2 * micro} would likely fit and usually runs faster (larger "
            f"products, half the accumulation steps; the global batch stays the same)")
