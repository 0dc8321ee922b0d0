"""scion verify: check every checkpoint of a run (checksums, completion, readable contents)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from scion.config import same_model
from scion.errors import ScionError

EXAMPLES = """
examples:
  scion verify runs/a                              # every checkpoint of the run
  scion verify runs/a/checkpoints/step-00000200    # one checkpoint

exit status: 0 when every checkpoint is good, 1 when any is broken, 2 when the path is not a run.
"""


def check_checkpoint(folder: Path, model_config: dict | None) -> str | None:
    """None when the checkpoint is complete, matches its checksums and its files parse."""
    from safetensors import safe_open

    from scion import checkpoint as ckpt
    from scion.checkpoint import layout

    problem = ckpt.verify_checkpoint(folder)
    if problem:
        return problem
    if layout.has_whole_weights(folder):  # a sharded one may have only dcp/
        try:
            with safe_open(str(folder / layout.MODEL), framework="pt") as f:
                f.keys()
        except Exception as e:  # safetensors raises its own error types for a bad header
            return f"{layout.MODEL} is unreadable ({e})"
    if (folder / layout.TRAINER).is_file():
        try:
            state = json.loads((folder / layout.TRAINER).read_text())
        except (ValueError, UnicodeDecodeError):
            return "trainer.json is not valid JSON"
        if model_config is not None and state.get("model") is not None and not same_model(state["model"], model_config):
            return "saved for another model architecture than the run's config.yaml"
    if layout.is_sharded_checkpoint(folder):  # the shards of an FSDP checkpoint
        from scion.checkpoint.safe_dcp import load_metadata

        try:
            load_metadata(folder / layout.DCP_METADATA)
        except ScionError as e:
            return str(e).split(": ", 1)[-1]
    return None


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="scion verify", description="Check the checkpoints of a run." + EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="run directory, or one checkpoint folder")
    args = p.parse_args(argv)

    from dataclasses import asdict

    from scion import checkpoint as ckpt
    from scion.checkpoint import layout
    from scion.run import is_run, load_config

    path = Path(args.path)
    if not path.exists():
        raise ScionError(f"{path}: no such run or checkpoint")
    if ckpt.holds_weights(path) or (path / ckpt.COMPLETE).is_file():
        run_dir = path.parent.parent if path.parent.name == layout.CHECKPOINTS else None
        folders = [path]
    elif is_run(path):
        run_dir = path
        root = path / layout.CHECKPOINTS
        folders = sorted(f for f in root.iterdir() if f.is_dir()) if root.is_dir() else []
    else:
        raise ScionError(f"{path}: not a scion run (no config.yaml) or checkpoint folder")
    model_config = asdict(load_config(run_dir).model) if run_dir is not None and is_run(run_dir) else None

    good, bad = [], []
    for folder in folders:
        if folder.name.startswith((".tmp-", ".old-")):
            print(f"  {folder.name}: left by an interrupted save (the next save removes it)")
            continue
        if not ckpt.NAME.match(folder.name):
            continue
        problem = check_checkpoint(folder, model_config)
        (bad if problem else good).append(folder)
        print(f"  BROKEN {folder.name}: {problem}" if problem else f"  ok     {folder.name}")
    if not good and not bad:
        print(f"{path}: no checkpoints yet")
        return 0
    summary = f"{len(good)} good, {len(bad)} broken"
    if good:
        newest = max(good, key=lambda f: int(ckpt.NAME.match(f.name).group(1)))
        summary += f"; --resume continues from {newest.name}" if run_dir is not None else ""
    else:
        summary += "; no checkpoint to resume from"
    print(summary)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
