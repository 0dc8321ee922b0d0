"""Where a training step's time goes: kernel time by kind, and each matrix-product shape alone.

    python benchmarks/gpu_profile.py OUT_DIR                        # one CUDA GPU, tinyllama-1.1b
    python benchmarks/gpu_profile.py OUT_DIR --micro-batch 8 --accum 2
    python benchmarks/gpu_profile.py OUT_DIR --dry-run              # a tiny model on CPU (rehearsal)
    python benchmarks/gpu_profile.py OUT_DIR --cpu --preset small --micro-batch 8 --accum 1   # the CPU's split
    python benchmarks/gpu_profile.py OUT_DIR --cpu --preset small --micro-batch 8 --accum 1 --precision bf16

The step is scion's own Trainer step, as `benchmarks/gpu_check.py` times it (bf16 autocast, compiled
blocks, fused AdamW, clipping; --precision as `scion pretrain` takes it, auto by default: bf16 on a
GPU, fp32 on a CPU without native bf16): a few steps warm it up (compilation), a few more give its wall
time, and one more runs under torch.profiler. Every kernel (on CPU: every operator's own time)
is sorted by its name into matrix products, attention, optimizer and clipping, casts and
copies, fused element-wise work (inductor's kernels) and the rest; the sum against the wall
time says how long the device sat idle. Then each distinct matrix-product shape of the model and
the attention kernel are timed alone, forward and backward, in TFLOP/s: how near the device's
peak each piece of the step can run at all. Results go to OUT_DIR/gpu_profile.json.
A few minutes on an H100, most of it compilation.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import TINY, build, throughput_trainer  # noqa: E402  (beside this file)
from torch.autograd import DeviceType  # noqa: E402

from scion.config import ModelConfig, RunConfig, preset  # noqa: E402
from scion.model import Transformer, flops_per_token  # noqa: E402
from scion.train.compile import compile_blocks  # noqa: E402
from scion.train.device import describe_machine, peak_flops, resolve_precision  # noqa: E402

# Kernel or operator names, lower-cased, by kind; the first kind whose pattern matches wins.
KINDS = [
    ("attention", ("flash", "fmha", "sdpa", "attention", "scaled_dot_product")),
    ("matrix products", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "aten::mm", "aten::addmm",
                         "aten::bmm", "aten::linear", "mkl")),
    ("optimizer and clipping", ("adam", "multi_tensor", "foreach", "lpnorm", "norm_kernel")),
    # whole (log_softmax, nll_loss) or a chunk of tokens at a time (log_softmax, then the
    # logits' gradient made in place: scatter_add)
    ("cross-entropy", ("log_softmax", "nll_loss", "cross_entropy", "scatter_add")),
    ("casts and copies", ("to_copy", "copy_", "direct_copy", "cast")),
    ("fused element-wise (compiled)", ("triton", "compiledfxgraph", "cpp_fused")),
    ("element-wise (eager)", ("elementwise", "reduce_kernel", "aten::mul", "aten::add", "aten::silu",
                              "aten::pow", "aten::div", "aten::sum", "aten::mean", "aten::rsqrt",
                              "aten::neg", "aten::cat", "aten::fill_")),
]


def kind_of(name: str) -> str:
    lowered = name.lower()
    for kind, patterns in KINDS:
        if any(p in lowered for p in patterns):
            return kind
    return "other"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def profile_step(step, device) -> dict:
    """Self time per kind over one profiled step (kernels on a GPU, operators on a CPU), in ms."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        step()
        synchronize(device)
    by_kind: dict[str, float] = {}
    top = []
    for event in prof.key_averages():
        if device.type == "cuda":
            if event.device_type != DeviceType.CUDA:
                continue
            us = event.self_device_time_total
        else:
            # Operators only: the profiler's own wrappers would count their children twice.
            if not (event.key.startswith("aten::") or "CompiledFxGraph" in event.key
                    or event.key.startswith("cpp_fused")):
                continue
            us = event.self_cpu_time_total
        if us <= 0:
            continue
        kind = kind_of(event.key)
        by_kind[kind] = by_kind.get(kind, 0.0) + us / 1e3
        top.append((us / 1e3, event.count, kind, event.key[:110]))
    top.sort(reverse=True)
    return {"ms_by_kind": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
            "top": [{"ms": round(ms, 3), "calls": n, "kind": k, "name": name} for ms, n, k, name in top[:20]]}


