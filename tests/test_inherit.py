"""Inheritune: weight surgery checked against its definitions, the distillation losses against
hand computation, and growth (including an exact resume mid-round)."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import pytest
import torch

from scion import checkpoint as ckpt
from scion.config import ModelConfig, RunConfig, TrainConfig
from scion.errors import ScionError
from scion.inherit.distill import DistillLoss, capture_final_hidden, cosine_term, kd_loss
from scion.inherit.init import (
    InheritSpec,
    distilbert_student,
    fresh,
    grow,
    half_width,
    half_width_config,
    hybrid_stack,
    inherit,
    stack,
    strided_blocks,
)

# Trains or runs at --precision auto: `make test-bf16` runs these again with auto forced to bf16.
pytestmark = pytest.mark.precision

LLAMA = ModelConfig(name="ref", vocab_size=96, n_layer=6, n_head=4, n_kv_head=2, d_model=32, ffn_hidden=48,
                    max_seq_len=16)
GPT2 = dataclasses.replace(LLAMA, name="gpt", n_kv_head=None, norm="layernorm", mlp="gelu",
                           position="learned", tie_embeddings=True, attn_scale_inverse_layer=True, bias=True)


def trained_like(cfg: ModelConfig, seed: int = 7) -> torch.nn.Module:
    """A model whose every weight (norms included) is random, so no copy can match by accident."""
    model = fresh(cfg, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def block_params(model, i: int, part: str) -> dict[str, torch.Tensor]:
    attrs = {"attn": ["attn"], "mlp": ["mlp"], "norms": ["attn_norm", "mlp_norm"]}[part]
    block = model.blocks[i]
    return {f"{a}.{k}": v for a in attrs for k, v in getattr(block, a).state_dict().items()}


def outer_params(model, part: str) -> dict[str, torch.Tensor]:
    if part == "embed":
        out = {"embed": model.embed.weight}
        if model.cfg.position == "learned":
            out["pos_embed"] = model.pos_embed.weight
        return out
    if part == "final_norm":
        return dict(model.norm.state_dict())
    return {"lm_head": model.lm_head.weight}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def assert_all_differ(a: dict, b: dict) -> None:
    for k in a:
        assert not torch.equal(a[k], b[k]), k


# ---- inherit ---------------------------------------------------------------------------------

SPECS = [
    InheritSpec(),
    InheritSpec(attn=False),
    InheritSpec(mlp=False),
    InheritSpec(norms=False),
    InheritSpec(embed=False, final_norm=False),  # what the paper's released code did for LLaMA
    InheritSpec(lm_head=False),
    InheritSpec(layers=4, attn=False, mlp=False, norms=False),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_inherited_parts_are_the_references_bit_for_bit_and_the_rest_fresh(spec):
    ref = trained_like(LLAMA)
    target = inherit(ref, spec, seed=3)
    n = spec.resolve_layers(LLAMA.n_layer)
    assert target.cfg.n_layer == n == (spec.layers or 3)
    init = fresh(target.cfg, 3)  # what every re-initialised part must equal
    for part in ("embed", "final_norm", "lm_head"):
        if getattr(spec, part):
            assert_same(outer_params(target, part), outer_params(ref, part))
        else:
            assert_same(outer_params(target, part), outer_params(init, part))
            if part != "final_norm":  # a fresh norm is all ones; the reference's is not
                assert_all_differ(outer_params(target, part), outer_params(ref, part))
    for i in range(n):
        for part in ("attn", "mlp", "norms"):
            got = block_params(target, i, part)
            if getattr(spec, part):
                assert_same(got, block_params(ref, i, part))
            else:
                assert_same(got, block_params(init, i, part))
                assert_all_differ(got, block_params(ref, i, part))


@pytest.mark.parametrize("spec, inherited", [
    (InheritSpec(mlp=False, mlp_norm=False), {"attn", "attn_norm"}),  # attention with its norm
    (InheritSpec(attn=False, attn_norm=False), {"mlp", "mlp_norm"}),  # the MLP with its norm
    (InheritSpec(attn_norm=False), {"attn", "mlp", "mlp_norm"}),
    (InheritSpec(mlp_norm=False), {"attn", "mlp", "attn_norm"}),
    (InheritSpec(norms=False, attn_norm=True), {"attn", "mlp"}),  # --no-norms covers both
], ids=lambda x: x.describe() if isinstance(x, InheritSpec) else "")
def test_each_norm_of_a_block_is_inherited_or_not_on_its_own(spec, inherited):
    ref = trained_like(LLAMA)
    target = inherit(ref, spec, seed=3)
    init = fresh(target.cfg, 3)
    assert set(spec.block_parts()) == inherited
    for i in range(target.cfg.n_layer):
        for attr in ("attn", "mlp", "attn_norm", "mlp_norm"):
            got = dict(getattr(target.blocks[i], attr).state_dict())
            source = ref if attr in inherited else init
            assert_same(got, dict(getattr(source.blocks[i], attr).state_dict()))


def test_inherit_gpt2_style_takes_position_embedding_and_tied_head():
    ref = trained_like(GPT2)
    target = inherit(ref, InheritSpec(), seed=0)
    assert torch.equal(target.pos_embed.weight, ref.pos_embed.weight)
    assert target.lm_head.weight is target.embed.weight  # still tied
    assert torch.equal(target.lm_head.weight, ref.lm_head.weight)
    for i in range(3):
        assert_same(dict(target.blocks[i].state_dict()), dict(ref.blocks[i].state_dict()))
    with pytest.raises(ScionError, match="ties the output head"):
        inherit(ref, InheritSpec(lm_head=False), seed=0)


@pytest.mark.parametrize("blocks, layers, expected", [
    ("first", 3, [0, 1, 2]),
    ("last", 3, [3, 4, 5]),
    ("spaced", 3, [0, 2, 5]),  # round(i * 5 / 2): 0, 2.5 -> 2, 5
    ("spaced", 1, [0]),
    ("4,0,2", None, [4, 0, 2]),  # a list: its length is the depth, its order the target's
])
def test_inherit_takes_the_blocks_asked_for_bit_for_bit(blocks, layers, expected):
    ref = trained_like(LLAMA)  # 6 layers
    spec = InheritSpec(layers=layers, blocks=blocks)
    assert spec.block_indices(6) == expected
    target = inherit(ref, spec, seed=0)
    assert target.cfg.n_layer == len(expected)
    for i, source in enumerate(expected):
        assert_same(dict(target.blocks[i].state_dict()), dict(ref.blocks[source].state_dict()))


@pytest.mark.parametrize("blocks, layers, message", [
    ("0,9", None, "between 0 and 5"),
    ("1,1", None, "each block once"),
    ("0,1,2", 2, "lists 3 blocks but --layers is 2"),
    ("some", None, "use first, last, spaced, strided, healthy"),
])
def test_inherit_refuses_a_bad_block_choice(blocks, layers, message):
    with pytest.raises(ScionError, match=message):
        inherit(trained_like(LLAMA), InheritSpec(layers=layers, blocks=blocks), seed=0)


def test_healthy_blocks_skip_the_ones_scion_lazy_marks_lazy(tmp_path):
    from scion.inherit.recipe import resolve_blocks
    from scion.inherit.runs import Reference

    ref = trained_like(LLAMA)
    run = tmp_path / "ref"
    (run / "lazy").mkdir(parents=True)
    lazy = {1, 3}
    report = {"layers": [{"layer": i, "lazy": i in lazy} for i in range(6)]}
    (run / "lazy" / "lazy.json").write_text(json.dumps(report))
    reference = Reference(ref, None, RunConfig(model=ref.cfg), str(run), None, None)
    spec = resolve_blocks(InheritSpec(layers=3, blocks="healthy"), reference)
    assert spec.blocks == "0,2,4" and spec.block_indices(6) == [0, 2, 4]
    target = inherit(ref, spec, seed=0)
    for i, source in enumerate([0, 2, 4]):
        assert_same(dict(target.blocks[i].state_dict()), dict(ref.blocks[source].state_dict()))
    with pytest.raises(ScionError, match="only 4 of the reference's 6 blocks are not lazy"):
        resolve_blocks(InheritSpec(layers=5, blocks="healthy"), reference)
    (run / "lazy" / "lazy.json").unlink()
    with pytest.raises(ScionError, match="needs its lazy-layer report; run `scion lazy"):
        resolve_blocks(InheritSpec(layers=3, blocks="healthy"), reference)


@pytest.mark.parametrize("mode", ["restart", "continue"])
def test_growth_rounds_start_as_their_mode_says(reference_run, corpus, tmp_path, monkeypatch, mode):
    """restart (the paper): round r is the reference's first n + step(r-1) blocks afresh, from step
    0 of a new schedule and the start of the data; continue: round r is round r-1's trained model
    with the reference's next blocks appended, on the next data."""
    import scion.inherit.grow as growth
    from scion.inherit.grow import GrowSettings, run_grow
    from scion.inherit.runs import load_reference

    starts = []  # per round: (initial weights, depth, provenance, steps trained, trained weights)
    real = growth.train_run

    def copy_state(model):
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    def recording(cfg, run_dir, init, *args, **kwargs):
        made = {}

        def snapshot():
            model = init()
            made["start"], made["depth"] = copy_state(model), model.cfg.n_layer
            return model

        trainer = real(cfg, run_dir, snapshot, *args, **kwargs)
        starts.append((made["start"], made["depth"], kwargs["provenance"], trainer.state.step,
                       copy_state(trainer.model)))
        return trainer

    monkeypatch.setattr(growth, "train_run", recording)
    settings = GrowSettings(reference=str(reference_run), spec=InheritSpec(layers=1), step=1, mode=mode,
                            until="depth")
    rows = run_grow(tmp_path / "g", settings, tiny_cfg(corpus, 3, 4), progress=False)
    assert [r.layers for r in rows] == [1, 2, 3] and all(r.steps == 4 for r in rows)
    ref = load_reference(str(reference_run)).model
    reference = ref.state_dict()
    for r, (start, depth, provenance, steps, _) in enumerate(starts, start=1):
        assert depth == r and steps == 4  # each round: its own run, T steps from step 0
        if mode == "restart" or r == 1:
            for key in start:  # the reference's first r blocks, embedding, final norm and head
                assert torch.equal(start[key], reference[key]), key
            assert provenance["blocks_from_reference"] == list(range(r))
            assert provenance["data_offset_samples"] == 0
        else:
            for key, value in starts[r - 2][4].items():  # every weight of the previous round, as trained
                assert torch.equal(start[key], value), key
            for key in (k for k in start if k.startswith(f"blocks.{r - 1}.")):  # + the next reference block
                assert torch.equal(start[key], reference[key]), key
            assert provenance["blocks_from_reference"] == [r - 1] and provenance["data_offset_samples"] > 0
        assert provenance["mode"] == mode


