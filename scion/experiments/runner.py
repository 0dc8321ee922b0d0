"""The Inheritune comparison end to end: train (or load) a reference, derive the target by
Inheritune and grow it, train every baseline at the same budget, and report one table (the
shape of the paper's Tables 1-3) and one plot of validation loss against steps.

    OUT/experiment.json     the resolved experiment config
    OUT/reference/          the reference run (when trained here)
    OUT/inheritune/         a growth run (round-1, round-2, ... ; see scion.inherit.grow)
    OUT/inheritune-continue/  with grow_mode both: the growth in place beside the paper's restart
    OUT/<recipe>/           one run per baseline (stacking also has OUT/stacking-stage1/)
    OUT/sweep-n<k>/         Figure 11: the first k reference blocks, trained T steps
    OUT/seed-<s>/<recipe>/  with experiment.seeds > 1: every run but the reference, once per seed
    OUT/results.json|.md    the table (mean and spread over seeds);  OUT/val_loss.png,
                            OUT/sweep.png: the plots

Running the same command again continues: finished runs are skipped and unfinished ones
resume from their latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict
from pathlib import Path

from scion.analysis.plots import plot_experiment
from scion.config import ModelConfig, RunConfig
from scion.errors import ScionError
from scion.experiments.config import ExperimentConfig, experiment_from_dict, experiment_to_dict
from scion.experiments.recipes import RECIPES
from scion.experiments.report import Row, chained, curve, train_curve, write_results
from scion.inherit.init import InheritSpec, fresh, inherit, with_depth
from scion.inherit.runs import (
    Reference,
    Stopped,
    adopt_tokenizer,
    check_tokenizer,
    evaluate,
    load_reference,
    train_run,
)
from scion.pretrain.steps import data_streams, load_data, log, setup
from scion.run import is_run, load_model


class Experiment:
    def __init__(self, out: Path, cfg: ExperimentConfig, progress: bool | None = None):
        cfg.validate()
        self.out, self.cfg, self.progress = Path(out), cfg, progress
        self.T = cfg.run.train.max_steps
        self.base_seed = self.seed = cfg.run.train.seed
        self.seed_out = self.out  # where this seed's runs go
        self.env = setup(cfg.run)
        self.reference: Reference | None = None
        self.rows: list[Row] = []
        self.n = self.depth = 0  # the starting depth n and the baselines' depth (Inheritune's final one)

    # -- plumbing --
    def dir(self, name: str) -> Path:
        return self.out / name if name == "reference" else self.seed_out / name

    def reached(self, layers: int) -> None:
        """Inheritune's growth ended at `layers`: the same-size baselines are built there, unless
        the config names their depth."""
        fixed = self.cfg.experiment.baseline_layers
        if fixed and fixed != layers:
            log(f"   note: Inheritune ended at {layers} layers; the baselines stay at "
                f"experiment.baseline_layers = {fixed}")
        self.depth = fixed or layers

    def target(self, layers: int) -> ModelConfig:
        ref = self.reference.model.cfg
        return with_depth(ref, layers, f"{ref.name}-n{layers}")

    def run_config(self, model_cfg, steps: int, tokens_per_step: int | None = None) -> RunConfig:
        train = dataclasses.replace(self.cfg.run.train, max_steps=steps, seed=self.seed)
        if tokens_per_step is not None:
            train.tokens_per_step = tokens_per_step
        return dataclasses.replace(self.cfg.run, model=model_cfg, train=train)

    def train(self, name: str, model_cfg, steps: int, init, recipe: str, loss_fn=None, extra=None,
              tokens_per_step: int | None = None):
        cfg = self.run_config(model_cfg, steps, tokens_per_step)
        provenance = {"recipe": recipe, "reference": str(self.ref_source), "seed": self.seed, **(extra or {})}
        kwargs = {"loss_fn": loss_fn} if loss_fn is not None else {}
        where = self.dir(name)
        log(f"== {where.relative_to(self.out)}: {model_cfg.n_layer} layers, d_model {model_cfg.d_model}, "
            f"{steps} steps, seed {self.seed}")
        trainer = train_run(
            cfg,
            where,
            init,
            self.env,
            self.tokenizer,
            self.folders,
            self.sampler,
            self.val,
            provenance=provenance,
            resume=is_run(where),
            progress=self.progress,
            resume_hint="the same scion experiment command (it resumes every run)",
            **kwargs,
        )
        if trainer.stop_reason:
            raise Stopped(trainer.stop_reason, trainer.resume_hint)
        return trainer

    def add_row(
        self,
        recipe: str,
        trainer,
        runs: list[str],
        steps: int | None = None,
        tokens: int | None = None,
        label: str | None = None,
        init: str | None = None,
    ) -> Row:
        """The row of `trainer`'s model; `runs` names the run folders whose curves make up its
        history, in order (stacking: its first stage, then itself)."""
        model = trainer.model
        registered = RECIPES.get(recipe)
        group, desc = (registered.group, registered.init) if registered else ("sweep", "first n reference blocks")
        chain = chained([self.dir(r) for r in runs])
        row = Row(
            label or recipe,
            group,
            init or desc,
            model.cfg.n_layer,
            model.num_params(),
            steps if steps is not None else trainer.state.step,
            tokens if tokens is not None else trainer.state.tokens,
            evaluate(model, self.val, self.env.device, self.env.precision),
            curve(chain),
            str(chain[-1][0]),
            self.seed,
            train_curve(chain),
        )
        log(f"   {row.recipe} (seed {self.seed}): val loss {row.val_loss:.4f}")
        self.rows.append(row)
        self.write_results()
        return row

    # -- the whole experiment --
    def run(self) -> list[Row]:
        c, e = self.cfg.run, self.cfg.experiment
        self.out.mkdir(parents=True, exist_ok=True)
        self._check_or_save_config()
        if e.reference:
            self.reference = load_reference(e.reference, self.env.device)
            self.ref_source = e.reference
            adopt_tokenizer(c, self.reference)
        self.tokenizer, self.folders = load_data(c, self.env.world)
        self.sampler, self.val = data_streams(c, self.folders)
        if self.val is None:
            raise ScionError(
                "the experiment compares validation losses: the data needs a validation split "
                "(raise --data.val-fraction)"
            )
        if self.reference is None:
            self._train_reference(e.reference_steps or self.T)
        else:
            check_tokenizer(self.tokenizer, self.reference)
            self._reference_row()
        ref = self.reference.model
        if ref.cfg != c.model and not e.reference:
            raise ScionError("internal: the trained reference does not match the config")
        self.n = e.target_layers or max(1, ref.cfg.n_layer // 2)
        # Inheritune first: the same-size baselines are built at the depth it ends at.
        order = sorted((r for r in e.recipes if RECIPES[r].run is not None), key=lambda r: r != "inheritune")
        for i in range(e.seeds):
            self.seed = self.base_seed + i
            self.seed_out = self.out if e.seeds == 1 else self.out / f"seed-{self.seed}"
            self.sampler, _ = data_streams(self.run_config(c.model, self.T), self.folders)
            self.depth = e.baseline_layers or self.n
            for name in order:
                RECIPES[name].run(self, ref)
            for k in e.sweep_layers:
                self.sweep(ref, k)
        self.write_results()
        return self.rows

    def _train_reference(self, steps: int) -> None:
        c = self.cfg.run
        self.ref_source = self.dir("reference")
        trainer = self.train("reference", c.model, steps, lambda: fresh(c.model, self.seed), "random")
        self.add_row("reference", trainer, ["reference"])
        loaded = load_model(self.ref_source, device=self.env.device)
        self.reference = Reference(
            loaded.model,
            loaded.tokenizer,
            loaded.config,
            str(self.ref_source),
            str(loaded.checkpoint),
            self.ref_source / "tokenizer",
        )

    def _reference_row(self) -> None:
        ref = self.reference
        val = evaluate(ref.model, self.val, self.env.device, self.env.precision)
        self.rows.append(
            Row(
                "reference",
                "reference",
                f"given: {ref.source}",
                ref.model.cfg.n_layer,
                ref.model.num_params(),
                0,
                0,
                val,
                [],
                ref.source,
                self.base_seed,
            )
        )

    def _check_or_save_config(self) -> None:
        f = self.out / "experiment.json"
        now = json.loads(json.dumps(experiment_to_dict(self.cfg)))
        if f.exists():
            # read back through the config class, so settings added since it was saved take their
            # defaults rather than making the same experiment look like another one
            saved = json.loads(json.dumps(experiment_to_dict(experiment_from_dict(json.loads(f.read_text()), str(f)))))
            if saved != now:
                changed = sorted(_differences(saved, now))
                raise ScionError(
                    f"{self.out}: holds an experiment with another config ({', '.join(changed[:4])} differ); choose "
                    f"another --out (or delete {f} to reuse its finished runs)"
                )
        elif self.env.world.main:
            f.write_text(json.dumps(now, indent=1))

    def sweep(self, ref, k: int) -> None:
        name = f"sweep-n{k}"
        cfg = self.target(k)
        spec = InheritSpec(layers=k)
        t = self.train(
            name,
            cfg,
            self.T,
            lambda: inherit(ref, spec, self.seed, cfg),
            "inheritune",
            extra={"spec": asdict(spec)},
        )
        self.add_row(name, t, [name], label=name, init=f"first {k} reference blocks")

    # -- reporting --
    def write_results(self) -> None:
        if self.env.world.main:
            write_results(self.rows, self.T, self.out)

    def plot(self) -> list[Path]:
        return plot_experiment(self.rows, self.out)


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """The dotted names of the settings that differ between two config dicts."""
    out = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _differences(x, y, f"{prefix}{key}.")
        elif x != y:
            out.append(f"{prefix}{key}")
    return out
