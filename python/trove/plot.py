"""Plots from the --json reports of trove.bench_e2e (tokens/s per variant, over a batch sweep)
and trove.train_e2e (loss curves), drawn with matplotlib into the file named, and nowhere else:

  python -m trove.plot bench.json -o bench.png
  python -m trove.plot run.json -o loss.png
"""
import argparse
import json
import sys


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m trove.plot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("report", help="a --json report of trove.bench_e2e or trove.train_e2e")
    p.add_argument("-o", "--output", required=True, help="the image to write (.png, .svg, .pdf)")
    args = p.parse_args(argv)
    with open(args.report) as f:
        report = json.load(f)
    if "variants" in report:
        from .bench_e2e import plot
    elif "runs" in report:
        from .train_e2e import plot
    else:
        raise SystemExit(f"{args.report}: not a report of trove.bench_e2e or trove.train_e2e")
    plot(report, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
