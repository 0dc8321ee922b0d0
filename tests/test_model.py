import pytest
import torch

from scion.config import MODEL_PRESETS, ModelConfig, preset
from scion.generate import CompiledDecoder, generate
from scion.model import Transformer

PUBLISHED_PARAMS = {
    "tinyllama-1.1b": 1_100_048_384,
    "dmas-llama-lite-1.7b": 1_716_144_128,
    "open-llama-3b": 3_426_473_600,
    "llama2-7b": 6_738_415_616,
}


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, d_model=32, ffn_hidden=48, max_seq_len=32)
    base.update(kw)
    return ModelConfig(**base)


def build(cfg: ModelConfig, seed: int = 0) -> Transformer:
    model = Transformer(cfg)
    model.init_weights(torch.Generator().manual_seed(seed))
    return model.eval()


@pytest.mark.parametrize("name", sorted(MODEL_PRESETS))
def test_presets_build_on_meta_without_allocating(name):
    cfg = preset(name).model
    with torch.device("meta"):
        model = Transformer(cfg)
    assert all(p.device.type == "meta" for p in model.parameters())
    if name in PUBLISHED_PARAMS:
        assert model.num_params() == PUBLISHED_PARAMS[name]


def test_gpt2_preset_shape():
    cfg = preset("gpt2-medium").model
    with torch.device("meta"):
        model = Transformer(cfg)
    # GPT-2 medium at vocab 50304, no biases, tied: 24 x 12 d^2 + embeddings + positions + norms.
    d = 1024
    expected = 24 * (12 * d * d + 2 * d) + 50304 * d + 1024 * d + d
    assert model.num_params() == expected
    assert model.lm_head.weight is model.embed.weight


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_output_shapes_and_loss(kind):
    extra = {} if kind == "llama" else dict(norm="layernorm", mlp="gelu", position="learned",
                                             tie_embeddings=True, attn_scale_inverse_layer=True, n_kv_head=None)
    model = build(tiny_cfg(**extra))
    x = torch.randint(0, 97, (3, 16))
    assert model(x).shape == (3, 16, 97)
    loss = model(x, x)
    assert loss.ndim == 0 and 3.0 < loss.item() < 6.0  # near log(97) at init


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_causal_masking(kind):
    extra = {} if kind == "llama" else dict(norm="layernorm", mlp="gelu", position="learned", tie_embeddings=True)
    model = build(tiny_cfg(**extra))
    x = torch.randint(0, 97, (2, 20))
    y = x.clone()
    y[:, 12:] = torch.randint(0, 97, (2, 8))
    with torch.no_grad():
        a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=0)
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_gqa_equals_repeated_kv_attention():
    """A GQA model equals an MHA model whose K/V projections repeat each KV head for its group."""
    gqa = build(tiny_cfg(n_head=4, n_kv_head=2))
    mha = Transformer(tiny_cfg(n_head=4, n_kv_head=4)).eval()
    state = gqa.state_dict()
    hd = gqa.cfg.dim_per_head
    for i in range(gqa.cfg.n_layer):
        for name in ("k_proj", "v_proj"):
            w = state[f"blocks.{i}.attn.{name}.weight"].view(2, hd, -1)
            state[f"blocks.{i}.attn.{name}.weight"] = w.repeat_interleave(2, dim=0).reshape(4 * hd, -1)
    mha.load_state_dict(state)
    x = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(gqa(x), mha(x), rtol=1e-5, atol=1e-5)


