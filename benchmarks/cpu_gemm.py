"""How fast this CPU's matrix products can go for one training step, by GEMM library.

    python benchmarks/cpu_gemm.py                 # the `small` preset's step, 2 threads

Every matmul of one training step of the preset (each projection's forward product and its two
backward products, the output layer's included; attention's own products are left out) is timed
with PyTorch's CPU BLAS (what both scion and transformers run; MKL in PyTorch's x86 builds) and
with NumPy's BLAS (OpenBLAS in NumPy's wheels) on the same fp32 data, each library in a process of
its own, rounds alternating, best of all taken. The table gives GFLOP/s per product; the last
lines give the step's matmul time and the tokens/s that caps the model at, for each library and for
the faster of the two per product. It shows how much of a training step's gap to a target a GEMM
library could close, and where this CPU's matmul ceiling lies (`measured_cpu_peak` measures
PyTorch's own product).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from scion.config import preset  # noqa: E402
from scion.model import Transformer, flops_per_token  # noqa: E402
from scion.train.device import describe_machine  # noqa: E402


def step_products(cfg) -> list[tuple[str, int, int, int, int]]:
    """(name, m, k, n, count) for each distinct [m, k] @ [k, n] product of one training step: the
    forward product and both gradients' of every linear layer of the model (built on the meta
    device, so nothing is allocated)."""
    tokens = cfg.train.micro_batch_size * cfg.train.sequence_length(cfg.model)
    with torch.device("meta"):
        model = Transformer(cfg.model)
    layers = Counter(  # (layer name, out, in): how many of the model's linear layers
        (name.rsplit(".", 1)[-1], *module.weight.shape)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    )
    products = []
    for (name, d_out, d_in), count in layers.items():
        products.append((f"{name} forward", tokens, d_in, d_out, count))  # x @ W^T
        products.append((f"{name} input grad", tokens, d_out, d_in, count))  # dy @ W
        products.append((f"{name} weight grad", d_out, tokens, d_in, count))  # dy^T @ x
    return products


def time_products(lib: str, products: list, threads: int, repeats: int) -> list[float]:
    """Best-of-`repeats` seconds of each product with one library, in the process that runs it.

    Each library is timed in a process of its own: an idle BLAS or OpenMP pool spins for a while
    after its last call, and would steal the cores from the other library's next product.
    """
    import numpy as np

    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    best = []
    for name, m, k, n, _ in products:
        # The layouts of the step: a weight is stored [out, in], so the forward product reads it
        # transposed; the weight gradient reads the [tokens, out] output gradient transposed.
        if "forward" in name:
            a, b = rng.standard_normal((m, k)), rng.standard_normal((n, k)).T
        elif "weight grad" in name:
            a, b = rng.standard_normal((k, m)).T, rng.standard_normal((k, n))
        else:
            a, b = rng.standard_normal((m, k)), rng.standard_normal((k, n))
        a, b = a.astype(np.float32), b.astype(np.float32)
        if lib == "torch":
            a, b = torch.from_numpy(a), torch.from_numpy(b)
        a @ b  # warm-up
        seconds = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            seconds = min(seconds, time.perf_counter() - start)
        best.append(seconds)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per library (best taken)")
    ap.add_argument("--repeats", type=int, default=5, help="timed products per round")
    args = ap.parse_args()
    print(f"machine: {describe_machine()}", flush=True)
    os.environ["OPENBLAS_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"] = str(args.threads)
    cfg = preset(args.preset)
    seq = cfg.train.sequence_length(cfg.model)
    tokens = cfg.train.micro_batch_size * seq
    products = step_products(cfg)

    libs = ("torch", "numpy")
    times = {lib: [float("inf")] * len(products) for lib in libs}
    spawn = multiprocessing.get_context("spawn")
    for _ in range(args.rounds):  # alternate, so that a change of load on the host hits both
        for lib in libs:
            with ProcessPoolExecutor(1, mp_context=spawn) as pool:
                got = pool.submit(time_products, lib, products, args.threads, args.repeats).result()
            times[lib] = [min(t, g) for t, g in zip(times[lib], got, strict=True)]

    import numpy as np

    blas = re.search(r"BLAS_INFO=(\w+)", torch.__config__.show())
    try:  # NumPy 1.25 and later say which BLAS they were built with
        numpy_blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]["name"]
    except (TypeError, KeyError):
        numpy_blas = "BLAS unknown"
    print(
        f"torch {torch.__version__} (BLAS: {blas.group(1) if blas else 'unknown'}), numpy {np.__version__} "
        f"({numpy_blas}), {args.threads} threads, preset {args.preset}: {tokens} tokens a step"
    )
    print("\n| product | m x k x n | per step | torch GFLOP/s | numpy GFLOP/s |")
    print("|---|---|---:|---:|---:|")
    flops_step = 0
    totals = dict.fromkeys((*libs, "faster of the two"), 0.0)
    for i, (name, m, k, n, count) in enumerate(products):
        flops = 2 * m * k * n
        flops_step += flops * count
        for lib in libs:
            totals[lib] += count * times[lib][i]
        totals["faster of the two"] += count * min(times[lib][i] for lib in libs)
        rates = " | ".join(f"{flops / times[lib][i] / 1e9:.0f}" for lib in libs)
        print(f"| {name} | {m} x {k} x {n} | {count} | {rates} |")

    fpt = flops_per_token(cfg.model, seq)
    print(
        f"\nOne step's projections: {flops_step / 1e9:.1f} GFLOP of the model's {fpt * tokens / 1e9:.1f} "
        "(the rest is attention's products)"
    )
    for lib, seconds in totals.items():
        print(
            f"  {lib}: {seconds * 1e3:.0f} ms, {flops_step / seconds / 1e9:.0f} GFLOP/s -> with nothing but "
            f"matmuls at this rate, at most {flops_step / seconds / fpt:,.0f} tok/s"
        )


if __name__ == "__main__":
    main()
