"""scion plan: the memory a training run will need per rank, term by term, and the largest
micro-batch that fits, on this machine or on a named device, without training."""

from __future__ import annotations

from scion.cli.options import add_config_flags, base_parser, parse_config

EXAMPLES = """
examples:
  scion plan                                            # the tiny preset on this machine
  scion plan --preset tinyllama-1.1b --micro-batch-size 4
  scion plan --preset tinyllama-1.1b --device h100-80gb --ranks 8 --parallel fsdp
  scion plan --preset tinyllama-1.1b --device h100-80gb --ranks 32 --parallel hsdp --hsdp-shard-size 8
  scion plan --config run.yaml --device a100-40gb --activation-checkpointing

Every `scion pretrain` flag works (--preset, --config, --micro-batch-size, --precision,
--parallel, ...). The same plan is printed below the start line of every training command, which
refuses to start when it does not fit (--force-memory starts anyway). With --parallel hsdp the
weights, gradients and optimizer state are split over a shard group of --hsdp-shard-size ranks
(default: all --ranks, as on one node; a run under torchrun takes one node's ranks).
"""


def main(argv: list[str]) -> int:
    from scion.train.memory import DEVICES

    p = base_parser("scion plan", "The memory plan of a training run: per-rank peak, term by term." + EXAMPLES)
    add_config_flags(p)
    p.add_argument("--device", default=None, metavar="NAME",
                   help=f"a named device instead of this machine's: {', '.join(DEVICES)}")
    p.add_argument("--ranks", type=int, default=1, help="ranks the run is spread over (one device each)")
    args, cfg = parse_config(p, argv)

    from scion.errors import ScionError
    from scion.train.memory import GiB, MemoryPlan, fixes, largest_micro_batch, plan_memory

    if args.ranks < 1:
        raise ScionError(f"--ranks must be positive, got {args.ranks}")
    if args.ranks > 1 and cfg.train.parallel == "none":
        raise ScionError(f"--ranks {args.ranks} needs --parallel ddp or --parallel fsdp (or hsdp)")
    kind, available, where, precision = _device(args.device, cfg.train.precision)
    seq = cfg.train.sequence_length(cfg.model)
    if cfg.train.tokens_per_step and cfg.train.tokens_per_step % (cfg.train.micro_batch_size * args.ranks * seq):
        raise ScionError(f"--tokens-per-step {cfg.train.tokens_per_step} is not a multiple of micro-batch x ranks "
                         f"x seq_len = {cfg.train.micro_batch_size} x {args.ranks} x {seq}")
    kw = {"precision": precision, "device_kind": kind, "ranks": args.ranks}
    plan = plan_memory(cfg.model, cfg.train, **kw)
    parallel = f", {plan.parallel}" if plan.parallel != "none" else ""
    if plan.parallel == "hsdp":
        parallel += f" {args.ranks // plan.shard_group} x {plan.shard_group} (replicate x shard)"
    ckpt = ", activation checkpointing" if cfg.train.activation_checkpointing else ""
    print(f"{cfg.model.name} on {where}: {args.ranks} rank(s){parallel}, {precision}{ckpt}, "
          f"micro-batch {plan.micro_batch} x {seq} tokens, {plan.accum} accumulation step(s)")
    for term in MemoryPlan.TERMS:
        label = MemoryPlan.LABELS[term] + (" (per micro-batch)" if term == "activations" else "")
        print(f"  {label:<34}{getattr(plan, term) / GiB:9.2f} GiB")
    fits = available is None or plan.total <= available
    room = f" of {available / GiB:.1f} GiB: {'fits' if fits else 'does NOT fit'}" if available else ""
    print(f"  {'peak per rank':<34}{plan.total / GiB:9.2f} GiB{room}")
    if available is None:
        return 0
    best = largest_micro_batch(cfg.model, cfg.train, available, **kw)
    print(f"largest micro-batch that fits: {best}" if best else "not even micro-batch 1 fits")
    if not fits:
        found = fixes(cfg.model, cfg.train, available, **kw)
        print("fits with: " + (" or ".join(found) if found else "no setting of scion's on this device"))
    return 0


def _device(name: str | None, precision: str) -> tuple[str, float | None, str, str]:
    """(kind, bytes available, description, precision) of a named device or of this machine."""
    from scion.train.device import resolve_device, resolve_precision
    from scion.train.memory import available_bytes, named_device

    if name and name != "auto" and name.split(":")[0] not in ("cpu", "cuda", "mps"):
        kind, available = named_device(name)
        if precision == "auto":  # what --precision auto picks there: bf16 on GPUs, fp32 on a CPU without fast bf16
            precision = "bf16" if kind == "cuda" else "fp32"
        return kind, available, name, precision
    device = resolve_device(name or "auto")  # this machine's (--device cpu, cuda:1: one of its own)
    return device.type, available_bytes(device), f"this machine ({device})", resolve_precision(precision, device)
