"""scion's training step against transformers' LlamaForCausalLM and litgpt's GPT, side by side.

    python benchmarks/train_step.py                 # the `small` preset, 2 threads, every mode
    python benchmarks/train_step.py --steps 20 --modes fp32 compile
    python benchmarks/train_step.py --dry-run --steps 2 --warmup 1 --modes fp32   # checks the script only

All three models have the same configuration (the `small` preset: vocab 8192, hidden 384,
6 layers, 6 heads, 2 KV heads, FFN 1024, RMSNorm, RoPE, untied head, sequence 256, batch 8) and
start from the same weights (scion's initialisation, copied into the others); before anything is
timed, their parameter counts and fp32 logits on one batch are checked to agree, so the three
compute the same thing. The step is the same for each: forward with the loss, backward,
gradient clipping at 1.0, AdamW. Each library runs in each mode (fp32, bf16 autocast,
torch.compile in fp32 and in bf16); the table shows tokens/s and the ratio of scion's best mode
to each peer's best mode, all measured in this one process. After the warm-up, the timed steps
are interleaved (one step of each library and mode in turn), so that on a shared machine a change
of load affects every configuration alike.

litgpt is optional (see benchmarks/requirements-peers.txt and docs/benchmarks.md, "Peers"):
without it, scion and transformers are measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from common import LITGPT_INSTALL, TINY, hf_llama, litgpt_gpt, litgpt_missing  # noqa: E402

from scion.config import RunConfig, preset  # noqa: E402
from scion.model import Transformer, flops_per_token  # noqa: E402
from scion.train.compile import compile_blocks  # noqa: E402
from scion.train.device import cpu_native_bf16, describe_machine, measured_cpu_peak  # noqa: E402
from scion.train.optim import build_optimizer  # noqa: E402

MODES = ["fp32", "bf16", "compile", "compile-bf16"]
LIBS = ["scion", "transformers", "litgpt"]
# The speed targets (issue 18): scion's best over the best peer's, by the kind of CPU.
TARGET = {True: 1.3, False: 1.1}  # native bf16 (AVX512-BF16 / AMX) or not
LOGIT_TOL = 1e-4  # fp32: the twins hold the same weights, only the order of operations may differ


def scion_reference(cfg: RunConfig) -> Transformer:
    """The weights all three start from: scion's initialisation, seed 0."""
    model = Transformer(cfg.model)
    model.init_weights(torch.Generator().manual_seed(0))
    return model


def twin(lib: str, cfg: RunConfig) -> torch.nn.Module:
    reference = scion_reference(cfg)
    if lib == "scion":
        return reference
    if lib == "transformers":
        return hf_llama(cfg.model, reference)
    return litgpt_gpt(cfg.model, reference)


def loss_fn(lib: str):
    """Each library's own way to the mean next-token loss of (x, y)."""
    if lib == "scion":
        return lambda m, x, y: m(x, y)
    if lib == "transformers":  # shift_labels: y is already shifted (labels alone would shift again)
        return lambda m, x, y: m(input_ids=x, labels=y, shift_labels=y).loss
    from litgpt.utils import chunked_cross_entropy  # what litgpt's pretrain calls (128-row chunks)

    return lambda m, x, y: chunked_cross_entropy(m(x), y)


def compiled(lib: str, model: torch.nn.Module) -> torch.nn.Module:
    if lib == "scion":
        return compile_blocks(model)  # what `scion pretrain --compile` does
    return torch.compile(model)  # transformers' Trainer (torch_compile=True) and litgpt's pretrain


def check_identity(cfg: RunConfig, libs: list[str], x: torch.Tensor) -> dict:
    """Parameter counts equal and fp32 logits within LOGIT_TOL of scion's: one guard, before any
    timing, that the libraries compute the same function from the same weights."""
    logits, counts = {}, {}
    for lib in libs:
        model = twin(lib, cfg).eval()
        counts[lib] = sum(p.numel() for p in model.parameters())
        with torch.no_grad():
            out = model(input_ids=x) if lib == "transformers" else model(x)
        logits[lib] = getattr(out, "logits", out).float()
    result = {"params": counts, "max_abs_logit_diff": {}}
    for lib in libs:
        diff = (logits[lib] - logits["scion"]).abs().max().item()
        result["max_abs_logit_diff"][lib] = diff
        if counts[lib] != counts["scion"] or not diff <= LOGIT_TOL:
            raise SystemExit(f"train_step: {lib} does not compute what scion does ({counts[lib]:,} parameters "
                             f"against {counts['scion']:,}, logits differ by up to {diff:.2e}, tolerance "
                             f"{LOGIT_TOL:.0e}); fix its twin in benchmarks/common.py before timing anything")
    return result


