"""scion against litgpt's GPT and transformers' LlamaForCausalLM on one GPU, and scion's ladder of
switches: the training step of each, timed alone (benchmarks/gpu_check.py runs these parts).

Every library trains its own model of one configuration (the `tinyllama-1.1b` shape at sequence
2048 on the GPU), compiled as its users compile it (scion: each block and the output layer, as
`scion pretrain --compile` does; litgpt and transformers: `torch.compile(model)`), in bf16
autocast over fp32 weights, with one step for all: forward and loss, backward, gradient clipping
at 1.0, fused AdamW (lr 4e-4, betas 0.9 and 0.95, weight decay 0.1 on every parameter), on random
tokens. The loss is each library's own: scion's model returns it (its output layer and
cross-entropy as `train.loss_chunk_tokens` sets them), litgpt's `chunked_cross_entropy` on GPT's
logits, and transformers' on upcast logits, as `LlamaForCausalLM` computes it.

Each runs at the largest micro-batch that fits, found by a short search: two eager probe steps
(micro-batches 1 and 2, after one that allocates AdamW's moments) give the memory that stays and
the memory a sequence adds; the largest candidate that line puts under 90% of the GPU's memory is
compiled and timed (halved on out-of-memory); then, while the part's time allows, a larger
candidate where the compiled run's own peak says it fits, keeping the faster. torch.compile's
caches are reset before every run, so no run inherits another's graphs or dynamic shapes.

One FLOP count serves every row: `scion.model.flops_per_token` (6 per matmul parameter, the
embedding table not counted, plus attention: PaLM's appendix B), 7.31 GFLOP per token for
tinyllama-1.1b at 2048; MFU is against the GPU's bf16 datasheet peak, fp8 rows included.
"""

from __future__ import annotations

import gc
import importlib.util
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from common import hf_llama  # (beside this file; puts the repository on the path)
from torch import nn

from scion.config import ModelConfig, TrainConfig
from scion.model import Transformer, flops_per_token
from scion.train.device import autocast, peak_flops
from scion.train.parallel import parallelize
from scion.train.world import World

CANDIDATES = (1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64)
MEMORY_SHARE = 0.9  # of the GPU's memory a predicted peak may take: the allocator's slack beyond
LR, BETAS, WEIGHT_DECAY, CLIP = 4e-4, (0.9, 0.95), 0.1, 1.0  # TinyLlama's AdamW, for every library
WHEELS = "build/device-wheels (benchmarks/gpu_check.sh --fetch-wheels)"


@dataclass
class Library:
    """How one library builds, prepares and runs its model. `prepare(model, compile)` returns the
    module forward runs through; `loss(run, x, y)` the mean cross-entropy."""

    name: str
    build: Callable[[], nn.Module]
    prepare: Callable[[nn.Module, bool], nn.Module]
    loss: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
    precision: str = "bf16"
    settings: dict = field(default_factory=dict)


def missing(module: str) -> str | None:
    """Why a peer library cannot run here, or None."""
    if importlib.util.find_spec(module) is None:
        return f"{module} is not installed (pip install {module}; on the lent GPU: the wheel in {WHEELS})"
    return None


def scion_library(cfg: ModelConfig, device: torch.device, *, precision: str = "bf16", bf16_residual: bool = False,
                  loss_chunk_tokens: int | None = None, activation_checkpointing: bool = False) -> Library:
    """scion's model through `parallelize`, as `scion pretrain` prepares it (fp8: its Linear layers
    converted there); `loss_chunk_tokens` None keeps the default of train.loss_chunk_tokens."""

    def make() -> nn.Module:
        with torch.device(device):  # initialised where it trains: a 1.1B model's init on a CPU takes seconds
            model = Transformer(cfg)
            model.init_weights(torch.Generator(device).manual_seed(0))
        if bf16_residual:
            residual_in_autocast_dtype(model)
        if loss_chunk_tokens is not None:
            model.loss_chunk_tokens = loss_chunk_tokens
        return model

    def prepare(model: nn.Module, compile: bool) -> nn.Module:
        return parallelize(model, "none", device, World.from_env(), compile=compile,
                           activation_checkpointing=activation_checkpointing, precision=precision)

    settings = {"precision": precision, "residual_stream": "bf16" if bf16_residual else "fp32",
                "loss_chunk_tokens": (loss_chunk_tokens if loss_chunk_tokens is not None
                                      else getattr(TrainConfig, "loss_chunk_tokens", None)),
                "activation_checkpointing": activation_checkpointing}
    return Library("scion", make, prepare, lambda run, x, y: run(x, y), precision, settings)


