"""Shared helpers for the benchmarks: the transformers twin of a scion model, and scion's
Trainer on random tokens set up to measure training alone."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from scion.config import ModelConfig, RunConfig  # noqa: E402
from scion.interop.llama import LlamaAdapter  # noqa: E402
from scion.model import Transformer  # noqa: E402
from scion.train.loop import Trainer  # noqa: E402

# The dry runs' model: the tinyllama shape (GQA, SwiGLU, RoPE) at a size a CPU compiles in seconds.
TINY = ModelConfig(name="check-tiny", vocab_size=512, n_layer=2, n_head=4, n_kv_head=2, d_model=64,
                   ffn_hidden=128, max_seq_len=64)


def hf_llama(m: ModelConfig, scion_model: torch.nn.Module | None = None):
    """A transformers LlamaForCausalLM with the same configuration (SDPA attention), holding
    `scion_model`'s weights when given. The config and the name mapping are scion's export path."""
    from transformers import LlamaForCausalLM

    adapter = LlamaAdapter()
    cfg, _ = adapter.hf_config(m, bos_id=None, eos_id=None)
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg)
    if scion_model is not None:
        sd = dict(adapter.from_scion(scion_model.state_dict(), m))
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if unexpected or [k for k in missing if "rotary" not in k and not (m.tie_embeddings and "lm_head" in k)]:
            raise RuntimeError(f"weight mapping failed: missing {missing}, unexpected {unexpected}")
        if m.tie_embeddings:
            model.tie_weights()
    return model


# litgpt is a benchmark-only peer, installed without its declared dependencies: it pins
# huggingface-hub < 1.4, and transformers 5 needs >= 1.31 (a plain install breaks transformers).
LITGPT_INSTALL = ("python -m venv .venv-peers --system-site-packages && "
                  ".venv-peers/bin/pip install --no-deps -r benchmarks/requirements-peers.txt")


def litgpt_missing() -> str | None:
    """Why litgpt's model cannot be imported here (one line), or None when it can."""
    try:
        import litgpt.model  # noqa: F401
    except ImportError as e:
        return f"{type(e).__name__}: {e}"
    return None


def litgpt_gpt(m: ModelConfig, scion_model: torch.nn.Module | None = None):
    """A litgpt GPT with the same configuration, holding `scion_model`'s weights when given:
    scion's transformers names (its export path), then litgpt's own LLaMA conversion."""
    from litgpt.config import Config
    from litgpt.model import GPT
    from litgpt.scripts.convert_hf_checkpoint import copy_weights_hf_llama

    differs = {"norm": "rmsnorm", "mlp": "swiglu", "position": "rope", "rope_scaling": "none", "bias": False,
               "qkv_bias": False, "qk_norm": False, "sliding_window": None, "attn_scale_inverse_layer": False}
    unsupported = [f"{k}={getattr(m, k)!r}" for k, v in differs.items() if getattr(m, k) != v]
    if unsupported:
        raise ValueError(f"litgpt twin: only the plain LLaMA shape is mapped, not {', '.join(unsupported)}")
    theta = int(m.rope_theta) if float(m.rope_theta).is_integer() else m.rope_theta  # litgpt types it int
    cfg = Config(name=m.name, block_size=m.max_seq_len, vocab_size=m.vocab_size, padded_vocab_size=m.vocab_size,
                 n_layer=m.n_layer, n_head=m.n_head, n_query_groups=m.kv_heads, n_embd=m.d_model,
                 head_size=m.dim_per_head, rotary_percentage=1.0, rope_base=theta, parallel_residual=False,
                 bias=False, norm_class_name="RMSNorm", norm_eps=m.norm_eps, mlp_class_name="LLaMAMLP",
                 intermediate_size=m.ffn_hidden)
    model = GPT(cfg)
    if scion_model is not None:
        hf = dict(LlamaAdapter().from_scion(scion_model.state_dict(), m))
        state: dict[str, torch.Tensor] = {}
        copy_weights_hf_llama(cfg, {}, state, hf)
        model.load_state_dict(state, strict=True)
    if m.tie_embeddings:  # litgpt's Config has no such switch; tie as transformers does
        model.lm_head.weight = model.transformer.wte.weight
    return model


def build(cfg: ModelConfig, device, seed: int = 0) -> Transformer:
    """A freshly initialised scion model on `device`."""
    model = Transformer(cfg)
    model.init_weights(torch.Generator().manual_seed(seed))
    return model.to(device)


class RandomTokens:
    """Batches of uniformly random tokens, a pure function of the global sample number."""

    def __init__(self, vocab_size: int, seq_len: int, seed: int = 0):
        self.vocab_size, self.seq_len, self.seed = vocab_size, seq_len, seed

    def batch(self, start: int, size: int):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + start)
        data = torch.randint(0, self.vocab_size, (size, self.seq_len + 1), generator=g)
        return data[:, :-1], data[:, 1:]


class ThroughputTrainer(Trainer):
    """The Trainer, minus checkpoint writing: the benchmarks measure training, not the disk."""

    def save(self, milestone: bool = False):
        return None


def throughput_trainer(cfg: RunConfig, model, run_dir: Path, device, precision: str, *, micro: int,
                       accum: int, steps: int, log=None) -> ThroughputTrainer:
    """scion's Trainer on random tokens for `steps` steps of `accum` micro-batches of `micro`
    sequences, logging a third of the way through and never evaluating, sampling or saving."""
    cfg = copy.deepcopy(cfg)
    t = cfg.train
    t.max_steps, t.warmup_steps, t.log_every = steps, 2, max(1, steps // 3)
    t.checkpoint_every = t.eval_every = t.sample_every = 10**9
    t.sample_prompts = []
    seq = t.sequence_length(cfg.model)
    t.micro_batch_size, t.tokens_per_step = micro, micro * seq * accum
    return ThroughputTrainer(cfg, run_dir, model, RandomTokens(cfg.model.vocab_size, seq), device=device,
                             precision=precision, progress=False,
                             log=log or (lambda m: print("   ", m, flush=True)))