class Runner:
    """One library in one mode: its model, optimizer and data, stepping on demand."""

    def __init__(self, lib: str, cfg: RunConfig, mode: str, steps: int):
        torch.manual_seed(0)
        self.lib, self.mode = lib, mode
        self.model = twin(lib, cfg).train()
        # The same AdamW for all (fused, decay on matrices only): see `optimizer_note`.
        self.opt = build_optimizer(self.model, cfg.train)
        self.clip = cfg.train.grad_clip
        self.loss_fn = loss_fn(lib)
        self.run = compiled(lib, self.model) if mode.startswith("compile") else self.model
        self.bf16 = mode.endswith("bf16")
        self.batches = batches(cfg, steps)
        self.tokens = self.batches[0][0].numel()
        self.i, self.times, self.warmup_s, self.first_loss = 0, [], 0.0, None

    def step(self) -> float:
        x, y = self.batches[self.i % len(self.batches)]
        self.i += 1
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.loss_fn(self.run, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        value = loss.item()
        elapsed = time.perf_counter() - t0
        if self.first_loss is None:
            self.first_loss = value
        return elapsed

    def result(self) -> dict:
        med = statistics.median(self.times)
        return {"lib": self.lib, "mode": self.mode, "tokens_per_s": self.tokens / med, "step_ms": med * 1e3,
                "warmup_s": self.warmup_s, "first_loss": self.first_loss}


def batches(cfg: RunConfig, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same random tokens for every library and mode: (inputs, next-token targets) per step."""
    seq, batch = cfg.train.sequence_length(cfg.model), cfg.train.micro_batch_size
    data = torch.randint(0, cfg.model.vocab_size, (steps, batch, seq + 1), generator=torch.Generator().manual_seed(0))
    return [(d[:, :-1].contiguous(), d[:, 1:].contiguous()) for d in data]


def optimizer_note(cfg: RunConfig) -> str:
    t = cfg.train
    return (f"optimizer: torch.optim.AdamW(fused=True), lr {t.lr:g}, betas ({t.beta1}, {t.beta2}), eps {t.adam_eps:g}, "
            f"weight decay {t.weight_decay:g} on matrices only, for every library (transformers' Trainer defaults "
            f"to this fused AdamW; litgpt's pretrain asks for fused only on CUDA and would take the slower "
            f"for-loop AdamW on a CPU: here it gets the fused one); clipping "
            f"torch.nn.utils.clip_grad_norm_({t.grad_clip:g}); losses: scion's fused head+loss, transformers' "
            f"ForCausalLMLoss, litgpt's chunked_cross_entropy")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--dry-run", action="store_true",
                    help="the check-tiny model (vocab 512, 2 layers, d64, seq 64, batch 2): checks, measures nothing")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per mode, interleaved (median reported)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    ap.add_argument("--libs", nargs="+", default=LIBS, choices=LIBS,
                    help="libraries to measure (scion always checks against itself); litgpt only if installed")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    native_bf16 = cpu_native_bf16()
    print(f"machine: {describe_machine()}", flush=True)
    if args.dry_run:
        cfg = RunConfig(model=TINY)
        cfg.train.micro_batch_size = 2
        print("dry run: the check-tiny model, to check the script; no figure below is a measurement", flush=True)
    else:
        cfg = preset(args.preset)
    libs = [lib for lib in LIBS if lib in args.libs or lib == "scion"]
    if "litgpt" in libs and (why := litgpt_missing()):
        libs.remove("litgpt")
        print(f"litgpt: not installed ({why}); measuring {' and '.join(libs)}. To add it: {LITGPT_INSTALL}, "
              f"then run this with .venv-peers/bin/python", flush=True)

    seq = cfg.train.sequence_length(cfg.model)
    fpt = flops_per_token(cfg.model, seq)
    print(f"torch {torch.__version__}, {args.threads} threads, {cfg.model.name} "
          f"(batch {cfg.train.micro_batch_size} x seq {seq}); libraries: {', '.join(libs)}", flush=True)
    print(f"FLOPs: {fpt / 1e6:.2f} MFLOP per token for every library (scion.model.flops_per_token: 6 per "
          f"matmul parameter, embedding excluded, plus attention, PaLM appendix B)", flush=True)
    print(optimizer_note(cfg), flush=True)

    identity = check_identity(cfg, libs, batches(cfg, 1)[0][0])
    print("same function: " + "; ".join(
        f"{lib} {identity['params'][lib]:,} parameters, logits within {identity['max_abs_logit_diff'][lib]:.1e}"
        for lib in libs) + f" of scion's (fp32, tolerance {LOGIT_TOL:.0e})", flush=True)

    runners = [Runner(lib, cfg, mode, args.steps + args.warmup) for lib in libs for mode in args.modes]
    for r in runners:  # warm-up (and compilation) first, untimed
        r.warmup_s = sum(r.step() for _ in range(args.warmup))
        print(f"  warmed up {r.lib} {r.mode} in {r.warmup_s:.1f} s (first loss {r.first_loss:.4f})", flush=True)
    # Then one step of each in turn, so that a load change on a shared machine hits all alike.
    for _ in range(args.steps):
        for r in runners:
            r.times.append(r.step())
    rows = []
    for r in runners:
        row = r.result()
        row["gflops"] = row["tokens_per_s"] * fpt / 1e9
        rows.append(row)

    # Probed again here, right after the timed steps: a virtual machine's clock differs from hour to
    # hour (this Zen 3's fp32 plateau read 103 GFLOP/s in one session, 177 in the next), and a cached figure
    # from a slower hour would put the rows above 100%. The cache keeps the highest ever measured.
    fp32_peak = None if args.dry_run else measured_cpu_peak("fp32", refresh=True) / 1e9
    if fp32_peak:
        print(f"\nCPU fp32 matmul peak (measured now, {args.threads} threads, highest so far): {fp32_peak:.0f} GFLOP/s "
              f"-> at most {fp32_peak * 1e9 / fpt:,.0f} tok/s for this model in fp32")
    print("\n| library | mode | tokens/s | ms/step | GFLOP/s | % of fp32 peak |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        share = f"{100 * r['gflops'] / fp32_peak:.0f}%" if fp32_peak else "-"
        print(f"| {r['lib']} | {r['mode']} | {r['tokens_per_s']:,.0f} | {r['step_ms']:.1f} | {r['gflops']:.1f} "
              f"| {share} |")

    best = {lib: max((r for r in rows if r["lib"] == lib), key=lambda r: r["tokens_per_s"]) for lib in libs}
    s = best["scion"]
    ratios = {peer: s["tokens_per_s"] / best[peer]["tokens_per_s"] for peer in libs if peer != "scion"}
    print()
    for lib, b in best.items():
        print(f"best {lib}: {b['mode']} {b['tokens_per_s']:,.0f} tok/s")
    target = TARGET[native_bf16]
    if ratios:
        peer = min(ratios, key=ratios.get)  # the fastest peer
        print(f"scion's best against {', '.join(f'{p} {x:.2f}x' for p, x in ratios.items())}; against the best peer "
              f"({peer}): {ratios[peer]:.2f}x. Target on this CPU ({'native' if native_bf16 else 'no native'} "
              f"bf16): >= {target}x{'' if args.dry_run else (' - met' if ratios[peer] >= target else ' - not met')}")
    if args.json:
        args.json.write_text(json.dumps({
            "machine": describe_machine(), "native_bf16": native_bf16, "dry_run": args.dry_run,
            "model": cfg.model.name, "flops_per_token": fpt, "libs": libs, "identity": identity, "rows": rows,
            "best": {lib: b["mode"] for lib, b in best.items()}, "ratios": ratios, "target": target,
        }, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
