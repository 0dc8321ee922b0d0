"""The Inheritune experiment runner: its config, its table, and one tiny end-to-end run."""

from __future__ import annotations

import json

import pytest

from scion.errors import ScionError
from scion.experiments import (
    CONFIG_DIR,
    DEFAULT_RECIPES,
    RECIPES,
    Row,
    experiment_from_dict,
    load_experiment_config,
    results_markdown,
)


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
def test_bundled_configs_load_and_validate(name):
    cfg = load_experiment_config(name)
    cfg.validate()
    assert cfg.experiment.distill.alpha == 0.6 and cfg.experiment.distill.temperature == 1.0


@pytest.mark.parametrize("name, layers, heads, d, n, final", [
    ("gpt2-medium", 24, 16, 1024, 12, 16), ("gpt2-large", 36, 20, 1280, 18, 18), ("gpt2-xl", 48, 25, 1600, 24, 24)])
def test_paper_configs_carry_the_released_hyperparameters(name, layers, heads, d, n, final):
    from scion.inherit.init import half_width_config

    cfg = load_experiment_config(name)
    m, t, e = cfg.run.model, cfg.run.train, cfg.experiment
    assert (m.n_layer, m.n_head, m.d_model) == (layers, heads, d)
    assert (t.lr, t.min_lr, t.warmup_steps, t.max_steps) == (2e-4, 1e-5, 2000, 100_000)
    assert t.tokens_per_step == 12 * 1024 * 4 * 3 == 147_456
    assert (e.target_layers, e.baseline_layers, e.grow_mode) == (n, final, "restart")
    assert (e.distill.steps, e.distill.tokens_per_step) == (50_000, 48 * 1024)
    assert half_width_config(m).d_model == d // 2  # xl's 25 heads included


def test_cpu_default_is_the_12_layer_reference_with_6_layer_targets():
    cfg = load_experiment_config(None)
    assert cfg.run.model.n_layer == 12 and cfg.experiment.target_layers == 6
    assert cfg.experiment.recipes == DEFAULT_RECIPES


def test_paper_gpt2_config_matches_the_papers_architecture():
    m = load_experiment_config("gpt2-medium").run.model
    assert (m.n_layer, m.n_head, m.d_model, m.vocab_size) == (24, 16, 1024, 50304)
    assert m.tie_embeddings and m.attn_scale_inverse_layer and m.mlp == "gelu" and not m.bias


@pytest.mark.parametrize(
    "values, message",
    [
        ({"experiment": {"recipes": ["inheritune", "magic"]}}, "unknown recipe"),
        ({"experiment": {"colour": 1}}, "known keys are"),
        ({"model": {"n_layer": 4}, "experiment": {"sweep_layers": [5]}}, "the reference's depth 4"),
    ],
)
def test_bad_experiment_configs_say_what_is_wrong(values, message):
    with pytest.raises(ScionError, match=message):
        experiment_from_dict(values, "x.yaml").validate()


def test_unknown_config_name_lists_the_bundled_ones():
    with pytest.raises(ScionError, match="bundled ones: .*cpu"):
        load_experiment_config("nope")


def test_results_table_has_a_row_per_run_and_the_difference_to_the_reference():
    rows = [
        Row("reference", "reference", "random", 8, 2_000_000, 100, 1000, 5.0, [], "r"),
        Row("random", "scratch", "random", 4, 1_000_000, 100, 1000, 5.25, [], "a"),
        Row("inheritune", "inheritune", "first 4", 4, 1_000_000, 100, 1000, 4.9, [], "b"),
    ]
    table = results_markdown(rows, 100).splitlines()
    body = [line for line in table if line.startswith("| ") and "recipe" not in line]
    assert [line.split("|")[2].strip() for line in body] == ["reference", "inheritune", "random"]
    assert body[1].endswith("| 4.9000 | -0.1000 |") and body[2].endswith("| 5.2500 | +0.2500 |")


def test_an_undertrained_reference_is_flagged_above_the_table():
    from scion.experiments import precondition_warning

    def rows(reference: float, random: float, random_2x: float | None):
        made = [Row("reference", "reference", "random", 8, 2_000_000, 400, 4000, reference, [], "r"),
                Row("random", "scratch", "random", 4, 1_000_000, 400, 4000, random, [], "a"),
                Row("inheritune", "inheritune", "first 4", 4, 1_000_000, 400, 4000, reference - 0.3, [], "b")]
        if random_2x is not None:
            made.append(Row("random-2x", "scratch", "random", 4, 1_000_000, 800, 8000, random_2x, [], "c"))
        return made

    # the CPU run of docs/inheritune.md: the 12-layer reference loses to 6-layer scratch at 2T
    short = rows(4.7976, 4.6634, 4.2885)
    warning = precondition_warning(short)
    assert warning.startswith("WARNING: the reference is undertrained") and "4.7976" in warning
    assert "4.2885" in warning and "800 steps" in warning
    assert results_markdown(short, 400).splitlines()[0] == f"**{warning}**"
    # a trained reference (the paper's GPT-2 medium: 2.819 against 2.869 at T and 2.831 at 2T)
    trained = rows(2.819, 2.869, 2.831)
    assert precondition_warning(trained) is None
    assert results_markdown(trained, 400).startswith("T = 400 steps")
    assert "random-2x was not run" in precondition_warning(rows(2.819, 2.869, None))
    assert "undertrained" in precondition_warning(rows(4.9, 4.6, None))


