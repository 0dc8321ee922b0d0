"""The memory plan: the peak memory one rank of a training run will need, term by term, known
before anything heavy is allocated, against what the device has.

    plan = plan_memory(cfg.model, cfg.train, precision="fp32", device_kind="cpu")
    print(plan.line(available_bytes("cpu")))

The terms, per rank, in bytes:

    weights       fp32 parameters (scion keeps fp32 weights; bf16 is autocast), sharded by FSDP
    gradients     fp32, trainable parameters only (LoRA: the adapters); DDP adds its buckets
    optimizer     AdamW's two fp32 moments per trainable parameter, sharded by FSDP
                  (weights, gradients and moments: over all ranks; under HSDP over a shard group)
    activations   what the blocks keep for backward for one micro-batch (per token, counted as
                  benchmarks/saved_activations.py lists them, for scion's eager blocks), or only
                  each block's input with activation checkpointing, plus the block recomputed;
                  under bf16 autocast also the weights' bf16 copies, cached once per micro-batch
    logits/loss   `Transformer.output_loss`: with more tokens than train.loss_chunk_tokens, one
                  chunk's [chunk, vocab] logits at a time and the gradients of its input and of
                  the head's weight that it makes in the forward pass and keeps for backward;
                  else the whole [tokens, vocab] logits in fp32: the log-softmax it keeps, and
                  its gradient twice over while the backward pass runs
    allocator     on a CPU, what glibc's heap costs beyond the tensors: it keeps what a step
                  frees and fits the next step's tensors into it imperfectly, so a micro-batch's
                  activations and logits take CPU_HEAP times their bytes in resident memory;
                  with activation checkpointing, CPU_CKPT_HEAP times the blocks' inputs, one
                  recomputed block's tensors and FSDP's gathered weights, those of them the
                  heap serves (both as benchmarks/memory_plan.py measured them); nothing on a
                  GPU, whose peak is counted in tensor bytes (torch.cuda.max_memory_allocated)
    runtime       what is resident before the model exists: on a CPU the process itself (Python,
                  torch, the tokenizer; measured), on a GPU the CUDA context (a fixed reserve)

The peak is the larger of the backward pass of a micro-batch (weights, optimizer state, the
activations and logits, and the gradients accumulated so far: all of them from the second
micro-batch of a step on, only the output layer's at the start of the first) and the optimizer
step (weights, gradients and moments), as `benchmarks/memory_plan.py` measures it, plus the
allocator's slack, which the heap still holds at the optimizer step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from scion.config import SHARDED_LAYOUTS, ModelConfig, TrainConfig
from scion.errors import ScionError
from scion.train.world import hsdp_shape, shard_group_size

GiB = 2**30
CUDA_CONTEXT = 1 * GiB  # the CUDA context and allocator slack: outside torch's own accounting
# Resident bytes per byte of a micro-batch's tensors on a CPU: 1.2 to 1.5 measured on the tiny
# preset (fp32 and bf16, with and without activation checkpointing, FSDP), and the issue's
# tinyllama-1.1b bf16 micro-batch 1 run (23.85 GB = 22.2 GiB peak) is planned at 22.6 GiB with it.
CPU_HEAP = 1.35
# With activation checkpointing the tensors a micro-batch makes are freed and made again block
# by block, and the heap's slack is CPU_CKPT_HEAP times those of them it serves (`heap_bytes`):
# each block's input, one block recomputed, and under FSDP the weights it gathers. torch allocates
# tensors with posix_memalign, and glibc (before 2.38) does not reuse a freed chunk of a tensor's
# exact size for the next tensor of that size (the aligned request is a few bytes larger), so the
# churn lands on fresh heap. Fitted on 20 checkpointed rows (tiny, small and tinyllama-1.1b, fp32
# and bf16, 2,048 to 65,536 tokens a micro-batch; within 0.89-1.13 of the measured peak) and
# checked on 10 more (other shapes, FSDP, GPT-2; 0.86-1.07): docs/benchmarks.md.
CPU_CKPT_HEAP = 1.9
GLIBC_MMAP_MAX = 32 * 2**20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
MAX_MICRO_BATCH = 4096

# Well-known devices and the memory a training process can use on each (GiB as nvidia-smi
# reports the whole card; the CUDA context comes out of it as the runtime term).
DEVICES: dict[str, tuple[str, float]] = {
    "h200-141gb": ("cuda", 139.8),
    "h100-80gb": ("cuda", 79.2),
    "a100-80gb": ("cuda", 79.2),
    "a100-40gb": ("cuda", 39.4),
    "l40s-48gb": ("cuda", 44.4),
    "a10g-24gb": ("cuda", 22.0),
    "l4-24gb": ("cuda", 22.0),
    "rtx4090-24gb": ("cuda", 23.6),
    "rtx3090-24gb": ("cuda", 23.6),
    "v100-32gb": ("cuda", 31.7),
    "cpu-16gb": ("cpu", 16.0),
    "cpu-24gb": ("cpu", 24.0),
    "cpu-64gb": ("cpu", 64.0),
}


class OutOfMemory(ScionError):
    """A step ran out of memory: the run stopped with its last checkpoint intact."""

    exit_code = 1


@dataclass(frozen=True)
class Shapes:
    """The parameter counts the plan needs, from the model's config alone."""

    params: int  # all parameters (tied weights once)
    head_params: int  # the output layer's own (0 when tied to the embedding)
    embed_params: int  # lookups, never cast to bf16 by autocast
    block_tensors: tuple[int, ...]  # one block's parameters, each one's size
    root_tensors: tuple[int, ...]  # FSDP's root unit: embeddings, final norm and head

    @property
    def block_params(self) -> int:
        return sum(self.block_tensors)

    @property
    def root_params(self) -> int:
        return sum(self.root_tensors)

    @classmethod
    def of(cls, cfg: ModelConfig) -> Shapes:
        from scion.model import Transformer

        with torch.device("meta"):  # shapes without memory
            model = Transformer(cfg)
        block = tuple(p.numel() for p in model.blocks[0].parameters())
        in_blocks = {id(p) for p in model.blocks.parameters()}
        root = tuple(p.numel() for p in model.parameters() if id(p) not in in_blocks)
        embed = model.embed.weight.numel() + (model.pos_embed.weight.numel() if cfg.position == "learned" else 0)
        head = 0 if cfg.tie_embeddings else model.lm_head.weight.numel()
        return cls(model.num_params(), head, embed, block, root)


