"""The one-GPU check: is the CUDA path correct, and how fast is a real model on it?

    python benchmarks/gpu_check.py OUT_DIR              # on a machine with one CUDA GPU
    python benchmarks/gpu_check.py OUT_DIR --dry-run    # the same steps on CPU with a tiny model

Steps, each recorded in OUT_DIR/gpu_check.json as it finishes (a later failure keeps the earlier
results):
  1. environment: torch, device, the peak that MFU is measured against;
  2. correctness on the device: fp32 against bf16 autocast, compiled blocks against eager (loss and
     gradients), a short training run that must memorise a batch, KV-cache greedy decoding
     against a no-cache full-forward greedy decode;
  3. FSDP on one device: `torchrun --nproc-per-node 1` running the training loop with
     `--parallel fsdp`'s code path (built on the meta device, sharded, then initialised on the
     GPU by scion.train.parallel.parallelize), whose loss must match the unwrapped model's; reported
     as skipped when this build has no FSDP;
  4. throughput: the `tinyllama-1.1b` preset at sequence 2048 on random tokens, bf16, compiled
     blocks, fused AdamW, through scion's Trainer, reporting tokens/s and MFU as metrics.jsonl
     records them: one micro-batch a step, then `--accum` micro-batches a step (the preset's own
     global batch is 128 of them, so the optimizer step's share is nearly nil there);
     then the accumulated run again with the residual stream in bf16 between blocks, as training
     with bf16 parameters has it (an experiment: scion's autocast keeps it fp32);
  5. profile: one step of 2 micro-batches profiled, its kernel time sorted by kind, and each
     matrix-product shape and the attention kernel timed alone (benchmarks/gpu_profile.py);
  6. compiled decoding: greedy batch-1 decoding eager and through `CompiledDecoder` (what
     `scion generate --compile` uses), the same tokens, and new tokens per second for each.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from common import TINY, RandomTokens, ThroughputTrainer, build, throughput_trainer  # noqa: E402  (beside this file)
from gpu_profile import print_tables, profile_training  # noqa: E402

from scion.config import ModelConfig, RunConfig, preset  # noqa: E402
from scion.errors import ScionError  # noqa: E402
from scion.model import flops_per_token  # noqa: E402
from scion.train.compile import compile_blocks  # noqa: E402
from scion.train.device import autocast, describe_machine, peak_flops  # noqa: E402
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


def residual_in_autocast_dtype(model) -> None:
    """Under autocast, cast the embedding's output to the autocast dtype, so that the residual
    stream between blocks (and what they save for backward) is bf16 rather than fp32: what
    training with bf16 parameters gives (FSDP's bf16 `param_dtype`, as TinyLlama and torchtitan
    train), measured here on the plain model as an experiment."""

    def cast(module, args, output):
        kind = output.device.type
        return output.to(torch.get_autocast_dtype(kind)) if torch.is_autocast_enabled(kind) else output

    model.embed.register_forward_hook(cast)


def check_throughput(cfg: RunConfig, device, precision: str, steps: int, out: Path, accum: int = 1,
                     compile_mode: str | None = None, bf16_residual: bool = False) -> dict:
    """Train `cfg` on random tokens for `steps` steps of `accum` micro-batches each; tokens/s and
    MFU from the last log window. `bf16_residual`: see `residual_in_autocast_dtype`."""
    seq = cfg.train.sequence_length(cfg.model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    run_dir = out / ("throughput" if accum == 1 else f"throughput-accum{accum}")
    if bf16_residual:
        run_dir = run_dir.with_name(run_dir.name + "-bf16-residual")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    first = cfg.train.micro_batch_size
    for micro in (first, first // 2, first // 4):
        if micro < 1:
            break
        model = None
        try:
            model = build(cfg.model, device, seed=cfg.train.seed)
            if bf16_residual:
                residual_in_autocast_dtype(model)
            model = compile_blocks(model, mode=compile_mode)
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
            "compile_mode": compile_mode or "default",
            "residual_stream": "autocast dtype" if bf16_residual else "fp32",
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="folder for gpu_check.json and the runs' metrics")
    ap.add_argument("--dry-run", action="store_true", help="the same steps on CPU with tiny models")
    ap.add_argument("--steps", type=int, default=30, help="throughput steps")
    ap.add_argument("--micro-batch", type=int, default=16, help="throughput micro-batch (halved on OOM)")
    ap.add_argument("--accum", type=int, default=4, help="micro-batches a step in the second throughput run")
    ap.add_argument("--compile-mode", default=None,
                    help="torch.compile mode of the throughput runs (e.g. max-autotune-no-cudagraphs)")
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
    results = Results(out)
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "dry_run": args.dry_run,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "machine": describe_machine(device),
    }
    print(f"machine: {env['machine']}", flush=True)
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        env["memory_GiB"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    peak = peak_flops(device, "bf16" if device.type == "cuda" else "fp32")
    env["peak"] = {"flops": peak[0], "label": peak[1]} if peak else None
    results.record("environment", env)

    failed = False

    def run(name: str, fn) -> dict:
        """Run one step and record it; a broken step is a result to record, not the end of the check."""
        nonlocal failed
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

    if args.dry_run:
        cfg = RunConfig(model=replace(TINY, name="tinyllama-shape-tiny"))
        cfg.train.micro_batch_size, precision, steps = 4, "fp32", min(args.steps, 6)
    else:
        cfg = preset("tinyllama-1.1b")
        cfg.train.micro_batch_size, precision, steps = args.micro_batch, "bf16", args.steps
        torch.backends.cuda.matmul.allow_tf32 = True
    cfg.train.seq_len = cfg.model.max_seq_len  # 2048 for tinyllama-1.1b
    value = run("throughput", lambda: check_throughput(cfg, device, precision, steps, out,
                                                        compile_mode=args.compile_mode))
    if value["status"] == "ok":
        # The same at the preset's shape: several micro-batches a step, so that the optimizer
        # step, the clipping and the per-step sync are paid once per `accum` forward/backward passes.
        cfg.train.micro_batch_size = value["micro_batch"]
        run("throughput_accumulated", lambda: check_throughput(
            cfg, device, precision, max(3, steps // 3), out, accum=args.accum, compile_mode=args.compile_mode))
        # An experiment for the 55% MFU target: the same step with a bf16 residual stream
        # (bf16 in the dry run too, so that the rehearsal exercises the cast).
        # At the accumulated run's shape, so that the two compare directly.
        run("throughput_bf16_residual", lambda: check_throughput(
            cfg, device, "bf16", max(3, steps // 3), out, accum=args.accum, compile_mode=args.compile_mode,
            bf16_residual=True))
        # Where that step's time goes (benchmarks/gpu_profile.py, at the micro-batch that fit).
        def profile() -> dict:
            result = profile_training(cfg, device, precision, cfg.train.micro_batch_size, accum=2, steps=3)
            print_tables(result)
            return {"status": "ok", **result}

        run("profile", profile)

    # Last, so that a slow compilation can only cost its own result.
    if args.only_throughput:
        run("compiled_decoding", lambda: {"status": "skipped", "reason": "--only-throughput"})
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