@pytest.mark.slow
def test_tiny_experiment_end_to_end(run_scion, corpus, tmp_path):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(json.dumps({
        "model": {"name": "r", "vocab_size": 512, "n_layer": 4, "n_head": 4, "n_kv_head": 2, "d_model": 64,
                  "ffn_hidden": 128, "max_seq_len": 32},
        "train": {"max_steps": 2, "micro_batch_size": 4, "warmup_steps": 1, "log_every": 1, "eval_every": 1,
                  "eval_batches": 2, "sample_prompts": [], "checkpoint_every": 2, "device": "cpu"},
        "data": {"val_fraction": 0.2},
        "experiment": {"sweep_layers": [1, 3]},
    }))
    out = tmp_path / "exp"
    proc = run_scion("experiment", "inheritune", "--config", cfg, "--data", corpus, "--out", out,
                     "--progress", "lines")
    results = json.loads((out / "results.json").read_text())
    names = {r["recipe"] for r in results["rows"]}
    expected = set(RECIPES) - {"random-ref"}  # the reference is the random-init reference-size run
    assert expected <= names and {"sweep-n1", "sweep-n3"} <= names
    assert all(r["val_loss"] > 0 for r in results["rows"])
    assert (out / "val_loss.png").stat().st_size > 0 and (out / "sweep.png").stat().st_size > 0
    assert "| inheritune |" in proc.stdout
    # Running it again continues: every run is finished, nothing trains again.
    again = run_scion("experiment", "inheritune", "--config", cfg, "--data", corpus, "--out", out,
                      "--progress", "lines")
    assert "already trained" in again.stderr
    stacking = json.loads((out / "stacking" / "inherit.json").read_text())
    assert stacking["stage1_steps"] == 1


def tiny_experiment(corpus, train: dict, experiment: dict):
    """A 4-layer reference of d_model 32 on the test corpus, 2-layer targets, in fp32 on the CPU."""
    return experiment_from_dict({
        "model": {"name": "r", "vocab_size": 512, "n_layer": 4, "n_head": 2, "n_kv_head": 1, "d_model": 32,
                  "ffn_hidden": 64, "max_seq_len": 16},
        "train": {"warmup_steps": 1, "log_every": 1, "sample_prompts": [], "device": "cpu", "precision": "fp32",
                  **train},
        "data": {"path": [str(corpus)], "val_fraction": 0.2},
        "experiment": {"target_layers": 2, **experiment},
    }, "test")


def test_protocol_seeds_growth_modes_and_baselines_at_the_final_depth(cache_dir, corpus, tmp_path):
    """Every same-size baseline is built at the depth Inheritune's (restart) growth ended at,
    random-2x also at the starting depth when that differs, both growth modes run side by side,
    the KD budget is its own, and each recipe runs once per seed with the mean and spread shown."""
    from scion.experiments import Experiment

    cfg = tiny_experiment(corpus, {"max_steps": 2, "micro_batch_size": 2, "eval_every": 1, "eval_batches": 2,
                                   "checkpoint_every": 2},
                          {"grow_mode": "both", "seeds": 2, "reference_steps": 3,
                           "recipes": ["inheritune", "random", "random-2x", "kd", "distilbert"],
                           "distill": {"steps": 3, "tokens_per_step": 2 * 2 * 16}})
    out = tmp_path / "exp"
    rows = Experiment(out, cfg, progress=False).run()

    by = {}
    for r in rows:
        by.setdefault(r.recipe, []).append(r)
    assert len(by["reference"]) == 1 and (out / "reference").is_dir()
    assert [r.seed for r in by["random"]] == [1337, 1338]
    for seed in (1337, 1338):
        mine = {r.recipe: r for r in rows if r.seed == seed}
        grown = json.loads((out / f"seed-{seed}" / "inheritune" / "summary.json").read_text())["rounds"]
        final = grown[-1]["layers"]
        # restart: every round is a fresh inheritance trained T steps; continue grows in place
        assert all(r["steps"] == 2 for r in grown)
        continued = json.loads((out / f"seed-{seed}" / "inheritune-continue" / "summary.json").read_text())
        assert continued["rounds"][0]["val_loss"] == grown[0]["val_loss"]  # round 1 is the same model
        for name in ("random", "random-2x", "kd", "distilbert"):
            assert mine[name].layers == final, name
        assert ("random-2x-n" in mine) == (final != 2)
        assert all(r.group == "scratch" for r in rows if r.recipe.startswith("random"))
        assert mine["kd"].steps == 3 and mine["kd"].tokens == 3 * 2 * 2 * 16
        distil = json.loads((out / f"seed-{seed}" / "distilbert" / "inherit.json").read_text())
        assert distil["blocks"] == [i * 4 // final for i in range(final)]
        assert distil["seed"] == seed
    table = (out / "results.md").read_text()
    assert "val loss (mean ± sd, 2 seeds)" in table and " ± " in table.split("| random |")[1].splitlines()[0]


@pytest.mark.parametrize("reference_steps, warned", [(1, True), (40, False)], ids=["short", "trained"])
def test_the_precondition_is_checked_on_real_runs(cache_dir, corpus, tmp_path, reference_steps, warned):
    """A reference trained one step loses to 2-layer scratch models trained 2T = 20 steps, and the
    table says so first; one trained 40 steps beats them, and the table starts with T."""
    from scion.experiments import Experiment, precondition_warning

    cfg = tiny_experiment(corpus, {"max_steps": 10, "micro_batch_size": 4, "warmup_steps": 2, "eval_every": 10,
                                   "eval_batches": 4, "checkpoint_every": 200},
                          {"grow": False, "reference_steps": reference_steps, "recipes": ["random-2x"]})
    out = tmp_path / "exp"
    rows = Experiment(out, cfg, progress=False).run()
    warning = precondition_warning(rows)
    table = (out / "results.md").read_text()
    if warned:
        assert warning.startswith("WARNING: the reference is undertrained: parity is not evidence")
        assert table.startswith(f"**{warning}**")
    else:
        assert warning is None and table.startswith("T = 10 steps")
