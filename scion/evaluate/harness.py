"""lm-evaluation-harness on a scion model in memory, through the harness's Python API.

`ScionLM` is an `lm_eval.api.model.LM` (via `TemplateLM`, which turns text requests into
token requests) implementing the three request types:
  - loglikelihood: continuation log-probabilities, batched longest first so padding is small;
  - loglikelihood_rolling: whole-document log-likelihood over disjoint windows of the context;
  - generate_until: greedy decoding with the KV cache until a stop string or the token budget,
    prompts of equal length decoded together.
`evaluate_tasks` resolves task names (with a list of close names for a typo), runs
`simple_evaluate` and reduces the results to one headline metric per task.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import logging
import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from scion.errors import ScionError
from scion.generate import generate_stream
from scion.model import Transformer
from scion.tokenizer import Tokenizer
from scion.train.callbacks import Callback, due
from scion.train.device import autocast

# The metric a task is summarised by, in order of preference (acc_norm where defined, as the
# papers report), and those that are accuracies (averaged in the table).
HEADLINE = ("acc_norm", "acc", "exact_match", "f1", "mcc", "word_perplexity", "perplexity", "bits_per_byte")
ACCURACIES = {"acc_norm", "acc", "exact_match", "f1", "mcc"}


class ScionLM(TemplateLM):
    def __init__(self, model: Transformer, tokenizer: Tokenizer, batch_size: int = 8,
                 device: torch.device | None = None, precision: str = "fp32", progress: bool = True):
        super().__init__()
        if batch_size <= 0:
            raise ScionError(f"--batch-size must be positive, got {batch_size}")
        if tokenizer.vocab_size > model.cfg.vocab_size:
            raise ScionError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                             f"{model.cfg.vocab_size}; they do not belong together")
        self.model, self.tok = model.eval(), tokenizer
        self.batch_size = batch_size
        self._device = device or next(model.parameters()).device
        self.precision = precision
        self.max_length = model.cfg.max_seq_len
        self.progress = progress

    # ---- tokens ------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id if self.tok.bos_id is not None else self.tok.eos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tok.encode(string)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tok.decode(tokens)

    # ---- scoring -------------------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.progress)

    @torch.inference_mode()
    def _score(self, pairs: list[tuple[list[int], list[int]]], desc: str,
               disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding gives the continuation)
        for token pairs, batched longest first. Contexts are cut from the left to fit."""
        out: list[tuple[float, bool] | None] = [None] * len(pairs)
        windows = []
        for i, (ctx, cont) in enumerate(pairs):
            if not cont:
                out[i] = (0.0, True)
                continue
            if len(cont) > self.max_length:
                raise ScionError(f"a continuation of {len(cont)} tokens exceeds the model's context "
                                 f"({self.max_length}); this task does not suit this model")
            whole = (ctx + cont)[-(self.max_length + 1):]
            windows.append((i, whole[:-1], len(cont), cont))
        windows.sort(key=lambda w: -len(w[1]))
        bar = tqdm(total=len(windows), desc=desc, disable=disable_tqdm or not self.progress, leave=False)
        for start in range(0, len(windows), self.batch_size):
            batch = windows[start:start + self.batch_size]
            width = len(batch[0][1])
            inputs = torch.zeros(len(batch), width, dtype=torch.long)
            for row, (_, inp, _, _) in enumerate(batch):
                inputs[row, :len(inp)] = torch.tensor(inp)  # right padding: causal attention ignores it
            with autocast(self._device, self.precision):
                logits = self.model(inputs.to(self._device))
            logprobs = F.log_softmax(logits.float(), dim=-1)
            for row, (i, inp, n, cont) in enumerate(batch):
                lp = logprobs[row, len(inp) - n:len(inp)]
                target = torch.tensor(cont, device=lp.device)
                total = lp.gather(-1, target[:, None]).sum().item()
                out[i] = (total, bool((lp.argmax(-1) == target).all()))
            bar.update(len(batch))
        bar.close()
        return out  # type: ignore[return-value]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kw) -> list[tuple[float, bool]]:
        results = self._score([(ctx, cont) for _, ctx, cont in requests], "loglikelihood", disable_tqdm)
        for (key, _, _), result in zip(requests, results, strict=True):
            self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents: every token predicted once, each window of the
        model's context conditioned on the tokens before it in the window."""
        pairs, owner = [], []
        for n, req in enumerate(requests):
            windows = get_rolling_token_windows(self.tok_encode(req.args[0]), self.prefix_token_id,
                                                self.max_length, context_len=1)
            for window in map(make_disjoint_window, windows):
                pairs.append(window)
                owner.append(n)
        totals = [0.0] * len(requests)
        scores = self._score(pairs, "loglikelihood_rolling", disable_tqdm)
        for n, (logprob, _) in zip(owner, scores, strict=True):
            totals[n] += logprob
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    # ---- generation ------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, cut at the first stop string. Requests whose prompts have the
        same length and settings are decoded as one batch (no padding needed)."""
        out: list[str | None] = [None] * len(requests)
        groups: dict[tuple, list[tuple[int, list[int]]]] = defaultdict(list)
        for i, req in enumerate(requests):
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            eos_text = self.tok.eos_token
            if eos_text not in until:
                until.append(eos_text)
            budget = int(kwargs.pop("max_gen_toks", 256))
            budget = max(1, min(budget, self.max_length - 1))
            ids = self.tok_encode(context)[-(self.max_length - budget):] or [self.prefix_token_id]
            groups[(len(ids), budget, tuple(until))].append((i, ids))
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm or not self.progress,
                   leave=False)
        for (_, budget, until), members in groups.items():
            for start in range(0, len(members), self.batch_size):
                chunk = members[start:start + self.batch_size]
                prompt = torch.tensor([ids for _, ids in chunk], device=self._device)
                texts = self._greedy(prompt, budget, list(until))
                for (i, _), text in zip(chunk, texts, strict=True):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(chunk))
        bar.close()
        return out  # type: ignore[return-value]

    def _greedy(self, prompt: torch.Tensor, budget: int, until: list[str]) -> list[str]:
        generated: list[list[int]] = [[] for _ in range(prompt.size(0))]
        done = [False] * prompt.size(0)
        with autocast(self._device, self.precision):
            for step in generate_stream(self.model, prompt, budget, temperature=0.0, eos_id=self.tok.eos_id):
                for row, token in enumerate(step.tolist()):
                    if not done[row]:
                        generated[row].append(token)
                        text = self.tok.decode(generated[row])
                        done[row] = any(stop in text for stop in until)
                if all(done):
                    break
        texts = []
        for ids in generated:
            text = self.tok.decode(ids)
            for stop in until:
                text = text.split(stop)[0]
            texts.append(text)
        return texts


# ---- tasks -----------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet(all_output: bool = False):
    """lm-eval logs through its own handlers; keep the terminal to scion's lines (and, during
    training, hide the harness's progress bars too)."""
    for name in ("lm-eval", "lm_eval"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()):
        if all_output:
            with contextlib.redirect_stderr(io.StringIO()):
                yield
        else:
            yield


