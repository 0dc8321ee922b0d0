"""Lazy-layer analysis: k* and m* on constructed attention matrices, batch invariance on a real
model, Q/K gradient norms, and `scion lazy` as a user runs it."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from scion.analysis.attention import (
    AttentionProbe,
    LazySettings,
    approximate_rank,
    column_mass,
    measure_attention,
    qk_grad_norms,
    summarise,
)
from scion.config import ModelConfig
from scion.model import Transformer

# Trains or runs at --precision auto: `make test-bf16` runs these again with auto forced to bf16.
pytestmark = pytest.mark.precision

T = 32


def uniform(t: int = T) -> torch.Tensor:
    return torch.full((t, t), 1.0 / t)


def single_column(t: int = T, column: int = 0) -> torch.Tensor:
    a = torch.zeros(t, t)
    a[:, column] = 1.0
    return a


def diagonal(t: int = T) -> torch.Tensor:
    return torch.eye(t)


def causal_uniform(t: int = T) -> torch.Tensor:
    a = torch.ones(t, t).tril()
    return a / a.sum(-1, keepdim=True)


def probe_layer(heads: list[torch.Tensor], settings: LazySettings, sequences: int = 3):
    """Feed one layer's heads (the same matrices for each sequence) through the probe, as the
    model's observer would, and summarise."""
    probs = torch.stack(heads).unsqueeze(0).expand(sequences, -1, -1, -1)
    model = Transformer(ModelConfig(vocab_size=16, n_layer=1, n_head=len(heads), d_model=8 * len(heads),
                                    ffn_hidden=16, max_seq_len=T))
    probe = AttentionProbe(model, settings)
    probe.observe(0, probs)
    stats = probe.stats()
    return stats, summarise(stats, settings)[0]


def test_uniform_attention_is_rank_one_and_lazy():
    assert approximate_rank(uniform()).item() == 1
    # Uniform attention spreads its mass over every column: m* is 90% of them, not 1.
    assert column_mass(uniform()).item() == math.ceil(0.9 * T)
    stats, layer = probe_layer([uniform()] * 4, LazySettings())
    assert (stats.k_star == 1).all()
    assert layer.k_star_median == [1, 1, 1, 1]
    assert layer.degenerate == [True] * 4 and layer.lazy


def test_single_column_attention_has_k_and_m_of_one_and_is_lazy():
    a = single_column(column=0)
    assert approximate_rank(a).item() == 1
    assert column_mass(a).item() == 1
    stats, layer = probe_layer([single_column(column=c) for c in (0, 0, 3, 7)], LazySettings())
    assert (stats.k_star == 1).all() and (stats.m_star == 1).all()
    assert layer.m_star_median == [1, 1, 1, 1] and layer.lazy


def test_diagonal_attention_has_full_rank_and_is_not_lazy():
    # All singular values equal: 90% of the variance needs 90% of them, and all of them at 100%.
    assert approximate_rank(diagonal()).item() == math.ceil(0.9 * T)
    assert approximate_rank(diagonal(), threshold=1.0).item() == T
    assert approximate_rank(diagonal(10), threshold=0.9).item() == 9  # exactly 90%: rounding is not a miss
    assert column_mass(diagonal()).item() == math.ceil(0.9 * T)
    stats, layer = probe_layer([diagonal()] * 4, LazySettings(rank_threshold=1.0))
    assert (stats.k_star == T).all()
    assert layer.degenerate == [False] * 4 and not layer.lazy


def test_causal_uniform_attention_is_not_degenerate():
    """Averaging over all earlier tokens (an untrained model's attention) is not rank 1: the
    lower-triangular matrix has full rank and k* measures its spread of singular values."""
    a = causal_uniform()
    k, m = approximate_rank(a).item(), column_mass(a).item()
    assert 1 < k < T and 1 < m < T
    singular = torch.linalg.svdvals(a.double()).square()
    assert singular[:k].sum() >= 0.9 * singular.sum() > singular[:k - 1].sum()