def time_it(fn, device, repeats: int) -> float:
    """Median seconds of `fn` over `repeats` runs, after two warm-up runs."""
    for _ in range(2):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def matmul_shapes(model: Transformer, tokens: int, device, dtype, repeats: int) -> list[dict]:
    """Each distinct (in, out) matrix product of the model at `tokens` rows, forward and backward."""
    shapes = sorted({tuple(m.weight.shape) for m in model.modules() if isinstance(m, torch.nn.Linear)})
    rows = []
    for out_features, in_features in shapes:
        x = torch.randn(tokens, in_features, device=device, dtype=dtype, requires_grad=True)
        w = torch.randn(out_features, in_features, device=device, dtype=dtype, requires_grad=True)
        grad = torch.randn(tokens, out_features, device=device, dtype=dtype)
        # autograd.grad rather than backward: no accumulation into .grad inside the timing
        seconds = time_it(lambda: torch.autograd.grad(F.linear(x, w), (x, w), grad), device, repeats)  # noqa: B023
        flops = 3 * 2 * tokens * in_features * out_features  # forward, and both gradients
        rows.append({"shape": f"{tokens} x {in_features} x {out_features}", "ms": round(seconds * 1e3, 3),
                     "tflop_s": float(f"{flops / seconds / 1e12:.3g}")})
    return rows


