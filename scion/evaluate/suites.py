"""Evaluation suites: a paper's benchmark table as data. A suite is a small YAML file naming
its harness tasks in the table's order, the examples per prompt of each (`shots`) and,
where the paper says, the metric its column shows:

    title: TinyLlama's commonsense table (zero-shot)
    source: where the table comes from
    include_path: tasks/          # optional: task YAML files of the suite's own (relative)
    tasks:
      - {task: hellaswag, shots: 0, metric: acc_norm}
      - {task: mmlu, shots: 5}    # no metric: acc_norm where the task defines it, else acc ...

The built-in suites live beside this module (`scion eval --suite tinyllama`); any other
suite is named by its path (`scion eval --suite my-table.yaml`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from scion.errors import ScionError

BUILTIN = Path(__file__).parent / "suites"


@dataclass(frozen=True)
class SuiteTask:
    task: str
    shots: int = 0
    metric: str | None = None  # the column's metric; None: the harness summary's headline rule


@dataclass(frozen=True)
class Suite:
    name: str
    title: str
    source: str
    tasks: tuple[SuiteTask, ...]
    include_path: str | None = None

    @property
    def names(self) -> list[str]:
        return [t.task for t in self.tasks]

    @property
    def shots(self) -> dict[str, int]:
        return {t.task: t.shots for t in self.tasks}

    @property
    def metrics(self) -> dict[str, str]:
        return {t.task: t.metric for t in self.tasks if t.metric}


def builtin_suites() -> list[str]:
    return sorted(p.stem for p in BUILTIN.glob("*.yaml"))


def load_suite(name: str) -> Suite:
    """A built-in suite by name, or a suite file by path."""
    path = Path(name)
    if not path.suffix and (BUILTIN / f"{name}.yaml").is_file():
        path = BUILTIN / f"{name}.yaml"
    if not path.is_file():
        raise ScionError(f"{name}: no such suite; the built-in ones are {', '.join(builtin_suites())}, "
                         "or give the path of a suite YAML file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ScionError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from e
    if not isinstance(raw, dict) or not isinstance(raw.get("tasks"), list) or not raw["tasks"]:
        raise ScionError(f"{path}: a suite needs a `tasks:` list of {{task: NAME, shots: N}} entries")
    unknown = sorted(set(raw) - {"title", "source", "include_path", "tasks"})
    if unknown:
        raise ScionError(f"{path}: unknown key(s) {', '.join(unknown)}; a suite has title, source, "
                         "include_path and tasks")
    tasks = tuple(_task(entry, path) for entry in raw["tasks"])
    seen = [t.task for t in tasks]
    twice = sorted({t for t in seen if seen.count(t) > 1})
    if twice:
        raise ScionError(f"{path}: task(s) {', '.join(twice)} listed twice; a table has one column each")
    include = raw.get("include_path")
    if include is not None:
        include = str((path.parent / include).resolve())
    return Suite(name=path.stem, title=str(raw.get("title") or path.stem), source=str(raw.get("source") or ""),
                 tasks=tasks, include_path=include)


def _task(entry, path: Path) -> SuiteTask:
    if isinstance(entry, str):
        entry = {"task": entry}
    if not isinstance(entry, dict) or not isinstance(entry.get("task"), str):
        raise ScionError(f"{path}: each entry of `tasks` needs `task: NAME`, got {entry!r}")
    unknown = sorted(set(entry) - {"task", "shots", "metric"})
    if unknown:
        raise ScionError(f"{path}: task {entry['task']}: unknown key(s) {', '.join(unknown)} "
                         "(an entry has task, shots and metric)")
    shots = entry.get("shots", 0)
    if not isinstance(shots, int) or isinstance(shots, bool) or shots < 0:
        raise ScionError(f"{path}: task {entry['task']}: shots must be a whole number >= 0, got {shots!r}")
    metric = entry.get("metric")
    if metric is not None and not isinstance(metric, str):
        raise ScionError(f"{path}: task {entry['task']}: metric must be a name such as acc_norm")
    return SuiteTask(entry["task"], shots, metric)