def test_lazy_fraction_and_thresholds_are_configurable():
    heads = [single_column(), single_column(), uniform(), diagonal()]
    _, layer = probe_layer(heads, LazySettings())
    assert layer.degenerate == [True, True, True, False]
    assert layer.degenerate_share == 0.75 and not layer.lazy
    _, layer = probe_layer(heads, LazySettings(lazy_fraction=0.75))
    assert layer.lazy
    # With m* <= 30 counting as degenerate, the diagonal head (m* = 29) is degenerate too.
    _, layer = probe_layer(heads, LazySettings(degenerate_columns=30))
    assert layer.degenerate == [True] * 4 and layer.lazy
    # A head with k* = 1 is no longer degenerate when both limits are 0.
    _, layer = probe_layer(heads, LazySettings(degenerate_rank=0, degenerate_columns=0))
    assert layer.degenerate == [False] * 4


def test_median_over_sequences_decides():
    # Two sequences of three single-column, one of diagonal: the head is degenerate.
    probs = torch.stack([single_column(), single_column(), diagonal()]).unsqueeze(1)  # [3 seqs, 1 head]
    cfg = ModelConfig(vocab_size=16, n_layer=1, n_head=1, d_model=8, ffn_hidden=16, max_seq_len=T)
    model = Transformer(cfg)
    probe = AttentionProbe(model, LazySettings())
    probe.observe(0, probs)
    stats = probe.stats()
    assert stats.k_star[0, 0].tolist() == [1, 1, math.ceil(0.9 * T)]
    layer = summarise(stats, LazySettings())[0]
    assert layer.k_star_median == [1] and layer.lazy
    assert layer.k_star_mean[0] == pytest.approx((2 + math.ceil(0.9 * T)) / 3)


def test_bad_settings_are_refused():
    from scion.errors import ScionError

    for bad in (LazySettings(rank_threshold=0), LazySettings(mass_threshold=1.5),
                LazySettings(lazy_fraction=-1), LazySettings(degenerate_rank=-1)):
        with pytest.raises(ScionError):
            bad.validate()


# ---- a real model ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def peaky_model() -> Transformer:
    """A small random model with large query/key weights, so its attention is far from uniform
    and k*, m* vary across heads and layers (GQA and RoPE included)."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, n_layer=3, n_head=4, n_kv_head=2, d_model=32, ffn_hidden=64,
                      max_seq_len=24)
    model = Transformer(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    with torch.no_grad():
        for block in model.blocks:
            block.attn.q_proj.weight.mul_(40)
            block.attn.k_proj.weight.mul_(40)
    return model.eval()


def test_results_do_not_depend_on_batching(peaky_model):
    tokens = torch.randint(0, 97, (6, 24), generator=torch.Generator().manual_seed(1))
    settings = LazySettings()
    keep = {0: [0, 3], 2: [1]}
    runs = [measure_attention(peaky_model, tokens.split(size), settings, keep=keep) for size in (6, 4, 1)]
    first = runs[0]
    assert first.k_star.shape == (3, 4, 6) and first.seq_len == 24
    assert len(np.unique(first.k_star)) > 3, "the model's attention should vary across heads"
    for other in runs[1:]:
        np.testing.assert_array_equal(other.k_star, first.k_star)
        np.testing.assert_array_equal(other.m_star, first.m_star)
        assert summarise(other, settings) == summarise(first, settings)
        assert other.heatmaps.keys() == first.heatmaps.keys() == {(0, 0), (0, 3), (2, 1)}
        for key in first.heatmaps:
            np.testing.assert_allclose(other.heatmaps[key], first.heatmaps[key], atol=1e-6)
    # The observers are gone afterwards: the model is back on its fused attention path.
    assert all(block.attn.observer is None for block in peaky_model.blocks)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(peaky_model):
    """On a GPU the probabilities and the float64 SVD run there; the integers agree with the CPU's."""
    import copy

    tokens = torch.randint(0, 97, (4, 24), generator=torch.Generator().manual_seed(4))
    settings = LazySettings()
    cpu = measure_attention(peaky_model, [tokens], settings)
    gpu_model = copy.deepcopy(peaky_model).cuda()
    gpu = measure_attention(gpu_model, tokens.cuda().split(3), settings)
    np.testing.assert_array_equal(gpu.k_star, cpu.k_star)
    np.testing.assert_array_equal(gpu.m_star, cpu.m_star)
    q_cpu, _ = qk_grad_norms(peaky_model, [(tokens[:, :-1], tokens[:, 1:])])
    q_gpu, _ = qk_grad_norms(gpu_model, [(tokens[:, :-1].cuda(), tokens[:, 1:].cuda())])
    assert q_gpu == pytest.approx(q_cpu, rel=1e-3)