def test_growth_starts_from_the_first_blocks_only():
    from scion.inherit.grow import GrowSettings

    with pytest.raises(ScionError, match="growth appends the reference's next blocks"):
        GrowSettings(reference="r", spec=InheritSpec(layers=2, blocks="last")).validate(6)


def test_inherit_rejects_bad_layer_counts():
    ref = trained_like(LLAMA)
    for n in (0, 7):
        with pytest.raises(ScionError, match="--layers must be between 1"):
            inherit(ref, InheritSpec(layers=n), seed=0)


def test_inherited_model_computes_what_the_reference_prefix_computes():
    """With every part inherited, the target's logits are the reference's with its last blocks cut."""
    ref = trained_like(LLAMA).eval()
    target = inherit(ref, InheritSpec(layers=2), seed=0).eval()
    x = torch.randint(0, LLAMA.vocab_size, (2, 10))
    cut = trained_like(LLAMA).eval()
    cut.load_state_dict(ref.state_dict())
    cut.blocks = cut.blocks[:2]
    torch.testing.assert_close(target(x), cut(x), rtol=0, atol=0)


# ---- growth and the baselines' initialisations ----------------------------------------------


def test_growth_appends_the_references_next_blocks_in_order():
    ref = trained_like(LLAMA)
    model = trained_like(dataclasses.replace(LLAMA, n_layer=2), seed=11)  # a "trained" 2-layer target
    grown = grow(model, ref, 2, seed=0)
    assert grown.cfg.n_layer == 4
    for i in range(2):
        assert_same(dict(grown.blocks[i].state_dict()), dict(model.blocks[i].state_dict()))
    for i in (2, 3):
        assert_same(dict(grown.blocks[i].state_dict()), dict(ref.blocks[i].state_dict()))
    for part in ("embed", "final_norm", "lm_head"):
        assert_same(outer_params(grown, part), outer_params(model, part))
    again = grow(grown, ref, 2, seed=0)
    for i in (4, 5):
        assert_same(dict(again.blocks[i].state_dict()), dict(ref.blocks[i].state_dict()))
    with pytest.raises(ScionError, match="the reference has only 6"):
        grow(again, ref, 1, seed=0)


