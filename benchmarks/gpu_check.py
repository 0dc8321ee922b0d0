"""The one-GPU check: is the CUDA path correct, how fast is a real model on it, against litgpt
and transformers, and what does each of scion's switches (fp8 among them) buy?

    python benchmarks/gpu_check.py OUT_DIR              # on a machine with one CUDA GPU
    python benchmarks/gpu_check.py OUT_DIR --dry-run    # every part on CPU at a tiny size

Parts, in this order, each recorded in OUT_DIR/gpu_check.json as it finishes (a later failure
keeps the earlier results). Each has a time budget on an H200 (BUDGET_S below); a part starts only
while the check's deadline (--budget, 450 s) leaves it that much, and is otherwise recorded as
skipped with the reason, so that the call ends on time with what it measured:
  1. environment: torch, device, the peak that MFU is measured against;
  2. correctness on the device: fp32 against bf16 autocast, compiled blocks against eager (loss and
     gradients), a short training run that must memorise a batch, KV-cache greedy decoding
     against a no-cache full-forward greedy decode;
  3. FSDP on one device: `torchrun --nproc-per-node 1` running the training loop with
     `--parallel fsdp`'s code path (built on the meta device, sharded, then initialised on the
     GPU by scion.train.parallel.parallelize), whose loss must match the unwrapped model's; reported
     as skipped when this build has no FSDP;
  4. peers: scion, litgpt's GPT and transformers' LlamaForCausalLM (SDPA) training the
     `tinyllama-1.1b` shape at sequence 2048, compiled, bf16, one step and one AdamW for all, each
     at the largest micro-batch that fits (a short search): tokens/s, MFU (one FLOP count for
     all, scion.model.flops_per_token), peak memory (benchmarks/gpu_peers.py says how); a peer
     whose library is missing is skipped with the reason;
  5. ladder: scion's switches from its default (the peers' scion row): the residual stream in
     bf16, the output layer and loss with and without chunks (train.loss_chunk_tokens), and
     activation checkpointing at its own largest micro-batch;
  6. fp8_throughput: `--precision fp8` (torchao float8 Linear layers, scion/train/float8.py) at
     the default's micro-batch, tokens/s against bf16; skipped with the refusal's reason where fp8
     training is not available (no torchao, a GPU before compute capability 8.9, a CPU);
  7. fp8_loss: `scion pretrain`'s path on the bundled corpus, the check's small model, a few
     hundred steps in bf16 and in fp8: the largest gap between the logged losses, and the
     validation losses;
  8. throughput: the default through scion's Trainer (what `scion pretrain` reports), at the same
     micro-batch, `--accum` micro-batches a step;
  9. profile: one step of 2 micro-batches profiled, its kernel time sorted by kind, and each
     matrix-product shape and the attention kernel timed alone (benchmarks/gpu_profile.py);
 10. compiled decoding: greedy batch-1 decoding eager and through `CompiledDecoder` (what
     `scion generate --compile` uses), the same tokens, and new tokens per second for each.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from common import TINY, RandomTokens, ThroughputTrainer, build, throughput_trainer  # noqa: E402  (beside this file)
from gpu_peers import (  # noqa: E402
    best_micro_batch,
    litgpt_library,
    measure,
    missing,
    scion_library,
    transformers_library,
    with_mfu,
)
from gpu_profile import print_tables, profile_training  # noqa: E402

from scion.config import DataConfig, ModelConfig, RunConfig, TrainConfig, preset  # noqa: E402
from scion.errors import ScionError  # noqa: E402
from scion.model import flops_per_token  # noqa: E402
from scion.train.compile import compile_blocks  # noqa: E402
from scion.train.device import autocast, describe_machine, peak_flops, resolve_precision  # noqa: E402
from scion.train.world import World  # noqa: E402

SMALL = ModelConfig(
    name="check-small",
    vocab_size=4096,
    n_layer=4,
    n_head=8,
    n_kv_head=2,
    d_model=512,
    ffn_hidden=1408,
    max_seq_len=512,
)

# Seconds each part is expected to take on an H200, compilation included (estimates from the H100
# call of 2026-11-26 and the size of each compilation; a call's gpu_check.json records each part's
# "seconds": correct these from it). The deadline (--budget) is 450 s, so that gpu_check.sh (the
# check, then the memory plan's 60 s) fits one 10-minute device call with the wheels' install.
BUDGET_S = {
    "correctness": 25,
    "fsdp_one_device": 40,
    "peers": 240,  # each library needs LIBRARY_S; a larger micro-batch is tried while this allows
    "ladder": 90,  # three scion runs (regional compilation: the cheapest)
    "fp8_throughput": 45,
    "fp8_loss": 70,  # the bundled corpus prepared once (tokenizer and shards), then 2 x FP8_LOSS_STEPS
    "throughput": 30,
    "profile": 20,
    "compiled_decoding": 30,
}
LIBRARY_S = {"scion": 45, "litgpt": 90, "transformers": 100}  # probe, compilation (whole model for the peers), steps
FP8_LOSS_STEPS = 300
FP8_LOSS_GAP = 0.1  # nats: a larger gap between fp8's and bf16's logged losses fails the part


class Clock:
    """The check's deadline; `None` seconds: no deadline (the dry run)."""

    def __init__(self, seconds: float | None):
        self.end = None if seconds is None else time.monotonic() + seconds

    def left(self) -> float:
        return float("inf") if self.end is None else self.end - time.monotonic()

    def lacks(self, need: float) -> str | None:
        """Why a part needing `need` seconds cannot start now, or None."""
        left = self.left()
        return None if left >= need else f"needs about {need:.0f} s and the deadline leaves {max(left, 0):.0f} s"