def unknown_task_message(missing: list[str], known: list[str]) -> str:
    parts = []
    for name in missing:
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
        parts.append(f"{name!r}" + (f" (did you mean: {', '.join(close)}?)" if close else ""))
    return (f"unknown task{'s' if len(missing) > 1 else ''} {'; '.join(parts)}; "
            "list them with `lm-eval ls tasks`, or add a folder of task YAML files with --include-path")


def task_manager(tasks: list[str], include_path: str | None = None):
    """An lm-eval TaskManager that knows every requested task. With --include-path, when all
    tasks are found there, the harness's own ~15,000 tasks are not indexed (that takes a minute)."""
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise ScionError(f"{include_path}: --include-path must be a folder of task YAML files")
    with _quiet():
        if include_path is not None:
            local = TaskManager(include_path=include_path, include_defaults=False)
            if all(local.match_tasks([t]) for t in tasks):
                return local
        manager = TaskManager(include_path=include_path)
    missing = [t for t in tasks if not manager.match_tasks([t])]
    if missing:
        raise ScionError(unknown_task_message(missing, manager.all_tasks))
    return manager


@dataclass
class TaskScores:
    """The harness's results reduced to what a table and a chart need."""

    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # task -> metric -> value
    headline: dict[str, tuple[str, float]] = field(default_factory=dict)  # task -> (metric, value)

    @property
    def average(self) -> float | None:
        values = [v for metric, v in self.headline.values() if metric in ACCURACIES]
        return sum(values) / len(values) if values else None

    def to_dict(self) -> dict[str, Any]:
        return {"metrics": self.metrics,
                "headline": {t: {"metric": m, "value": v} for t, (m, v) in self.headline.items()},
                "average": self.average}