def attention_alone(cfg: ModelConfig, micro: int, seq: int, device, dtype, repeats: int) -> dict:
    """The model's attention call for one layer, forward and backward; TFLOP/s by the MFU's
    accounting (the full, not the causal, score matrix: what flops_per_token counts)."""
    hd, h, kv = cfg.dim_per_head, cfg.n_head, cfg.kv_heads
    q = torch.randn(micro, h, seq, hd, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(micro, kv, seq, hd, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(micro, kv, seq, hd, device=device, dtype=dtype, requires_grad=True)

    grad = torch.randn(micro, h, seq, hd, device=device, dtype=dtype)

    def run():  # as scion.model calls it
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kv != h)
        torch.autograd.grad(out, (q, k, v), grad)

    def run_expanded():  # the alternative for grouped-query attention: K/V copied to every head
        k_all, v_all = k.repeat_interleave(h // kv, 1), v.repeat_interleave(h // kv, 1)
        out = F.scaled_dot_product_attention(q, k_all, v_all, is_causal=True)
        torch.autograd.grad(out, (q, k, v), grad)

    seconds = time_it(run, device, repeats)
    flops = 12 * micro * h * hd * seq * seq
    result = {"shape": f"batch {micro}, {h} heads ({kv} KV), seq {seq}, head dim {hd}",
              "ms_per_layer": round(seconds * 1e3, 3),
              "tflop_s_by_mfu_accounting": float(f"{flops / seconds / 1e12:.3g}"),
              "ms_all_layers": round(seconds * 1e3 * cfg.n_layer, 2)}
    if kv != h:
        result["ms_per_layer_kv_expanded"] = round(time_it(run_expanded, device, repeats) * 1e3, 3)
    return result


def profile_training(cfg: RunConfig, device, precision: str, micro: int, accum: int, steps: int,
                     compile: bool = True, run_dir: Path | None = None) -> dict:
    """Build `cfg`'s model, time scion's training step on it and profile one; the results as a dict."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = build(cfg.model, device)
    if compile:
        compile_blocks(model)
    # Nothing is written to run_dir: the steps run one by one, outside fit().
    trainer = throughput_trainer(cfg, model, run_dir or Path("profile"), device, precision, micro=micro,
                                 accum=accum, steps=10**6)
    step, seq = trainer._step, trainer.seq_len  # one optimizer step: accumulation, clipping, guards, AdamW

    started = time.perf_counter()
    for _ in range(2):
        step()
    synchronize(device)
    warmup = time.perf_counter() - started
    wall = time_it(step, device, steps)
    tokens = accum * micro * seq
    achieved = tokens / wall * flops_per_token(cfg.model, seq)
    peak = peak_flops(device, precision)
    if peak and device.type == "cpu" and peak[0] < achieved:  # cached in a slower hour: measure it again
        peak = peak_flops(device, precision, refresh=True)
    mfu = achieved / peak[0] if peak else None
    result: dict = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "model": cfg.model.name, "micro_batch": micro, "accum": accum, "seq_len": seq, "precision": precision,
        "compiled": compile, "warmup_s": round(warmup, 1),
        "step_ms": round(wall * 1e3, 1), "tokens_per_s": round(tokens / wall), "mfu": mfu,
    }
    result.update(profile_step(step, device))
    busy = sum(result["ms_by_kind"].values())
    result["ms_busy"] = round(busy, 1)
    result["idle_share"] = max(0.0, 1 - busy / (wall * 1e3)) if device.type == "cuda" else None
    result["matmul_shapes"] = matmul_shapes(model, micro * seq, device, dtype, repeats=10)
    result["attention"] = attention_alone(cfg.model, micro, seq, device, dtype, repeats=10)
    return result


def print_tables(result: dict) -> None:
    mfu = result["mfu"]
    print(f"{result['device']}, {result['model']}, micro-batch {result['micro_batch']} x {result['accum']}, "
          f"sequence {result['seq_len']}, {result['precision']}: {result['step_ms']} ms a step, "
          f"{result['tokens_per_s']:,} tokens/s" + (f", MFU {mfu:.1%}" if mfu is not None else ""))
    print("\n| kind | ms in the profiled step | share of the step |\n|---|---:|---:|")
    for kind, ms in result["ms_by_kind"].items():
        print(f"| {kind} | {ms:.1f} | {ms / result['step_ms']:.1%} |")
    if result["idle_share"] is not None:
        print(f"| (device idle) | | {result['idle_share']:.1%} |")
    print("\n| matrix product (rows x in x out), forward and backward | ms | TFLOP/s |\n|---|---:|---:|")
    for row in result["matmul_shapes"]:
        print(f"| {row['shape']} | {row['ms']} | {row['tflop_s']} |")
    a = result["attention"]
    print(f"\nattention, {a['shape']}: {a['ms_per_layer']} ms a layer forward and backward, "
          f"{a['tflop_s_by_mfu_accounting']} TFLOP/s by the MFU's accounting, {a['ms_all_layers']} ms for all layers")
    if "ms_per_layer_kv_expanded" in a:
        print(f"  with K/V expanded to every head first: {a['ms_per_layer_kv_expanded']} ms a layer")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="folder for gpu_profile.json")
    ap.add_argument("--dry-run", action="store_true", help="a tiny model on CPU")
    ap.add_argument("--cpu", action="store_true", help="--preset on this machine's CPU")
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                    help="as scion pretrain takes it (auto: bf16 on a GPU; on a CPU bf16 only where it is native)")
    ap.add_argument("--preset", default="tinyllama-1.1b")
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--accum", type=int, default=2, help="micro-batches in the profiled step")
    ap.add_argument("--steps", type=int, default=3, help="timed steps (after 2 warm-up steps)")
    ap.add_argument("--no-compile", action="store_true", help="eager blocks")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    if args.dry_run:
        device, cfg, micro = torch.device("cpu"), RunConfig(model=TINY), min(args.micro_batch, 4)
        torch.set_num_threads(2)
    elif args.cpu:
        device, cfg, micro = torch.device("cpu"), preset(args.preset), args.micro_batch
    else:
        if not torch.cuda.is_available():
            sys.exit("gpu_profile: no CUDA device here; use --dry-run to rehearse on CPU")
        device, cfg, micro = torch.device("cuda"), preset(args.preset), args.micro_batch
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    precision = resolve_precision(args.precision, device)
    result = profile_training(cfg, device, precision, micro, args.accum, args.steps, compile=not args.no_compile,
                              run_dir=out / "profile")
    result["machine"] = describe_machine(device)
    print(f"machine: {result['machine']}", flush=True)
    (out / "gpu_profile.json").write_text(json.dumps(result, indent=1))
    print_tables(result)
    print(f"\nresults in {out / 'gpu_profile.json'}")


if __name__ == "__main__":
    main()
