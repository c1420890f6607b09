"""One timed weight-space compress of fc6+fc7, for A/B runs of two versions of the code.

Run it in alternated fresh processes, the other version first on ``PYTHONPATH`` (a worktree of
the older commit); it prints one JSON line: the label, which adntn was imported, the wall
seconds and the 1-minute load average after. ``bench/results/mera-fit-tanh.md`` ran

    python bench/ab/mera_compress.py new 2000
    PYTHONPATH=/tmp/ab-old/src python bench/ab/mera_compress.py old 2000

on the random-init VGG-16 that ``bench/speed.py`` builds in its work folder.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import adntn
from adntn.pipeline.compress import compress_to
from adntn.pipeline.options import CompressOptions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("label", help="what this run is, e.g. new or old")
    parser.add_argument("ratio", type=float)
    parser.add_argument("--arch", default="mera")
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/adntn-bench/vgg16-random-seed0.pt"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        start = time.perf_counter()
        compress_to(args.checkpoint, ["fc6", "fc7"], Path(work) / "out.adntn",
                    options=CompressOptions(arch=args.arch, ratio=args.ratio))
        seconds = time.perf_counter() - start
    print(json.dumps({"label": args.label, "adntn": adntn.__file__, "arch": args.arch, "ratio": args.ratio,
                      "seconds": round(seconds, 1), "load": Path("/proc/loadavg").read_text().split()[0]}), flush=True)


if __name__ == "__main__":
    main()