def block_tensors_per_token(cfg: ModelConfig, precision: str) -> list[float]:
    """Bytes per token of each tensor one block keeps for backward, eager, as a saved-tensor hook
    lists them: each norm's fp32 input and statistics (RMSNorm also its normalized input) and its
    output once in fp32, or one bf16 copy per projection that reads it under autocast; attention's
    q, k, v, output and log-sum-exp; the MLP's inner tensors (SwiGLU: gate, its SiLU, up and their
    product; GELU: up and its GELU)."""
    a = 2 if precision in ("bf16", "fp8") else 4  # fp8 runs all but its Linear products as bf16
    d, f = cfg.d_model, cfg.ffn_hidden
    heads = cfg.n_head * cfg.dim_per_head
    kv = cfg.kv_heads * cfg.dim_per_head
    swiglu = cfg.mlp == "swiglu"

    def norm(readers: int) -> list[float]:
        kept = [4 * d, 4 * d, 4] if cfg.norm == "rmsnorm" else [4 * d, 8]  # input (and x/rms), statistics
        return kept + ([2 * d] * readers if a == 2 else [4 * d])

    attention = norm(3) + [a * heads, a * kv, a * kv, a * heads, 4 * cfg.n_head]
    mlp = norm(2 if swiglu else 1) + [a * f] * (4 if swiglu else 2)
    return attention + mlp


def activation_bytes_per_token(cfg: ModelConfig, precision: str) -> float:
    """Bytes one block keeps for backward per token (`block_tensors_per_token`, summed)."""
    return sum(block_tensors_per_token(cfg, precision))


def heap_bytes(tensor_bytes: list[float], tokens: int) -> float:
    """What of these tensors, for `tokens` tokens, glibc serves from its heap: those under its
    mmap threshold, which rises with what is freed but never past GLIBC_MMAP_MAX. Larger ones are
    mapped on their own and returned whole when freed."""
    return sum(b * tokens for b in tensor_bytes if b * tokens < GLIBC_MMAP_MAX)


