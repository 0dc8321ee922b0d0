"""Today's small-model families in and out: Llama 3.x (RoPE scaling, tied embeddings), Qwen2/2.5
(q/k/v biases), Qwen3 (per-head q/k RMSNorm, explicit head_dim), Mistral (sliding window) and
SmolLM (Llama). Each is proven on a random tiny model built from its transformers config class:
the same logits (fp32, 1e-5) and greedy tokens in both directions, the family kept on export, and
the switches working through the rest of scion (KV-cache decoding, inheritance)."""

from __future__ import annotations

import json

import pytest
import torch
from interop_helpers import TEXT, tokenizer

from scion.config import MODEL_PRESETS, ModelConfig
from scion.errors import ScionError
from scion.generate import generate
from scion.interop import export_hf, import_run, load_hf
from scion.model import Transformer
from scion.run import load_model

transformers = pytest.importorskip("transformers")

TOL = 1e-5
BASE = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=32, rms_norm_eps=1e-5, bos_token_id=None,
            eos_token_id=0)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8}
FAMILIES = {
    # Llama 3.2: llama3 RoPE scaling (both the stretched and the blended frequency bands are hit
    # at head_dim 16 and theta 5e5), tied embeddings
    "llama3.2": ("LlamaConfig", dict(rope_theta=500000.0, rope_scaling=LLAMA3_ROPE, tie_word_embeddings=True)),
    "llama-linear": ("LlamaConfig", dict(rope_scaling={"rope_type": "linear", "factor": 4.0})),
    "qwen2.5": ("Qwen2Config", dict(rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(head_dim=32, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", dict(sliding_window=8, tie_word_embeddings=False)),
    "smollm2": ("LlamaConfig", dict(num_key_value_heads=1, rope_theta=100000.0, tie_word_embeddings=True)),
}
ARCHITECTURE = {"LlamaConfig": "LlamaForCausalLM", "Qwen2Config": "Qwen2ForCausalLM",
                "Qwen3Config": "Qwen3ForCausalLM", "MistralConfig": "MistralForCausalLM"}


def hf_model(folder, family: str, **overrides):
    """A random tiny model of the family (norms and biases random too), saved with a tokenizer."""
    config_class, extra = FAMILIES[family]
    config = getattr(transformers, config_class)(**{**BASE, **extra, **overrides})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:  # norms to one and biases to zero would hide a wrong mapping
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    model.save_pretrained(folder)
    family_tokenizer(family).save_pretrained(folder)
    return model


def family_tokenizer(family: str):
    """The family's own tokenizer class over a small BPE: Qwen's adds NFC and its own
    pre-tokenizer (digits one by one), which the exported tokenizer must keep."""
    tok = tokenizer()
    if not family.startswith("qwen"):
        return transformers.PreTrainedTokenizerFast(tokenizer_object=tok.backend, eos_token=tok.eos_token)
    model = json.loads(tok.backend.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return transformers.Qwen2Tokenizer(vocab=model["vocab"], merges=merges)


def tokens(n: int = 32, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, 320, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_imports_with_the_same_logits_and_greedy_tokens(tmp_path, family):
    theirs = hf_model(tmp_path / "hf", family)
    ours, tok, cfg = load_hf(tmp_path / "hf")
    x = tokens()
    with torch.no_grad():
        assert (ours(x) - theirs(x).logits).abs().max().item() <= TOL
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok.encode(TEXT) == hf_tok(TEXT, add_special_tokens=False).input_ids
    prompt = tokens(6, batch=1)
    expected = theirs.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    got = generate(ours, prompt, 12, temperature=0.0)
    assert torch.equal(got, expected)
    config_class = FAMILIES[family][0]
    assert cfg.model.hf_architecture == ARCHITECTURE[config_class]
    if family == "qwen2.5":
        assert cfg.model.qkv_bias and not cfg.model.bias and cfg.model.tie_embeddings
    if family == "qwen3":
        assert cfg.model.qk_norm and cfg.model.dim_per_head == 32 and not cfg.model.qkv_bias
    if family == "mistral":
        assert cfg.model.sliding_window == 8
    if family == "llama3.2":
        m = cfg.model
        assert (m.rope_scaling, m.rope_factor, m.rope_original_max_seq_len) == ("llama3", 8.0, 8)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_round_trips_through_a_scion_run_and_keeps_its_architecture(tmp_path, family):
    hf_model(tmp_path / "hf", family)
    run = import_run(tmp_path / "hf", tmp_path / "run")
    out = export_hf(run, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [ARCHITECTURE[FAMILIES[family][0]]]
    exported = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours = load_model(run).model
    x = tokens()
    with torch.no_grad():
        assert (exported(x).logits - ours(x)).abs().max().item() <= TOL
    original = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    exported_tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = original(TEXT, add_special_tokens=False).input_ids
    assert exported_tok(TEXT, add_special_tokens=False).input_ids == ids == load_model(run).tokenizer.encode(TEXT)
    assert exported_tok.eos_token == original.eos_token


def test_dynamic_rope_scaling_matches_past_the_original_context(tmp_path):
    """Dynamic NTK scaling changes the frequencies only past max_position_embeddings (16 here):
    scion imports it with the scaled context (16 x 2) and matches transformers at 12 tokens and
    at 32, where the base has grown."""
    theirs = hf_model(tmp_path / "hf", "llama-linear", max_position_embeddings=16,
                      rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    ours, _, cfg = load_hf(tmp_path / "hf")
    assert (cfg.model.rope_scaling, cfg.model.max_seq_len, cfg.model.rope_original_max_seq_len) == ("dynamic", 32, 16)
    for n in (12, 32):
        theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
        with torch.no_grad():
            assert (ours(tokens(n)) - theirs(tokens(n)).logits).abs().max().item() <= TOL
    run = import_run(tmp_path / "hf", tmp_path / "run")
    config = json.loads((export_hf(run, tmp_path / "out") / "config.json").read_text())
    assert config["max_position_embeddings"] == 16 and config["rope_scaling"]["rope_type"] == "dynamic"


def test_sliding_window_decoding_with_a_kv_cache_equals_the_full_sequence(tmp_path):
    cfg = ModelConfig(vocab_size=96, n_layer=2, n_head=4, n_kv_head=2, d_model=32, ffn_hidden=48, max_seq_len=32,
                      sliding_window=5, qk_norm=True, qkv_bias=True)
    model = Transformer(cfg).eval()
    model.init_weights(torch.Generator().manual_seed(0))
    x = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(x)
        model.setup_kv_cache(2, 24)
        steps = [model(x[:, :4], pos=0)]  # a prompt, then one token at a time
        steps += [model(x[:, i:i + 1], pos=i) for i in range(4, 24)]
        model.clear_kv_cache()
        torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
        # the window is real: a token reaches 2 layers x (window - 1) positions ahead and no further
        y = x.clone()
        y[:, 10] = (y[:, 10] + 1) % 96
        changed = (model(y) - full).abs().amax(dim=(0, 2))
    assert changed[:10].max() == 0 and changed[10:19].min() > 0 and changed[19:].max() == 0


def test_unsupported_family_features_are_refused_in_one_line(tmp_path):
    hf_model(tmp_path / "hf", "qwen2.5", use_sliding_window=True, sliding_window=8, max_window_layers=1)
    with pytest.raises(ScionError, match="use_sliding_window"):
        load_hf(tmp_path / "hf")
    hf_model(tmp_path / "yarn", "llama-linear", rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ScionError, match="RoPE scaling 'yarn'"):
        load_hf(tmp_path / "yarn")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config.update(use_sliding_window=False, layer_types=None, num_experts=8)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ScionError, match="mixture-of-experts"):
        load_hf(tmp_path / "hf")


# Parameter counts of the published models, tied embeddings counted once (the Hub's safetensors
# count of a tied Qwen3 also counts its stored lm_head copy: 2.03B for Qwen3-1.7B); the Qwen cards'
# non-embedding counts (0.36B, 0.44B, 1.4B) are checked too. transformers' own count of each config
# on the meta device must agree with scion's.
PUBLISHED = {
    "llama3.2-1b": 1_235_814_400,
    "llama3.2-3b": 3_212_749_824,
    "qwen2.5-0.5b": 494_032_768,
    "qwen3-0.6b": 596_049_920,
    "qwen3-1.7b": 1_720_574_976,
    "smollm2-360m": 361_821_120,
    "mistral-7b": 7_241_732_096,
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_presets_have_the_published_parameter_counts(name):
    cfg = MODEL_PRESETS[name]
    with torch.device("meta"):
        ours = Transformer(cfg).num_params()
    assert ours == PUBLISHED[name]
    card = {"qwen2.5-0.5b": 0.36e9, "qwen3-0.6b": 0.44e9, "qwen3-1.7b": 1.4e9}
    if name in card:
        assert abs(ours - cfg.vocab_size * cfg.d_model - card[name]) < 0.01e9
    from scion.interop.convert import family_for

    config, _ = family_for(cfg, name).hf_config(cfg, None, 0)
    with torch.device("meta"):
        theirs = transformers.AutoModelForCausalLM.from_config(config)
    assert theirs.num_parameters() == ours


@pytest.mark.parametrize("family", ["llama3.2", "qwen2.5", "qwen3", "mistral"])  # one per architecture
def test_a_child_inherits_from_each_family_trains_and_exports_as_that_family(tmp_path, family, cache_dir, corpus):
    from scion.cli.main import main as scion

    hf_model(tmp_path / "hf", family)
    import_run(tmp_path / "hf", tmp_path / "ref")
    assert scion(["inherit", "--reference", str(tmp_path / "ref"), "--layers", "1", "--out", str(tmp_path / "child"),
                  "--data", str(corpus), "--max-steps", "2", "--micro-batch-size", "2", "--eval-every", "2",
                  "--checkpoint-every", "2", "--data.val-fraction", "0.2", "--progress", "lines"]) == 0
    export_hf(tmp_path / "child", tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == [ARCHITECTURE[FAMILIES[family][0]]] and config["num_hidden_layers"] == 1
    child = load_model(tmp_path / "child").model
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    x = tokens(16)
    with torch.no_grad():
        assert (exported(x).logits - child(x)).abs().max().item() <= TOL
    if family == "qwen3":  # the lazy-layer analysis reads the per-head-normed attention
        assert scion(["lazy", str(tmp_path / "ref"), "--data", str(corpus), "--out", str(tmp_path / "lazy"),
                      "--num-seqs", "4"]) == 0
        assert (tmp_path / "lazy" / "lazy.json").is_file()