def test_stacking_repeats_the_models_own_blocks():
    small = trained_like(dataclasses.replace(LLAMA, n_layer=3))
    stacked = stack(small, seed=0)
    assert stacked.cfg.n_layer == 6
    for i in range(6):
        assert_same(dict(stacked.blocks[i].state_dict()), dict(small.blocks[i % 3].state_dict()))
    assert torch.equal(stacked.embed.weight, small.embed.weight)


def test_hybrid_stacking_repeats_the_references_first_half():
    ref = trained_like(LLAMA)
    model = hybrid_stack(ref, 4, seed=0)
    assert [i % 2 for i in range(4)] == [0, 1, 0, 1]
    for i in range(4):
        assert_same(dict(model.blocks[i].state_dict()), dict(ref.blocks[i % 2].state_dict()))
    assert torch.equal(model.lm_head.weight, ref.lm_head.weight)


def test_distilbert_student_takes_every_other_block_at_half_depth():
    ref = trained_like(LLAMA)
    model = distilbert_student(ref, seed=0)
    assert model.cfg.n_layer == 3
    for i, j in enumerate((0, 2, 4)):
        assert_same(dict(model.blocks[i].state_dict()), dict(ref.blocks[j].state_dict()))


def test_distilbert_student_of_16_from_24_takes_two_blocks_of_every_three():
    # The documented rule, block floor(i k / n): the paper's 16-layer student of GPT-2 medium.
    assert strided_blocks(24, 16) == [0, 1, 3, 4, 6, 7, 9, 10, 12, 13, 15, 16, 18, 19, 21, 22]
    assert strided_blocks(24, 12) == list(range(0, 24, 2))  # DistilBERT's own case
    assert strided_blocks(6, 6) == list(range(6))
    ref = trained_like(LLAMA)  # 6 blocks; a 4-block student takes 0, 1, 3, 4
    model = distilbert_student(ref, seed=0, layers=4)
    for i, j in enumerate((0, 1, 3, 4)):
        assert_same(dict(model.blocks[i].state_dict()), dict(ref.blocks[j].state_dict()))
    assert torch.equal(model.embed.weight, ref.embed.weight)
    assert InheritSpec(layers=4, blocks="strided").block_indices(6) == [0, 1, 3, 4]