def test_observed_attention_matches_the_model(peaky_model):
    """The probabilities the probe reduces are the model's own: rows sum to one, causal, and the
    explicit path gives the same logits as scaled_dot_product_attention."""
    tokens = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(2))
    seen = {}
    with torch.no_grad():
        plain = peaky_model(tokens)
        with AttentionProbe(peaky_model, LazySettings()) as probe:
            original = probe.observe

            def spy(layer, probs):
                seen[layer] = probs.clone()
                original(layer, probs)

            for block in peaky_model.blocks:
                block.attn.observer = spy
            observed = peaky_model(tokens)
    torch.testing.assert_close(observed, plain, atol=1e-4, rtol=1e-4)
    assert sorted(seen) == [0, 1, 2]
    for probs in seen.values():
        assert probs.shape == (2, 4, 24, 24)
        torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 24))
        assert (probs.triu(diagonal=1) == 0).all()


def test_qk_gradient_norms(peaky_model):
    tokens = torch.randint(0, 97, (4, 25), generator=torch.Generator().manual_seed(3))
    flags = [p.requires_grad for p in peaky_model.parameters()]
    q, k = qk_grad_norms(peaky_model, [(tokens[:2, :-1], tokens[:2, 1:]), (tokens[2:, :-1], tokens[2:, 1:])])
    assert len(q) == len(k) == 3
    assert all(math.isfinite(v) and v > 0 for v in q + k)
    # Same as computing one batch's gradient by hand.
    q1, _ = qk_grad_norms(peaky_model, [(tokens[:2, :-1], tokens[:2, 1:])])
    loss = peaky_model(tokens[:2, :-1], tokens[:2, 1:])
    manual = torch.autograd.grad(loss, peaky_model.blocks[1].attn.q_proj.weight)[0].norm().item()
    assert q1[1] == pytest.approx(manual, rel=1e-5)
    assert [p.requires_grad for p in peaky_model.parameters()] == flags
    assert all(p.grad is None for p in peaky_model.parameters())


# ---- the command ----------------------------------------------------------------------------


def test_lazy_command_on_runs(run_scion, tiny_run, tmp_path):
    out = tmp_path / "cmp"
    proc = run_scion("lazy", tiny_run, tiny_run, "--names", "deep,shallow", "--out", out, "--num-seqs", "4",
                     "--batch-size", "3", "--grad-batches", "1", "--layers", "0,-1", "--heads", "0")
    assert "lazy layers:" in proc.stdout and "|dL/dWq|" in proc.stdout
    for name in ("0-deep", "1-shallow"):
        report = json.loads((out / name / "lazy.json").read_text())
        assert report["format"] == "scion-lazy/1"
        assert report["summary"]["n_layer"] == 2 and report["data"]["sequences"] == 4
        assert report["data"]["seq_len"] == 64  # the run's training length
        assert "validation split" in report["data"]["source"]
        layer = report["layers"][0]
        assert len(layer["k_star"]) == 4 and len(layer["k_star"][0]) == 4  # heads x sequences
        assert layer["grad_norm_q"] > 0
        for png in ("layers.png", "heatmaps.png"):
            assert (out / name / png).stat().st_size > 1000
    assert (out / "compare.png").stat().st_size > 1000
    assert len(json.loads((out / "compare.json").read_text())) == 2