def logits_bytes(cfg: ModelConfig, tokens: int, chunk: int, bf16: bool) -> float:
    """The output layer's peak for a micro-batch of `tokens`, with the final norm's saved tensors
    (12 bytes per token and d_model, and 4). Whole (chunk 0, or no more tokens than a chunk):
    the fp32 log-softmax kept for backward and the gradients of the loss and of the logits beside
    it, 3 fp32 [vocab] rows per token. In chunks (`scion.model.linear_cross_entropy`): the
    gradients it keeps for backward, of its input (fp32, per token) and of the head's weight
    (fp32), and one chunk's working set: its fp32 logits and their log-softmax side by side
    (2 fp32 [vocab] rows per token of the chunk), and its part of the weight's gradient in the
    compute dtype."""
    d, vocab = cfg.d_model, cfg.vocab_size
    norm = tokens * (12 * d + 4)
    if not chunk or tokens <= chunk:
        return norm + tokens * 12 * vocab
    kept = tokens * 4 * d + 4 * vocab * d
    working = chunk * 8 * vocab + vocab * d * (2 if bf16 else 4)
    return norm + kept + working


@dataclass
class MemoryPlan:
    """Bytes per rank. `total` is the predicted peak."""

    weights: float
    gradients: float
    optimizer: float
    activations: float  # per micro-batch, bf16 weight copies included
    logits: float
    allocator: float
    runtime: float
    total: float
    micro_batch: int
    accum: int
    ranks: int
    parallel: str
    precision: str
    activation_checkpointing: bool
    trainable: int
    device_kind: str
    shard_group: int = 1  # ranks the weights, gradients and moments are split over (HSDP: fewer than `ranks`)

    TERMS = ("weights", "gradients", "optimizer", "activations", "logits", "allocator", "runtime")
    LABELS = {"weights": "weights", "gradients": "gradients", "optimizer": "optimizer state (AdamW)",
              "activations": "activations", "logits": "logits/loss", "allocator": "allocator (CPU heap)",
              "runtime": "runtime"}

    def largest(self) -> str:
        return max(self.TERMS, key=lambda t: getattr(self, t))

    def breakdown(self) -> str:
        parts = [f"{self.LABELS[t].split(' ')[0]} {getattr(self, t) / GiB:.2f}" for t in self.TERMS]
        return ", ".join(parts)

    def line(self, available: float | None) -> str:
        """One line: the total against what the device has, then the terms, in GiB."""
        room = f" of {available / GiB:.1f} GiB available" if available else ""
        return (f"memory plan: {self.total / GiB:.2f} GiB peak per rank{room} "
                f"(micro-batch {self.micro_batch}) = {self.breakdown()} GiB")


