"""scion report: an HTML page with the figures of one or several runs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from scion.errors import ScionError

EXAMPLES = """
The folder holds index.html and PNG figures: loss against tokens, learning rate, gradient norm,
tokens/s and MFU, the samples taken during training, evaluation scores (RUN/eval/*.json) and
lazy layers (RUN/lazy/, written by scion lazy), whatever of these the runs have.

examples:
  scion report runs/a                          # writes runs/a/report/index.html
  scion report runs/inheritune runs/baseline --out reports/cmp
"""


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="scion report",
                                description="Write an HTML report of training runs." + EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (several share each chart)")
    p.add_argument("--out", default=None, help="report folder (default for one run: RUN_DIR/report)")
    args = p.parse_args(argv)
    if args.out is None and len(args.runs) > 1:
        raise ScionError("--out is needed for a report of several runs")
    out = Path(args.out) if args.out else Path(args.runs[0]) / "report"

    from scion.analysis.run_report import write_report

    index = write_report(args.runs, out)
    print(f"wrote {index} (open it in a browser)", file=sys.stderr)
    return 0
