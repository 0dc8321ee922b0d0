"""The output layer and cross-entropy whole against a chunk of tokens at a time
(`--loss-chunk-tokens`): peak memory and time of one forward and backward pass.

    python benchmarks/chunked_loss.py                        # tinyllama-1.1b's output, 2 x 2048 tokens
    python benchmarks/chunked_loss.py --batch 4 --chunks 0 512 1024 2048 4096 --precisions bf16
    python benchmarks/chunked_loss.py --d-model 256 --vocab 4096 --seq 512 --repeats 1   # a quick check

What runs is `Transformer.output_loss` (final norm, head, cross-entropy and their backward pass)
on a random last hidden state [batch, seq, d_model] with random targets, at tinyllama-1.1b's
output shapes by default (d_model 2048, vocab 32000, sequence 2048) and a batch a CPU holds.
Chunk 0 is the whole computation: [tokens, vocab] logits in fp32, their log-softmax kept for
backward. Each row runs in a fresh process, so peaks never mix: the inputs and the weights are
made first, then the peak resident set (ru_maxrss) of the first pass, less the resident set
before it, is the pass's memory (the gradients it leaves behind included); then the median
time of `--repeats` more passes. bf16 is autocast, as `scion pretrain --precision bf16` runs it
(on a CPU without native bf16 it is emulated and slow: compare chunks within a precision).
The plan column is the memory plan's logits term (`scion.train.memory.logits_bytes`) plus the
gradients the pass leaves (of the hidden state, the head, the norm): what it predicts here.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import common  # noqa: F401  (puts the repository on the path)
import torch

from scion.config import ModelConfig, TrainConfig, preset
from scion.model import Transformer
from scion.train.device import describe_machine
from scion.train.memory import logits_bytes, resident_bytes

MiB = 2**20


def one_row(d_model: int, vocab: int, seq: int, batch: int, chunk: int, precision: str, repeats: int) -> dict:
    """In this (fresh) process: the pass's peak memory and its median time."""
    cfg = ModelConfig(name="output", vocab_size=vocab, n_layer=1, n_head=1, d_model=d_model, ffn_hidden=8,
                      max_seq_len=seq)
    model = Transformer(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    model.loss_chunk_tokens = chunk
    g = torch.Generator().manual_seed(1)
    h = torch.randn(batch, seq, d_model, generator=g).requires_grad_()
    targets = torch.randint(0, vocab, (batch, seq), generator=g)

    def run() -> None:
        model.zero_grad(set_to_none=True)
        h.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model.output_loss(h, targets)
        loss.backward()

    before = resident_bytes()
    if resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 > before + 64 * MiB:
        print("chunked_loss: warning: the setup's own peak may hide the pass's", file=sys.stderr)
    started = time.perf_counter()
    run()
    first_s = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    tokens = batch * seq
    left = 4 * (tokens * d_model + vocab * d_model + d_model)  # .grad of h, the head, the norm
    plan = logits_bytes(cfg, tokens, chunk, precision == "bf16") + left
    return {"chunk": chunk, "precision": precision, "tokens": tokens, "peak_bytes": int(peak - before),
            "plan_bytes": plan, "first_s": first_s, "median_s": sorted(times)[len(times) // 2] if times else first_s}


def run_row(args, chunk: int, precision: str) -> dict:
    cmd = [sys.executable, __file__, "--row", str(chunk), precision, "--d-model", str(args.d_model),
           "--vocab", str(args.vocab), "--seq", str(args.seq), "--batch", str(args.batch),
           "--repeats", str(args.repeats), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"chunked_loss: the row chunk {chunk}, {precision} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    tiny_llama = preset("tinyllama-1.1b").model
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-model", type=int, default=tiny_llama.d_model)
    ap.add_argument("--vocab", type=int, default=tiny_llama.vocab_size)
    ap.add_argument("--seq", type=int, default=tiny_llama.max_seq_len)
    ap.add_argument("--batch", type=int, default=2, help="sequences in the micro-batch")
    ap.add_argument("--chunks", type=int, nargs="+", default=[0, 512, 1024, 2048, 4096],
                    help="tokens a chunk; 0: the whole computation (the baseline)")
    ap.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    ap.add_argument("--repeats", type=int, default=3, help="timed passes after the first")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", type=Path, default=None, help="also write the rows to this JSON file")
    ap.add_argument("--row", nargs=2, metavar=("CHUNK", "PRECISION"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.row:
        row = one_row(args.d_model, args.vocab, args.seq, args.batch, int(args.row[0]), args.row[1], args.repeats)
        print(json.dumps(row))
        return

    print(f"machine: {describe_machine()}", flush=True)
    chunks = [0] + [c for c in args.chunks if c != 0]
    default = TrainConfig().loss_chunk_tokens
    print(f"output layer d_model {args.d_model}, vocab {args.vocab}, {args.batch} x {args.seq} tokens; "
          f"chunk 0 = whole; the default chunk is {default} tokens\n")
    print("| precision | chunk | peak MiB | plan MiB | forward+backward ms | memory whole / chunked "
          "| time chunked / whole |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    rows = []
    for precision in args.precisions:
        whole = None
        for chunk in chunks:
            row = run_row(args, chunk, precision)
            rows.append(row)
            whole = whole or row
            print(f"| {precision} | {chunk or 'whole'} | {row['peak_bytes'] / MiB:,.0f} "
                  f"| {row['plan_bytes'] / MiB:,.0f} | {row['median_s'] * 1e3:,.1f} "
                  f"| {whole['peak_bytes'] / max(row['peak_bytes'], 1):.2f}x "
                  f"| {row['median_s'] / whole['median_s']:.2f}x |", flush=True)
    print()
    for precision in args.precisions:
        whole = next(r for r in rows if r["precision"] == precision and r["chunk"] == 0)
        chosen = next((r for r in rows if r["precision"] == precision and r["chunk"] == default), None)
        if chosen and chosen is not whole:
            saved = whole["peak_bytes"] - chosen["peak_bytes"]
            print(f"{precision}: chunks of {default} tokens save {saved:,} bytes ({saved / MiB:,.0f} MiB) of the "
                  f"whole computation's peak, {whole['peak_bytes'] / max(chosen['peak_bytes'], 1):.2f}x less, "
                  f"in {chosen['median_s'] / whole['median_s']:.2f}x its time")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