def residual_in_autocast_dtype(model: nn.Module) -> None:
    """Under autocast, cast the embedding's output to the autocast dtype, so that the residual
    stream between blocks (and what they save for backward) is bf16 rather than fp32: what
    training with bf16 parameters gives (FSDP's bf16 `param_dtype`, as TinyLlama and torchtitan
    train), measured here on the plain model as an experiment."""

    def cast(module, args, output):
        kind = output.device.type
        return output.to(torch.get_autocast_dtype(kind)) if torch.is_autocast_enabled(kind) else output

    model.embed.register_forward_hook(cast)


def litgpt_library(cfg: ModelConfig, device: torch.device) -> Library:
    """litgpt's GPT with scion's configuration (LLaMA layout: RMSNorm, SwiGLU, GQA, RoPE, untied)."""
    from litgpt import GPT, Config
    from litgpt.utils import chunked_cross_entropy

    config = Config(name=cfg.name, block_size=cfg.max_seq_len, vocab_size=cfg.vocab_size,
                    padded_vocab_size=cfg.vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                    n_embd=cfg.d_model, n_query_groups=cfg.kv_heads, head_size=cfg.dim_per_head,
                    rotary_percentage=1.0, parallel_residual=False, bias=False, norm_class_name="RMSNorm",
                    norm_eps=cfg.norm_eps, mlp_class_name="LLaMAMLP", intermediate_size=cfg.ffn_hidden,
                    rope_base=int(cfg.rope_theta))

    def make() -> nn.Module:
        with torch.device(device):  # as litgpt's fabric.init_module builds it: RoPE tables there too
            return GPT(config)

    return Library("litgpt", make, lambda model, compile: torch.compile(model) if compile else model,
                   lambda run, x, y: chunked_cross_entropy(run(x), y, chunk_size=0))


