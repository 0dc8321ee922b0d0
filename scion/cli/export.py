"""scion export: write a run's checkpoint as a Hugging Face model folder."""

from __future__ import annotations

import argparse
import sys

EXAMPLES = """
examples:
  scion export runs/a --hf out/a                       # the latest checkpoint
  scion export runs/a --hf out/a-step1000 --checkpoint 1000
  python -c "from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained('out/a')"
"""


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="scion export", description=__doc__.splitlines()[0] + EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run directory or checkpoint folder")
    p.add_argument("--hf", required=True, metavar="OUT_DIR", help="folder to write the Hugging Face model to")
    p.add_argument("--checkpoint", default=None, help="step number or checkpoint name (default: latest)")
    p.add_argument("--overwrite", action="store_true", help="replace a model exported there before")
    args = p.parse_args(argv)

    from scion.interop import export_hf

    out = export_hf(args.run, args.hf, checkpoint=args.checkpoint, overwrite=args.overwrite)
    arch = __import__("json").loads((out / "config.json").read_text())["architectures"][0]
    print(f"exported {args.run} -> {out} ({arch}); load it with "
          f"AutoModelForCausalLM.from_pretrained({str(out)!r})", file=sys.stderr)
    return 0