def summarise(results: dict[str, Any], tasks: list[str], metrics: dict[str, str] | None = None,
              scores: TaskScores | None = None) -> TaskScores:
    """One headline per task: the metric `metrics` names for it (a suite's column), else the
    first of HEADLINE the task reports. Added to `scores` when given."""
    scores = scores or TaskScores()
    tables = {**results.get("results", {}), **results.get("groups", {})}
    for task in tasks:
        row = tables.get(task)
        if row is None:
            continue
        values = {}
        for key, value in row.items():
            metric = key.split(",")[0]
            if "," in key and not metric.endswith("_stderr") and isinstance(value, (int, float)) \
                    and not isinstance(value, bool) and math.isfinite(value):
                values.setdefault(metric, float(value))
        scores.metrics[task] = values
        wanted = (metrics or {}).get(task)
        if wanted is not None and wanted not in values:
            raise ScionError(f"task {task} reports {', '.join(sorted(values))}, not {wanted}; "
                             "fix the metric of its suite entry")
        for metric in ((wanted,) if wanted else ()) + HEADLINE + tuple(values):
            if metric in values:
                scores.headline[task] = (metric, values[metric])
                break
    return scores


def evaluate_tasks(model: Transformer, tokenizer: Tokenizer, tasks: list[str], *,
                   num_fewshot: int | dict[str, int] | None = None, limit: int | float | None = None,
                   batch_size: int = 8, include_path: str | None = None,
                   device: torch.device | None = None, precision: str = "fp32", seed: int = 1234,
                   manager=None, progress: bool = True,
                   metrics: dict[str, str] | None = None) -> tuple[TaskScores, dict[str, Any]]:
    """Run harness tasks on the in-memory model: (headline scores, the harness's full results).
    `num_fewshot` is one count for every task or one per task (a suite's shots: each count is
    its own harness pass); `metrics` names a task's headline metric."""
    import lm_eval

    manager = manager or task_manager(tasks, include_path)
    lm = ScionLM(model, tokenizer, batch_size=batch_size, device=device, precision=precision,
                 progress=progress)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    passes: dict[int | None, list[str]] = defaultdict(list)
    for task in tasks:
        passes[num_fewshot.get(task, 0) if isinstance(num_fewshot, dict) else num_fewshot].append(task)
    scores, full = TaskScores(), {}
    was_training = model.training
    try:
        for shots, group in passes.items():
            with _quiet(all_output=not progress), _data_errors(group, manager):
                results = lm_eval.simple_evaluate(
                    model=lm, tasks=group, num_fewshot=shots, limit=limit, task_manager=manager,
                    log_samples=False, bootstrap_iters=1000, random_seed=seed, numpy_random_seed=seed,
                    torch_random_seed=seed, fewshot_random_seed=seed,
                )
            if results is None:
                raise ScionError("lm-evaluation-harness returned no results")
            summarise(results, group, metrics, scores)
            for key, value in results.items():  # one results record, as a single pass makes it
                if isinstance(value, dict) and isinstance(full.get(key), dict):
                    full[key].update(value)
                else:
                    full.setdefault(key, value)
    finally:
        model.train(was_training)
    scores.headline = {t: scores.headline[t] for t in tasks if t in scores.headline}  # in the asked order
    scores.metrics = {t: scores.metrics[t] for t in tasks if t in scores.metrics}
    return scores, full


@contextlib.contextmanager
def _data_errors(tasks: list[str], manager):
    """A task whose data set cannot be fetched (no network, no cached copy) is one line naming
    the task and the data set, not the hub client's retries and traceback."""
    try:
        yield
    except (OSError, ConnectionError) as e:
        dataset = _unreachable_dataset(e)
        if dataset is None:
            raise
        owners = [t for t in tasks if _dataset_of(t, manager) == dataset] or tasks
        raise ScionError(
            f"{', '.join(owners)}: cannot load the data set {dataset} from the Hugging Face hub (no network "
            "here, and no cached copy); run the task once where the hub is reachable (lm-eval caches it), "
            "or give a local copy of the task with --include-path") from None