def transformers_library(cfg: ModelConfig, device: torch.device) -> Library:
    """transformers' LlamaForCausalLM with SDPA attention and scion's configuration."""

    def make() -> nn.Module:
        with torch.device(device):
            model = hf_llama(cfg)
        model.config.use_cache = False  # training: no KV cache objects
        return model

    def loss(run, x, y):  # as LlamaForCausalLM's own loss: the logits upcast, then cross-entropy
        logits = run(input_ids=x).logits
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())

    return Library("transformers", make, lambda model, compile: torch.compile(model) if compile else model, loss)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Trainer:
    """One library's model, prepared, with AdamW; two batches of random tokens on the device for
    each micro-batch size it steps at."""

    def __init__(self, lib: Library, seq: int, vocab: int, device: torch.device, compile: bool):
        self.lib, self.device, self.seq, self.vocab = lib, device, seq, vocab
        self.model = lib.build()
        self.run = lib.prepare(self.model, compile)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY,
                                     fused=device.type == "cuda")
        self.batches: dict[int, list[torch.Tensor]] = {}
        self.steps = 0

    def step(self, micro: int) -> torch.Tensor:
        if micro not in self.batches:
            g = torch.Generator().manual_seed(micro)
            self.batches[micro] = [torch.randint(0, self.vocab, (micro, self.seq + 1), generator=g).to(self.device)
                                   for _ in range(2)]
        data = self.batches[micro][self.steps % 2]
        self.steps += 1
        with autocast(self.device, self.lib.precision):
            loss = self.lib.loss(self.run, data[:, :-1], data[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, CLIP)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()


def device_memory(device: torch.device) -> float | None:
    return float(torch.cuda.get_device_properties(device).total_memory) if device.type == "cuda" else None


def peak_bytes(device: torch.device) -> float | None:
    return float(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def probe(lib: Library, seq: int, vocab: int, device: torch.device) -> dict:
    """Eager steps at micro-batches 1 and 2 (after one that allocates AdamW's moments): the bytes
    that stay whatever the micro-batch (`fixed`) and those one sequence adds (`per_sequence`).
    Without device memory to read (a CPU), only the steps run."""
    free(device)
    trainer = Trainer(lib, seq, vocab, device, compile=False)
    trainer.step(1)
    peaks = {}
    for micro in (1, 2):
        synchronize(device)
        reset_peak(device)
        trainer.step(micro)
        synchronize(device)
        peaks[micro] = peak_bytes(device)
    del trainer
    free(device)
    if peaks[1] is None:
        return {}
    per_sequence = max(peaks[2] - peaks[1], 1.0)
    return {"fixed": peaks[1] - per_sequence, "per_sequence": per_sequence}


def largest_fitting(fixed: float, per_sequence: float, total: float, candidates=CANDIDATES,
                    share: float = MEMORY_SHARE) -> int:
    """The largest candidate micro-batch whose predicted peak stays under `share` of `total`
    bytes; 0 when not even the smallest does."""
    return max((m for m in candidates if fixed + m * per_sequence <= share * total), default=0)


def measure(lib: Library, micro: int, seq: int, vocab: int, device: torch.device, *, compile: bool,
            warmup: int, steps: int) -> dict:
    """Time `steps` steps after `warmup` (compilation happens there) at `micro` sequences; peak
    memory over both. Raises torch.OutOfMemoryError when it does not fit."""
    torch._dynamo.reset()  # no graphs, guards or dynamic shapes carried over from another run
    free(device)
    reset_peak(device)
    trainer = None
    try:
        trainer = Trainer(lib, seq, vocab, device, compile)
        started = time.perf_counter()
        first = trainer.step(micro)
        for _ in range(warmup - 1):
            trainer.step(micro)
        synchronize(device)
        warm = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(steps):
            last = trainer.step(micro)
        synchronize(device)
        wall = time.perf_counter() - started
        result = {
            "micro_batch": micro, "seq_len": seq, "compiled": compile, "warmup_s": round(warm, 1),
            "step_ms": round(1e3 * wall / steps, 1), "tokens_per_s": round(micro * seq * steps / wall),
            "loss_first_last": [round(first.item(), 4), round(last.item(), 4)],
            "params": sum(p.numel() for p in trainer.model.parameters()),
        }
        peak = peak_bytes(device)
        if peak is not None:
            result["max_memory_GiB"] = round(peak / 2**30, 1)
        return result
    finally:
        del trainer
        free(device)


def with_mfu(result: dict, cfg: ModelConfig, device: torch.device) -> dict:
    peak = peak_flops(device, "bf16")
    if peak:
        result["mfu"] = round(result["tokens_per_s"] * flops_per_token(cfg, result["seq_len"]) / peak[0], 4)
    return result


def best_micro_batch(lib: Library, cfg: ModelConfig, seq: int, device: torch.device, *, compile: bool,
                     warmup: int, steps: int, default_micro: int, time_left: Callable[[], float]) -> dict:
    """`lib` timed at the largest micro-batch that fits (see the module's docstring), with the
    search's readings; a CPU (no memory to read) takes `default_micro`."""
    started = time.perf_counter()
    found = probe(lib, seq, cfg.vocab_size, device)
    total = device_memory(device)
    search: dict = {"probe_s": round(time.perf_counter() - started, 1)}
    if found and total:
        micro = largest_fitting(found["fixed"], found["per_sequence"], total)
        search.update(fixed_GiB=round(found["fixed"] / 2**30, 2),
                      eager_GiB_per_sequence=round(found["per_sequence"] / 2**30, 3), predicted=micro)
        if micro == 0:
            return {"status": "FAILED", "reason": "micro-batch 1 is predicted not to fit", "search": search}
    else:
        micro = default_micro
        search["predicted"] = f"not searched: no device memory to read on {device.type}"
    result, tried, too_large = None, [], float("inf")
    while micro >= 1 and result is None:
        try:
            run_started = time.perf_counter()
            result = measure(lib, micro, seq, cfg.vocab_size, device, compile=compile, warmup=warmup, steps=steps)
            spent = time.perf_counter() - run_started
            result["run_s"] = round(spent, 1)
        except torch.OutOfMemoryError:
            tried.append(f"{micro}: out of memory")
            too_large = micro
            micro = max((m for m in CANDIDATES if m <= micro // 2), default=0)
    if result is None:
        return {"status": "FAILED", "reason": "out of memory even at micro-batch 1", "search": search}
    tried.append(f"{result['micro_batch']}: {result['tokens_per_s']} tokens/s")
    # A compiled run keeps less for backward than the eager probe: its own peak may admit more.
    if found and total and "max_memory_GiB" in result:
        per = (result["max_memory_GiB"] * 2**30 - found["fixed"]) / result["micro_batch"]
        larger = largest_fitting(found["fixed"], per, total, [m for m in CANDIDATES if m < too_large])
        if larger > result["micro_batch"]:
            if time_left() < 1.5 * spent:  # the first run's time, with room to spare
                tried.append(f"{larger}: predicted to fit, not tried (the part's time is spent)")
            else:
                try:
                    other = measure(lib, larger, seq, cfg.vocab_size, device, compile=compile, warmup=warmup,
                                    steps=steps)
                    tried.append(f"{larger}: {other['tokens_per_s']} tokens/s")
                    if other["tokens_per_s"] > result["tokens_per_s"]:
                        result = other
                except torch.OutOfMemoryError:
                    tried.append(f"{larger}: out of memory")
    search["tried"] = tried
    return {"status": "ok", "library": lib.name, **lib.settings, **with_mfu(result, cfg, device), "search": search}
