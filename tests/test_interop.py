"""Hugging Face interop, proven by logits: scion -> transformers and transformers -> scion give
the same logits (fp32, max abs difference <= 1e-4), tokenizers give the same ids, and bad
input is refused with one line."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from interop_helpers import GPT2, LLAMA, TEXT, hf_gpt2, hf_llama, make_run, tokenizer

from scion import checkpoint as ckpt
from scion.config import ModelConfig
from scion.errors import ScionError
from scion.interop import export_hf, import_run, load_hf, load_reference
from scion.model import Transformer
from scion.run import load_model

transformers = pytest.importorskip("transformers")

TOL = 1e-4
EXPORTS = {
    "llama-gqa-untied": ModelConfig(**LLAMA, n_kv_head=2, rope_theta=500000.0),
    "llama-mha-tied": ModelConfig(**LLAMA, tie_embeddings=True, norm_eps=1e-6),
    "llama-gqa-bias-headdim": ModelConfig(**LLAMA, n_kv_head=1, head_dim=8, bias=True),
    "gpt2-inheritune": ModelConfig(**GPT2, attn_scale_inverse_layer=True),  # no biases, 1/(layer+1)
    "gpt2-bias": ModelConfig(**dict(GPT2, ffn_hidden=200), bias=True),
}


def hf_logits(folder: Path, x: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("name", list(EXPORTS))
def test_export_gives_transformers_the_same_logits(tmp_path, name):
    cfg = EXPORTS[name]
    tok = tokenizer(bos=name.startswith("llama"))
    run = make_run(tmp_path / "run", cfg, tok)
    out = export_hf(run, tmp_path / "hf")

    x = torch.randint(0, cfg.vocab_size, (2, cfg.max_seq_len), generator=torch.Generator().manual_seed(0))
    ours = load_model(run).model
    with torch.no_grad():
        expected = ours(x)
    assert (hf_logits(out, x) - expected).abs().max().item() <= TOL

    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM" if name.startswith("llama") else "GPT2LMHeadModel"]
    assert config["vocab_size"] == cfg.vocab_size
    assert config["eos_token_id"] == tok.eos_id
    assert config.get("bos_token_id") == tok.bos_id
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tok.eos_id
    if name.startswith("llama"):
        assert config["rope_theta"] == cfg.rope_theta  # readable by transformers 4 as well

    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok(TEXT, add_special_tokens=False).input_ids == tok.encode(TEXT)
    assert hf_tok.eos_token_id == tok.eos_id and hf_tok.bos_token_id == tok.bos_id

    # Back again: the exported folder imports into the same function.
    model, back_tok, _ = load_hf(out)
    with torch.no_grad():
        assert (model(x) - expected).abs().max().item() <= TOL
    assert back_tok.encode(TEXT) == tok.encode(TEXT)


@pytest.mark.parametrize("name", list(EXPORTS))
def test_exported_logits_agree_under_bf16_autocast(tmp_path, name):
    """The same comparison as `--precision bf16` runs both models on a CPU (autocast: products in
    bf16, norms and softmax in fp32). Each product's output is rounded to bf16 (a step of 2^-6
    at 2-4), and the libraries multiply in different layouts (GPT-2's Conv1D is the weight
    transposed), so a hidden state can round one step apart and the logits, whose spread is 0.8,
    differ by up to about 0.02 here: they must agree within 0.05 + 2^-7 relative, where a
    mis-mapped tensor is off by whole units. The fp32 test above stays the exact check."""
    cfg = EXPORTS[name]
    run = make_run(tmp_path / "run", cfg, tokenizer(bos=name.startswith("llama")))
    out = export_hf(run, tmp_path / "hf")
    x = torch.randint(0, cfg.vocab_size, (2, cfg.max_seq_len), generator=torch.Generator().manual_seed(0))
    ours = load_model(run).model
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        fp32 = ours(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected, got = ours(x).float(), theirs(x).logits.float()
    assert not torch.equal(expected, fp32)  # bf16 products did run
    torch.testing.assert_close(got, expected, rtol=2**-7, atol=0.05)


IMPORTS = {
    "llama-gqa": lambda folder, tok: hf_llama(folder, tok),
    "llama-mha-tied-theta": lambda folder, tok: hf_llama(
        folder, tok, num_key_value_heads=4, rms_norm_eps=1e-6, rope_theta=5e5, tie_word_embeddings=True),
    "gpt2": lambda folder, tok: hf_gpt2(folder, tok),
    "gpt2-inverse-layer-scale": lambda folder, tok: hf_gpt2(folder, tok, scale_attn_by_inverse_layer_idx=True,
                                                             n_inner=100),
}


@pytest.mark.parametrize("name", list(IMPORTS))
def test_transformers_models_import_with_the_same_logits(tmp_path, name):
    tok = tokenizer()
    reference = IMPORTS[name](tmp_path / "hf", tok)
    x = torch.randint(0, 320, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(x).logits
    model, tok_back, cfg = load_hf(tmp_path / "hf")
    with torch.no_grad():
        assert (model(x) - expected).abs().max().item() <= TOL
    assert tok_back.encode("naïve café") == tok.encode("naïve café")
    if name == "llama-mha-tied-theta":
        assert cfg.model.rope_theta == 500000.0 and cfg.model.tie_embeddings and cfg.model.norm_eps == 1e-6
    if name == "gpt2-inverse-layer-scale":
        assert cfg.model.attn_scale_inverse_layer and cfg.model.ffn_hidden == 100


def test_sharded_safetensors_and_bin_weights_import(tmp_path):
    tok = tokenizer()
    reference = hf_llama(tmp_path / "sharded", tok)
    reference.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    x = torch.randint(0, 320, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reference(x).logits
    model, _, _ = load_hf(tmp_path / "sharded")
    with torch.no_grad():
        assert (model(x) - expected).abs().max().item() <= TOL

    bin_folder = tmp_path / "bin"
    bin_folder.mkdir()
    (bin_folder / "config.json").write_text((tmp_path / "sharded" / "config.json").read_text())
    torch.save(reference.state_dict(), bin_folder / "pytorch_model.bin")
    model, tok_back, _ = load_hf(bin_folder)
    assert tok_back is None  # no tokenizer in that folder: load_hf says so rather than guessing
    with torch.no_grad():
        assert (model(x) - expected).abs().max().item() <= TOL


def test_import_cli_makes_a_run_that_generates(tmp_path, run_scion):
    tok = tokenizer()
    hf_gpt2(tmp_path / "hf", tok)
    run = tmp_path / "run"
    proc = run_scion("import", tmp_path / "hf", "--out", run)
    assert "imported" in proc.stderr
    assert ckpt.verify_checkpoint(ckpt.list_checkpoints(run)[0].path) is None
    loaded = load_model(run)
    assert loaded.config.model.position == "learned" and loaded.tokenizer.eos_id == tok.eos_id
    proc = run_scion("generate", run, "--prompt", "The quick", "--max-new-tokens", "5", "--seed", "0")
    assert proc.stdout.startswith("The quick")
    with pytest.raises(ScionError, match="already exists and is not empty"):  # an existing run stays
        import_run(tmp_path / "hf", run)
    assert ckpt.verify_checkpoint(ckpt.list_checkpoints(run)[0].path) is None


def test_export_cli_writes_any_checkpoint(tmp_path, run_scion):
    tok = tokenizer()
    run = make_run(tmp_path / "run", ModelConfig(**LLAMA, n_kv_head=2), tok, steps=(4, 8))
    proc = run_scion("export", run, "--hf", tmp_path / "hf4", "--checkpoint", "4")
    assert "LlamaForCausalLM" in proc.stderr
    export_hf(run, tmp_path / "hf8")  # the latest
    x = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(3))
    for step, folder in ((4, "hf4"), (8, "hf8")):
        with torch.no_grad():
            expected = load_model(run, str(step)).model(x)
        assert (hf_logits(tmp_path / folder, x) - expected).abs().max().item() <= TOL
    with pytest.raises(ScionError, match="not empty"):  # never overwrites silently
        export_hf(run, tmp_path / "hf8")
    export_hf(run, tmp_path / "hf8", checkpoint="4", overwrite=True)
    assert (hf_logits(tmp_path / "hf8", x) - hf_logits(tmp_path / "hf4", x)).abs().max().item() == 0


def test_load_reference_takes_runs_checkpoints_and_hf_folders(tmp_path):
    tok = tokenizer()
    cfg = ModelConfig(**LLAMA)
    run = make_run(tmp_path / "run", cfg, tok, steps=(2, 5))
    hf_llama(tmp_path / "hf", tok)
    x = torch.randint(0, 320, (1, 8))
    step5 = run / "checkpoints" / "step-00000005"
    sources = [(run, None), (run, "2"), (step5, None), (tmp_path / "hf", None)]
    for source, which in sources:
        model, tok_back, config = load_reference(source, checkpoint=which)
        assert isinstance(model, Transformer) and tok_back is not None and config.model.n_layer == 2
        assert model(x).shape == (1, 8, 320)
    latest = load_reference(run)[0]
    explicit = load_reference(run / "checkpoints" / "step-00000005")[0]
    assert torch.equal(latest(x), explicit(x))
    assert not torch.equal(load_reference(run, checkpoint="2")[0](x), latest(x))
    with pytest.raises(ScionError, match="neither a scion run"):
        load_reference(tmp_path)


# ---- bad input ----------------------------------------------------------------------------


def one_line_error(proc) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_unsupported_architecture_is_refused(tmp_path, run_scion):
    folder = tmp_path / "bert"
    folder.mkdir()
    config = {"architectures": ["BertForMaskedLM"], "model_type": "bert"}
    (folder / "config.json").write_text(json.dumps(config))
    line = one_line_error(run_scion("import", folder, "--out", tmp_path / "run", check=False))
    assert "BertForMaskedLM is not a supported architecture" in line and "LlamaForCausalLM" in line
    assert not (tmp_path / "run").exists()

    with pytest.raises(ScionError, match="no such folder"):
        import_run(tmp_path / "nowhere", tmp_path / "run")


def test_unimplemented_rope_scaling_is_refused(tmp_path):
    hf_llama(tmp_path / "hf", tokenizer())
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "longrope", "factor": 2.0, "rope_theta": 10000.0}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ScionError, match="RoPE scaling 'longrope' .* is not implemented"):
        load_hf(tmp_path / "hf")


def test_missing_and_mismatched_tokenizers_are_refused(tmp_path, run_scion):
    hf_llama(tmp_path / "hf")  # weights and config, no tokenizer
    line = one_line_error(run_scion("import", tmp_path / "hf", "--out", tmp_path / "run", check=False))
    assert "no tokenizer" in line and "--tokenizer" in line
    assert not (tmp_path / "run").exists()

    big = tokenizer(vocab_size=400)  # more tokens than the model's 320 embeddings
    assert big.vocab_size > 320
    big.save(tmp_path / "big")
    with pytest.raises(ScionError, match=f"{big.vocab_size} tokens but the model's embedding has 320 rows"):
        import_run(tmp_path / "hf", tmp_path / "run", tokenizer=str(tmp_path / "big"))
    assert not (tmp_path / "run").exists()

    run = make_run(tmp_path / "scion-run", ModelConfig(**LLAMA), tokenizer())
    big.save(run / "tokenizer")
    with pytest.raises(ScionError, match="does not belong to this model"):
        export_hf(run, tmp_path / "out")


class _Hostile:
    """Unpickling this would create a marker file: a stand-in for arbitrary code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_that_would_run_code_is_refused_not_run(tmp_path, run_scion):
    folder = tmp_path / "hostile"
    hf_llama(folder, tokenizer())
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    with open(folder / "pytorch_model.bin", "wb") as fh:
        pickle.dump({"model.embed_tokens.weight": _Hostile(marker)}, fh)
    line = one_line_error(run_scion("import", folder, "--out", tmp_path / "run", check=False))
    assert "refused to load" in line and "pytorch_model.bin" in line
    assert not marker.exists()
    assert not (tmp_path / "run").exists()


def test_unrepresentable_model_is_refused_with_the_reason(tmp_path):
    cfg = ModelConfig(**dict(LLAMA, mlp="gelu"))  # RMSNorm + RoPE + GELU: neither Llama nor GPT-2
    run = make_run(tmp_path / "run", cfg, tokenizer())
    with pytest.raises(ScionError) as info:
        export_hf(run, tmp_path / "out")
    message = str(info.value)
    assert "representable in none of the Hugging Face families" in message
    assert "mlp='gelu'" in message and "norm='rmsnorm'" in message
    assert not (tmp_path / "out").exists()


def test_weights_that_do_not_match_the_config_are_refused(tmp_path):
    hf_llama(tmp_path / "hf", tokenizer())
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["intermediate_size"] = 128
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ScionError, match="do not match config.json"):
        load_hf(tmp_path / "hf")


def test_hub_ids_go_through_huggingface_hub(monkeypatch):
    """The hub path is real; offline (as here) it fails with one clear line, not a traceback."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ScionError, match="someone/tiny-llama: could not download from the Hugging Face hub"):
        load_reference("hf:someone/tiny-llama")