def test_explicit_attention_path_matches_sdpa():
    """The observer path (used by the lazy-layer analysis) computes the same outputs."""
    model = build(tiny_cfg())
    x = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        ref = model(x)
        seen = []
        for block in model.blocks:
            block.attn.observer = lambda layer, probs: seen.append((layer, probs.shape))
        out = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert seen == [(0, (2, 4, 16, 16)), (1, (2, 4, 16, 16))]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_kv_cache_decoding_equals_full_forward(kind):
    extra = {} if kind == "llama" else dict(norm="layernorm", mlp="gelu", position="learned", tie_embeddings=True)
    model = build(tiny_cfg(**extra))
    prompt = torch.randint(0, 97, (2, 5))
    out = generate(model, prompt, 10, temperature=0)
    # Greedy decoding without a cache: one full forward per new token.
    seq = prompt
    with torch.no_grad():
        for _ in range(10):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_static_shape_decoding_equals_offset_decoding(kind):
    """The compiled decoder's path: the cache spans the whole context, positions come as a tensor
    and the unwritten end is masked; its logits equal the sliced cache's."""
    extra = {} if kind == "llama" else dict(norm="layernorm", mlp="gelu", position="learned", tie_embeddings=True)
    model = build(tiny_cfg(**extra))
    tokens = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        model.setup_kv_cache(2, 12)
        sliced = [model(tokens[:, :5], pos=0)] + [model(tokens[:, t:t + 1], pos=t) for t in range(5, 12)]
        model.setup_kv_cache(2)  # the whole context, 32 positions
        model.kv_caches[0].k.fill_(1e4)  # stale entries must be masked, whatever they hold
        static = [model(tokens[:, :3], pos=torch.arange(3)), model(tokens[:, 3:5], pos=torch.arange(3, 5))]
        static += [model(tokens[:, t:t + 1], pos=torch.tensor([t])) for t in range(5, 12)]
        model.clear_kv_cache()
    torch.testing.assert_close(torch.cat(static, 1), torch.cat(sliced, 1), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_compiled_decoder_gives_the_eager_tokens():
    model = build(tiny_cfg())
    decoder = CompiledDecoder(model, batch=2)
    for length, new in ((5, 10), (9, 30)):  # a second prompt reuses the compiled step and its cache
        prompt = torch.randint(0, 97, (2, length))
        assert torch.equal(generate(model, prompt, new, temperature=0, decoder=decoder),
                           generate(model, prompt, new, temperature=0))
    with pytest.raises(ValueError, match="batch size"):
        generate(model, prompt[:1], 4, decoder=decoder)

    # A caller's token of another stride or integer type is copied into the step's own input:
    # the same logits, no recompilation (which the skipped guards would refuse).
    with torch.inference_mode():
        model.kv_caches = decoder.caches
        column = prompt[:, :1]  # strides (9, 1), where decoding passes (1, 1)
        reference = decoder.step(column.clone(memory_format=torch.contiguous_format), 9)
        assert torch.equal(decoder.step(column, 9), reference)
        assert torch.equal(decoder.step(column.int(), 9), reference)
        with pytest.raises(ValueError, match="shape"):
            decoder.step(prompt[:, :2], 9)
        model.clear_kv_cache()


def test_init_is_deterministic_and_scaled():
    a, b = build(tiny_cfg(), seed=3), build(tiny_cfg(), seed=3)
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), name
    std = a.blocks[0].mlp.down_proj.weight.std().item()
    assert std < 0.02 * 0.7  # residual projections are scaled by 1/sqrt(2 * n_layer)


def test_invalid_model_config():
    from scion.errors import ScionError

    with pytest.raises(ScionError, match="multiple of"):
        Transformer(tiny_cfg(n_head=4, n_kv_head=3))
    with pytest.raises(ScionError, match="positive"):
        Transformer(tiny_cfg(n_layer=0))


@pytest.mark.parametrize("name, params", [("dmas-llama-lite-1.7b", 1_716_144_128), ("tinyllama-1.1b", 1_100_048_384)])
def test_shipped_configs_match_the_published_models(name, params):
    from pathlib import Path

    from scion.config import load_yaml

    cfg = load_yaml(Path(__file__).parents[1] / "configs" / f"{name}.yaml")
    cfg.validate()
    with torch.device("meta"):
        assert Transformer(cfg.model).num_params() == params
    assert cfg.model == preset(name).model


def test_a_checkpoint_saved_before_a_model_setting_existed_still_matches():
    from dataclasses import asdict

    from scion.config import same_model

    cfg = ModelConfig(n_layer=2)
    saved = {k: v for k, v in asdict(cfg).items() if k not in ("qk_norm", "sliding_window", "hf_architecture")}
    assert same_model(saved, cfg) and same_model(asdict(cfg), cfg)
    assert not same_model({**saved, "n_layer": 3}, cfg)
    assert not same_model({**saved, "colour": 1}, cfg) and not same_model(None, cfg)
    assert not same_model(saved, ModelConfig(n_layer=2, qk_norm=True))
