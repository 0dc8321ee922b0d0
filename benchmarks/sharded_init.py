"""Building a model for FSDP: on the meta device and initialised shard by shard (what
`scion pretrain --parallel fsdp` does), against building it whole on every rank and then sharding.

    python benchmarks/sharded_init.py                          # tinyllama-1.1b on 2 gloo ranks (CPU)
    python benchmarks/sharded_init.py --preset small --ranks 2

Each way runs in its own freshly spawned ranks; each rank reports its peak resident memory
(ru_maxrss) and the seconds from the start of the build to a sharded, initialised model. Both
ways give bit-identical weights (tests/test_distributed.py checks it); this measures the cost.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import tempfile
import time
from pathlib import Path

import common  # noqa: F401  (puts the repository on the path)
import torch
import torch.multiprocessing as mp

from scion.config import RunConfig, preset
from scion.train.device import describe_machine


def rank_main(rank: int, world: int, port: int, preset_name: str, way: str, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from scion.pretrain import build_model, setup
    from scion.train.parallel import parallelize, shutdown

    cfg: RunConfig = preset(preset_name)
    cfg.train.device, cfg.train.parallel = "cpu", "fsdp"
    env = setup(cfg)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    if way == "meta":
        model = build_model(cfg, env.device)
    else:  # the whole model on this rank first, as every rank would without the meta device
        cfg.train.parallel = "none"
        model = build_model(cfg, env.device)
        cfg.train.parallel = "fsdp"
    parallelize(model, "fsdp", env.device, env.world, init_seed=cfg.train.seed)
    seconds = time.perf_counter() - started
    local = sum(p.to_local().numel() for p in model.parameters())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(out, f"{way}-{rank}.json").write_text(json.dumps(
        dict(seconds=seconds, peak_mb=peak, start_mb=rss_before, local_params=local)))
    shutdown()


def measure(preset_name: str, way: str, ranks: int, out: str) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(rank_main, args=(ranks, port, preset_name, way, out), nprocs=ranks, join=True)
    return [json.loads(Path(out, f"{way}-{r}.json").read_text()) for r in range(ranks)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tinyllama-1.1b")
    ap.add_argument("--ranks", type=int, default=2)
    args = ap.parse_args()
    print(f"machine: {describe_machine()}", flush=True)
    cfg = preset(args.preset).model
    with torch.device("meta"):
        from scion.model import Transformer

        n = Transformer(cfg).num_params()
    print(f"torch {torch.__version__}, preset {args.preset} ({n / 1e6:,.1f}M parameters, "
          f"{n * 4 / 2**20:,.0f} MB in fp32), {args.ranks} gloo ranks on CPU", flush=True)
    rows = {}
    with tempfile.TemporaryDirectory() as out:
        for way in ("whole", "meta"):
            rows[way] = measure(args.preset, way, args.ranks, out)
            print(f"  {way}: " + ", ".join(f"rank {i} {r['peak_mb']:,.0f} MB peak, {r['seconds']:.1f} s"
                                           for i, r in enumerate(rows[way])), flush=True)
    print("\n| build | peak RSS per rank (MB) | of which before the build | seconds to a sharded model |"
          "\n|---|---:|---:|---:|")
    labels = {"whole": "whole on each rank, then sharded", "meta": "meta device, initialised per shard"}
    for way, rs in rows.items():
        print(f"| {labels[way]} | {max(r['peak_mb'] for r in rs):,.0f} | {max(r['start_mb'] for r in rs):,.0f} | "
              f"{max(r['seconds'] for r in rs):.1f} |")
    whole, meta = (max(r["peak_mb"] - r["start_mb"] for r in rows[w]) for w in ("whole", "meta"))
    print(f"\nmemory the build adds per rank: {whole:,.0f} MB whole, {meta:,.0f} MB on meta ({meta / whole:.2f}x)")


if __name__ == "__main__":
    main()
