"""What one compiled block keeps for its backward pass, per token: the activation memory that
decides which micro-batch fits on a GPU.

    python benchmarks/saved_activations.py                      # tinyllama-1.1b's block
    python benchmarks/saved_activations.py --preset small --seq 160

One block of the preset (its real width, heads and MLP), compiled as `scion pretrain --compile`
compiles it, runs forward under bf16 autocast on CPU while a saved-tensor hook records every
tensor autograd keeps; the table lists them, once each, with bytes per token. Run twice: with
the fp32 residual stream that autocast gives (the embedding's fp32 output starts it) and with a
bf16 one, as training with bf16 parameters has it (`gpu_check.py`'s ladder, `bf16_residual`).
Tensors without a token dimension are the weights' bf16 copies, counted apart: they are kept once
per micro-batch, whatever its size. The partitioner that picks what to keep is the one CUDA uses,
so the result holds for a GPU, up to the attention kernel's own buffers.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import torch  # noqa: E402
from common import build  # noqa: E402  (beside this file)

from scion.config import preset  # noqa: E402
from scion.train.compile import compile_blocks  # noqa: E402
from scion.train.device import describe_machine  # noqa: E402


def saved_by_block(cfg, seq: int, residual: torch.dtype) -> tuple[list[tuple[tuple, torch.dtype, int]], int]:
    """(shape, dtype, bytes) of each distinct activation one compiled block saves for a sequence
    of `seq` tokens, and the bytes of the saved tensors that have no token dimension."""
    torch._dynamo.reset()
    model = compile_blocks(build(replace(cfg, n_layer=1, max_seq_len=seq), "cpu"))
    block = model.blocks[0]
    x = torch.randn(1, seq, cfg.d_model, dtype=residual, requires_grad=True)
    rope = (model.rope_cos[:seq].to(residual), model.rope_sin[:seq].to(residual))
    weights = {p.data_ptr() for p in model.parameters()}
    kept: dict[int, torch.Tensor] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in weights:
            kept[t.data_ptr()] = t
        return t

    with torch.autocast("cpu", dtype=torch.bfloat16):
        block(x, rope)  # compiles
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            block(x, rope)
    per_token = [(tuple(t.shape), t.dtype, t.numel() * t.element_size()) for t in kept.values() if seq in t.shape]
    other = sum(t.numel() * t.element_size() for t in kept.values() if seq not in t.shape)
    return per_token, other


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tinyllama-1.1b")
    ap.add_argument("--seq", type=int, default=320,
                    help="tokens in the probe (the result is per token); must differ from the model's widths")
    args = ap.parse_args()
    print(f"machine: {describe_machine()}", flush=True)
    torch.set_num_threads(2)
    cfg = preset(args.preset).model
    widths = {cfg.d_model, cfg.ffn_hidden, cfg.n_head, cfg.kv_heads, cfg.dim_per_head, cfg.kv_heads * cfg.dim_per_head}
    if args.seq in widths:  # a tensor's token dimension is told apart by its size
        sys.exit(f"saved_activations: --seq {args.seq} equals one of the model's widths; pick another length")
    for residual in (torch.float32, torch.bfloat16):
        per_token, other = saved_by_block(cfg, args.seq, residual)
        total = sum(nbytes for *_, nbytes in per_token) / args.seq / 1024
        print(f"\n{args.preset} block, {str(residual).removeprefix('torch.')} residual stream: "
              f"{total:.1f} KiB per token, and {other / 2**20:.0f} MiB of bf16 weight copies")
        print("| shape | dtype | KiB per token |\n|---|---|---:|")
        for shape, dtype, nbytes in per_token:
            print(f"| {list(shape)} | {str(dtype).removeprefix('torch.')} | {nbytes / args.seq / 1024:.2f} |")


if __name__ == "__main__":
    main()
