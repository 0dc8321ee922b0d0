"""scion eval: benchmark tasks through lm-evaluation-harness, or validation loss, perplexity and
bits per byte on data."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from scion.errors import ScionError

EXAMPLES = """
examples:
  scion eval runs/a --suite tinyllama                          # TinyLlama's seven-task table, zero-shot
  scion eval runs/a --suite inheritune-mmlu --checkpoints all  # Inheritune Table 5 (MMLU 5-shot) over training
  scion eval runs/a --suite my-table.yaml                      # a suite of your own (see scion/evaluate/suites/)
  scion eval runs/a --tasks hellaswag,openbookqa,winogrande,arc_challenge,arc_easy,boolq,piqa
  scion eval runs/a --tasks mmlu --num-fewshot 5 --limit 100
  scion eval runs/a --tasks my_task --include-path my_tasks/    # task YAML files of your own
  scion eval runs/a --tasks arc_easy,piqa --checkpoints all    # every checkpoint: scores vs tokens seen
  scion eval runs/a --data shards/                             # loss, perplexity, bits per byte (val split)
  scion eval runs/a --data notes.txt
  scion eval runs/a --data hf:Salesforce/wikitext:wikitext-103-raw-v1 --split test --max-tokens 1000000
  scion eval path/to/hf-model --tasks piqa                     # a Hugging Face model, converted in memory
"""


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="scion eval", description=__doc__.splitlines()[0] + " ..." + EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="run directory, checkpoint folder, or Hugging Face model folder / hub id")
    p.add_argument("--tasks", default=None, help="comma-separated lm-eval task (or group) names")
    p.add_argument("--suite", default=None,
                   help="a paper's table by name (tinyllama, inheritune-zeroshot, inheritune-mmlu) or a suite "
                        "YAML file: its tasks, each with its own shots and metric")
    p.add_argument("--data", nargs="+", default=None, metavar="PATH",
                   help="prepared shard folders (their validation split), raw text files/folders, or "
                        "hf:NAME[:CONFIG] data sets")
    p.add_argument("--split", default="validation", help="split of an hf: --data set (default validation)")
    p.add_argument("--checkpoint", default=None, help="step number or checkpoint name (default: latest)")
    p.add_argument("--checkpoints", default=None, metavar="WHICH",
                   help="evaluate several checkpoints of a run: all, milestones, or comma-separated steps")
    p.add_argument("--num-fewshot", type=int, default=None, help="examples in each prompt")
    p.add_argument("--limit", type=float, default=None,
                   help="documents per task (a fraction when below 1); for quick checks, not for reporting")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--include-path", default=None, help="a folder of task YAML files of your own")
    p.add_argument("--seq-len", type=int, default=None, help="window for --data (default: context)")
    p.add_argument("--max-tokens", type=int, default=None, help="cap on tokens per --data dataset")
    p.add_argument("--text-field", default="text", help="field holding the text in JSONL/Parquet records")
    p.add_argument("--out", default=None, help="also write every checkpoint's results to this one JSON file")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)
    tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
    suite = None
    if args.suite:
        from scion.evaluate.suites import load_suite

        if tasks or args.num_fewshot is not None:
            raise ScionError("--suite names its tasks and their shots; drop --tasks and --num-fewshot")
        suite = load_suite(args.suite)
        tasks = suite.names
    if not tasks and not args.data:
        raise ScionError("give --tasks or --suite (benchmark tasks), or --data (perplexity on data), or both")
    if args.batch_size <= 0 or (args.limit is not None and args.limit <= 0):
        raise ScionError("--batch-size and --limit must be positive")
    if args.checkpoint and args.checkpoints:
        raise ScionError("give --checkpoint (one) or --checkpoints (several), not both")

    from scion.checkpoint import list_checkpoints
    from scion.interop import load_reference
    from scion.run import is_run, is_scion_source, resolve_checkpoint
    from scion.train.device import resolve_device, resolve_precision

    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    refs = select_checkpoints(Path(args.model), args.checkpoints, list_checkpoints, is_run)
    run_dir = resolve_checkpoint(args.model)[0] if is_scion_source(args.model) else None
    manager = None
    if tasks:
        from scion.evaluate.harness import task_manager

        include = (suite.include_path if suite else None) or args.include_path
        manager = task_manager(tasks, include)  # unknown names fail here, before any model loads
    shots = suite.shots if suite else args.num_fewshot
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit

    rows = []
    streams = {}  # the --data tokens by tokenizer: read once, whatever the number of checkpoints
    for which in refs:
        model, tok, cfg = load_reference(args.model, checkpoint=which, device=device)
        if tok is None:
            raise ScionError(f"{args.model}: has no tokenizer; evaluation needs one")
        name, step, tokens = checkpoint_label(args.model, which, run_dir)
        row = {"checkpoint": name, "step": step, "tokens": tokens}
        if args.data:
            from scion.evaluate.perplexity import evaluate_data, token_streams

            key = tok.fingerprint()
            if key not in streams:
                streams[key] = token_streams(tok, args.data, max_tokens=args.max_tokens, text_field=args.text_field,
                                             split=args.split)
            scores = evaluate_data(model, tok, args.data, seq_len=args.seq_len, batch_size=args.batch_size,
                                   device=device, precision=precision, streams=streams[key])
            row["data"] = scores.to_dict()
            print(f"{name}: loss {scores.loss:.4f} | perplexity {scores.perplexity:.3f} | bits per byte "
                  f"{scores.bits_per_byte:.4f} | {scores.tokens:,} tokens, {scores.bytes:,} bytes")
        if tasks:
            from scion.evaluate.harness import evaluate_tasks

            print(f"{name}: running {suite.title if suite else ', '.join(tasks)} ...", file=sys.stderr, flush=True)
            scores, full = evaluate_tasks(model, tok, tasks, num_fewshot=shots, limit=limit,
                                          batch_size=args.batch_size, device=device, precision=precision,
                                          seed=args.seed, manager=manager, metrics=suite.metrics if suite else None)
            row["scores"] = scores.to_dict()
            row["n_samples"] = full.get("n-samples", {})
            row["n_shot"] = full.get("n-shot", {})
        rows.append(row)
        del model

    if tasks:
        from scion.evaluate.harness import format_table

        if suite:
            print(f"{suite.title} ({suite.source})" if suite.source else suite.title)
        print(format_table(rows, tasks, shots if isinstance(shots, dict) else None))
    from importlib.metadata import version

    settings = {"model": str(args.model), "tasks": tasks, "data": args.data, "num_fewshot": shots,
                "limit": args.limit, "seed": args.seed}
    if suite:
        settings["suite"] = {"name": suite.name, "title": suite.title, "source": suite.source,
                             "metrics": suite.metrics}
    if tasks:
        settings["lm_eval_version"] = version("lm_eval")
    if run_dir is not None:  # one file per checkpoint in RUN_DIR/eval/, where `scion report` reads them
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for row in rows:
            path = run_dir / "eval" / f"{'harness' if tasks else 'data'}-{row['checkpoint']}-{stamp}.json"
            write_json(path, {**settings, **row, "results": report_results(row)})
    if args.out:  # every checkpoint in one file, ready to chart against tokens seen
        write_json(Path(args.out), {**settings, "rows": rows})
    return 0


def report_results(row: dict) -> dict:
    """{task: {metric: value}}, as lm-eval's own results files hold them (and `scion report` reads)."""
    results = dict(row.get("scores", {}).get("metrics", {}))
    if "data" in row:
        results["data"] = {k: row["data"][k] for k in ("loss", "perplexity", "bits_per_byte")}
    return results