@pytest.mark.parametrize("cfg", [LLAMA, GPT2], ids=["llama-gqa", "gpt2-bias"])
def test_half_width_is_the_leading_corner_of_every_weight(cfg):
    ref = trained_like(cfg)
    half = half_width(ref, seed=0)
    hc = half_width_config(cfg)
    hd = cfg.dim_per_head  # 8: heads keep their size
    assert (hc.n_layer, hc.d_model, hc.n_head, hc.kv_heads, hc.dim_per_head, hc.ffn_hidden) == (
        6, 16, 2, cfg.kv_heads // 2, hd, 24,
    )
    d, f, q, kv = 16, 24, 2 * hd, (cfg.kv_heads // 2) * hd
    for i in range(6):
        a, b = half.blocks[i], ref.blocks[i]
        assert torch.equal(a.attn.q_proj.weight, b.attn.q_proj.weight[:q, :d])  # heads 0 and 1
        assert torch.equal(a.attn.k_proj.weight, b.attn.k_proj.weight[:kv, :d])
        assert torch.equal(a.attn.v_proj.weight, b.attn.v_proj.weight[:kv, :d])
        assert torch.equal(a.attn.o_proj.weight, b.attn.o_proj.weight[:d, :q])
        assert torch.equal(a.mlp.up_proj.weight, b.mlp.up_proj.weight[:f, :d])
        assert torch.equal(a.mlp.down_proj.weight, b.mlp.down_proj.weight[:d, :f])
        assert torch.equal(a.attn_norm.weight, b.attn_norm.weight[:d])
        assert torch.equal(a.mlp_norm.weight, b.mlp_norm.weight[:d])
        if cfg.mlp == "swiglu":
            assert torch.equal(a.mlp.gate_proj.weight, b.mlp.gate_proj.weight[:f, :d])
        if cfg.bias:
            assert torch.equal(a.attn.q_proj.bias, b.attn.q_proj.bias[:q])
            assert torch.equal(a.attn.o_proj.bias, b.attn.o_proj.bias[:d])
            assert torch.equal(a.mlp.down_proj.bias, b.mlp.down_proj.bias[:d])
            assert torch.equal(a.attn_norm.bias, b.attn_norm.bias[:d])
    assert torch.equal(half.embed.weight, ref.embed.weight[:, :d])
    assert torch.equal(half.lm_head.weight, ref.lm_head.weight[:, :d])
    assert torch.equal(half.norm.weight, ref.norm.weight[:d])
    if cfg.position == "learned":
        assert torch.equal(half.pos_embed.weight, ref.pos_embed.weight[:, :d])
    half(torch.randint(0, cfg.vocab_size, (1, 5)))  # a working model


def test_half_width_rounds_an_odd_head_count_up():
    # GPT-2 xl: 25 heads of 64 over 1600 features -> 13 heads of 64 over an 800-wide stream.
    xl = half_width_config(dataclasses.replace(GPT2, n_head=25, n_kv_head=None, d_model=1600, ffn_hidden=6400))
    assert (xl.d_model, xl.n_head, xl.kv_heads, xl.dim_per_head, xl.ffn_hidden) == (800, 13, 13, 64, 3200)
    # Grouped-query attention keeps whole groups: 3 KV heads with 2 queries each -> 2 KV heads, 4 queries.
    gqa = half_width_config(dataclasses.replace(LLAMA, n_head=6, n_kv_head=3, d_model=48))
    assert (gqa.n_head, gqa.kv_heads, gqa.dim_per_head) == (4, 2, 8)
    mqa = half_width_config(dataclasses.replace(LLAMA, n_head=5, n_kv_head=1, d_model=40))
    assert (mqa.n_head, mqa.kv_heads) == (3, 1)


def test_half_width_of_a_qwen_style_model_keeps_per_head_norms_and_qkv_biases():
    cfg = dataclasses.replace(LLAMA, qk_norm=True, qkv_bias=True, tie_embeddings=True)
    ref = trained_like(cfg)
    half = half_width(ref, seed=0)
    for a, b in zip(half.blocks, ref.blocks, strict=True):
        assert torch.equal(a.attn.q_norm.weight, b.attn.q_norm.weight)
        assert torch.equal(a.attn.k_proj.bias, b.attn.k_proj.bias[: a.attn.k_proj.bias.numel()])
    half(torch.randint(0, cfg.vocab_size, (1, 5)))


@pytest.mark.parametrize("heads", [(5, None), (6, 3)], ids=["mha-odd", "gqa-odd-kv"])
def test_half_width_with_odd_heads_is_the_leading_corner(heads):
    n_head, n_kv = heads
    cfg = dataclasses.replace(LLAMA, n_head=n_head, n_kv_head=n_kv, d_model=8 * n_head, ffn_hidden=48)
    ref = trained_like(cfg)
    half = half_width(ref, seed=0)
    hc = half.cfg
    hd, d = cfg.dim_per_head, cfg.d_model // 2
    q, kv = hc.n_head * hd, hc.kv_heads * hd
    for a, b in zip(half.blocks, ref.blocks, strict=True):
        assert torch.equal(a.attn.q_proj.weight, b.attn.q_proj.weight[:q, :d])
        assert torch.equal(a.attn.k_proj.weight, b.attn.k_proj.weight[:kv, :d])
        assert torch.equal(a.attn.o_proj.weight, b.attn.o_proj.weight[:d, :q])
    half(torch.randint(0, cfg.vocab_size, (1, 5)))  # a working model


def test_half_width_refuses_odd_widths():
    with pytest.raises(ScionError, match="even d_model"):
        half_width_config(dataclasses.replace(LLAMA, n_head=6, n_kv_head=3, d_model=51, head_dim=8))


# ---- distillation ----------------------------------------------------------------------------


def test_kd_loss_matches_a_hand_computation():
    student = torch.tensor([[[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]]])
    teacher = torch.tensor([[[0.0, 2.0, 0.0], [1.0, -1.0, 0.0]]])
    targets = torch.tensor([[1, 0]])

    def softmax(v, tau):
        e = [math.exp(x / tau) for x in v]
        return [x / sum(e) for x in e]

    for alpha, tau in [(0.6, 1.0), (0.3, 2.0)]:
        kd, ce = 0.0, 0.0
        for s, t, y in zip(student[0].tolist(), teacher[0].tolist(), targets[0].tolist(), strict=True):
            ps, pt = softmax(s, tau), softmax(t, tau)
            kd += sum(b * (math.log(b) - math.log(a)) for a, b in zip(ps, pt, strict=True))
            ce += -math.log(softmax(s, 1.0)[y])
        expected = alpha * tau**2 * kd / 2 + (1 - alpha) * ce / 2
        assert kd_loss(student, teacher, targets, alpha, tau).item() == pytest.approx(expected, rel=1e-6)


def test_cosine_term_matches_a_hand_computation():
    h_s = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    h_t = torch.tensor([[[0.0, 1.0], [2.0, 2.0]]])
    # cos = 0 and 1: mean of (1 - cos) = (1 + 0) / 2
    assert cosine_term(h_s, h_t).item() == pytest.approx(0.5)


def test_distill_loss_in_the_loop():
    teacher = trained_like(LLAMA).eval()
    student = distilbert_student(teacher, seed=0).train()
    x = torch.randint(0, LLAMA.vocab_size, (2, 8))
    y = torch.randint(0, LLAMA.vocab_size, (2, 8))
    loss_fn = DistillLoss(teacher, alpha=0.6, temperature=1.0, beta=0.5)
    with capture_final_hidden(student) as hs, capture_final_hidden(teacher) as ht:
        expected = kd_loss(student(x), teacher(x), y, 0.6, 1.0) + 0.5 * cosine_term(hs[0], ht[0])
    got = loss_fn(student, (x, y))
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    got.backward()
    assert student.blocks[0].attn.q_proj.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())  # the teacher is frozen
    student.eval()  # validation reports the plain cross-entropy
    assert loss_fn(student, (x, y)).item() == pytest.approx(student(x, y).item())


