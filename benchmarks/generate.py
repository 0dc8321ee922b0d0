"""KV-cache decoding: scion's `generate` against transformers' `generate`, same weights.

    python benchmarks/generate.py                       # the `small` preset, batch 1 and 8, greedy, fp32
    python benchmarks/generate.py --batches 1 --new 128

Both decode greedily in fp32 from the same random prompt with the same weights (copied into
transformers' LlamaForCausalLM), and the benchmark checks that they produce the same tokens.
scion runs eagerly and with its compiled decoding step (`CompiledDecoder`, what
`scion generate --compile` uses; compiled during the warm-up, not timed).
Reported: new tokens per second (batch x new tokens / wall time, prompt processing included),
the median of runs that alternate between the libraries and modes.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import hf_llama

from scion.config import preset
from scion.generate import CompiledDecoder, generate
from scion.model import Transformer
from scion.train.device import describe_machine


def interleaved(fns, repeats: int):
    """Run each function once in turn, `repeats` times over (a load change on a shared machine
    hits all alike); the last outputs and the median seconds of each."""
    outs, times = [None] * len(fns), [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            outs[i] = fn()
            times[i].append(time.perf_counter() - t0)
    return outs, [statistics.median(t) for t in times]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt", type=int, default=16, help="prompt length in tokens")
    ap.add_argument("--new", type=int, default=128, help="new tokens per sequence")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per setting (median reported)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-compile", action="store_true", help="leave out the compiled decoder")
    args = ap.parse_args()
    print(f"machine: {describe_machine()}", flush=True)

    torch.set_num_threads(args.threads)
    cfg = preset(args.preset).model
    model = Transformer(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    model.eval()
    hf = hf_llama(cfg, model).eval()
    print(
        f"torch {torch.__version__}, {args.threads} threads, preset {args.preset}, prompt {args.prompt}, "
        f"{args.new} new tokens, greedy, fp32",
        flush=True,
    )
    rows = []
    for batch in args.batches:
        gen = torch.Generator().manual_seed(batch)
        prompt = torch.randint(0, cfg.vocab_size, (batch, args.prompt), generator=gen)

        def run_hf(prompt=prompt):
            with torch.inference_mode():
                return hf.generate(
                    prompt,
                    attention_mask=torch.ones_like(prompt),
                    max_new_tokens=args.new,
                    min_new_tokens=args.new,
                    do_sample=False,
                    pad_token_id=0,
                    eos_token_id=None,
                )

        fns = [run_hf, lambda prompt=prompt: generate(model, prompt, args.new, temperature=0.0)]
        if not args.no_compile:
            decoder = CompiledDecoder(model, batch)
            fns.append(lambda prompt=prompt, decoder=decoder: generate(
                model, prompt, args.new, temperature=0.0, decoder=decoder))
        t0 = time.perf_counter()
        for fn in fns:  # warm-up, and compilation
            fn()
        print(f"  batch {batch}: warm-up (compilation included) {time.perf_counter() - t0:.0f} s", flush=True)
        outs, seconds = interleaved(fns, args.repeats)
        rate = [batch * args.new / s for s in seconds]
        r = dict(batch=batch, hf=rate[0], eager=rate[1], compiled=rate[2] if len(rate) > 2 else None,
                 same=all(torch.equal(outs[0], o) for o in outs[1:]))
        rows.append(r)
        print(f"  batch {batch}: " + ", ".join(f"{x:,.0f}" for x in rate) + f" tok/s, same tokens: {r['same']}",
              flush=True)
    print("\n| batch | transformers tok/s | scion eager tok/s | scion compiled tok/s | best ratio | same tokens |")
    print("|---:|---:|---:|---:|---:|:---:|")
    for r in rows:
        best = max(r["eager"], r["compiled"] or 0)
        compiled = f"{r['compiled']:,.0f}" if r["compiled"] else "-"
        print(
            f"| {r['batch']} | {r['hf']:,.0f} | {r['eager']:,.0f} | {compiled} | {best / r['hf']:.2f}x | "
            f"{'yes' if r['same'] else 'NO'} |"
        )


if __name__ == "__main__":
    main()
