"""`scion prepare` against raw `tokenizers` encode_batch on the same corpus.

    python benchmarks/prepare.py                  # a 20 MB corpus, and 10x that for peak memory
    python benchmarks/prepare.py --mb 50 --scale 4

The corpus is the bundled Shakespeare, repeated with variations (each copy shuffles the order
of lines within a file and changes letter case on some of them) into files of about 4 MB. The
tokenizer is a byte-level BPE of 8192 tokens trained by scion on the bundled corpus. Each prepare
runs in a fresh subprocess (`scion prepare ...` as a user runs it), which reports its own peak
resident memory; the baseline encodes the same pieces with `tokenizers`' encode_batch in the
same batches, in this process, and writes nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scion.data.prepare import BATCH_CHARS  # noqa: E402
from scion.data.readers import expand_paths, read_pieces  # noqa: E402
from scion.data.sources import bundled_corpus  # noqa: E402
from scion.tokenizer import load_tokenizer, train_bpe  # noqa: E402
from scion.train.device import describe_machine  # noqa: E402

CHILD = """
import resource, sys, time
from scion.cli.main import main
t0 = time.perf_counter()
code = main(sys.argv[1:])
wall = time.perf_counter() - t0
print("RESULT", wall, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, flush=True)
sys.exit(code or 0)
"""


def build_corpus(folder: Path, megabytes: float, seed: int = 0) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for f in sorted(bundled_corpus().rglob("*")):
        if f.is_file():
            lines.extend(f.read_text(encoding="utf-8", errors="replace").splitlines())
    rng = random.Random(seed)
    target, written, n = int(megabytes * 2**20), 0, 0
    while written < target:
        chunk = []
        size = 0
        while size < 4 * 2**20 and written + size < target:
            start = rng.randrange(len(lines))
            block = lines[start : start + 200]
            rng.shuffle(block)
            block = [ln.upper() if rng.random() < 0.1 else ln for ln in block]
            text = "\n".join(block) + "\n\n"
            chunk.append(text)
            size += len(text.encode())
        (folder / f"part-{n:04d}.txt").write_text("".join(chunk), encoding="utf-8")
        written += size
        n += 1
    return written


def raw_encode(files: list[Path], tok) -> tuple[float, int]:
    """Seconds and tokens for encode_batch over the same pieces, in the same batch sizes."""
    backend = tok.backend
    tokens, batch, chars = 0, [], 0
    t0 = time.perf_counter()
    for f in files:
        for text, _ in read_pieces(f, "text", 1 << 15):
            batch.append(text)
            chars += len(text)
            if chars >= BATCH_CHARS:
                tokens += sum(len(e.ids) for e in backend.encode_batch(batch, add_special_tokens=False))
                batch, chars = [], 0
    if batch:
        tokens += sum(len(e.ids) for e in backend.encode_batch(batch, add_special_tokens=False))
    return time.perf_counter() - t0, tokens


def scion_prepare(data: Path, tok: Path, out: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            CHILD,
            "prepare",
            "--data",
            str(data),
            "--tokenizer",
            str(tok),
            "--out",
            str(out),
            "--overwrite",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode != 0:
        raise SystemExit(f"scion prepare failed:\n{proc.stderr[-3000:]}")
    _, wall, rss = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")).split()
    manifest = json.loads((out / "manifest.json").read_text())
    t = manifest["totals"]
    return {
        "wall_s": float(wall),
        "prepare_s": manifest["seconds"],
        "peak_rss": int(rss),
        "tokens": t["train_tokens"] + t["val_tokens"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=20, help="corpus size in MB")
    ap.add_argument(
        "--scale", type=int, default=10, help="the memory check's corpus is this many times larger"
    )
    ap.add_argument("--keep", help="work in this folder and keep it (default: a temporary folder)")
    args = ap.parse_args()
    print(f"machine: {describe_machine()}", flush=True)
    work = Path(args.keep or tempfile.mkdtemp(prefix="scion-bench-prepare-"))
    try:
        corpus = work / "corpus"
        big = work / "corpus-big"
        size = (
            build_corpus(corpus, args.mb)
            if not corpus.exists()
            else sum(f.stat().st_size for f in corpus.iterdir())
        )
        big_size = (
            build_corpus(big, args.mb * args.scale, seed=1)
            if args.scale > 1 and not big.exists()
            else sum(f.stat().st_size for f in big.iterdir())
            if big.exists()
            else 0
        )
        tok_dir = work / "tokenizer"
        if not tok_dir.exists():
            texts = (
                p.read_text(encoding="utf-8", errors="replace")
                for p in sorted(bundled_corpus().rglob("*"))
                if p.is_file()
            )
            train_bpe(texts, 8192).save(tok_dir)
        tok = load_tokenizer(tok_dir)
        files = expand_paths([str(corpus)])
        threads = os.environ.get("RAYON_NUM_THREADS", str(os.cpu_count()))
        print(f"corpus {size / 2**20:.1f} MB in {len(files)} files; tokenizers {threads} threads", flush=True)

        raw_s, raw_tokens = raw_encode(files, tok)
        small = scion_prepare(corpus, tok_dir, work / "out")
        rows = [
            ("tokenizers encode_batch", size, raw_s, raw_s, raw_tokens, None),
            ("scion prepare", size, small["prepare_s"], small["wall_s"], small["tokens"], small["peak_rss"]),
        ]
        if big_size:
            large = scion_prepare(big, tok_dir, work / "out-big")
            rows.append(
                (
                    f"scion prepare ({args.scale}x corpus)",
                    big_size,
                    large["prepare_s"],
                    large["wall_s"],
                    large["tokens"],
                    large["peak_rss"],
                )
            )
        shutil.rmtree(work / "out", ignore_errors=True)
        shutil.rmtree(work / "out-big", ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    print("\n| what | corpus MB | seconds | MB/s | process wall s | tokens | peak RSS MB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, nbytes, secs, wall, tokens, rss in rows:
        print(
            f"| {name} | {nbytes / 2**20:.0f} | {secs:.1f} | {nbytes / 2**20 / secs:.2f} | {wall:.1f} | "
            f"{tokens:,} | {'' if rss is None else f'{rss / 2**20:.0f}'} |"
        )
    print(
        f"\nthroughput ratio scion / raw encode_batch: {raw_s / rows[1][2]:.2f}x "
        "(scion's tokens include the EOS that ends each document)"
    )
    if len(rows) > 2:
        print(f"peak memory, {args.scale}x corpus / 1x corpus: {rows[2][5] / rows[1][5]:.2f}x")


if __name__ == "__main__":
    main()