class Results:
    def __init__(self, out: Path):
        self.path = out / "gpu_check.json"
        self.data: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "steps": {}}

    def record(self, name: str, value: dict) -> None:
        self.data["steps"][name] = value
        self.path.write_text(json.dumps(self.data, indent=1))
        status = value.get("status", "ok")
        detail = {k: v for k, v in value.items() if k != "status"}
        print(f"[{status:>7}] {name}: {json.dumps(detail)}", flush=True)


def failure(e: Exception) -> dict:
    return {"status": "FAILED", "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}


def loss_and_grads(model, batch, device, precision):
    model.zero_grad(set_to_none=True)
    with autocast(device, precision):
        loss = model(*batch)
    loss.backward()
    return loss.item(), {n: p.grad.detach().float().clone() for n, p in model.named_parameters()}


def max_rel_diff(a: dict, b: dict) -> float:
    return max(((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-12)).item() for k in a)


def check_correctness(cfg: ModelConfig, device: torch.device) -> dict:
    torch.manual_seed(0)
    seq = cfg.max_seq_len
    batch = tuple(t.to(device) for t in RandomTokens(cfg.vocab_size, seq).batch(0, 4))
    out: dict = {}
    eager = build(cfg, device)
    l32, g32 = loss_and_grads(eager, batch, device, "fp32")
    l16, g16 = loss_and_grads(eager, batch, device, "bf16")
    out["fp32_loss"], out["bf16_loss"] = l32, l16
    out["bf16_grad_rel_diff"] = max_rel_diff(g16, g32)
    ok = abs(l16 - l32) < 2e-2 * l32 and out["bf16_grad_rel_diff"] < 0.1

    compiled = compile_blocks(build(cfg, device))
    t0 = time.perf_counter()
    lc, g_compiled = loss_and_grads(compiled, batch, device, "fp32")
    out["compile_s"] = round(time.perf_counter() - t0, 1)
    out["compiled_fp32_loss"] = lc
    out["compiled_grad_rel_diff"] = max_rel_diff(g_compiled, g32)
    ok &= abs(lc - l32) < 1e-4 * l32 and out["compiled_grad_rel_diff"] < 1e-3
    lcb, _ = loss_and_grads(compiled, batch, device, "bf16")
    out["compiled_bf16_loss"] = lcb
    ok &= abs(lcb - l32) < 2e-2 * l32

    # A bf16 compiled run on one batch must memorise it: halve its loss within 200 steps (random
    # tokens: a 4-layer model needs about 50 at this batch; a broken backward never gets there).
    opt = torch.optim.AdamW(compiled.parameters(), lr=3e-3, fused=True)
    losses = []
    while len(losses) < 200 and (not losses or losses[-1] >= 0.5 * losses[0]):
        with autocast(device, "bf16"):
            loss = compiled(*batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    out["memorise_loss_first_last"] = [round(losses[0], 4), round(losses[-1], 4)]
    out["memorise_steps"] = len(losses)
    ok &= losses[-1] < 0.5 * losses[0]

    # KV-cache greedy decoding against a full forward per token, in fp32 (the trained model,
    # so that the next token is not a near-tie).
    from scion.generate import generate

    compiled.eval()
    prompt = batch[0][:2, :8]
    new = min(24, seq - 8)
    cached = generate(compiled, prompt, new, temperature=0.0)
    seqs = prompt
    with torch.no_grad():
        for _ in range(new):
            seqs = torch.cat([seqs, compiled(seqs)[:, -1].argmax(-1, keepdim=True)], dim=1)
    out["kv_cache_matches_full_forward"] = torch.equal(cached, seqs)
    ok &= out["kv_cache_matches_full_forward"]
    out["status"] = "ok" if ok else "FAILED"
    return out


def check_decoding(cfg: ModelConfig, device, new: int = 64) -> dict:
    """Greedy decoding at batch 1, eager and through `CompiledDecoder` (what `--compile` uses):
    the same tokens, and new tokens per second for each (compilation not timed)."""
    from scion.generate import CompiledDecoder, generate

    model = build(cfg, device).eval()
    prompt = torch.randint(0, cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0)).to(device)
    started = time.perf_counter()
    decoder = CompiledDecoder(model, batch=1)
    runs = {"eager": lambda: generate(model, prompt, new, temperature=0.0),
            "compiled": lambda: generate(model, prompt, new, temperature=0.0, decoder=decoder)}
    outs = {name: fn() for name, fn in runs.items()}  # warm-up, and compilation
    out: dict = {"compile_s": round(time.perf_counter() - started, 1)}
    for name, fn in runs.items():
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        outs[name] = fn()
        out[f"{name}_tok_s"] = round(new / (time.perf_counter() - t0), 1)
    out["same_tokens"] = torch.equal(outs["eager"], outs["compiled"])
    out["status"] = "ok" if out["same_tokens"] else "FAILED"
    return out


def fsdp_worker(args) -> None:
    """Runs under torchrun: a few training steps through the FSDP code path and, for reference,
    the same steps on the plain model; writes both losses."""
    import torch.distributed as dist

    from scion.pretrain import build_model
    from scion.train.parallel import init_distributed, parallelize

    device = (
        torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
    )
    cfg = RunConfig(model=TINY if args.dry_run else SMALL)
    cfg.train.max_steps, cfg.train.warmup_steps, cfg.train.log_every = 4, 1, 1
    cfg.train.micro_batch_size, cfg.train.parallel, cfg.train.sample_prompts = 4, "fsdp", []
    precision = "bf16" if device.type == "cuda" else "fp32"
    result: dict = {}
    world = init_distributed("fsdp", device)
    if not dist.is_initialized():  # one process: join a group of one, as --parallel fsdp needs
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    world = World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    losses = {}
    for parallel in ("none", "fsdp"):
        # FSDP builds on the meta device and initialises its shards on the device, as
        # `scion pretrain --parallel fsdp` does; the weights must equal the plain build's.
        model = build(cfg.model, device, seed=cfg.train.seed) if parallel == "none" else build_model(cfg, device)
        try:
            # Compiled on the GPU, as a GPU run would be; eager in the dry run, to keep it short.
            train_model = parallelize(
                model, parallel, device, world, compile=device.type == "cuda", precision=precision,
                init_seed=cfg.train.seed,
            )
        except ScionError as e:
            result = {"status": "skipped", "reason": f"scion.train.parallel has no FSDP here: {e}"}
            break
        if parallel == "fsdp":
            from torch.distributed.tensor import DTensor

            sharded = any(isinstance(p, DTensor) for p in model.parameters())
            result["parameters_are_dtensors"] = sharded
            if not sharded and train_model is model:
                result.update(status="skipped", reason="parallelize applied no FSDP wrapping on one rank")
                break
        run_dir = Path(args.out) / f"fsdp-{parallel}"
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        trainer = ThroughputTrainer(
            cfg,
            run_dir,
            model,
            RandomTokens(cfg.model.vocab_size, cfg.model.max_seq_len),
            device=device,
            precision=precision,
            world=world,
            parallel_model=train_model,
            progress=False,
            log=lambda m: None,
        )
        trainer.fit()
        records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        losses[parallel] = [r["loss"] for r in records if "loss" in r]
    if "status" not in result:
        diff = max(abs(a - b) for a, b in zip(losses["none"], losses["fsdp"], strict=True))
        tol = 2e-2 if precision == "bf16" else 1e-4
        result.update(
            status="ok" if diff <= tol * losses["none"][0] else "FAILED",
            losses=losses,
            max_loss_diff=diff,
            precision=precision,
        )
    if world.main:
        Path(args.out, "fsdp.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def check_fsdp(out: Path, dry_run: bool, timeout: float) -> dict:
    env = dict(
        os.environ,
        PYTHONPATH=str(Path(__file__).resolve().parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "1",
        str(Path(__file__).resolve()),
        str(out),
        "--fsdp-worker",
    ] + (["--dry-run"] if dry_run else [])
    (out / "fsdp.json").unlink(missing_ok=True)
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "FAILED", "reason": f"timed out after {timeout:.0f} s"}
    if (out / "fsdp.json").exists():
        return json.loads((out / "fsdp.json").read_text())
    return {"status": "FAILED", "returncode": proc.returncode, "stderr_tail": proc.stderr[-2000:]}


def check_throughput(cfg: RunConfig, device, precision: str, steps: int, out: Path, accum: int = 1,
                     compile_mode: str | None = None, compile: bool = True) -> dict:
    """Train `cfg` through scion's Trainer on random tokens for `steps` steps of `accum`
    micro-batches each; tokens/s and MFU from the last log window, as `scion pretrain` reports
    them."""
    seq = cfg.train.sequence_length(cfg.model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    run_dir = out / f"throughput-accum{accum}"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    first = cfg.train.micro_batch_size
    for micro in (first, first // 2, first // 4):
        if micro < 1:
            break
        model = None
        try:
            torch._dynamo.reset()
            model = build(cfg.model, device, seed=cfg.train.seed)
            if compile:
                compile_blocks(model, mode=compile_mode)
            trainer = throughput_trainer(cfg, model, run_dir, device, precision, micro=micro, accum=accum,
                                         steps=steps)
            started = time.perf_counter()
            trainer.fit()
            wall = time.perf_counter() - started
        except torch.OutOfMemoryError:
            del model
            torch.cuda.empty_cache()
            print(f"    micro-batch {micro} does not fit; halving it", flush=True)
            continue
        records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        last = records[-1]
        peak = peak_flops(device, precision)
        result = {
            "status": "ok",
            "model": cfg.model.name,
            "params_M": round(model.num_params() / 1e6, 1),
            "seq_len": seq,
            "micro_batch": micro,
            "accumulation": accum,
            "steps": steps,
            "precision": precision,
            "compile_mode": (compile_mode or "default") if compile else "eager",
            "tokens_per_s": round(last["tokens_per_s"]),
            "mfu": last.get("mfu"),
            "peak_flops": peak[0] if peak else None,
            "peak_label": peak[1] if peak else None,
            "flops_per_token": flops_per_token(cfg.model, seq),
            "wall_s": round(wall, 1),
            "first_window_s": round(records[0]["elapsed_s"], 1),
            "final_loss": round(last["loss"], 4),
        }
        if peak and last.get("mfu") is not None:
            # TinyLlama's 56% was counted as lit-gpt's estimate_flops counts: 6 FLOPs per token
            # for every trainable parameter (the embedding table too) plus attention. scion's own
            # MFU counts matmul parameters only; this one is for comparing with that figure.
            all_params = 6 * model.num_params() + 12 * cfg.model.n_layer * cfg.model.d_model * seq
            result["mfu_all_parameters_accounting"] = last["tokens_per_s"] * all_params / peak[0]
        if device.type == "cuda":
            result["max_memory_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
        return result
    return {"status": "FAILED", "reason": "out of memory even at micro-batch 1"}


def skipped(reason: str) -> dict:
    return {"status": "skipped", "reason": reason}


def status_of(rows: dict) -> str:
    """A part made of rows: FAILED if one failed, skipped if all were, ok otherwise."""
    states = [r.get("status") for r in rows.values() if isinstance(r, dict) and "status" in r]
    if "FAILED" in states:
        return "FAILED"
    return "skipped" if states and all(s == "skipped" for s in states) else "ok"


def check_peers(model: ModelConfig, seq: int, device, run: dict, clock: Clock) -> dict:
    """scion, litgpt and transformers, each at its largest micro-batch (benchmarks/gpu_peers.py)."""
    libraries = {
        "scion": (None, lambda: scion_library(model, device)),
        "litgpt": (missing("litgpt"), lambda: litgpt_library(model, device)),
        "transformers": (missing("transformers"), lambda: transformers_library(model, device)),
    }
    part = Clock(BUDGET_S["peers"] if clock.end is not None else None)
    out: dict = {
        "model": model.name, "seq_len": seq,
        "flop_count": {"flops_per_token": flops_per_token(model, seq),
                       "accounting": "scion.model.flops_per_token for every library: 6 per matmul parameter "
                                     "(the embedding table not counted) plus attention, PaLM's appendix B"},
        "step": f"bf16 autocast over fp32 weights, {'compiled' if run['compile'] else 'eager'}, forward and loss, "
                "backward, clip 1.0, AdamW (fused on a GPU; lr 4e-4, betas 0.9 0.95, weight decay 0.1), random tokens",
    }
    names = list(libraries)
    for i, name in enumerate(names):
        reason, make = libraries[name]
        later = sum(LIBRARY_S[n] for n in names[i + 1:] if libraries[n][0] is None)
        reason = reason or part.lacks(LIBRARY_S[name]) or clock.lacks(LIBRARY_S[name])
        if reason:
            out[name] = skipped(reason)
            continue
        try:
            out[name] = best_micro_batch(make(), model, seq, device, **run,
                                         time_left=lambda later=later: min(part.left(), clock.left()) - later)
        except Exception as e:
            out[name] = failure(e)
            if name != "scion":  # a peer that breaks here is a finding about the peer, not a failed check
                out[name].update(status="skipped", reason=f"{name} failed here: {out[name]['error']}")
        print(f"    {name}: {json.dumps({k: v for k, v in out[name].items() if k != 'trace'})}", flush=True)
    params = {n: out[n]["params"] for n in names if out[n].get("status") == "ok"}
    if len(set(params.values())) > 1:  # one FLOP count for all holds only for one parameter count
        out["params_differ"] = params
        out["status"] = "FAILED"
        return out
    out["status"] = status_of({n: out[n] for n in names})
    return out


def check_ladder(model: ModelConfig, seq: int, device, run: dict, default: dict, clock: Clock) -> dict:
    """scion's switches, each against the default (the peers' scion row): at the default's
    micro-batch, except activation checkpointing, which gets its own largest."""
    micro = default["micro_batch"]
    rows: dict = {"default": {k: default[k] for k in ("status", "micro_batch", "tokens_per_s", "mfu",
                                                       "max_memory_GiB", "residual_stream", "loss_chunk_tokens",
                                                       "activation_checkpointing") if k in default}}
    fixed = {k: v for k, v in run.items() if k != "default_micro"}

    def at_default(name: str, lib) -> None:
        if reason := clock.lacks(BUDGET_S["ladder"] / 3):
            rows[name] = skipped(reason)
            return
        try:
            rows[name] = {"status": "ok", **lib.settings,
                          **with_mfu(measure(lib, micro, seq, model.vocab_size, device, **fixed), model, device)}
        except torch.OutOfMemoryError:
            rows[name] = {"status": "ok", "micro_batch": micro, "fits": False, **lib.settings}
        except Exception as e:
            rows[name] = failure(e)

    at_default("bf16_residual", scion_library(model, device, bf16_residual=True))
    # The output layer the other way round: whole where the default chunks it, in chunks otherwise.
    flipped = 0 if TrainConfig.loss_chunk_tokens else 2048
    at_default(f"loss_chunk_tokens_{flipped}", scion_library(model, device, loss_chunk_tokens=flipped))
    if reason := clock.lacks(BUDGET_S["ladder"] / 3):
        rows["activation_checkpointing"] = skipped(reason)
    else:
        try:
            rows["activation_checkpointing"] = best_micro_batch(
                scion_library(model, device, activation_checkpointing=True), model, seq, device, **run,
                time_left=lambda: clock.left() - BUDGET_S["fp8_throughput"] - BUDGET_S["fp8_loss"])
        except Exception as e:
            rows["activation_checkpointing"] = failure(e)
    for name, row in rows.items():
        if name != "default" and row.get("tokens_per_s"):
            row["speedup_over_default"] = round(row["tokens_per_s"] / default["tokens_per_s"], 3)
    return {"status": status_of(rows), **rows}


def fp8_refusal(device) -> str | None:
    """Why fp8 training cannot run here (the line `--precision fp8` would refuse with), or None."""
    try:
        resolve_precision("fp8", device)
    except ScionError as e:
        return str(e)
    return None


def check_fp8_throughput(model: ModelConfig, seq: int, device, run: dict, default: dict) -> dict:
    """scion's default step with --precision fp8, at the default's micro-batch."""
    if reason := fp8_refusal(device):
        return skipped(reason)
    micro = default["micro_batch"]
    fixed = {k: v for k, v in run.items() if k != "default_micro"}
    lib = scion_library(model, device, precision="fp8")
    try:
        row = with_mfu(measure(lib, micro, seq, model.vocab_size, device, **fixed), model, device)
    except torch.OutOfMemoryError:
        return {"status": "FAILED", "reason": f"fp8 did not fit at bf16's micro-batch {micro}"}
    out = {"status": "ok", **lib.settings, **row, "bf16_tokens_per_s": default["tokens_per_s"],
           "speedup_over_bf16": round(row["tokens_per_s"] / default["tokens_per_s"], 3),
           "mfu_note": "against the bf16 peak, as bf16 rows: only the Linear products run in float8"}
    if "max_memory_GiB" in default:
        out["bf16_max_memory_GiB"] = default["max_memory_GiB"]
    return out


def small_bundled_corpus(folder: Path, n: int = 6, least: int = 64_000) -> Path:
    """`folder` holding the `n` smallest plays of the bundled corpus with at least `least` bytes
    each: a corpus a CPU prepares in seconds, with a validation split (it goes by whole files
    this small)."""
    from scion.data.sources import bundled_corpus

    plays = sorted((f for f in bundled_corpus().glob("*.txt") if f.stat().st_size >= least),
                   key=lambda f: f.stat().st_size)
    folder.mkdir(parents=True, exist_ok=True)
    for play in plays[:n]:
        shutil.copyfile(play, folder / play.name)
    return folder


def check_fp8_loss(device, out: Path, dry_run: bool, steps: int) -> dict:
    """`scion pretrain`'s path (scion.pretrain.pretrain: the bundled corpus prepared, compiled
    blocks, validation, sampling and a checkpoint at the end) for `steps` steps in bf16, then in
    fp8, from the same weights on the same batches: the largest gap between their logged training
    losses, and their validation losses. The dry run trains on six plays of the corpus."""
    from scion.pretrain import pretrain

    refused = fp8_refusal(device)
    if refused and not dry_run:  # the bf16 run alone would compare with nothing
        return skipped(refused)
    rows: dict = {}
    curves = {}
    for precision in ("bf16", "fp8"):
        if precision == "fp8" and refused:
            rows[precision] = skipped(refused)
            continue
        cfg = RunConfig(model=replace(TINY if dry_run else SMALL))
        t = cfg.train
        t.device, t.precision, t.compile = device.type, precision, device.type == "cuda"
        t.max_steps, t.micro_batch_size, t.warmup_steps = steps, 4 if dry_run else 16, max(1, steps // 10)
        t.log_every, t.eval_every, t.eval_batches = max(1, steps // 30), max(1, steps // 3), 2 if dry_run else 10
        t.sample_every = t.checkpoint_every = steps  # once, at the end: float8's passes without gradients, its save
        t.sample_tokens = 16
        if dry_run:
            cfg.data = DataConfig(path=[str(small_bundled_corpus(out / "fp8-loss-corpus"))], val_fraction=0.3)
        started = time.perf_counter()
        # gpu_check.sh turns the tokenizers' threads off (forks follow); here they train the
        # corpus's tokenizer and encode it, after the last fork.
        os.environ["TOKENIZERS_PARALLELISM"] = "true"
        run_dir, _, _ = pretrain(cfg, out / f"fp8-loss-{precision}", resume=False, overwrite=True, progress=False)
        records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        curves[precision] = {r["step"]: r["loss"] for r in records if "loss" in r}
        rows[precision] = {
            "status": "ok", "seconds": round(time.perf_counter() - started, 1),
            "final_loss": round(curves[precision][max(curves[precision])], 4),
            "val_loss": {r["step"]: round(r["val_loss"], 4) for r in records if "val_loss" in r},
            "tokens_per_s": next((round(r["tokens_per_s"]) for r in reversed(records) if "tokens_per_s" in r), None),
        }
    result: dict = {"model": (TINY if dry_run else SMALL).name, "steps": steps,
                    "data": "six plays of the bundled corpus" if dry_run else "the bundled corpus", **rows}
    if len(curves) < 2:
        result["status"] = "skipped" if rows["fp8"]["status"] == "skipped" else "FAILED"
        result["reason"] = rows["fp8"].get("reason", "")
        return result
    gaps = [(abs(curves["fp8"][s] - curves["bf16"][s]), s) for s in curves["bf16"] if s in curves["fp8"]]
    gap, step = max(gaps)
    result["largest_gap"] = {"step": step, "gap": round(gap, 4), "bf16": round(curves["bf16"][step], 4),
                             "fp8": round(curves["fp8"][step], 4)}
    finite = all(math.isfinite(v) for c in curves.values() for v in c.values())
    result["status"] = "ok" if finite and gap <= FP8_LOSS_GAP else "FAILED"
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="folder for gpu_check.json and the runs' metrics")
    ap.add_argument("--dry-run", action="store_true", help="every part on CPU with tiny models, eager")
    ap.add_argument("--steps", type=int, default=10, help="timed steps of each throughput row")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds the parts may take in all (default 450 on a GPU, none in the dry run)")
    ap.add_argument("--micro-batch", type=int, default=16, help="the Trainer row's micro-batch when the peers' "
                    "search did not run (halved on OOM)")
    ap.add_argument("--accum", type=int, default=4, help="micro-batches a step in the Trainer row")
    ap.add_argument("--fp8-loss-steps", type=int, default=FP8_LOSS_STEPS, help="steps of each fp8_loss run")
    ap.add_argument("--compile-mode", default=None,
                    help="torch.compile mode of the Trainer row (e.g. max-autotune-no-cudagraphs)")
    ap.add_argument("--only-throughput", action="store_true", help="skip the correctness and decoding steps")
    ap.add_argument("--fsdp-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.fsdp_worker:
        fsdp_worker(args)
        return

    if args.dry_run:
        device = torch.device("cpu")
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    else:
        if not torch.cuda.is_available():
            sys.exit("gpu_check: no CUDA device here; use --dry-run to rehearse on CPU")
        device = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = False  # the correctness checks compare fp32 exactly
    clock = Clock(args.budget if args.budget is not None else (None if args.dry_run else 450))
    results = Results(out)
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "dry_run": args.dry_run,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "machine": describe_machine(device),
        "budget_s": None if clock.end is None else round(clock.left()),
        "part_budgets_s": BUDGET_S,
    }
    print(f"machine: {env['machine']}", flush=True)
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        env["memory_GiB"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    for lib in ("litgpt", "transformers", "torchao"):
        spec = importlib.util.find_spec(lib)
        env[lib] = importlib.metadata.version(lib) if spec else None
    peak = peak_flops(device, "bf16" if device.type == "cuda" else "fp32")
    env["peak"] = {"flops": peak[0], "label": peak[1]} if peak else None
    results.record("environment", env)

    failed = False

    def run(name: str, fn) -> dict:
        """Run one part and record it; a broken part is a result to record, not the end of the
        check; a part its budget no longer fits is recorded as skipped."""
        nonlocal failed
        if reason := clock.lacks(BUDGET_S.get(name, 0)):
            value = skipped(reason)
            results.record(name, value)
            return value
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        started = time.perf_counter()
        try:
            value = fn()
        except Exception as e:
            value = failure(e)
        value["seconds"] = round(time.perf_counter() - started, 1)
        failed |= value["status"] == "FAILED"
        results.record(name, value)
        return value

    if not args.only_throughput:
        run("correctness", lambda: check_correctness(TINY if args.dry_run else SMALL, device))
        run("fsdp_one_device", lambda: check_fsdp(out, args.dry_run, timeout=240 if args.dry_run else 150))

    if args.dry_run:  # eager: compiling on a CPU is what makes a dry run slow
        cfg = RunConfig(model=replace(TINY, name="tinyllama-shape-tiny"))
        precision, steps = "fp32", min(args.steps, 3)
        timing = {"compile": False, "warmup": 1, "steps": steps, "default_micro": 2}
    else:
        cfg = preset("tinyllama-1.1b")
        precision, steps = "bf16", args.steps
        timing = {"compile": True, "warmup": 3, "steps": steps, "default_micro": args.micro_batch}
        torch.backends.cuda.matmul.allow_tf32 = True
    cfg.train.seq_len = cfg.model.max_seq_len  # 2048 for tinyllama-1.1b
    seq = cfg.model.max_seq_len

    peers = run("peers", lambda: check_peers(cfg.model, seq, device, timing, clock))
    default = peers.get("scion", {})
    if default.get("status") == "ok":
        run("ladder", lambda: check_ladder(cfg.model, seq, device, timing, default, clock))
        run("fp8_throughput", lambda: check_fp8_throughput(cfg.model, seq, device, timing, default))
        cfg.train.micro_batch_size = default["micro_batch"]
    else:
        for name in ("ladder", "fp8_throughput"):
            results.record(name, skipped("no default scion row to compare with (see peers)"))
        cfg.train.micro_batch_size = timing["default_micro"]
    run("fp8_loss", lambda: check_fp8_loss(device, out, args.dry_run, 6 if args.dry_run else args.fp8_loss_steps))
    value = run("throughput", lambda: check_throughput(cfg, device, precision, max(3, steps), out, accum=args.accum,
                                                        compile_mode=args.compile_mode, compile=not args.dry_run))
    if value["status"] == "ok":
        cfg.train.micro_batch_size = value["micro_batch"]

        # Where that step's time goes (benchmarks/gpu_profile.py, at the micro-batch that fit).
        def profile() -> dict:
            result = profile_training(cfg, device, precision, cfg.train.micro_batch_size, accum=2, steps=3,
                                      compile=not args.dry_run)
            print_tables(result)
            return {"status": "ok", **result}

        run("profile", profile)

    # Last, so that a slow compilation can only cost its own result.
    if args.only_throughput:
        run("compiled_decoding", lambda: skipped("--only-throughput"))
    else:
        run("compiled_decoding", lambda: check_decoding(TINY if args.dry_run else SMALL, device))
    results.data["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    results.data["ok"] = not failed
    results.path.write_text(json.dumps(results.data, indent=1))
    verdict = "SOME CHECKS FAILED" if failed else "all checks passed"
    print(f"gpu_check: {verdict}; results in {results.path}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
