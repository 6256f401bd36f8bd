#!/usr/bin/env python
"""Print the ticket table of one or more loft_ext runs (their summary.json ticket rows).

  python recipes/compare_runs.py runs/*            every run under runs/
  python recipes/compare_runs.py RUN_DIR --sort test_acc

Per run: samples/wkr (training samples one worker process passed in pretraining) and samples (all S x D
of them), so rows with different budgets are visible: dense on N processes is data parallel (N-times
larger global batch, 1/N of the steps per epoch), LoFT with S=N gives every worker the whole epoch.
pre MiB sums every pretraining phase that sent bytes (docs/usage.md, "Comparing tickets").
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from loft_ext.report import format_table  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories (each holding summary.json)")
    parser.add_argument("--sort", default="", help="sort rows by this column (e.g. test_acc, ratio, method)")
    args = parser.parse_args(argv)
    rows, missing = [], []
    for run in args.runs:
        path = os.path.join(run, "summary.json")
        if not os.path.isfile(path):
            missing.append(run)
            continue
        with open(path) as f:
            rows += json.load(f).get("ticket_rows", [])
    if missing:
        print(f"skipped (no summary.json, not a finished run): {', '.join(missing)}", file=sys.stderr)
    if not rows:
        print("error: no ticket rows found; run recipes/loft_timm.py with --ratios first", file=sys.stderr)
        return 2
    if args.sort:
        rows.sort(key=lambda r: (r.get(args.sort) is None, r.get(args.sort)))
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
