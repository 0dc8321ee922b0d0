"""How long the default `scion pretrain` takes to reach its first training step on a fresh
machine: nothing cached (a new SCION_CACHE), so the tokenizer is trained and the corpus prepared.

    python benchmarks/cold_start.py

Runs `scion pretrain --max-steps 1` (everything before the first step is what the default run
does) in a subprocess and stamps each line it logs with the time since the process started,
which splits the cold start into imports, tokenizer training, data preparation, model build and
the first step.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    from scion.train.device import describe_machine

    print(f"machine: {describe_machine()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="scion-cold-") as tmp:
        env = dict(
            os.environ,
            SCION_CACHE=str(Path(tmp) / "cache"),
            PYTHONUNBUFFERED="1",
            PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        )
        imports = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", "import scion.cli.main, scion.pretrain"],
            env=env,
            capture_output=True,
            text=True,
        )
        top = sorted(
            (
                (int(line.split("|")[1]), line.split("|")[2].strip())
                for line in imports.stderr.splitlines()
                if line.startswith("import time:") and line.split("|")[1].strip().isdigit()
            ),
            reverse=True,
        )
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "scion", "pretrain", "--max-steps", "1", "--out", str(Path(tmp) / "run")],
            env=env,
            stderr=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=tmp,
        )
        stamps = []
        for line in proc.stderr:
            stamps.append((time.perf_counter() - t0, line.rstrip()))
        proc.wait()
        total = time.perf_counter() - t0
    print("seconds | what scion logged")
    for t, line in stamps:
        print(f"{t:7.2f} | {line[:150]}")
    # The first step ends where the progress bar reaches 1/1 (or a plain log reports step 1).
    done = re.compile(r"^(train: 100%.* 1/1 |step 1[/:])")
    first_step = next((t for t, line in stamps if done.search(line)), None)
    print(f"\nimporting scion's CLI and pretrain modules alone: {top[0][0] / 1e6:.2f} s; the slowest imports:")
    for us, name in top[1:8]:
        print(f"  {us / 1e6:5.2f} s  {name}")
    if first_step is None:
        print(f"no first step logged (exit code {proc.returncode}); total {total:.1f} s")
        sys.exit(1)
    print(f"\nfirst training step done after {first_step:.1f} s (process ended after {total:.1f} s)")


if __name__ == "__main__":
    main()
