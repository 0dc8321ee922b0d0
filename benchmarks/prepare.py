"""`scion prepare` against raw `tokenizers` encode_batch on the same corpus.

    python benchmarks/prepare.py                  # a 20 MB corpus, and 10x that for peak memory
    python benchmarks/prepare.py --mb 50 --scale 4
    python benchmarks/prepare.py --source hf      # only the Hugging Face data set case

The corpus is the bundled Shakespeare, repeated with variations (each copy shuffles the order
of lines within a file and changes letter case on some of them) into files of about 4 MB. The
tokenizer is a byte-level BPE of 8192 tokens trained by scion on the bundled corpus. Each prepare
runs in a fresh subprocess (`scion prepare ...` as a user runs it), which reports its own peak
resident memory; the baseline encodes the same pieces with `tokenizers`' encode_batch in the
same batches, in this process, and writes nothing. `seconds` is the manifest's own time (read,
tokenize, write); `process wall s` adds the start-up (imports, and for hf: listing the data set).

The `hf` case writes the same text as a data set laid out as the hub lays it out
(data/train-00000-of-000NN.parquet, one file per text file, a record per block of lines, with an
`id` column beside `text` as hub data sets have) and runs `scion prepare --data hf:FOLDER`, which
streams it through `datasets`; its baseline is encode_batch on the same records' pieces.
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

import pyarrow as pa
import pyarrow.parquet as pq

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


def build_hub_folder(corpus: Path, folder: Path) -> int:
    """The corpus as a hub-style Parquet data set: one file per text file, one record per block."""
    files = sorted(corpus.glob("*.txt"))
    (folder / "data").mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(files):
        docs = [d for d in f.read_text(encoding="utf-8").split("\n\n") if d]
        table = pa.table({"text": docs, "id": [f"{f.stem}-{j}" for j in range(len(docs))]})
        pq.write_table(table, folder / "data" / f"train-{i:05d}-of-{len(files):05d}.parquet")
    return sum(f.stat().st_size for f in files)


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


def scion_prepare(data: Path | str, tok: Path, out: Path) -> dict:
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
    ap.add_argument("--source", choices=["text", "hf", "both"], default="both",
                    help="text files, a hub-style Parquet data set (hf:FOLDER), or both")
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
        threads = os.environ.get("RAYON_NUM_THREADS", str(os.cpu_count()))
        print(f"corpus {size / 2**20:.1f} MB in {len(list(corpus.iterdir()))} files; tokenizers {threads} threads",
              flush=True)
        cases = []
        if args.source in ("text", "both"):
            cases.append(("scion prepare", corpus, big, lambda folder: folder))
        if args.source in ("hf", "both"):
            for folder in (corpus, big):
                if folder.exists() and not (work / f"{folder.name}-hf").exists():
                    build_hub_folder(folder, work / f"{folder.name}-hf")
            cases.append(("scion prepare hf:", work / "corpus-hf", work / "corpus-big-hf", lambda f: f"hf:{f}"))
        results = []
        for name, small_data, big_data, as_data in cases:
            # The baseline encodes the very files the case reads (text files, or the Parquet files).
            raw_s, raw_tokens = raw_encode(expand_paths([str(small_data)]), tok)
            small = scion_prepare(as_data(small_data), tok_dir, work / "out")
            rows = [
                (f"tokenizers encode_batch ({'Parquet' if 'hf' in name else 'text'})", size, raw_s, raw_s,
                 raw_tokens, None),
                (name, size, small["prepare_s"], small["wall_s"], small["tokens"], small["peak_rss"]),
            ]
            if big_size:
                large = scion_prepare(as_data(big_data), tok_dir, work / "out-big")
                rows.append((f"{name} ({args.scale}x corpus)", big_size, large["prepare_s"], large["wall_s"],
                             large["tokens"], large["peak_rss"]))
            results.append((name, raw_s, rows))
            shutil.rmtree(work / "out", ignore_errors=True)
            shutil.rmtree(work / "out-big", ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    print("\n| what | corpus MB | seconds | MB/s | process wall s | tokens | peak RSS MB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for _, _, rows in results:
        for name, nbytes, secs, wall, tokens, rss in rows:
            print(
                f"| {name} | {nbytes / 2**20:.0f} | {secs:.1f} | {nbytes / 2**20 / secs:.2f} | {wall:.1f} | "
                f"{tokens:,} | {'' if rss is None else f'{rss / 2**20:.0f}'} |"
            )
    print()
    for name, raw_s, rows in results:
        print(f"{name}: throughput ratio against raw encode_batch on the same text {raw_s / rows[1][2]:.2f}x "
              "(scion's tokens include the EOS that ends each document)")
        if len(rows) > 2:
            print(f"{name}: peak RSS {rows[1][5] / 2**20:.0f} MB at 1x, {rows[2][5] / 2**20:.0f} MB at {args.scale}x "
                  f"({rows[2][5] / rows[1][5]:.2f}x)")


if __name__ == "__main__":
    main()
