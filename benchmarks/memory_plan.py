"""The memory plan (`scion plan`, and the line below every training command's start line)
against the peak measured, row by row.

    python benchmarks/memory_plan.py                                # tiny, small, tinyllama-1.1b
    python benchmarks/memory_plan.py --presets tiny small --precisions fp32
    python benchmarks/memory_plan.py --presets tinyllama-1.1b --micro 1 --precisions fp32 --no-fsdp
    python benchmarks/memory_plan.py --presets small --micro 16 32 --ckpt yes --only-fsdp

Each row runs in a fresh process (FSDP rows: 2 freshly spawned gloo ranks, fp32, with and
without activation checkpointing as --ckpt says), so peaks never mix:
scion's Trainer, with the model, precision, activation checkpointing and sharding that
`scion pretrain` gives them, trains 2 steps on random tokens (the second step is the first with
the optimizer's moments allocated: the steady state). Measured: the process's peak resident set
(ru_maxrss; the larger rank's for FSDP) on a CPU, torch.cuda.max_memory_allocated on a GPU (then
the plan's runtime term, the CUDA context, is left out of both). The plan's runtime term on a
CPU is the process's resident memory after importing torch and scion and choosing the device,
just before the model is built: what `scion.pretrain.steps.setup` measures in a real run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import common  # noqa: F401  (puts the repository on the path)
import torch

from scion.config import RunConfig, preset
from scion.train.device import describe_machine
from scion.train.memory import GiB, plan_memory

MICRO = {"tiny": (8, 32), "small": (8, 32), "tinyllama-1.1b": (1, 2)}
STEPS = 2


def run_row(rank: int, row: dict, port: int | None, out: str) -> None:
    """One row in this (fresh) process: train STEPS steps, write the plan and the peak."""
    if row["ranks"] > 1:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(row["ranks"]),
                          LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(row["threads"])
    from common import RandomTokens, ThroughputTrainer

    from scion.pretrain.steps import build_model, setup
    from scion.train.parallel import parallelize, shutdown

    cfg: RunConfig = preset(row["preset"])
    t = cfg.train
    t.device, t.precision, t.activation_checkpointing = row["device"], row["precision"], row["ckpt"]
    t.parallel = "fsdp" if row["ranks"] > 1 else "none"
    t.seq_len = row["seq"] or None
    seq = t.sequence_length(cfg.model)
    t.micro_batch_size, t.tokens_per_step = row["micro"], row["micro"] * seq * row["ranks"]
    t.max_steps, t.warmup_steps, t.log_every = STEPS, 1, 10**9
    t.checkpoint_every = t.eval_every = t.sample_every = 10**9
    t.force_memory = True  # measure what the plan would refuse, too
    env = setup(cfg)
    cuda = env.device.type == "cuda"
    plan = plan_memory(cfg.model, t, precision=env.precision, device_kind=env.device.type,
                       ranks=env.world.size, runtime=0.0 if cuda else env.runtime)
    model = build_model(cfg, env.device)
    train_model = parallelize(model, t.parallel, env.device, env.world, precision=env.precision,
                              activation_checkpointing=t.activation_checkpointing, init_seed=t.seed)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = ThroughputTrainer(cfg, run_dir, model, RandomTokens(cfg.model.vocab_size, seq), device=env.device,
                                    precision=env.precision, world=env.world, parallel_model=train_model,
                                    progress=False, log=lambda m: None)
        trainer.fit()
    if cuda:
        peak = torch.cuda.max_memory_allocated(env.device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    terms = {k: getattr(plan, k) for k in plan.TERMS}
    Path(out, f"rank{rank}.json").write_text(json.dumps({"plan": plan.total, "terms": terms, "peak": peak}))
    shutdown()


def measure(row: dict) -> dict:
    """The row in a fresh interpreter (and its ranks in fresh spawned processes)."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, __file__, "--row", json.dumps(row), "--out", out]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
        ranks = [json.loads(p.read_text()) for p in sorted(Path(out).glob("rank*.json"))]
    worst = max(ranks, key=lambda r: r["peak"])
    return {**worst, "ratio": worst["plan"] / worst["peak"]}


def child(row: dict, out: str) -> None:
    if row["ranks"] == 1:
        return run_row(0, row, None, out)
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(run_row, args=(row, port, out), nprocs=row["ranks"], join=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=list(MICRO))
    ap.add_argument("--micro", nargs="+", type=int, default=None, help="micro-batches (default: two per preset)")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--seq", type=int, default=0, help="sequence length (default: the preset's)")
    ap.add_argument("--no-fsdp", action="store_true", help="leave out the FSDP rows (2 gloo ranks)")
    ap.add_argument("--only-fsdp", action="store_true", help="only the FSDP rows (2 gloo ranks, fp32)")
    ap.add_argument("--ckpt", choices=["both", "no", "yes"], default="both", help="activation checkpointing rows")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("--row", default=None, help=argparse.SUPPRESS)  # one row, in a fresh process
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.row:
        return child(json.loads(args.row), args.out)
    print(f"machine: {describe_machine(torch.device(args.device))}", flush=True)
    print(f"{STEPS} steps per row, each row in a fresh process; measured: "
          + ("torch.cuda.max_memory_allocated" if args.device != "cpu" else "peak RSS (ru_maxrss)"), flush=True)
    print("\n| preset | micro-batch x seq | precision | act. ckpt | ranks | weights | grads | AdamW | activations "
          "| logits | allocator | runtime | plan | measured | plan / measured |\n|---|---|---|---|---:|" + "---:|" * 10,
          flush=True)
    base = {"device": args.device, "threads": args.threads, "seq": args.seq}
    rows = []
    for name in args.presets:
        micros = args.micro or MICRO.get(name, (1, 2))
        ckpts = {"both": (False, True), "no": (False,), "yes": (True,)}[args.ckpt]
        shapes = [] if args.only_fsdp else [(p, c, 1) for p in args.precisions for c in ckpts]
        if not args.no_fsdp:
            shapes += [("fp32", c, 2) for c in ckpts]
        for precision, ckpt, ranks in shapes:
            for m in micros:
                row = {**base, "preset": name, "micro": m, "precision": precision, "ckpt": ckpt, "ranks": ranks}
                result = measure(row)
                rows.append({**row, **result})
                seq = args.seq or preset(name).train.sequence_length(preset(name).model)
                head = f"| {name} | {m} x {seq} | {precision} | {'yes' if ckpt else 'no'} | {ranks} |"
                if "error" in result:
                    print(f"{head} {result['error']} |", flush=True)
                    continue
                terms = " | ".join(f"{v / GiB:.2f}" for v in result["terms"].values())
                print(f"{head} {terms} | {result['plan'] / GiB:.2f} | {result['peak'] / GiB:.2f} | "
                      f"{result['ratio']:.2f} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    ratios = [r["ratio"] for r in rows if "ratio" in r]
    if ratios:
        worst = max(ratios, key=lambda r: abs(r - 1))
        print(f"\nworst row: plan / measured = {worst:.2f} ({abs(worst - 1):.0%} off); "
              f"{sum(abs(r - 1) <= 0.15 for r in ratios)} of {len(ratios)} rows within 15%")


if __name__ == "__main__":
    main()