def test_lazy_command_on_text_writes_into_the_run(run_scion, tiny_run, corpus, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)  # the shared run stays as it is
    proc = run_scion("lazy", run, "--data", corpus / "part0.txt", "--num-seqs", "2", "--seq-len", "16")
    report = json.loads((run / "lazy" / "lazy.json").read_text())
    assert report["data"]["seq_len"] == 16 and report["data"]["sequences"] == 2
    assert "part0.txt" in report["data"]["source"]
    assert "lazy layers:" in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["{missing}", "--out", "{out}"], "nope"),
    (["{run}", "--out", "{out}", "--rank-threshold", "1.5"], "--rank-threshold must be in (0, 1]"),
    (["{run}", "--out", "{out}", "--layers", "7"], "--layers: 7 is out of range"),
    (["{run}", "--out", "{out}", "--num-seqs", "0"], "--num-seqs must be positive"),
    (["{run}", "{run}"], "--out is needed"),
    (["{run}", "--out", "{out}", "--seq-len", "999"], "--seq-len 999"),
    (["{run}", "--out", "{out}", "--checkpoint", "12345"], "no checkpoint '12345'"),
    (["{run}", "--out", "{busy}"], "not empty and not an earlier scion lazy output"),
])
def test_lazy_command_errors(tiny_run, tmp_path, capsys, args, message):
    from scion.cli.main import main

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    paths = {"missing": tmp_path / "nope", "run": tiny_run, "out": tmp_path / "o", "busy": busy}
    code = main(["lazy", *[a.format(**paths) for a in args]])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]


# ---- models that are not scion runs: through scion.interop ----------------------------------


def test_foreign_model_goes_through_interop(monkeypatch, tmp_path, tiny_run, corpus, capsys):
    """A folder that is not a scion run is handed to scion.interop.load_reference; here a stand-in
    returns the tiny run's model, and the analysis reads raw text with the returned tokenizer."""
    import sys
    import types

    from scion.cli.main import main
    from scion.run import load_model

    hf_folder = tmp_path / "hf-model"
    hf_folder.mkdir()
    asked = []

    def load_reference(source):
        asked.append(source)
        loaded = load_model(tiny_run)
        return loaded.model, loaded.tokenizer, loaded.config

    monkeypatch.setitem(sys.modules, "scion.interop", types.SimpleNamespace(load_reference=load_reference))
    out = tmp_path / "out"
    assert main(["lazy", str(hf_folder), "--data", str(corpus), "--num-seqs", "3", "--out", str(out)]) == 0
    assert asked == [str(hf_folder)]
    report = json.loads((out / "lazy.json").read_text())
    assert report["model"]["name"] == "hf-model" and report["data"]["sequences"] == 3
    # Without --data there is no validation split to fall back on: one clear line.
    capsys.readouterr()
    assert main(["lazy", str(hf_folder), "--out", str(out)]) == 2
    assert "pass --data" in capsys.readouterr().err


def test_foreign_model_without_interop(monkeypatch, tmp_path, capsys):
    import sys

    from scion.cli.main import main

    monkeypatch.setitem(sys.modules, "scion.interop", None)  # importing it raises ImportError
    folder = tmp_path / "hf-model"
    folder.mkdir()
    assert main(["lazy", str(folder), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "not a scion run" in err and "scion.interop" in err and len(err.strip().splitlines()) == 1


def test_squared_singular_values_match_the_svd():
    from scion.analysis.attention import squared_singular_values

    g = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 40, 40, generator=g) * 3
    probs = logits.masked_fill(~torch.ones(40, 40, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
    for a in (probs, probs[:, :, :25], probs[:, :25, :]):  # square, wide and tall
        expected = torch.linalg.svdvals(a.double()).square()
        got = squared_singular_values(a)
        n = expected.size(-1)
        torch.testing.assert_close(got[..., :n], expected, atol=1e-12, rtol=0)
        assert (got[..., n:].abs() < 1e-12).all()
