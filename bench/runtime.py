"""bench-runtime: the compressed model at inference, without its dense weights.

    make bench-runtime            # or: python bench/runtime.py [--quick] [--threads 2]

1. Layers: VGG-16's fc6 (4096x25088) and fc7 (4096x4096), each arch at ~2,000x and ~50,000x
   (random cores: speed does not depend on their values), under ``auto`` (the schedule it picks is
   shown), against the dense ``nn.Linear`` of the same shape and TensorLy-Torch's
   ``FactorizedLinear`` (BlockTT, factorized forward) at about the same parameter count; batch 1,
   32 and 256; median of ``--repeats`` after a warm-up; the layer's resident bytes (cores, cached
   operands or row blocks) against the dense weight's, as the cost model counts them, and as
   measured: the rise of the peak RSS that building the layer and two forwards cause in a fresh
   process (``layer_memory``), for the dense layer and the generated one.
2. Whole model: torchvision VGG-16 (random weights, saved as .pth: no download) with fc6+fc7
   compressed by ttn at 2,000x (weight-space stage only); each variant in a fresh process: the
   directory's size, load time, resident memory after load (VmRSS, and above the imports),
   images/s at batch 1 and 32 on 224x224 inputs; the dense model loaded from its .pth; the ONNX
   file (``adntn export``) in onnxruntime: size, load time, latency.

Writes bench/results/runtime.json and runtime.md. Timings need an idle machine: a second busy
process on the same cores makes each multi-threaded op wait for a scheduler slice (we saw 0.1 ms
layers take 32 ms), so the load average is recorded with the results.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = {"fc6": (4096, 25088), "fc7": (4096, 4096)}
ARCHS = ("ttn", "attn", "mera", "tt", "svd")
RATIOS = (2000, 50000)
BATCHES = (1, 32, 256)
MARK = "@@RESULT@@"


def median_ms(call, repeats: int) -> float:
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
        if times[-1] > 2.0 and len(times) >= 3:  # slow cases: three runs are enough
            break
    return 1000 * statistics.median(times)


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) * 1024
    return 0


def tltorch_layer(shape: tuple[int, int], spec, core_params: int):
    """TensorLy-Torch's BlockTT FactorizedLinear over the balanced digits of ``choose_leg_factors``
    (as many legs as ``spec``; ttn and attn move digits between their halves, which is theirs),
    at the rank whose weight parameters come closest to ``core_params`` from below (at least rank 1)."""
    try:
        import tltorch
    except ImportError:  # pip install -e '.[bench]'
        return None
    from adntn.core.tensorize import choose_leg_factors

    out_dims, in_dims = choose_leg_factors(shape[0], shape[1], spec.n_legs)
    best = None
    for rank in range(1, 65):
        layer = tltorch.FactorizedLinear(in_tensorized_features=in_dims, out_tensorized_features=out_dims,
                                         factorization="blocktt", rank=rank, implementation="factorized", bias=True)
        params = sum(p.numel() for p in layer.parameters()) - shape[0]
        if best is not None and params > core_params:
            break
        best = (layer.eval(), params, rank)
    return best


def generated_layer(spec, bias=None):
    """The generated ``nn.Linear`` of ``spec`` in eval mode, its disentanglers moved off the
    identity (P ~ N(0, 0.1)) as after a fit: random cores, speed and memory do not depend on them."""
    import torch

    from adntn.models.layers import GeneratedLinear
    from adntn.networks import build

    generator = build(spec)
    with torch.no_grad():
        for key, p in generator.named_parameters():
            if key.endswith(".p"):
                p.normal_(0, 0.1)
    return GeneratedLinear(generator, bias).eval()


def layer_rows(args) -> list[dict]:
    import torch
    from torch import nn

    from adntn.errors import AdntnError
    from adntn.models.layers import inference_cost
    from adntn.networks.budget import spec_for_ratio

    torch.manual_seed(0)
    rows = []
    dense_rss: dict[tuple[str, int], dict] = {}  # measured once per layer and batch
    with torch.no_grad():
        for name, shape in LAYERS.items():
            dense = nn.Linear(shape[1], shape[0]).eval()
            for arch in args.archs:
                for ratio in args.ratios:
                    try:
                        spec = spec_for_ratio(arch, shape, ratio, "tanh", label=name)
                    except AdntnError as error:
                        rows.append({"layer": name, "arch": arch, "ratio": ratio, "skipped": str(error)})
                        continue
                    layer = generated_layer(spec, dense.bias)
                    generator = layer.generator
                    tl = tltorch_layer(shape, spec, spec.core_params) if spec.n_legs > 1 else None
                    for batch in args.batches:
                        x = torch.randn(batch, shape[1])
                        row = {"layer": name, "arch": arch, "ratio": round(spec.ratio), "core_params": spec.core_params,
                               "batch": batch, "dense_ms": median_ms(lambda: dense(x), args.repeats),
                               "adntn_ms": median_ms(lambda: layer(x), args.repeats),
                               "schedule": layer.resolve_schedule(batch, x)}
                        measure = {"layer": name, "shape": list(shape), "ratio": ratio, "batch": batch,
                                   "threads": args.threads}
                        row["rss"] = run_child("layer", {**measure, "arch": arch})
                        if (name, batch) not in dense_rss:
                            dense_rss[name, batch] = run_child("layer", {**measure, "arch": "dense"})
                        row["dense_rss"] = dense_rss[name, batch]
                        cost = inference_cost(generator, batch)[row["schedule"]]
                        row["adntn_bytes"] = cost["bytes"]
                        row["dense_bytes"] = 4 * spec.dense_params
                        if tl is not None:
                            try:
                                row["tltorch_ms"] = median_ms(lambda: tl[0](x), args.repeats)
                                row["tltorch_params"], row["tltorch_rank"] = tl[1], tl[2]
                            except RuntimeError as error:  # e.g. its einsum runs out of letters for 16 legs
                                row["tltorch_error"] = str(error).splitlines()[0][:120]
                        rows.append(row)
                        print(json.dumps(row), flush=True)
    return rows


def layer_memory(payload: dict) -> dict:
    """In a fresh process, what one layer adds to the resident memory: a first copy of the layer
    (the dense ``nn.Linear``, or the generated layer as ``layer_rows`` makes it) is built, run and
    dropped, so that one-off costs are paid; then VmRSS, a second copy built, the peak (VmHWM)
    reset to the resident set, two forwards without autograd; the peak's rise over that reading
    (cores or weight, cached operands, the forward's temporaries and its output) and what stays
    resident after the forwards (with what malloc keeps of freed temporaries)."""
    import torch
    from torch import nn

    from adntn.memory import trim_heap
    from adntn.networks.budget import spec_for_ratio
    from speed import hwm_bytes

    torch.set_num_threads(payload["threads"])
    rows, cols = payload["shape"]

    def built() -> nn.Module:
        torch.manual_seed(0)
        if payload["arch"] == "dense":
            return nn.Linear(cols, rows).eval()
        return generated_layer(spec_for_ratio(payload["arch"], tuple(payload["shape"]), payload["ratio"], "tanh",
                                              label=payload["layer"]))

    x = torch.randn(payload["batch"], cols)
    with torch.no_grad():  # a first layer pays the one-off costs (lazy imports, BLAS buffers), then goes
        built()(x)
    gc.collect()
    trim_heap()
    base = rss_bytes()
    layer = built()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    with torch.no_grad():
        layer(x)
        layer(x)
    return {"rss_added": hwm_bytes() - base, "rss_held": rss_bytes() - base}


# ------------------------------------------------------------------------------- whole model

def child(kind: str, payload: dict) -> dict:
    import torch

    if kind == "layer":
        return layer_memory(payload)
    torch.set_num_threads(payload["threads"])
    images = {batch: torch.randn(batch, 3, 224, 224) for batch in (1, 32)}
    if kind == "onnx":
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = payload["threads"]
        base = rss_bytes()
        start = time.perf_counter()
        session = onnxruntime.InferenceSession(payload["path"], options)
        seconds = time.perf_counter() - start
        run = {batch: (lambda x=x: session.run(None, {"input": x.numpy()})) for batch, x in images.items()}
        result = {"load_s": seconds, "rss_after_load": rss_bytes(), "rss_above_imports": rss_bytes() - base}
    else:
        import adntn  # noqa: F401  (both variants pay the same imports)
        import torchvision

        base = rss_bytes()
        start = time.perf_counter()
        if kind == "dense":
            model = torchvision.models.vgg16()
            model.load_state_dict(torch.load(payload["path"], weights_only=True, mmap=False))
            model.eval()
        else:
            model = adntn.load(payload["path"])
        seconds = time.perf_counter() - start
        result = {"load_s": seconds, "rss_after_load": rss_bytes(), "rss_above_imports": rss_bytes() - base}
        run = {batch: (lambda x=x: model(x)) for batch, x in images.items()}
    with torch.no_grad():
        for batch, call in run.items():
            result[f"images_per_s_{batch}"] = batch / (median_ms(call, payload["repeats"]) / 1000)
    from speed import hwm_bytes

    result["peak_rss"] = hwm_bytes()
    return result


def run_child(kind: str, payload: dict) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", kind, json.dumps(payload)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    line = next((l for l in done.stdout.splitlines() if l.startswith(MARK)), None)
    if line is None:
        return {"error": (done.stderr or done.stdout)[-2000:]}
    return json.loads(line[len(MARK):])


def model_rows(args) -> dict:
    import torch
    import torchvision

    import adntn

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    pth = work / "vgg16.pth"
    if not pth.exists():
        torch.manual_seed(0)
        torch.save(torchvision.models.vgg16().state_dict(), pth)
    directory = work / "vgg16.adntn"
    if not (directory / "report.json").exists():
        adntn.compress(pth, layers=["fc6", "fc7"], arch="ttn", ratio=2000, steps=0).save(directory, force=True)
    onnx = work / "vgg16.onnx"
    if not onnx.exists():
        adntn.export_onnx(directory, onnx)
    payload = {"threads": args.threads, "repeats": max(3, args.repeats // 2)}
    variants = {"dense": (pth, pth.stat().st_size),
                "adntn": (directory, sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())),
                "onnx": (onnx, onnx.stat().st_size)}
    rounds: dict[str, list[dict]] = {name: [] for name in variants}
    for _ in range(args.model_rounds):  # alternated processes: this machine's speed drifts between runs
        for name, (path, _) in variants.items():
            rounds[name].append(run_child(name, {**payload, "path": str(path)}))
    return {name: {"bytes": size, **summarised(rounds[name])} for name, (_, size) in variants.items()}


def summarised(runs: list[dict]) -> dict:
    """One variant's runs: each measured value's median, the images/s also as (least, most), and
    the runs themselves; the first error if any run failed."""
    failed = next((run for run in runs if "error" in run), None)
    if failed is not None:
        return failed
    summary = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    for key in [key for key in runs[0] if key.startswith("images_per_s")]:
        summary[key + "_range"] = (min(run[key] for run in runs), max(run[key] for run in runs))
    return {**summary, "runs": runs}


# ----------------------------------------------------------------------------------- report

def rss_cell(row: dict) -> str:
    """``layer_memory``'s peak and held rises, in MB: the dense layer's, then the generated one's."""
    dense, ours = row.get("dense_rss"), row.get("rss")
    if not dense or not ours or "rss_added" not in dense or "rss_added" not in ours:
        return "-"
    return "; ".join(f"{m['rss_added'] / 1e6:,.1f} / {m['rss_held'] / 1e6:,.1f}" for m in (dense, ours))


def images_per_s(row: dict, batch: int) -> str:
    value, spread = row[f"images_per_s_{batch}"], row.get(f"images_per_s_{batch}_range")
    return f"{value:.2f}" + ("" if spread is None else f" ({spread[0]:.2f} - {spread[1]:.2f})")


def markdown(results: dict) -> str:
    lines = ["# bench-runtime: inference without dense weights", "",
             f"{results['machine']}; {results['threads']} threads; load average {results['load_before']} before, "
             f"{results['load_after']} after. Medians. `adntn` = the generated layer under `auto` "
             "(schedule shown); `tltorch` = TensorLy-Torch FactorizedLinear (BlockTT, factorized forward, "
             "rank matched to the core parameters from below).", "",
             *([results["rerun"] + ".", ""] if "rerun" in results else [])]
    if results["layers"]:
        lines += ["| layer | arch | ratio | batch | schedule | dense ms | adntn ms | speed-up | tltorch ms (rank) "
                  "| adntn bytes | % of dense weight | RSS added MB, peak / held: dense; adntn |",
                  "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results["layers"]:
        if "skipped" in r:
            lines.append(f"| {r['layer']} | {r['arch']} | {r['ratio']} | - | - | - | - | - | - | - | - | {r['skipped']} |")
            continue
        tl = f"{r['tltorch_ms']:.3f} ({r['tltorch_rank']})" if "tltorch_ms" in r else \
            ("fails" if "tltorch_error" in r else "-")
        lines.append(f"| {r['layer']} | {r['arch']} | {r['ratio']:,} | {r['batch']} | {r['schedule']} | "
                     f"{r['dense_ms']:.3f} | {r['adntn_ms']:.3f} | {r['dense_ms'] / r['adntn_ms']:.1f}x | {tl} | "
                     f"{r['adntn_bytes']:,} | {100 * r['adntn_bytes'] / r['dense_bytes']:.2f} | {rss_cell(r)} |")
    model = results.get("model")
    if model:
        runs = len(next(iter(model.values())).get("runs", [None]))
        lines += ([""] if results["layers"] else []) + ["Whole model: VGG-16 (torchvision, random weights), fc6+fc7 by ttn at 2,000x, 224x224"
                  + (f"; each variant in {runs} fresh processes, alternated with the others: medians, images/s "
                     "also (least - most)." if runs > 1 else "."), "",
                  "| variant | file bytes | load s | RSS after load | RSS above imports | peak RSS (after the runs) "
                  "| images/s b=1 | images/s b=32 |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for name, row in model.items():
            if "error" in row:
                lines.append(f"| {name} | {row['bytes']:,} | error: {row['error'][-200:]!r} ||||||")
                continue
            lines.append(f"| {name} | {row['bytes']:,} | {row['load_s']:.3f} | {row['rss_after_load'] / 1e6:,.0f} MB | "
                         f"{row['rss_above_imports'] / 1e6:,.0f} MB | {row['peak_rss'] / 1e6:,.0f} MB | "
                         f"{images_per_s(row, 1)} | {images_per_s(row, 32)} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", nargs=2, metavar=("KIND", "PAYLOAD"), help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--archs", default=",".join(ARCHS))
    parser.add_argument("--quick", action="store_true", help="fc7 only, ttn, batch 1 and 32, no whole model")
    parser.add_argument("--no-model", action="store_true", help="skip the whole-model part")
    parser.add_argument("--no-layers", action="store_true", help="the whole-model part only")
    parser.add_argument("--model-rounds", type=int, default=3,
                        help="fresh processes per whole-model variant, alternated (default 3)")
    parser.add_argument("--work", default="/tmp/adntn-bench-runtime")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "runtime.json")
    args = parser.parse_args()
    if args.child:
        result = child(args.child[0], json.loads(args.child[1]))
        sys.stdout.write(MARK + json.dumps(result) + "\n")
        return 0
    import torch

    torch.set_num_threads(args.threads)
    args.archs = args.archs.split(",")
    args.ratios, args.batches = RATIOS, BATCHES
    if args.quick:
        LAYERS.pop("fc6")
        args.archs, args.batches = ["ttn"], (1, 32)
    from speed import machine_info  # bench/speed.py: the CPU's model and the commit, as its results name them

    info = machine_info()
    commit = (info["git_commit"] or "unknown")[:7] + ("-dirty" if info["src_uncommitted_changes"] else "")
    results = {"machine": f"{info['cpu']} ({platform.machine()}, {os.cpu_count()} cores), torch {torch.__version__}, "
                          f"git {commit}",
               "threads": args.threads, "load_before": round(os.getloadavg()[0], 2)}
    results["layers"] = [] if args.no_layers else layer_rows(args)
    if not (args.quick or args.no_model):
        results["model"] = model_rows(args)
    results["load_after"] = round(os.getloadavg()[0], 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
