"""Configuration: plain dataclasses for the model, the data and the training run, named presets,
and YAML round-tripping. Nothing here knows about torch modules or files beyond YAML."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from scion.errors import ScionError


@dataclass
class ModelConfig:
    """A decoder-only transformer. Defaults describe the LLaMA family; the GPT-2 variants of the
    Inheritune paper are the same module with `norm="layernorm"`, `mlp="gelu"`,
    `position="learned"`, tied embeddings and `attn_scale_inverse_layer=True`."""

    name: str = "custom"
    vocab_size: int = 4096
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None  # None: as many as n_head (multi-head attention)
    d_model: int = 256
    head_dim: int | None = None  # None: d_model // n_head
    ffn_hidden: int = 688
    max_seq_len: int = 256
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norm_eps: float = 1e-5
    mlp: Literal["swiglu", "gelu"] = "swiglu"
    position: Literal["rope", "learned"] = "rope"
    rope_theta: float = 10000.0
    # RoPE frequency scaling for long contexts, as transformers defines it: linear (positions / factor),
    # dynamic (NTK: the base grows past rope_original_max_seq_len), llama3 (Llama 3.1+: long wavelengths
    # divided by the factor, short ones kept, a smooth band between)
    rope_scaling: Literal["none", "linear", "dynamic", "llama3"] = "none"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0  # llama3
    rope_high_freq_factor: float = 4.0  # llama3
    rope_original_max_seq_len: int = 0  # llama3 and dynamic: the context before scaling (0: max_seq_len)
    tie_embeddings: bool = False
    bias: bool = False  # biases on linear layers and LayerNorm (the original GPT-2 has them)
    qkv_bias: bool = False  # biases on the q, k and v projections only (Qwen2)
    qk_norm: bool = False  # RMSNorm over each head of the queries and keys, before RoPE (Qwen3)
    sliding_window: int | None = None  # each token attends to itself and the window - 1 before it (Mistral)
    attn_scale_inverse_layer: bool = False  # GPT-2/Inheritune: logits also scaled by 1/(layer_idx+1)
    init_std: float = 0.02
    # the Hugging Face architecture the model came from or is meant for (e.g. Qwen3ForCausalLM):
    # `scion export` writes that family when the model fits it; None: the first family that fits
    hf_architecture: str | None = None

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.n_head

    def validate(self) -> None:
        positive = ["vocab_size", "n_layer", "n_head", "d_model", "ffn_hidden", "max_seq_len"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ScionError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.n_head % self.kv_heads:
            raise ScionError(
                f"model.n_head ({self.n_head}) must be a multiple of model.n_kv_head ({self.kv_heads})"
            )
        if self.head_dim is None and self.d_model % self.n_head:
            raise ScionError(f"model.d_model ({self.d_model}) must be divisible by model.n_head ({self.n_head})")
        if self.position == "rope" and self.dim_per_head % 2:
            raise ScionError(f"RoPE needs an even head dimension, got {self.dim_per_head}")
        if self.rope_scaling != "none" and self.rope_factor <= 0:
            raise ScionError(f"model.rope_factor must be positive with rope_scaling {self.rope_scaling}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ScionError(f"model.sliding_window must be positive (or none), got {self.sliding_window}")


@dataclass
class DataConfig:
    """Where tokens come from. `path` is raw text (files, folders, globs; .txt, .jsonl, .parquet)
    or a folder of prepared shards (one with a manifest.json), or a Hugging Face data set
    (hf:NAME[:CONFIG], streamed). Empty: the bundled corpus."""

    path: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)  # mixing weights, one per path (default equal)
    tokenizer: str | None = None  # tokenizer.json, an HF tokenizer folder or "gpt2"; None: train one
    text_field: str = "text"  # the field holding the text in JSONL and Parquet records
    split: str = "train"  # the split of an hf:NAME[:CONFIG] data set
    val_fraction: float = 0.01  # share of documents held out for validation
    bad_files: Literal["skip", "error"] = "skip"  # non-UTF-8 or binary inputs: skip with a count, or stop


# The layouts whose parameters are sharded DTensors (built on the meta device, saved with DCP):
# FSDP across all ranks, HSDP within each shard group.
SHARDED_LAYOUTS = ("fsdp", "hsdp")


@dataclass
class TrainConfig:
    seed: int = 1337
    max_steps: int = 300  # optimizer steps; also the length of the LR schedule
    seq_len: int | None = None  # None: the model's max_seq_len
    micro_batch_size: int = 8  # sequences per forward/backward on one device
    tokens_per_step: int | None = None  # global batch in tokens; None: one micro-batch per device
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    # auto: bf16 where the device has fast bf16; fp8: the Linear layers in float8 through torchao
    # (GPUs of compute capability 8.9+), the rest as in bf16 (scion/train/float8.py)
    precision: Literal["auto", "fp32", "bf16", "fp8"] = "auto"
    tf32: bool = True  # on GPUs from Ampere on, fp32 matrix products run on TF32 tensor cores; false: IEEE fp32
    compile: bool = False
    device: str = "auto"  # auto, cpu, cuda, cuda:1, mps
    parallel: Literal["none", "ddp", "fsdp", "hsdp"] = "none"
    # With --parallel hsdp: the ranks each replica is sharded over; 0: one node's (LOCAL_WORLD_SIZE)
    hsdp_shard_size: int = 0
    activation_checkpointing: bool = False
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 20
    sample_every: int = 100
    sample_prompts: list[str] = field(default_factory=lambda: ["ROMEO.", "To be, or not to be"])
    sample_tokens: int = 48
    checkpoint_every: int = 100
    keep_last: int = 2  # regular checkpoints kept; milestones are never deleted
    milestone_every: int = 0  # steps between permanent milestone checkpoints; 0: none
    tensorboard: bool = False
    # With --parallel fsdp: also write the weights whole (model.safetensors) in each checkpoint,
    # beside the shards. auto: for models up to 2B parameters; otherwise `scion consolidate`.
    consolidated_weights: Literal["auto", "always", "never"] = "auto"
    eval_tasks: list[str] = field(default_factory=list)  # lm-eval tasks run during training
    eval_tasks_every: int = 0  # steps between those runs; 0: never
    eval_tasks_limit: int | None = None  # documents per task (None: all); keep it small
    eval_tasks_include: str | None = None  # a folder of task YAML files of your own
    # Reliability (see docs/guarantees.md)
    time_limit: str | None = None  # wall-clock budget like "3h50m", "90m" or seconds: stop, save, exit 75
    max_bad_steps: int = 5  # this many skipped (non-finite) steps in a row stop the run; 0: never
    loss_spike_sigma: float = 0.0  # a loss this many std above the recent mean stops the run; 0: off
    loss_spike_window: int = 100  # steps in the recent-loss window of the spike guard
    # what a guard's stop does; rollback: reload the last good checkpoint and skip the data since
    on_divergence: Literal["stop", "rollback"] = "stop"
    # run even when the memory plan does not fit the device (see docs/memory.md)
    force_memory: bool = False
    # GiB per rank the memory plan must fit in, instead of what the device has (a share of a
    # shared machine); 0: the device's available memory
    memory_limit: float = 0.0
    # what an out-of-memory in a step does: stop (the last checkpoint intact), or halve the
    # micro-batch, double the accumulation and redo the step
    on_oom: Literal["stop", "halve"] = "stop"
    # the output layer and its cross-entropy run on this many tokens at a time, so the [tokens,
    # vocab] logits never exist whole (see docs/memory.md); 0: all tokens at once
    loss_chunk_tokens: int = 2048

    def validate(self, model: ModelConfig) -> None:
        for name in ["max_steps", "micro_batch_size", "log_every", "eval_every", "sample_every",
                     "checkpoint_every", "keep_last", "loss_spike_window"]:
            if getattr(self, name) <= 0:
                raise ScionError(f"train.{name} must be positive, got {getattr(self, name)}")
        for name in ["lr", "min_lr", "warmup_steps", "weight_decay", "grad_clip", "milestone_every",
                     "eval_batches", "sample_tokens", "eval_tasks_every", "max_bad_steps", "loss_spike_sigma",
                     "memory_limit", "hsdp_shard_size"]:
            if getattr(self, name) < 0:
                raise ScionError(f"train.{name} must not be negative, got {getattr(self, name)}")
        if self.loss_chunk_tokens < 0:
            raise ScionError(f"train.loss_chunk_tokens must not be negative (0: no chunks), "
                             f"got {self.loss_chunk_tokens}")
        if self.eval_tasks_limit is not None and self.eval_tasks_limit <= 0:
            raise ScionError(f"train.eval_tasks_limit must be positive, got {self.eval_tasks_limit}")
        if self.min_lr > self.lr:
            raise ScionError(f"train.min_lr ({self.min_lr}) must not exceed train.lr ({self.lr})")
        if self.seq_len is not None and not 0 < self.seq_len <= model.max_seq_len:
            raise ScionError(
                f"train.seq_len ({self.seq_len}) must be between 1 and the model's "
                f"max_seq_len ({model.max_seq_len}); raise --model.max-seq-len or lower --seq-len"
            )

        parse_duration(self.time_limit)

    def sequence_length(self, model: ModelConfig) -> int:
        return self.seq_len or model.max_seq_len


_DURATION = re.compile("^" + "".join(rf"(?:(\d+(?:\.\d+)?){unit})?" for unit in "dhms") + "$")


def parse_duration(text: str | float | int | None) -> float | None:
    """Seconds in "3h50m", "90m", "1d2h", "45s", "3600" or "1:30:00" (h:m:s); None stays None."""
    if text is None or text == "":
        return None
    if isinstance(text, (int, float)):
        seconds = float(text)
    else:
        raw = text.strip().lower().replace(" ", "")
        if ":" in raw:
            parts = raw.split(":")
            if len(parts) > 3 or not all(p.replace(".", "", 1).isdigit() for p in parts):
                raise ScionError(f"train.time_limit {text!r}: expected h:m:s, like 3:50:00")
            seconds = sum(float(p) * 60**i for i, p in enumerate(reversed(parts)))
        elif raw.replace(".", "", 1).isdigit():
            seconds = float(raw)
        else:
            m = _DURATION.match(raw)
            if not m or not any(m.groups()):
                raise ScionError(f"train.time_limit {text!r}: expected seconds or a duration like 3h50m")
            d, h, mi, s = (float(g or 0) for g in m.groups())
            seconds = ((d * 24 + h) * 60 + mi) * 60 + s
    if seconds <= 0:
        raise ScionError(f"train.time_limit {text!r} must be positive")
    return seconds


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> None:
        self.model.validate()
        self.train.validate(self.model)
        if self.data.weights and len(self.data.weights) != len(self.data.path):
            raise ScionError(
                f"data.weights has {len(self.data.weights)} values for {len(self.data.path)} data paths"
            )
        if any(w <= 0 for w in self.data.weights):
            raise ScionError("data.weights must all be positive")
        if not 0 <= self.data.val_fraction < 1:
            raise ScionError(f"data.val_fraction must be in [0, 1), got {self.data.val_fraction}")


# --------------------------------------------------------------------------------------------
# Presets. Figures come from the papers and the models' published configs.


def _llama(name: str, **kw: Any) -> ModelConfig:
    return ModelConfig(name=name, **kw)


# Llama 3.1+ RoPE: the 8K context of pretraining stretched 32x (Llama 3.2's config.json)
_LLAMA3_ROPE = dict(rope_scaling="llama3", rope_factor=32.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                    rope_original_max_seq_len=8192)


def _gpt2(name: str, n_layer: int, n_head: int, d_model: int) -> ModelConfig:
    # Inheritune's GPT-2 variants: vocab 50304, no biases, no dropout, GELU, tied embeddings,
    # learned positions, LayerNorm, attention logits scaled by 1/(layer_idx+1).
    return ModelConfig(
        name=name, vocab_size=50304, n_layer=n_layer, n_head=n_head, d_model=d_model,
        ffn_hidden=4 * d_model, max_seq_len=1024, norm="layernorm", mlp="gelu",
        position="learned", tie_embeddings=True, attn_scale_inverse_layer=True,
    )


MODEL_PRESETS: dict[str, ModelConfig] = {
    # CPU-sized: trains on the bundled corpus in about five minutes on two cores.
    "tiny": _llama("tiny", vocab_size=4096, n_layer=4, n_head=4, n_kv_head=2, d_model=256,
                   ffn_hidden=688, max_seq_len=256),
    # The configuration the benchmarks compare against transformers and litgpt.
    "small": _llama("small", vocab_size=8192, n_layer=6, n_head=6, n_kv_head=2, d_model=384,
                    ffn_hidden=1024, max_seq_len=256),
    "tinyllama-1.1b": _llama("tinyllama-1.1b", vocab_size=32000, n_layer=22, n_head=32, n_kv_head=4,
                             d_model=2048, ffn_hidden=5632, max_seq_len=2048),
    "dmas-llama-lite-1.7b": _llama("dmas-llama-lite-1.7b", vocab_size=50304, n_layer=36, n_head=32,
                                   n_kv_head=8, d_model=2048, ffn_hidden=5120, max_seq_len=1024,
                                   rope_theta=500000.0),
    "open-llama-3b": _llama("open-llama-3b", vocab_size=32000, n_layer=26, n_head=32, d_model=3200,
                            ffn_hidden=8640, max_seq_len=2048, norm_eps=1e-6),
    "llama2-7b": _llama("llama2-7b", vocab_size=32000, n_layer=32, n_head=32, d_model=4096,
                        ffn_hidden=11008, max_seq_len=4096),
    # Today's small models (their config.json): `scion import` reads the weights, these are the shapes.
    "llama3.2-1b": _llama("llama3.2-1b", vocab_size=128256, n_layer=16, n_head=32, n_kv_head=8, d_model=2048,
                          ffn_hidden=8192, max_seq_len=131072, rope_theta=500000.0, tie_embeddings=True,
                          **_LLAMA3_ROPE, hf_architecture="LlamaForCausalLM"),
    "llama3.2-3b": _llama("llama3.2-3b", vocab_size=128256, n_layer=28, n_head=24, n_kv_head=8, d_model=3072,
                          ffn_hidden=8192, max_seq_len=131072, rope_theta=500000.0, tie_embeddings=True,
                          **_LLAMA3_ROPE, hf_architecture="LlamaForCausalLM"),
    "qwen2.5-0.5b": _llama("qwen2.5-0.5b", vocab_size=151936, n_layer=24, n_head=14, n_kv_head=2, d_model=896,
                           ffn_hidden=4864, max_seq_len=32768, norm_eps=1e-6, rope_theta=1e6, tie_embeddings=True,
                           qkv_bias=True, hf_architecture="Qwen2ForCausalLM"),
    "qwen3-0.6b": _llama("qwen3-0.6b", vocab_size=151936, n_layer=28, n_head=16, n_kv_head=8, d_model=1024,
                         head_dim=128, ffn_hidden=3072, max_seq_len=40960, norm_eps=1e-6, rope_theta=1e6,
                         tie_embeddings=True, qk_norm=True, hf_architecture="Qwen3ForCausalLM"),
    "qwen3-1.7b": _llama("qwen3-1.7b", vocab_size=151936, n_layer=28, n_head=16, n_kv_head=8, d_model=2048,
                         head_dim=128, ffn_hidden=6144, max_seq_len=40960, norm_eps=1e-6, rope_theta=1e6,
                         tie_embeddings=True, qk_norm=True, hf_architecture="Qwen3ForCausalLM"),
    "smollm2-360m": _llama("smollm2-360m", vocab_size=49152, n_layer=32, n_head=15, n_kv_head=5, d_model=960,
                           ffn_hidden=2560, max_seq_len=8192, rope_theta=100000.0, tie_embeddings=True,
                           hf_architecture="LlamaForCausalLM"),
    "mistral-7b": _llama("mistral-7b", vocab_size=32000, n_layer=32, n_head=32, n_kv_head=8, d_model=4096,
                         ffn_hidden=14336, max_seq_len=32768, sliding_window=4096,
                         hf_architecture="MistralForCausalLM"),
    "gpt2-medium": _gpt2("gpt2-medium", 24, 16, 1024),
    "gpt2-large": _gpt2("gpt2-large", 36, 20, 1280),
    "gpt2-xl": _gpt2("gpt2-xl", 48, 25, 1600),
}

# Training recipes that come with a preset (the papers' hyperparameters).
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "tinyllama-1.1b": dict(lr=4e-4, min_lr=4e-5, warmup_steps=2000, weight_decay=0.1,
                           tokens_per_step=2048 * 1024, max_steps=1_430_000, micro_batch_size=8,
                           precision="bf16"),
    # About 20B tokens (38,147 x 524,288 = 20.0B), as the papers say (19,073 steps would be
    # 10B). HellaSwag every 250 steps, as the released training script evaluates.
    "dmas-llama-lite-1.7b": dict(lr=6e-4, min_lr=6e-5, warmup_steps=715, weight_decay=0.1,
                                 tokens_per_step=524_288, max_steps=38_147, micro_batch_size=16,
                                 precision="bf16", eval_tasks=["hellaswag"], eval_tasks_every=250),
    "open-llama-3b": dict(lr=3e-4, min_lr=3e-5, warmup_steps=1000, tokens_per_step=131_072,
                          precision="bf16"),
}


def preset(name: str) -> RunConfig:
    if name not in MODEL_PRESETS:
        raise ScionError(f"unknown preset {name!r}; choose one of: {', '.join(MODEL_PRESETS)}")
    cfg = RunConfig(model=dataclasses.replace(MODEL_PRESETS[name]))
    for key, value in TRAIN_PRESETS.get(name, {}).items():
        setattr(cfg.train, key, value)
    if name not in ("tiny", "small"):  # the demo prompts only suit the bundled corpus
        cfg.train.sample_prompts = ["The meaning of life is", "Once upon a time"]
    return cfg


# --------------------------------------------------------------------------------------------
# YAML


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _fill(cls: type, values: dict[str, Any], where: str) -> Any:
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ScionError(
            f"{where}: unknown key(s) {', '.join(unknown)}; known keys are: {', '.join(known)}"
        )
    return cls(**values)


def from_dict(values: dict[str, Any], where: str = "config") -> RunConfig:
    if not isinstance(values, dict):
        raise ScionError(f"{where}: expected a mapping with model/data/train sections")
    unknown = sorted(set(values) - {"model", "data", "train"})
    if unknown:
        raise ScionError(f"{where}: unknown section(s) {', '.join(unknown)}; use model, data and train")
    try:
        return RunConfig(
            model=_fill(ModelConfig, values.get("model") or {}, f"{where} [model]"),
            data=_fill(DataConfig, values.get("data") or {}, f"{where} [data]"),
            train=_fill(TrainConfig, values.get("train") or {}, f"{where} [train]"),
        )
    except TypeError as e:
        raise ScionError(f"{where}: {e}") from e


def same_model(saved: dict[str, Any] | None, cfg: ModelConfig | dict[str, Any]) -> bool:
    """Whether a model config saved in a checkpoint describes `cfg`. Settings added to ModelConfig
    since the checkpoint was written take their defaults, so older checkpoints still match."""
    if not isinstance(saved, dict):
        return False
    current = cfg if isinstance(cfg, dict) else dataclasses.asdict(cfg)
    try:
        return dataclasses.asdict(_fill(ModelConfig, saved, "checkpoint")) == {**dataclasses.asdict(ModelConfig()),
                                                                               **current}
    except (ScionError, TypeError):
        return False


def load_yaml(path: str | Path, base: RunConfig | None = None) -> RunConfig:
    """Read a YAML config. With `base`, the file's values override the base's (a preset)."""
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError as e:
        raise ScionError(f"{path}: config file not found") from e
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ScionError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from e
    if base is not None and isinstance(values, dict):
        merged = to_dict(base)
        for section, fields in values.items():
            if isinstance(fields, dict) and isinstance(merged.get(section), dict):
                merged[section].update(fields)
            else:
                merged[section] = fields
        values = merged
    return from_dict(values, str(path))


def save_yaml(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
