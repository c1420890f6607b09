"""Latency of VGG-16's fc6 / fc7 as TTN layers without the dense weight (factorized, blocked)
against a dense nn.Linear, at batch 1, 32 and 256; writes bench/results/runtime-layers.md.

    PYTHONPATH=src python bench/runtime_layers.py [--threads 2] [--repeats 7]

Random cores (build(spec)); the spec from spec_for_ratio('ttn', shape, ratio, 'tanh'). Times are
the median of ``repeats`` runs after one warm-up, under torch.no_grad, eval mode.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from adntn.models.layers import GeneratedLinear, inference_cost
from adntn.networks import build
from adntn.networks.budget import spec_for_ratio

LAYERS = {"fc6": (4096, 25088), "fc7": (4096, 4096)}
RATIOS = (2000, 50000)
BATCHES = (1, 32, 256)


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "runtime-layers.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    with torch.no_grad():
        for name, shape in LAYERS.items():
            dense = nn.Linear(shape[1], shape[0]).eval()
            for ratio in RATIOS:
                spec = spec_for_ratio("ttn", shape, ratio, "tanh")
                layer = GeneratedLinear(build(spec), dense.bias).eval()
                for batch in BATCHES:
                    x = torch.randn(batch, shape[1])
                    result = {"layer": name, "ratio": round(spec.ratio), "bonds": list(spec.bond_dims),
                              "legs": spec.n_legs, "batch": batch}
                    result["dense_ms"] = median_ms(lambda: dense(x), args.repeats)
                    for schedule in ("factorized", "blocked"):
                        layer.schedule = schedule
                        result[f"{schedule}_ms"] = median_ms(lambda: layer(x), args.repeats)
                    layer.schedule = "auto"
                    result["auto"] = layer.resolve_schedule(batch, x)
                    cost = inference_cost(layer.generator, batch)
                    result["state_bytes"] = layer.generator.linear_state_bytes()
                    result["core_bytes"] = sum(p.numel() * 4 for p in layer.generator.parameters())
                    result["factorized_mflops"] = cost["factorized"]["flops"] / 1e6
                    result["dense_mflops"] = 2 * batch * shape[0] * shape[1] / 1e6
                    rows.append(result)
                    print(json.dumps(result), flush=True)
    lines = [f"# Runtime of generated layers (VGG-16 fc6/fc7, TTN, random cores)", "",
             f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
             f"{args.threads} threads, median of {args.repeats}, no_grad. dense = nn.Linear with the "
             "weight in memory; factorized / blocked never hold the dense weight. state = cached "
             "factorized operands (bytes), cores = stored parameters.", "",
             "| layer | ratio | batch | dense ms | factorized ms | blocked ms | auto | state KB | cores KB "
             "| factorized MFLOP | dense MFLOP |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['ratio']} | {r['batch']} | {r['dense_ms']:.2f} | "
                     f"{r['factorized_ms']:.3f} | {r['blocked_ms']:.1f} | {r['auto']} | "
                     f"{r['state_bytes'] / 1024:.0f} | {r['core_bytes'] / 1024:.0f} | "
                     f"{r['factorized_mflops']:.1f} | {r['dense_mflops']:.0f} |")
    lines += ["", "```json", json.dumps(rows, indent=1), "```", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
