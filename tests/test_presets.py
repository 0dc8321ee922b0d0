"""The papers' recipes as presets: token budgets, schedules and in-training evaluation as
published (DMaS-LLaMa-Lite: about 20B tokens, HellaSwag every 250 steps; TinyLlama: 3T tokens,
LR 4e-4 with 2,000 warm-up steps, cosine to 4e-5, about 2M tokens a step), and the shipped YAML
configs agree with them."""

from __future__ import annotations

from pathlib import Path

import pytest

from scion.config import load_yaml, preset
from scion.errors import ScionError
from scion.train.optim import lr_at

CONFIGS = Path(__file__).parents[1] / "configs"


def tokens(cfg) -> int:
    return cfg.train.max_steps * cfg.train.tokens_per_step


def test_dmas_trains_about_20b_tokens_with_hellaswag_every_250_steps():
    t = preset("dmas-llama-lite-1.7b").train
    assert t.tokens_per_step == 524_288 and t.max_steps == 38_147
    assert tokens(preset("dmas-llama-lite-1.7b")) == pytest.approx(20e9, rel=1e-3)
    assert (t.lr, t.min_lr, t.warmup_steps, t.weight_decay, t.grad_clip) == (6e-4, 6e-5, 715, 0.1, 1.0)
    assert (t.beta1, t.beta2) == (0.9, 0.95)
    assert t.eval_tasks == ["hellaswag"] and t.eval_tasks_every == 250 and t.eval_tasks_limit is None


def test_tinyllama_has_its_published_hyperparameters():
    cfg = preset("tinyllama-1.1b")
    t = cfg.train
    assert t.tokens_per_step == 2 * 1024 * 1024  # 1,024 sequences of 2,048 tokens: "about 2M tokens"
    assert t.tokens_per_step == 1024 * cfg.model.max_seq_len
    assert tokens(cfg) == pytest.approx(3e12, rel=1e-3)  # 3T tokens
    assert (t.lr, t.min_lr, t.warmup_steps, t.weight_decay, t.grad_clip) == (4e-4, 4e-5, 2000, 0.1, 1.0)


@pytest.mark.parametrize("name, peak, floor, warmup", [("dmas-llama-lite-1.7b", 6e-4, 6e-5, 715),
                                                        ("tinyllama-1.1b", 4e-4, 4e-5, 2000)])
def test_schedule_warms_up_linearly_then_decays_by_cosine_to_the_floor(name, peak, floor, warmup):
    t = preset(name).train
    assert lr_at(0, t) == pytest.approx(peak / warmup)
    assert lr_at(warmup - 1, t) == pytest.approx(peak)
    assert lr_at(warmup, t) == pytest.approx(peak)
    middle = warmup + (t.max_steps - warmup) // 2
    assert lr_at(middle, t) == pytest.approx((peak + floor) / 2, rel=1e-3)
    assert lr_at(t.max_steps, t) == pytest.approx(floor)
    lrs = [lr_at(s, t) for s in range(warmup, t.max_steps + 1, 997)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))  # never rises after the warm-up


@pytest.mark.parametrize("name", ["dmas-llama-lite-1.7b", "tinyllama-1.1b"])
def test_the_shipped_config_trains_as_the_preset(name):
    shipped, named = load_yaml(CONFIGS / f"{name}.yaml"), preset(name)
    fields = ("max_steps", "tokens_per_step", "lr", "min_lr", "warmup_steps", "weight_decay", "grad_clip",
              "eval_tasks", "eval_tasks_every")
    assert {f: getattr(shipped.train, f) for f in fields} == {f: getattr(named.train, f) for f in fields}
    assert shipped.model == named.model


def test_a_sentencepiece_only_tokenizer_folder_says_what_to_install(tmp_path, monkeypatch):
    import importlib.util

    from scion.tokenizer import load_tokenizer

    folder = tmp_path / "llama-2-tokenizer"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(b"\x0a\x0bnot a real model")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "sentencepiece" else real(name, *a))
    with pytest.raises(ScionError) as e:
        load_tokenizer(folder)
    assert str(folder) in str(e.value) and "pip install sentencepiece" in str(e.value)
    assert "\n" not in str(e.value)
