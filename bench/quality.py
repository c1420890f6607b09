"""make bench-quality: fc6+fc7 of the CIFAR-10 VGG-16-BN compressed by every arch at several ratios.

Needs the project's shared data beside the checkout (or --shared DIR):
    shared/models/vgg16_bn_cifar10.safetensors   the reference model (test top-1 0.878)
    shared/data/cifar10-jpg.tar.gz               CIFAR-10 as JPEG ImageFolder (train/, test/)
Each row runs the whole pipeline (weight-space fit, activation-space fit, CE+KD fine-tuning on
train/, top-1 on the 10,000 test images) through the library, exactly as `adntn compress --data`
does. The convolutional features are computed once and cached in --work. Rows are appended to
the JSON and Markdown results as they finish, so a partial run keeps what it measured; rows of an
earlier run with the same settings are kept (a row run again replaces its old result).

    python bench/quality.py --out bench/results/quality.json [--rows ttn-2000,...] [--epochs 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch

import adntn
from adntn.networks.budget import smallest_spec, spec_for_ratio
from adntn.progress import RichProgress

ROOT = Path(__file__).resolve().parent.parent
COMMIT = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                        text=True).stdout.strip() or None
LAYERS = {"fc6": (4096, 512), "fc7": (4096, 4096)}
ARCHS = adntn.networks.archs()
RATIOS = (2000, 10000, 50000)
PRIORITY = ("ttn-10000", "tt-10000", "ttn-total424", "ttn-total424-fc8", "ttn-2000", "tt-2000", "svd-2000", "ttn-50000", "tt-50000",
            "ttn-total200", "mera-10000", "attn-10000", "mera-2000", "attn-2000")  # run order: a partial run keeps these
# The smallest budgets, split between the layers: fc6 (the 512 trunk features in) at bond 2 or
# (2, 1, 1, 1), fc7 the same; 158 + 182 = 340 and 82 + 106 = 188 parameters. A first run with fc6
# at its 60-parameter minimum and 342 in fc7 reached 0.8393 (ttn-total424-fc6min).
SMALLEST_BUDGETS = {424: {"fc6": 13000, "fc7": 80000}, 200: {"fc6": 25000, "fc7": 120000}}
CAPPED_SHARE = 0.5  # a layer that cannot reach the ratio is run at its smallest if within this share
EXTREME_EPOCHS = 3  # rows at >= 50,000x or at the smallest budgets train longer, and without dropout


def smallest_ratio(arch: str, shape: tuple[int, int]) -> float:
    """The largest ratio any spec of ``arch`` reaches on ``shape``."""
    return smallest_spec(arch, shape, "tanh").ratio


def plan_rows() -> list[dict]:
    """Rows: every arch at every ratio (capped per layer where the structure stops short) and the
    smallest TTN budgets (the ADTN mark: 424 parameters for fc6+fc7 together)."""
    rows = []
    for arch in ARCHS:
        for ratio in RATIOS:
            layer_ratios, notes = {}, []
            for name, shape in LAYERS.items():
                top = smallest_ratio(arch, shape)
                if top >= ratio:
                    layer_ratios[name] = ratio
                elif top >= CAPPED_SHARE * ratio:
                    layer_ratios[name] = top
                    notes.append(f"{name} at its smallest generator ({top:,.0f}x)")
                elif arch == "svd" and ratio == RATIOS[0]:
                    layer_ratios[name] = top
                    notes.append(f"{name} at rank 1 ({top:,.0f}x): more parameters than the other rows")
                else:
                    notes.append(f"{name} cannot reach {ratio:,}x (smallest generator: {top:,.0f}x)")
                    layer_ratios = None
                    break
            rows.append({"id": f"{arch}-{ratio}", "arch": arch, "ratio": ratio, "layer_ratios": layer_ratios,
                         "notes": notes, "extreme": ratio >= 50000})
    for total, layer_ratios in SMALLEST_BUDGETS.items():
        params = sum(spec_for_ratio("ttn", LAYERS[name], ratio, "tanh").core_params for name, ratio in layer_ratios.items())
        assert params <= total, (total, params)
        rows.append({"id": f"ttn-total{total}", "arch": "ttn", "ratio": None, "layer_ratios": layer_ratios,
                     "notes": [f"smallest budget: at most {total} parameters for fc6+fc7"], "extreme": True})
    rows.append({"id": "ttn-total424-fc8", "arch": "ttn", "ratio": None, "layer_ratios": SMALLEST_BUDGETS[424],
                 "train": ["fc8"], "extreme": True,
                 "notes": ["as ttn-total424, with the dense fc8 (40,970 parameters, not compressed) fine-tuned too (--train fc8)"]})
    # one budget for fc6+fc7, split by measured sensitivity (--budget; pipeline.allocate), not by hand
    for arch in ("ttn", "attn", "mera"):
        for total in SMALLEST_BUDGETS:
            rows.append({"id": f"{arch}-budget{total}", "arch": arch, "ratio": None, "layer_ratios": None,
                         "budget": total, "extreme": True,
                         "notes": [f"--budget {total} for fc6+fc7, split by distillation probes"]})
    order = {row_id: index for index, row_id in enumerate(PRIORITY)}
    return sorted(rows, key=lambda row: order.get(row["id"], len(order)))


def prepare_data(shared: Path, work: Path) -> tuple[Path, Path]:
    model = shared / "models" / "vgg16_bn_cifar10.safetensors"
    archive = shared / "data" / "cifar10-jpg.tar.gz"
    if not model.is_file() or not archive.is_file():
        sys.exit(f"bench-quality needs {model} and {archive}: put the project's shared/ folder beside the "
                 "checkout (../shared) or pass --shared DIR. Nothing was measured.")
    data = work / "cifar10"
    if not (data / "test").is_dir():
        work.mkdir(parents=True, exist_ok=True)
        staging = work / "cifar10.partial"
        with tarfile.open(archive) as tar:
            tar.extractall(staging, filter="data")
        inner = next(p for p in [staging, *staging.iterdir()] if (p / "train").is_dir())
        inner.rename(data)
    return model, data


def run_row(row: dict, model: Path, data: Path, work: Path, args) -> dict:
    epochs = max(args.epochs, EXTREME_EPOCHS) if row["extreme"] else args.epochs
    sizing = {"budget": row["budget"]} if row.get("budget") else {"layer_ratios": row["layer_ratios"]}
    options = adntn.CompressOptions(arch=row["arch"], **sizing, steps=args.steps, lr=args.lr,
                              seed=args.seed, activation=args.activation, data=data, epochs=epochs,
                              finetune_lr=args.finetune_lr, batch_size=args.batch_size, dropout=not (row["extreme"] or args.no_dropout),
                              train=tuple(row.get("train", ())), cache_dir=work / "features")
    (work / "out").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with RichProgress() as progress:
        result = adntn.compress(model, list(LAYERS), options=options, progress=progress)
    result.save(work / "out" / f"{row['id']}.adntn", force=True)
    report = result.report
    layers = {layer["alias"]: layer for layer in report["layers"]}
    return {
        **row,
        "core_params": {name: layers[name]["core_params"] for name in LAYERS},
        "core_params_total": sum(layers[name]["core_params"] for name in LAYERS),
        "layer_ratio": {name: round(layers[name]["ratio"], 1) for name in LAYERS},
        "bond_dims": {name: layers[name]["bond_dims"] for name in LAYERS},
        "mix_ranks": {name: layers[name]["mix_ranks"] for name in LAYERS},
        **({"allocation": report["allocation"]} if "allocation" in report else {}),
        "weight_rel_error": {name: round(layers[name]["weight_rel_error"], 4) for name in LAYERS},
        "activation_rel_error": {name: round(layers[name]["activation_rel_error"], 4) for name in LAYERS},
        "top1": report["accuracy"]["compressed"]["top1"],
        "dense_top1": report["accuracy"]["dense"]["top1"],
        "test_images": report["accuracy"]["images"],
        "paired": report["accuracy"]["paired"],
        "train_images": report["training"]["train_images"],
        "epochs": epochs,
        "dropout": options.dropout,
        "trained": report["training"]["trained"],
        "seconds": round(time.perf_counter() - start, 1),
        "commit": COMMIT,
    }


def markdown(results: dict) -> str:
    lines = [
        "# bench-quality: VGG-16-BN on CIFAR-10, fc6 (4096x512) + fc7 (4096x4096) compressed together",
        "",
        f"{results['settings']}",
        "",
        "Code: each row names the commit it ran on (`commit`; rows without one ran on the code of "
        "2026-11-24). Compare rows of the same code only: the feature-cache shuffling fix (2026-12-01) and "
        "the stratified recording of the activation stage's inputs (2026-12-02) changed every data-aware row.",
        "",
        "Paired (rows that record it): top-1 agreement with dense on the test images; images right by "
        "dense only / by compressed only; McNemar's exact two-sided p-value for equal accuracy.",
        "",
        "| row | arch | fc6 core params (ratio) | fc7 core params (ratio) | total | epochs | test top-1 | dense top-1 | Δ points | paired: agree, lost / gained, p | wall s | commit | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        if "top1" not in row:
            lines.append(f"| {row['id']} | {row['arch']} | - | - | - | - | - | - | - | - | - | - | {'; '.join(row['notes']) or row.get('error', '')} |")
            continue
        delta = 100 * (row["top1"] - row["dense_top1"])
        paired = row.get("paired")
        pairs = "-" if paired is None else (f"{paired['top1_agreement']:.4f}, {paired['lost']} / {paired['gained']}, "
                                            f"{paired['mcnemar_p']:.2f}")
        lines.append(
            f"| {row['id']} | {row['arch']} | {row['core_params']['fc6']:,} ({row['layer_ratio']['fc6']:,.0f}x) | "
            f"{row['core_params']['fc7']:,} ({row['layer_ratio']['fc7']:,.0f}x) | {row['core_params_total']:,} | {row['epochs']}{'' if row.get('dropout', True) else ', no dropout'} | "
            f"{row['top1']:.4f} | {row['dense_top1']:.4f} | {delta:+.2f} | {pairs} | {row['seconds']:,.0f} | {row.get('commit', '-')} | {'; '.join(row['notes'])} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "quality.json")
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    parser.add_argument("--work", type=Path, default=Path("/tmp/adntn-bench-quality"))
    parser.add_argument("--rows", default="", help="comma-separated row ids (default: all)")
    parser.add_argument("--epochs", type=int, default=1, help=f"(rows at >= 50,000x or smallest budgets: {EXTREME_EPOCHS})")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--finetune-lr", type=float, default=1e-2)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--activation", default="tanh")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-dropout", action="store_true", help="fine-tune every row without dropout (default: only the extreme rows)")
    args = parser.parse_args()

    model, data = prepare_data(args.shared, args.work)
    wanted = {r for r in args.rows.split(",") if r}
    rows = [row for row in plan_rows() if not wanted or row["id"] in wanted]
    results = {
        "settings": (f"{args.epochs} epoch(s) CE+KD ({max(args.epochs, EXTREME_EPOCHS)} for the extreme rows) (Adam, constant lr {args.finetune_lr}, batch {args.batch_size}, "
                     f"{'dropout off' if args.no_dropout else 'dropout on; off for the extreme rows'}) after "
                     f"{args.steps} weight-space + {args.steps} activation-space Adam steps (lr {args.lr}); "
                     f"activation {args.activation}; seed {args.seed}; torch {torch.__version__}, "
                     f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"),
        "rows": [],
    }
    earlier = {}
    if args.out.exists():
        previous = json.loads(args.out.read_text())
        if previous.get("settings") == results["settings"]:
            earlier = {row["id"]: row for row in previous["rows"]}
    order = [row["id"] for row in plan_rows()]

    def save(row: dict) -> None:
        """Record ``row``, keeping the earlier rows measured with the same settings."""
        earlier[row["id"]] = row
        results["rows"] = sorted(earlier.values(), key=lambda r: order.index(r["id"]) if r["id"] in order else len(order))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(markdown(results))

    for row in rows:
        if row["layer_ratios"] is not None or row.get("budget"):
            try:
                row = run_row(row, model, data, args.work, args)
            except adntn.AdntnError as error:
                row = {**row, "error": str(error)}
        save(row)
        print(f"{row['id']}: {json.dumps(row.get('top1'))}", file=sys.stderr)


if __name__ == "__main__":
    main()
