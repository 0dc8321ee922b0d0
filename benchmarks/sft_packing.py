"""Packing against padding for SFT, and the packed attention mask on the device at hand.

    python benchmarks/sft_packing.py                # GPU if there is one (bf16), else CPU (fp32)
    python benchmarks/sft_packing.py --small        # a CPU-sized model

Prints, for the same conversations (lengths drawn like chat data: many short, a few long), the
real (non-padding) tokens trained per second with `--layout pack` and `--layout pad`, their ratio,
and checks on the device that packed conversations do not see each other and that LoRA merged
weights give the adapted logits."""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from scion.config import ModelConfig
from scion.model import Transformer
from scion.sft.batches import Example, SFTBatches, attention_mask, collate, sft_loss
from scion.sft.lora import apply_lora, merged_model
from scion.train.device import autocast, describe_machine


def conversations(n: int, vocab: int, max_len: int, seed: int = 0) -> list[Example]:
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(mean=4.6, sigma=0.8, size=n).astype(int), 16, max_len)
    out = []
    for n_tok in lengths:
        ids = rng.integers(0, vocab, size=n_tok + 1).tolist()
        targets = [-100] * (n_tok // 2) + ids[1 + n_tok // 2 :]
        out.append(Example(ids[:-1], targets))
    return out


def throughput(model, batches: SFTBatches, steps: int, micro: int, device, precision) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    real = 0
    for step in range(steps + 2):
        rows = [batches._row(g) for g in range(step * micro, (step + 1) * micro)]
        batch = {k: v.to(device) for k, v in collate(rows, batches.pad_id, batches.packed).items()}
        if step == 2:  # after two warm-up steps
            if device.type == "cuda":
                torch.cuda.synchronize()
            start, real = time.perf_counter(), 0
        real += sum(len(ex) for row in rows for ex in row)
        with autocast(device, precision):
            loss = sft_loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return real / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--small", action="store_true")
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    print(f"machine: {describe_machine()}", flush=True)
    cuda = torch.cuda.is_available() and not args.small
    device = torch.device("cuda" if cuda else "cpu")
    precision = "bf16" if cuda else "fp32"
    if args.small:
        cfg = ModelConfig(
            vocab_size=512, n_layer=2, n_head=4, n_kv_head=2, d_model=64, ffn_hidden=128, max_seq_len=256
        )
        micro, n_conv = 4, 400
    else:
        cfg = ModelConfig(
            vocab_size=32000,
            n_layer=12,
            n_head=12,
            n_kv_head=4,
            d_model=768,
            ffn_hidden=2048,
            max_seq_len=1024,
        )
        micro, n_conv = 8, 4000
    torch.manual_seed(0)
    examples = conversations(n_conv, cfg.vocab_size, cfg.max_seq_len)

    # Isolation on this device: each packed conversation's logits equal its logits alone.
    model = Transformer(cfg).to(device)
    model.init_weights(torch.Generator().manual_seed(0))
    model.eval()
    a, b, c = sorted(examples[:50], key=len)[:3]  # three that fit one row
    batch = {k: v.to(device) for k, v in collate([[a, b, c]], 0, True).items()}
    with torch.no_grad(), autocast(device, precision):
        together = model(
            batch["inputs"], doc_mask=attention_mask(batch["doc_ids"]), positions=batch["positions"]
        )
        worst = 0.0
        at = 0
        for ex in (a, b, c):
            alone = model(torch.tensor([ex.inputs], device=device))
            worst = max(worst, (together[0, at : at + len(ex)].float() - alone[0].float()).abs().max().item())
            at += len(ex)
    print(f"device {device} {precision}: packed vs alone, max |logit difference| {worst:.2e}")

    lora = Transformer(cfg).to(device)
    lora.init_weights(torch.Generator().manual_seed(0))
    apply_lora(lora, 8, 16, ["q_proj", "v_proj"])
    with torch.no_grad():
        for n, prm in lora.named_parameters():
            if "lora_B" in n:
                prm.normal_(0, 0.02)
        x = torch.tensor([a.inputs], device=device)
        diff = (lora(x) - merged_model(lora)(x)).abs().max().item()
    print(f"LoRA adapted vs merged (fp32), max |logit difference| {diff:.2e}")

    model.train()
    results = {}
    for layout in ("pack", "pad"):
        batches = SFTBatches(examples, cfg.max_seq_len, seed=0, pad_id=0, packed=layout == "pack")
        results[layout] = throughput(model, batches, args.steps, micro, device, precision)
        print(
            f"{layout}: {results[layout]:,.0f} conversation tokens/s ({len(batches)} rows"
            + (f", {batches.fill():.0%} full)" if layout == "pack" else ")")
        )
    print(f"packing speed-up over padding: {results['pack'] / results['pad']:.2f}x")


if __name__ == "__main__":
    main()