def _unreachable_dataset(e: BaseException | None) -> str | None:
    """The hub data set named by a 'could not reach / not cached' error in the chain, if any."""
    for _ in range(8):
        if e is None:
            return None
        found = re.search(r"Couldn't reach '([^']+)' on the Hub", str(e)) or \
            re.search(r"Dataset '?([^' ]+)'? is not cached", str(e))
        if found:
            return found.group(1)
        e = e.__cause__ or e.__context__
    return None


def _dataset_of(task: str, manager) -> str | None:
    entry = manager._entry(task) if hasattr(manager, "_entry") else None  # lm-eval's task index
    cfg = getattr(entry, "cfg", None)
    return cfg.get("dataset_path") if isinstance(cfg, dict) else None


def format_table(rows: list[dict[str, Any]], tasks: list[str], shots: dict[str, int] | None = None) -> str:
    """A Markdown table in the style of TinyLlama's: one row per model or checkpoint, tasks as
    columns (accuracies in percent; few-shot counts named), and their average."""
    metrics = {}
    for row in rows:
        for task, head in row["scores"]["headline"].items():
            metrics.setdefault(task, head["metric"])

    def column(task: str) -> str:
        n = (shots or {}).get(task, 0)
        return f"{task} ({metrics.get(task, '-')}{f', {n}-shot' if n else ''})"

    header = ["checkpoint", "tokens"] + [column(t) for t in tasks] + ["avg"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        cells = [row["checkpoint"], _human(row.get("tokens"))]
        for task in tasks:
            head = row["scores"]["headline"].get(task)
            cells.append("-" if head is None else _cell(head["metric"], head["value"]))
        avg = row["scores"]["average"]
        cells.append("-" if avg is None else f"{avg * 100:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(metric: str, value: float) -> str:
    return f"{value * 100:.2f}" if metric in ACCURACIES else f"{value:.4g}"


def _human(tokens: int | None) -> str:
    if tokens is None:
        return "-"
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if tokens >= size:
            return f"{tokens / size:.3g}{unit}"
    return str(tokens)


class TrainingTasks(Callback):
    """The hook behind `train.eval_tasks`: a few harness tasks every `eval_tasks_every` steps,
    logged beside the loss. Task names and data are checked when training starts, not at the
    first evaluation. The global RNGs the harness reseeds are restored, so a run with evaluations
    trains exactly as one without."""

    def __init__(self, tcfg, tokenizer: Tokenizer | None, device: torch.device, precision: str):
        if tokenizer is None:
            raise ScionError("train.eval_tasks needs the run's tokenizer")
        self.tasks, self.limit, self.every = list(tcfg.eval_tasks), tcfg.eval_tasks_limit, tcfg.eval_tasks_every
        self.batch_size = tcfg.micro_batch_size
        self.tokenizer, self.device, self.precision = tokenizer, device, precision
        self.manager = task_manager(self.tasks, tcfg.eval_tasks_include)
        self._fetch_data()

    def _fetch_data(self) -> None:
        """Load the tasks' data sets now: a data set the machine cannot fetch stops the run before
        its first step, not at the first evaluation hours in."""
        with _quiet(all_output=True), _data_errors(self.tasks, self.manager):
            if hasattr(self.manager, "load"):  # newer lm-eval; get_task_dict is deprecated there
                self.manager.load(self.tasks)
            else:
                from lm_eval.tasks import get_task_dict

                get_task_dict(self.tasks, self.manager)

    def post_step(self, trainer, loss: float, grad_norm: float) -> None:
        if due(trainer, self.every):
            trainer.metrics.write({"step": trainer.state.step, "tokens": trainer.state.tokens,
                                   **self(trainer.model)})

    def __call__(self, model: Transformer) -> dict[str, float]:
        import random

        import numpy as np

        states = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
                  torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None)
        try:
            scores, _ = evaluate_tasks(model, self.tokenizer, self.tasks, limit=self.limit,
                                       batch_size=self.batch_size, device=self.device,
                                       precision=self.precision, manager=self.manager, progress=False)
        finally:
            random.setstate(states[0])
            np.random.set_state(states[1])
            torch.set_rng_state(states[2])
            if states[3] is not None:
                torch.cuda.set_rng_state_all(states[3])
        record = {f"tasks/{task}/{metric}": value
                  for task, values in scores.metrics.items() for metric, value in values.items()}
        if scores.average is not None:
            record["tasks/average"] = scores.average
        return record