def test_a_later_round_reads_the_stream_where_the_previous_one_stopped():
    from scion.inherit.runs import Shifted

    class Stream:
        def batch(self, start, size):
            return list(range(start, start + size))

    assert Shifted(Stream(), 16).batch(4, 4) == [20, 21, 22, 23]


# ---- growth runs -----------------------------------------------------------------------------


def tiny_cfg(corpus, layers: int, steps: int) -> RunConfig:
    cfg = RunConfig(
        model=ModelConfig(name="ref", vocab_size=512, n_layer=layers, n_head=4, n_kv_head=2,
                          d_model=64, ffn_hidden=128, max_seq_len=32),
        train=TrainConfig(max_steps=steps, micro_batch_size=4, warmup_steps=1, log_every=1,
                          eval_every=2, eval_batches=2, sample_every=1000, sample_prompts=[],
                          checkpoint_every=2, keep_last=5, device="cpu", precision="fp32"),
    )
    cfg.data.path = [str(corpus)]
    cfg.data.val_fraction = 0.2
    return cfg


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, corpus, cache_dir):
    from scion.pretrain import pretrain

    out = tmp_path_factory.mktemp("inherit") / "ref"
    pretrain(tiny_cfg(corpus, 3, 4), out, resume=False, progress=False)
    return out