def plan_memory(
    model: ModelConfig,
    train: TrainConfig,
    *,
    precision: str,
    device_kind: str = "cpu",
    ranks: int = 1,
    micro_batch: int | None = None,
    trainable: int | None = None,
    runtime: float | None = None,
    shapes: Shapes | None = None,
) -> MemoryPlan:
    """The plan for `model` trained with `train` on `ranks` ranks. `trainable` is the number of
    parameters that train (LoRA: the adapters; default all); `runtime` the bytes resident before
    the model exists (default: this process's on a CPU, the CUDA context on a GPU)."""
    s = shapes or Shapes.of(model)
    m = micro_batch or train.micro_batch_size
    parallel = train.parallel if ranks > 1 or train.parallel in SHARDED_LAYOUTS else "none"
    shard = shard_group_size(parallel, ranks, train.hsdp_shard_size)  # HSDP: a shard group, not the world
    trainable = s.params if trainable is None else trainable
    bf16 = precision in ("bf16", "fp8")  # fp8: planned as bf16 (its float8 copies are smaller)
    tokens = m * train.sequence_length(model)

    weights = 4 * s.params / shard
    grads = 4 * trainable / shard
    if parallel == "ddp":
        grads *= 2  # DDP's buckets hold a second copy of the gradients
    optimizer = 8 * trainable / shard

    block_tensors = block_tensors_per_token(model, precision)
    per_block = sum(block_tensors)
    block_input = 4 * model.d_model  # per token: the fp32 residual stream a checkpointed block keeps
    if train.activation_checkpointing:  # each block's input, and one block recomputed
        acts = tokens * (model.n_layer * block_input + per_block)
    else:
        acts = tokens * model.n_layer * per_block
    if bf16 and not (device_kind == "cuda" and parallel in SHARDED_LAYOUTS):
        acts += 2 * (s.params - s.embed_params)  # autocast's bf16 copies of the matmul weights
    gathered: list[float] = []  # FSDP: the root and the blocks gathered whole (one ahead), one block's gradients
    if parallel in SHARDED_LAYOUTS:
        gathered = [(2 if bf16 and device_kind == "cuda" else 4) * n for n in s.root_tensors + 3 * s.block_tensors]
        acts += sum(gathered)
    logits = logits_bytes(model, tokens, train.loss_chunk_tokens, bf16)
    if device_kind != "cpu":
        allocator = 0.0
    elif train.activation_checkpointing:
        made = heap_bytes([block_input], tokens) * model.n_layer
        made += heap_bytes(block_tensors, tokens) + heap_bytes(gathered, 1)
        allocator = CPU_CKPT_HEAP * made
    else:
        allocator = (CPU_HEAP - 1) * (acts + logits)

    accum = max(1, (train.tokens_per_step or 0) // (tokens * ranks)) if train.tokens_per_step else 1
    # During a micro-batch's backward the gradients held are all of them once a step has
    # accumulated one micro-batch, only the output layer's at the start of the first.
    held = grads if accum > 1 else 4 * (s.head_params or s.embed_params) / shard
    if runtime is None:
        runtime = resident_bytes() if device_kind == "cpu" else CUDA_CONTEXT
    # The heap's slack outlives the backward pass: it is still resident at the optimizer step.
    total = runtime + weights + optimizer + max(grads, acts + logits + held) + allocator
    return MemoryPlan(weights, grads, optimizer, acts, logits, allocator, runtime, total, m, accum, ranks, parallel,
                      precision, train.activation_checkpointing, trainable, device_kind, shard)


def largest_micro_batch(model: ModelConfig, train: TrainConfig, available: float, **kw) -> int:
    """The largest micro-batch whose plan fits in `available` bytes (0: not even one), among
    those that divide the step's sequences per rank when train.tokens_per_step fixes them."""
    shapes = kw.pop("shapes", None) or Shapes.of(model)
    ranks = kw.get("ranks", 1)
    per_rank = (train.tokens_per_step // train.sequence_length(model) // ranks) if train.tokens_per_step else None
    best = 0
    for m in range(1, MAX_MICRO_BATCH + 1):
        if per_rank and per_rank % m:
            continue
        if per_rank and m > per_rank:
            break
        if plan_memory(model, train, micro_batch=m, shapes=shapes, **kw).total > available:
            break
        best = m
    return best


def fixes(model: ModelConfig, train: TrainConfig, available: float, *, lora_hint: bool = False, **kw) -> list[str]:
    """The flags that make a plan fit, each checked against the plan: a smaller micro-batch,
    activation checkpointing, bf16, a larger HSDP shard group, FSDP across enough ranks (of this
    device each), LoRA; when
    none does, the longest shorter context that fits."""
    shapes = kw.pop("shapes", None) or Shapes.of(model)
    found = []
    m = largest_micro_batch(model, train, available, shapes=shapes, **kw)
    if 0 < m < train.micro_batch_size:
        found.append(f"--micro-batch-size {m}")
    variants = []
    if not train.activation_checkpointing:
        variants.append(("--activation-checkpointing", replace(train, activation_checkpointing=True), {}))
    if kw.get("precision") != "bf16":
        variants.append(("--precision bf16", train, {"precision": "bf16"}))
    for flag, t, change in variants:
        m = largest_micro_batch(model, t, available, shapes=shapes, **{**kw, **change})
        if m:
            found.append(flag + (f" --micro-batch-size {m}" if m < train.micro_batch_size else ""))
    ranks = kw.get("ranks", 1)
    if train.parallel == "hsdp" and ranks > 1:  # HSDP: shard each replica over more of the ranks
        group = hsdp_shape(ranks, train.hsdp_shard_size)[1]
        for n in (d for d in range(group + 1, ranks + 1) if ranks % d == 0):
            if largest_micro_batch(model, replace(train, hsdp_shard_size=n), available, shapes=shapes, **kw):
                found.append(f"--hsdp-shard-size {n}")
                break
    # More ranks of the same GPU; a CPU's ranks would share the one host's memory.
    if kw.get("device_kind") == "cuda" and (ranks == 1 or train.parallel not in SHARDED_LAYOUTS):
        for n in (2, 4, 8, 16, 32, 64, 128, 256):
            t = replace(train, parallel="fsdp", tokens_per_step=None)
            m = largest_micro_batch(model, t, available, shapes=shapes, **{**kw, "ranks": n})
            if m:
                size = f" --micro-batch-size {m}" if m < train.micro_batch_size else ""
                found.append(f"--parallel fsdp on {n} GPUs{size} (torchrun --nproc-per-node {n})")
                break
    if lora_hint:
        found.append("--lora-rank 16 (LoRA: only the adapters keep gradients and optimizer state)")
    if not found:  # a long context (today's models ship 32K-128K) is often what does not fit
        seq = train.sequence_length(model)
        while seq > 128:
            seq //= 2
            t = replace(train, seq_len=seq, tokens_per_step=None)
            m = largest_micro_batch(model, t, available, shapes=shapes, **kw)
            if m:
                size = f" --micro-batch-size {m}" if m < train.micro_batch_size else ""
                found.append(f"--seq-len {seq}{size}")
                break
    return found


def refusal(plan: MemoryPlan, available: float, where: str, found: list[str]) -> str:
    """The one line that stops a run whose plan does not fit."""
    big = plan.largest()
    how = "; fits with " + " or ".join(found) if found else "; no setting of scion's fits it on this device"
    return (f"the memory plan needs {plan.total / GiB:.1f} GiB per rank but {where} has "
            f"{available / GiB:.1f} GiB; the largest term is {plan.LABELS[big]} "
            f"({getattr(plan, big) / GiB:.1f} GiB){how}; --force-memory runs it anyway")


# ---- what the device has ---------------------------------------------------------------------


def resident_bytes() -> float:
    """This process's resident memory now (Linux; 0 elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0.0
    return float(pages * os.sysconf("SC_PAGE_SIZE"))


def host_available_bytes() -> float | None:
    """MemAvailable from /proc/meminfo, or less where a cgroup (a container, a batch job) limits
    this process to less (None where neither is known)."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = float(line.split()[1]) * 1024
    except OSError:
        pass
    for limit, usage in (("memory.max", "memory.current"),  # cgroup v2, then v1
                         ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        try:
            raw = Path("/sys/fs/cgroup", limit).read_text().strip()
            used = float(Path("/sys/fs/cgroup", usage).read_text())
        except (OSError, ValueError):
            continue
        if raw.isdigit() and int(raw) < 2**60:  # "max" or a huge number: no limit
            room = float(raw) - used + _reclaimable(Path("/sys/fs/cgroup", limit).parent)
            available = room if available is None else min(available, room)
        break
    return available


def _reclaimable(folder: Path) -> float:
    """The page cache a cgroup's usage counts but the kernel gives back under pressure."""
    try:
        for line in (folder / "memory.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key in ("inactive_file", "total_inactive_file"):
                return float(value)
    except (OSError, ValueError):
        pass
    return 0.0


def available_bytes(device: torch.device | str) -> float | None:
    """What one rank of this machine can grow to: on a GPU its free memory; on a CPU the host's
    available memory plus what this process already holds, shared among the local ranks."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # What this process's allocator holds already, and the context, are terms of the plan.
        return float(free) + torch.cuda.memory_reserved(device) + CUDA_CONTEXT
    if device.type != "cpu":
        return None
    host = host_available_bytes()
    if host is None:
        return None
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return host / local + resident_bytes()


def named_device(name: str) -> tuple[str, float]:
    """(device kind, bytes) of a device in DEVICES."""
    if name not in DEVICES:
        raise ScionError(f"unknown device {name!r}; choose from: {', '.join(DEVICES)}")
    kind, gib = DEVICES[name]
    return kind, gib * GiB
