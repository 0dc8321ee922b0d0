"""scion's training step against transformers' LlamaForCausalLM, side by side.

    python benchmarks/train_step.py                 # the `small` preset, 2 threads, every mode
    python benchmarks/train_step.py --steps 20 --modes fp32 compile

Both models have the same configuration (the `small` preset: vocab 8192, hidden 384, 6 layers,
6 heads, 2 KV heads, FFN 1024, sequence 256, batch 8) and the same step: forward with the loss,
backward, gradient clipping, AdamW. Each library runs in each mode (fp32, bf16 autocast,
torch.compile in fp32 and in bf16); the table shows tokens/s and the ratio of scion's best mode
to transformers' best mode, all measured in this one process. After the warm-up, the timed steps
are interleaved (one step of each library and mode in turn), so that on a shared machine a change
of load affects every configuration alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from common import hf_llama  # noqa: E402

from scion.config import preset  # noqa: E402
from scion.model import Transformer, flops_per_token  # noqa: E402
from scion.train.compile import compile_blocks  # noqa: E402
from scion.train.device import describe_machine, measured_cpu_peak  # noqa: E402
from scion.train.optim import build_optimizer  # noqa: E402

MODES = ["fp32", "bf16", "compile", "compile-bf16"]


def scion_model(cfg):
    model = Transformer(cfg.model)
    model.init_weights(torch.Generator().manual_seed(0))
    return model, build_optimizer(model, cfg.train), lambda m, x, y: m(x, y)


def scion_compile(model):
    return compile_blocks(model)  # what `scion pretrain --compile` does


def hf_model(cfg):
    model = hf_llama(cfg.model)
    t = cfg.train
    opt = torch.optim.AdamW(
        model.parameters(), lr=t.lr, betas=(t.beta1, t.beta2), weight_decay=t.weight_decay
    )
    return model, opt, lambda mdl, x, y: mdl(input_ids=x, labels=y).loss


class Runner:
    """One library in one mode: its model, optimizer and data, stepping on demand."""

    def __init__(self, lib: str, build, cfg, mode: str, steps: int):
        torch.manual_seed(0)
        self.lib, self.mode = lib, mode
        self.model, self.opt, self.loss_fn = build(cfg)
        self.model.train()
        self.run = self.model
        if mode.startswith("compile"):
            self.run = scion_compile(self.model) if lib == "scion" else torch.compile(self.model)
        self.bf16 = mode.endswith("bf16")
        seq, batch = cfg.train.sequence_length(cfg.model), cfg.train.micro_batch_size
        gen = torch.Generator().manual_seed(0)
        self.data = torch.randint(0, cfg.model.vocab_size, (steps, batch, seq + 1), generator=gen)
        self.tokens = batch * seq
        self.i, self.times, self.warmup_s = 0, [], 0.0

    def step(self) -> float:
        x, y = self.data[self.i % len(self.data), :, :-1], self.data[self.i % len(self.data), :, 1:]
        self.i += 1
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.loss_fn(self.run, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        loss.item()
        return time.perf_counter() - t0

    def result(self) -> dict:
        med = statistics.median(self.times)
        return {
            "lib": self.lib,
            "mode": self.mode,
            "tokens_per_s": self.tokens / med,
            "step_ms": med * 1e3,
            "warmup_s": self.warmup_s,
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument(
        "--steps", type=int, default=10, help="timed steps per mode, interleaved (median reported)"
    )
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    ap.add_argument("--only", choices=["scion", "transformers"], help="run one library only")
    args = ap.parse_args()
    print(f"machine: {describe_machine()}", flush=True)

    torch.set_num_threads(args.threads)
    cfg = preset(args.preset)
    seq = cfg.train.sequence_length(cfg.model)
    fpt = flops_per_token(cfg.model, seq)
    libs = {"transformers": hf_model, "scion": scion_model}
    if args.only:
        libs = {args.only: libs[args.only]}
    print(
        f"torch {torch.__version__}, {args.threads} threads, preset {args.preset} "
        f"(batch {cfg.train.micro_batch_size} x seq {seq}), {fpt / 1e6:.1f} MFLOP/token",
        flush=True,
    )
    runners = [
        Runner(lib, build, cfg, mode, args.steps + args.warmup)
        for lib, build in libs.items()
        for mode in args.modes
    ]
    for r in runners:  # warm-up (and compilation) first, untimed
        r.warmup_s = sum(r.step() for _ in range(args.warmup))
        print(f"  warmed up {r.lib} {r.mode} in {r.warmup_s:.1f} s", flush=True)
    # Then one step of each in turn, so that a load change on a shared machine hits all alike.
    for _ in range(args.steps):
        for r in runners:
            r.times.append(r.step())
    rows = []
    for r in runners:
        row = r.result()
        row["gflops"] = row["tokens_per_s"] * fpt / 1e9
        rows.append(row)
        print(
            f"  {row['lib']:>12} {row['mode']:<13} {row['tokens_per_s']:>9,.0f} tok/s  "
            f"{row['step_ms']:>8.1f} ms/step  {row['gflops']:>6.1f} GFLOP/s",
            flush=True,
        )

    fp32_peak = measured_cpu_peak("fp32") / 1e9
    print(
        f"\nCPU fp32 matmul peak (measured, {args.threads} threads): {fp32_peak:.0f} GFLOP/s "
        f"-> at most {fp32_peak * 1e9 / fpt:,.0f} tok/s for this model in fp32"
    )
    print("\n| library | mode | tokens/s | ms/step | GFLOP/s | % of fp32 peak |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['lib']} | {r['mode']} | {r['tokens_per_s']:,.0f} | {r['step_ms']:.1f} "
            f"| {r['gflops']:.1f} | {100 * r['gflops'] / fp32_peak:.0f}% |"
        )
    best = {lib: max((r for r in rows if r["lib"] == lib), key=lambda r: r["tokens_per_s"]) for lib in libs}
    if len(best) == 2:
        s, h = best["scion"], best["transformers"]
        print(
            f"\nbest: scion {s['mode']} {s['tokens_per_s']:,.0f} tok/s vs transformers {h['mode']} "
            f"{h['tokens_per_s']:,.0f} tok/s -> ratio {s['tokens_per_s'] / h['tokens_per_s']:.2f}x"
        )


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
