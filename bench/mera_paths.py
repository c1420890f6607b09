"""MERA's weight-sized paths on VGG-16's fc6 (4096x25088), old code against new in one window.

    python bench/mera_paths.py --against REV [--ratio 2000] [--out bench/results/mera-paths.md]

Times, for the tree in this checkout and for git revision REV (checked out into a temporary
worktree), each in its own process and alternated (REV, this, REV, this, ...: ``--rounds``) so
that both see the same machine: one fit step (``accumulate_squared_distance`` and its backward,
what each Adam step of the weight-space stage runs), ``forward(out=...)`` without autograd (what
``expand`` and the dense schedule run), the whole ``row_blocks`` pass and ``blocked_linear`` at batch 1 (the blocked
schedule), and the dense ``x @ W.T`` for scale. Random cores (timing does not depend on their
values); medians of 5 after a warm-up (``runtime.median_ms``); 2 threads. Machines differ from
day to day (a shared cloud host): compare only the rows of one run.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from runtime import median_ms  # bench/runtime.py: this script's folder is on sys.path

ROOT = Path(__file__).resolve().parent.parent


def child(ratio: float) -> dict:
    import torch

    from adntn.core.registry import generator_class
    from adntn.networks.budget import spec_for_ratio

    torch.manual_seed(0)
    torch.set_num_threads(2)
    spec = spec_for_ratio("mera", (4096, 25088), ratio, "tanh")
    net = generator_class("mera")(spec)
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.normal_(0, 0.3)
    target = torch.randn(spec.leg_dims) * 0.01
    norm_sq = target.pow(2).sum()

    def step() -> None:
        net.zero_grad(set_to_none=True)
        net.accumulate_squared_distance(target, norm_sq, 1 / norm_sq)

    out = torch.zeros(spec.shape)
    x = torch.randn(1, spec.shape[1])
    dense = torch.randn(spec.shape)
    row = {"fit_step_ms": median_ms(step, 5)}
    with torch.no_grad():
        row["forward_out_ms"] = median_ms(lambda: net(out=out), 5)
        row["row_blocks_ms"] = median_ms(lambda: [None for _ in net.row_blocks()], 5)
        row["blocked_linear_b1_ms"] = median_ms(lambda: net.blocked_linear(x), 5)
        row["dense_b1_ms"] = median_ms(lambda: x @ dense.T, 5)
    return row


def run_child(src: Path, ratio: float) -> dict:
    result = subprocess.run([sys.executable, __file__, "--child", str(ratio)], capture_output=True, text=True,
                            check=True, env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin"})
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--against", help="git revision to compare with (e.g. HEAD~1)")
    parser.add_argument("--ratio", type=float, default=2000)
    parser.add_argument("--rounds", type=int, default=3, help="processes per revision, alternated")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "mera-paths.md")
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child)))
        return 0
    if not args.against:
        parser.error("--against REV is required")
    here = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, check=True).stdout.strip()
    label = here + ("-dirty" if dirty else "")
    with tempfile.TemporaryDirectory() as work:
        old = Path(work) / "old"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(old), args.against],
                       check=True)
        try:
            rows = {args.against: [], label: []}
            for _ in range(args.rounds):
                for name, src in ((args.against, old / "src"), (label, ROOT / "src")):
                    rows[name].append(run_child(src, args.ratio))
                    print(f"[mera-paths] {name}: {rows[name][-1]}", file=sys.stderr, flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], check=True)
    keys = ["fit_step_ms", "forward_out_ms", "row_blocks_ms", "blocked_linear_b1_ms", "dense_b1_ms"]
    load = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"
    lines = [
        "# MERA's weight-sized paths, fc6 of VGG-16 (4096x25088)",
        "",
        f"`python bench/mera_paths.py --against {args.against} --ratio {args.ratio:g} --rounds {args.rounds}`; "
        f"{platform.machine()} {platform.processor() or ''}, 2 threads, "
        f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')}, 1-minute load {load} after. {args.rounds} processes per "
        "revision, alternated; each cell their medians (of 5 each). Random cores.",
        "",
        "| revision | " + " | ".join(k.removesuffix("_ms").replace("_", " ") + " ms" for k in keys) + " |",
        "|---|" + "---:|" * len(keys),
    ]
    for name, runs in rows.items():
        lines.append(f"| {name} | " + " | ".join(" / ".join(f"{r[k]:.0f}" for r in runs) for k in keys) + " |")
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