def write_json(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"results: {path}", file=sys.stderr)


def select_checkpoints(path: Path, which: str | None, list_checkpoints, is_run) -> list[str | None]:
    """The checkpoints to evaluate, as names load_reference understands (None: the latest)."""
    if which is None:
        return [None]
    if not is_run(path):
        raise ScionError(f"{path}: --checkpoints needs a scion run directory")
    refs = list_checkpoints(path)
    if which == "all":
        chosen = refs
    elif which == "milestones":
        chosen = [r for r in refs if r.milestone]
    else:
        try:
            steps = {int(s) for s in which.split(",") if s.strip()}
        except ValueError:
            raise ScionError(f"--checkpoints {which!r}: use all, milestones or steps (1000,2000)") from None
        chosen = [r for r in refs if r.step in steps]
        absent = steps - {r.step for r in chosen}
        if absent:
            raise ScionError(f"{path}: no checkpoint at step(s) {', '.join(map(str, sorted(absent)))}; "
                             f"have {', '.join(str(r.step) for r in refs)}")
    if not chosen:
        raise ScionError(f"{path}: no checkpoints match --checkpoints {which}")
    return [r.path.name for r in chosen]


def checkpoint_label(source: str, which: str | None, run_dir: Path | None):
    """(name, step, tokens) of the checkpoint evaluated, for the table and the chart."""
    if run_dir is None:
        return Path(str(source)).name or str(source), None, None
    from scion.checkpoint import load_trainer_state
    from scion.checkpoint.layout import TRAINER
    from scion.run import resolve_checkpoint

    _, folder = resolve_checkpoint(source, which)
    state = load_trainer_state(folder) if (folder / TRAINER).exists() else {}
    return folder.name, state.get("step"), state.get("tokens")