def test_grow_resumed_mid_round_matches_an_uninterrupted_run(reference_run, corpus, tmp_path):
    from scion.inherit.grow import GrowSettings, run_grow

    settings = GrowSettings(reference=str(reference_run), spec=InheritSpec(layers=1), step=1, until="depth")
    out = tmp_path / "grow"
    rows = run_grow(out, settings, tiny_cfg(corpus, 3, 4), progress=False)
    assert [r.layers for r in rows] == [1, 2, 3]
    assert json.loads((out / "summary.json").read_text())["rounds"][2]["layers"] == 3
    assert "| 3 | 3 |" in (out / "summary.md").read_text()
    prov = [json.loads((out / f"round-{r}" / "inherit.json").read_text()) for r in (1, 2, 3)]
    assert [p["blocks_from_reference"] for p in prov] == [[0], [1], [2]]
    # Round 2 continues the data where round 1 stopped: 4 steps x 4 sequences.
    assert [p["data_offset_samples"] for p in prov] == [0, 16, 32]
    final = {r: ckpt.load_weights(ckpt.list_checkpoints(out / f"round-{r}")[-1].path) for r in (2, 3)}

    # Stop in the middle of round 2: its last checkpoint (step 4) and round 3 never happened.
    shutil.rmtree(ckpt.list_checkpoints(out / "round-2")[-1].path)
    shutil.rmtree(out / "round-3")
    resumed = run_grow(out, settings, tiny_cfg(corpus, 3, 4), resume=True, progress=False)
    assert [(r.layers, r.val_loss) for r in resumed] == [(r.layers, r.val_loss) for r in rows]
    for r in (2, 3):
        again = ckpt.load_weights(ckpt.list_checkpoints(out / f"round-{r}")[-1].path)
        assert again.keys() == final[r].keys()
        for k in again:
            assert torch.equal(again[k], final[r][k]), (r, k)
    metrics = [json.loads(line) for line in (out / "round-2" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3, 4]  # no duplicated records


def test_grow_stops_at_parity(reference_run, corpus, tmp_path):
    from scion.inherit.grow import GrowSettings, run_grow

    # The reference itself as round 1 (all its layers): parity is met at once or the depth is reached.
    settings = GrowSettings(reference=str(reference_run), spec=InheritSpec(layers=2), step=2)
    rows = run_grow(tmp_path / "g", settings, tiny_cfg(corpus, 3, 4), progress=False)
    assert rows[0].reference_val_loss == rows[-1].reference_val_loss
    if rows[0].val_loss <= rows[0].reference_val_loss:
        assert len(rows) == 1
    else:
        assert [r.layers for r in rows] == [2, 3]  # capped at the reference's depth


# ---- the command line ------------------------------------------------------------------------


def test_cli_inherit_trains_and_records_provenance(run_scion, reference_run, tmp_path):
    out = tmp_path / "t"
    run_scion("inherit", "--reference", reference_run, "--layers", "2", "--out", out, "--max-steps", "2",
              "--no-norms", "--progress", "lines")
    prov = json.loads((out / "inherit.json").read_text())
    assert prov["layers"] == 2 and prov["spec"]["norms"] is False and prov["blocks_from_reference"] == [0, 1]
    assert "n_layer: 2" in (out / "config.yaml").read_text()
    assert ckpt.list_checkpoints(out)[-1].step == 2
    again = run_scion("inherit", "--reference", reference_run, "--out", out, check=False)
    assert again.returncode == 2 and "already exists" in again.stderr
    cont = run_scion("inherit", "--resume", out, "--max-steps", "3", "--progress", "lines")
    assert "resuming" in cont.stderr and ckpt.list_checkpoints(out)[-1].step == 3
    changed = run_scion("inherit", "--resume", out, "--norms", "--max-steps", "4", check=False)
    assert changed.returncode == 2 and "drop --norms" in changed.stderr and "Traceback" not in changed.stderr
    assert ckpt.list_checkpoints(out)[-1].step == 3


def test_cli_inherit_takes_the_blocks_asked_for(run_scion, reference_run, tmp_path):
    out = tmp_path / "last"
    run_scion("inherit", "--reference", reference_run, "--layers", "2", "--blocks", "last", "--out", out,
              "--max-steps", "1", "--progress", "lines")
    prov = json.loads((out / "inherit.json").read_text())
    assert prov["blocks_from_reference"] == [1, 2] and prov["spec"]["blocks"] == "last"
    listed = run_scion("inherit", "--reference", reference_run, "--blocks", "2,0", "--out", tmp_path / "listed",
                       "--max-steps", "1", "--progress", "lines")
    prov = json.loads((tmp_path / "listed" / "inherit.json").read_text())
    assert prov["layers"] == 2 and prov["blocks_from_reference"] == [2, 0] and listed.returncode == 0


@pytest.mark.slow
def test_cli_grow_prints_the_summary_and_resumes_a_finished_run(run_scion, reference_run, tmp_path):
    out = tmp_path / "g"
    proc = run_scion("grow", "--reference", reference_run, "--layers", "2", "--grow-step", "1",
                     "--until", "depth", "--max-steps", "2", "--out", out, "--progress", "lines")
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "round" not in line]
    assert [line.split("|")[2].strip() for line in table] == ["2", "3"]
    assert json.loads((out / "grow.json").read_text())["settings"]["step"] == 1
    again = run_scion("grow", "--resume", out, "--progress", "lines")
    assert again.stdout == proc.stdout  # nothing retrained, the same losses
    busy = run_scion("grow", "--reference", reference_run, "--out", out, check=False)
    assert busy.returncode == 2 and "--resume" in busy.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["inherit", "--reference", "/nonexistent", "--out", "x"], "no such reference"),
        (["inherit", "--out", "x"], "give --reference"),
        (["grow", "--resume", "/nonexistent"], "not a growth run"),
    ],
)
def test_cli_errors_are_one_line(run_scion, args, message):
    proc = run_scion(*args, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_cli_inherit_from_a_folder_that_is_no_model_fails_cleanly(run_scion, tmp_path):
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    proc = run_scion("inherit", "--reference", folder, "--out", tmp_path / "x", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert str(folder) in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_cli_inherit_refuses_architecture_overrides(run_scion, reference_run, tmp_path):
    proc = run_scion("inherit", "--reference", reference_run, "--out", tmp_path / "x",
                     "--model.d-model", "32", check=False)
    assert proc.returncode == 2 and "--model.d-model" in proc.stderr
