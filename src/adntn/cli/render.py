"""Rendering a compressed directory's report.json for people (rich tables)."""

from __future__ import annotations

from rich.console import Console, Group
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text


def _params(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return str(n)


def _fraction(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def p_value(p: float) -> str:
    """A p-value as printed: two digits, or below float64's range when it underflowed to 0."""
    return "< 1e-300" if p == 0 else f"= {p:.2g}"


LAYER_COLUMNS = (("layer", "left"), ("shape", "left"), ("arch", "left"), ("bonds", "left"), ("dense", "right"),
                 ("core", "right"), ("ratio", "right"), ("w.err", "right"), ("a.err", "right"), ("fit s", "right"))
NARROW_DROPS = ("bonds", "shape", "fit s", "a.err")  # left out in this order while the table is too wide


def _ratio(numerator: float, denominator: float, spec: str) -> str:
    return f"{numerator / denominator:{spec}}x" if denominator else "-"


def layer_table(report: dict, drop: tuple[str, ...] = ()) -> Table:
    """One row per compressed layer; the columns named in ``drop`` are left out."""
    table = Table(title=f"adntn: {report['source']['path']} ({report['source']['model']})")
    columns = [(column, justify) for column, justify in LAYER_COLUMNS if column not in drop]
    for column, justify in columns:
        table.add_column(column, justify=justify, no_wrap=True)
    for row in report["layers"]:
        ratio = row.get("ratio")
        cells = {
            "layer": row.get("alias") or row["name"], "shape": "x".join(map(str, row["shape"])),
            "arch": f"{row['arch']}/{row['activation']}", "bonds": ",".join(map(str, row["bond_dims"])),
            "dense": _params(row["dense_params"]), "core": _params(row["core_params"]),
            "ratio": "-" if ratio is None else f"{ratio:,.0f}x",
            "w.err": _fraction(row.get("weight_rel_error")), "a.err": _fraction(row.get("activation_rel_error")),
            "fit s": "-" if row.get("fit_seconds") is None else f"{row['fit_seconds']:.1f}",
        }
        table.add_row(*(cells[column] for column, _ in columns))
    return table


def fitting_layer_table(report: dict, console: Console) -> Table:
    """``layer_table`` with as many columns as fit the console whole (bonds, then shape, fit s and
    a.err are left out on narrow consoles rather than every number cut to '102,760,…')."""
    unbounded = console.options.update(width=1 << 16, max_width=1 << 16)  # the table's natural width
    drop: tuple[str, ...] = ()
    table = layer_table(report)
    for column in NARROW_DROPS:
        if Measurement.get(console, unbounded, table).maximum <= console.width:
            break
        drop += (column,)
        table = layer_table(report, drop)
    return table


def totals_table(report: dict) -> Table:
    total = report["total"]
    table = Table(title="whole model")
    for column in ("", "before", "after", "ratio"):
        table.add_column(column, justify="right" if column else "left")
    table.add_row("parameters", _params(total["dense_params"]), _params(total["stored_params"]),
                  _ratio(total["dense_params"], total["stored_params"], ",.1f"))
    if total.get("stored_bytes"):
        table.add_row("bytes on disk", _bytes(total["dense_bytes"]), _bytes(total["stored_bytes"]),
                      _ratio(total["dense_bytes"], total["stored_bytes"], ",.1f"))
    table.add_row("compressed layers", _params(total["compressed_dense_params"]),
                  _params(total["compressed_core_params"]),
                  _ratio(total["compressed_dense_params"], total["compressed_core_params"], ",.0f"))
    return table


def accuracy_table(report: dict) -> Table | None:
    accuracy = report.get("accuracy")
    if not accuracy:
        return None
    table = Table(title=f"accuracy on {accuracy['split']} ({accuracy['images']:,} images)")
    for column in ("model", "top-1", "top-5"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for name in ("dense", "compressed"):
        table.add_row(name, _fraction(accuracy[name]["top1"]), _fraction(accuracy[name]["top5"]))
    return table


def paired_text(report: dict) -> Text | None:
    """The compressed model against the dense one on the same images, in one sentence (None for
    a report without it)."""
    paired = (report.get("accuracy") or {}).get("paired")
    if not paired:
        return None
    return Text(f"on the same images: top-1 agreement with dense {_fraction(paired['top1_agreement'])}; right by "
                f"dense only {paired['lost']:,}, by compressed only {paired['gained']:,} (McNemar p "
                f"{p_value(paired['mcnemar_p'])}: the chance of a split at least this uneven between equally good models)")


def training_text(report: dict) -> Text:
    settings = report["settings"]
    lines = [f"weight-space fit: {settings['steps']} Adam steps per layer, lr {settings['lr']}, seed {settings['seed']}"]
    training = report.get("training")
    if training:
        lines.append(training["summary"])
    lines.append(f"bias: {report['bias']}")
    return Text("\n".join(lines))


def render(report: dict, console: Console) -> None:
    """Print the tables; ``report`` is the content of report.json. The columns are described in
    the README (w.err: relative weight error, a.err: relative activation error)."""
    parts = [fitting_layer_table(report, console), totals_table(report)]
    accuracy = accuracy_table(report)
    if accuracy is not None:
        parts.append(accuracy)
    paired = paired_text(report)
    if paired is not None:
        parts.append(paired)
    parts.append(training_text(report))
    console.print(Group(*parts))
