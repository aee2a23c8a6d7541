"""Run a detection suite: the same as ``gradtail bench SUITE --output OUT`` (docs/detection.md, "Suites"),
kept as a script for the commands quoted in older notes.

    python benchmarks/detection_suite.py suites/detection_3seeds.yaml OUT
"""

from __future__ import annotations

import argparse
import sys

from gradtail.cli.main import main as gradtail_main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("suite")
    p.add_argument("out")
    p.add_argument("--seeds", type=int, nargs="*")
    args = p.parse_args()
    argv = ["bench", args.suite, "--output", args.out]
    if args.seeds:
        argv += ["--seeds", *map(str, args.seeds)]
    return gradtail_main(argv)


if __name__ == "__main__":
    sys.exit(main())
