"""The ``adntn`` command line: parse, call the library, print.

Human output and progress go to stderr (rich); ``--json`` output goes to stdout. Every user error
is one sentence on stderr and exit status 1.
"""

from __future__ import annotations

import functools
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table
from torch import nn

from adntn.core.registry import archs
from adntn.core.spec import ACTIVATIONS
from adntn.errors import AdntnError
from adntn.io.files import json_text
from adntn import networks  # noqa: F401  (registers the archs that --arch offers)
from adntn.pipeline.options import TARGET_DTYPES
from adntn.version import __version__

app = typer.Typer(
    add_completion=True,
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Compress AlexNet/VGG layers into nonlinear tensor-network generators (TTN, aTTN, MERA).",
)


def _fail(message: str) -> None:
    typer.echo(f"adntn: error: {message}", err=True)
    raise typer.Exit(1)


class Terminated(BaseException):
    """SIGTERM, raised where the program is, so that the library's cleanup (``except
    BaseException``: staging folders, temporary files) runs as for Ctrl-C."""


def _terminate(signum, frame) -> None:
    raise Terminated()


def user_errors(command):
    """Turn AdntnError (and Ctrl-C, SIGTERM) into one line on stderr and a non-zero exit."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
        try:
            return command(*args, **kwargs)
        except AdntnError as error:
            _fail(str(error))
        except KeyboardInterrupt:
            typer.echo("adntn: interrupted; nothing was written.", err=True)
            raise typer.Exit(130) from None
        except Terminated:
            typer.echo("adntn: terminated; nothing was written.", err=True)
            raise typer.Exit(128 + signal.SIGTERM) from None
        except MemoryError:
            _fail("ran out of memory; try fewer layers at a time or a machine with more memory.")
        finally:
            if main_thread:
                signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)

    return wrapper


def _console(stderr: bool = False) -> Console:
    """A rich console; 120 columns when not a terminal so logs keep whole numbers."""
    console = Console(stderr=stderr)
    return console if console.is_terminal else Console(stderr=stderr, width=120)


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _print_json(payload: dict) -> None:
    sys.stdout.write(json_text(payload))  # strict JSON: a non-finite number is null


def _version(value: bool) -> None:
    if value:
        typer.echo(f"adntn {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """adntn: automatically differentiable nonlinear tensor networks for CNN compression."""


ModelOption = Annotated[Optional[str], typer.Option(
    "--model", help="Force the architecture (alexnet, vgg11 ... vgg19_bn) instead of detecting it.")]
PickleOption = Annotated[bool, typer.Option(
    "--allow-pickle", help="Load a trusted pickle with weights_only=False (it can run code).")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object to stdout.")]


@app.command()
@user_errors
def inspect(
    checkpoint: Annotated[Path, typer.Argument(
        help="A state_dict (.pt/.pth) or .safetensors file, or a directory written by 'adntn compress'.")],
    model: ModelOption = None,
    allow_pickle: PickleOption = False,
    batch: Annotated[int, typer.Option(help="Batch size the inference costs of a directory are given for.")] = 1,
    as_json: JsonOption = False,
) -> None:
    """Show the detected model and its compressible layers, or a compressed model's inference plan."""
    if checkpoint.is_dir():
        _inspect_directory(checkpoint, batch, as_json)
        return
    from adntn.models.architectures import describe
    from adntn.pipeline.source import read_source

    info = read_source(checkpoint, model=model, allow_pickle=allow_pickle).info
    rows = describe(info)
    if as_json:
        _print_json({"model": info.name, "num_classes": info.num_classes, "layers": rows})
        return
    table = Table(title=f"{checkpoint.name}: {info.name}, {info.num_classes} classes")
    for column in ("alias", "module", "kind", "weight shape", "params (weight + bias)"):
        table.add_column(column, justify="left" if column in ("alias", "module", "kind", "weight shape") else "right")
    for row in rows:
        table.add_row(row["alias"] or "-", row["module"], row["kind"],
                      "x".join(map(str, row["shape"])), f"{row['params']:,}")
    _console().print(table)


def _inspect_directory(directory: Path, batch: int, as_json: bool) -> None:
    from adntn.pipeline.load import inference_plan

    rows = inference_plan(directory, batch)
    if as_json:
        _print_json({"directory": str(directory), "batch": batch, "layers": rows})
        return
    table = Table(title=f"{directory.name}: inference at batch {batch} (auto schedule)")
    for column in ("layer", "arch", "schedule", "bytes held", "dense bytes", "flops/sample", "dense flops/sample"):
        table.add_column(column, justify="left" if column in ("layer", "arch", "schedule") else "right")
    for row in rows:
        name = f"{row['alias']} ({row['layer']})" if row["alias"] else row["layer"]
        table.add_row(name, row["arch"], row["schedule"], f"{row['bytes']:,}", f"{row['dense_bytes']:,}",
                      f"{row['flops_per_sample']:,}", f"{row['dense_flops_per_sample']:,}")
    _console().print(table)


@app.command()
@user_errors
def compress(
    checkpoint: Annotated[Path, typer.Argument(help="A state_dict (.pt/.pth) or .safetensors file.")],
    layers: Annotated[str, typer.Option("--layers", "-l",
                                        help="Comma-separated layers: aliases (fc6, conv3_1), modules (classifier.3), or all (every conv and hidden linear layer), conv, fc (fc6, fc7).")],
    arch: Annotated[str, typer.Option(autocompletion=archs,
                                      help=f"Generator: {' | '.join(archs())} (tt and svd are baselines).")] = "ttn",
    ratio: Annotated[Optional[str], typer.Option(
        help="Per-layer compression ratio dense/core params, e.g. 2000, or per layer: fc6=20000,fc7=80000, "
             "or total:R for all layers together at dense/R, split as --budget (default 2000 unless --bond-dim).")] = None,
    budget: Annotated[Optional[str], typer.Option(
        help="Core parameters for all compressed layers together, e.g. 424, 10k, 1.5M: split between them by "
             "measured sensitivity, with --data a short distillation probe per candidate size (the report's "
             "allocation shows every candidate and its measure).")] = None,
    bond_dim: Annotated[Optional[int], typer.Option("--bond-dim", help="Uniform bond dimension instead of --ratio.")] = None,
    activation: Annotated[str, typer.Option(autocompletion=lambda: ACTIVATIONS,
                                            help=f"Nonlinearity between levels: {' | '.join(ACTIVATIONS)}.")] = "tanh",
    steps: Annotated[int, typer.Option(help="Adam steps of the weight-space fit per layer.")] = 200,
    lr: Annotated[float, typer.Option(help="Learning rate of the weight-space fit.")] = 1e-2,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same cores).")] = 0,
    device: Annotated[str, typer.Option(help="Where to fit and fine-tune: cpu, cuda or cuda:N.")] = "cpu",
    target_dtype: Annotated[str, typer.Option(
        "--target-dtype", autocompletion=lambda: tuple(TARGET_DTYPES),
        help=f"{' | '.join(TARGET_DTYPES)}: dtype of the weight copy the weight-space fit reads: float32, or bfloat16 (half the "
             "memory; rounding 2^-9, far below the fit errors at these ratios).")] = "float32",
    out: Annotated[Optional[Path], typer.Option("--out", "--output", "-o", help="Output directory (default CHECKPOINT-STEM.adntn).")] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing output directory.")] = False,
    model: ModelOption = None,
    allow_pickle: PickleOption = False,
    data: Annotated[Optional[Path], typer.Option(
        help="ImageFolder root with train/ and val/ (or test/): fit on data and fine-tune by distillation.")] = None,
    config: Annotated[Optional[Path], typer.Option(help="Preprocessing TOML (see sample_configs/).")] = None,
    epochs: Annotated[Optional[int], typer.Option(
        help="Fine-tuning epochs over train/ (with --data; default 3).", show_default=False)] = None,
    finetune_lr: Annotated[Optional[float], typer.Option(
        "--finetune-lr", help="Fine-tuning learning rate (with --data; default 0.01).", show_default=False)] = None,
    batch_size: Annotated[Optional[int], typer.Option(
        "--batch-size", help="Fine-tuning batch size (with --data; default 256).", show_default=False)] = None,
    temperature: Annotated[Optional[float], typer.Option(
        help="Distillation temperature (with --data; default 4).", show_default=False)] = None,
    kd_weight: Annotated[Optional[float], typer.Option(
        "--kd-weight", help="Weight of distillation vs cross-entropy (with --data; default 0.9).",
        show_default=False)] = None,
    dropout: Annotated[Optional[bool], typer.Option(
        "--dropout/--no-dropout", help="Keep the model's dropout layers active while fine-tuning (with --data; "
                                       "default --dropout).", show_default=False)] = None,
    train: Annotated[str, typer.Option(
        help="Comma-separated dense layers to fine-tune too (e.g. fc8); by default only the generators and the compressed layers' biases train.")] = "",
    cache_dir: Annotated[Optional[Path], typer.Option(
        "--cache-dir", help="Keep convolutional features here between runs (with --data; classifier layers only; "
                            "without it they go to a temporary folder on disk).")] = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue an interrupted fine-tuning from its last completed epoch (with --data; "
                         "the state is kept beside the output until it is written).")] = False,
    feature_dtype: Annotated[str, typer.Option(
        "--feature-dtype", help="How cached features are stored: float16 (default; 2 bytes per value) | "
                                "bfloat16 | float32.")] = "float16",
    max_images: Annotated[Optional[int], typer.Option(
        "--max-images", help="At most N images per split, stratified by class, seeded by --seed (quick runs).")] = None,
    class_map: Annotated[Optional[Path], typer.Option(
        "--class-map", help="Which output each class folder is: one line per output whose first word is the "
                            "folder (ImageNet's LOC_synset_mapping.txt), or JSON {folder: index}.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Replace each chosen layer's weight by a small tensor-network generator.

    Under 'torchrun --nproc-per-node N -m adntn compress ...' the data-aware stages run on N processes (DDP: gloo on cpu, nccl with --device cuda); rank 0 writes."""
    from adntn.cli.render import render
    from adntn.pipeline.compress import compress_to
    from dataclasses import replace

    from adntn import distributed
    from adntn.pipeline.options import CompressOptions, parse_ratio, parse_total_ratio
    from adntn.progress import Progress, RichProgress

    total_ratio = parse_total_ratio(ratio) if ratio is not None else None
    common_ratio, layer_ratios = parse_ratio(ratio) if ratio is not None and total_ratio is None else (None, {})
    options = CompressOptions(
        arch=arch, ratio=common_ratio, layer_ratios=layer_ratios, bond_dim=bond_dim, activation=activation,
        budget=budget, total_ratio=total_ratio,
        steps=steps, lr=lr, seed=seed, device=device, target_dtype=target_dtype, model=model,
        allow_pickle=allow_pickle, data=data, config=config, epochs=epochs, finetune_lr=finetune_lr,
        batch_size=batch_size, temperature=temperature, kd_weight=kd_weight, dropout=dropout,
        train=tuple(_names(train)), cache_dir=cache_dir, feature_dtype=feature_dtype, max_images=max_images,
        class_map=class_map, resume=resume)
    out_dir = out or Path(f"{checkpoint.stem}.adntn")
    if distributed.requested():
        options = replace(options, device=distributed.setup(options.device))
        if not distributed.is_main():  # the other ranks compute with rank 0, silently, and write nothing
            compress_to(checkpoint, _names(layers), out_dir, force=force, options=options, progress=Progress())
            distributed.shutdown()
            return
    with RichProgress() as progress:
        report = compress_to(checkpoint, _names(layers), out_dir, force=force, options=options, progress=progress)
    distributed.shutdown()
    if as_json:
        _print_json(report)
    else:
        render(report, _console(stderr=True))
        typer.echo(f"wrote {out_dir}", err=True)


@app.command()
@user_errors
def report(
    directory: Annotated[Path, typer.Argument(help="A directory written by 'adntn compress'.")],
    as_json: JsonOption = False,
) -> None:
    """Show what compression gained and lost."""
    from adntn.cli.render import render
    from adntn.pipeline.load import read_archive

    content = read_archive(directory)[0]  # the layer files and dense.safetensors checked too
    if as_json:
        _print_json(content)
    else:
        render(content, _console())


@app.command()
@user_errors
def expand(
    directory: Annotated[Path, typer.Argument(help="A directory written by 'adntn compress'.")],
    output: Annotated[Path, typer.Option("--output", "--out", "-o", help="Dense state_dict to write (.pt, .pth or .safetensors).")],
    force: Annotated[bool, typer.Option(help="Replace an existing output file.")] = False,
) -> None:
    """Rebuild a dense state_dict that loads into torchvision unchanged."""
    from adntn.pipeline.expand import expand as expand_directory

    written = expand_directory(directory, output, force=force)
    typer.echo(f"wrote {written}", err=True)


@app.command()
@user_errors
def export(
    directory: Annotated[Path, typer.Argument(help="A directory written by 'adntn compress'.")],
    output: Annotated[Path, typer.Option("--output", "--out", "-o", help="ONNX file to write (.onnx).")],
    input_size: Annotated[Optional[int], typer.Option(
        "--input-size", help="Image side, 32 (AlexNet: 63) to 2048 (default: the checkpoint's input_size "
                             "metadata, else 224).")] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing output file.")] = False,
) -> None:
    """Write an ONNX graph whose compressed layers stay compressed (needs adntn\\[export])."""
    from adntn.pipeline.export import export_onnx

    written = export_onnx(directory, output, input_size=input_size, force=force)
    typer.echo(f"wrote {written} ({written.stat().st_size:,} bytes)", err=True)


@app.command("eval")
@user_errors
def evaluate(
    source: Annotated[Path, typer.Argument(help="A dense checkpoint or a directory written by 'adntn compress'.")],
    data: Annotated[Path, typer.Option(help="ImageFolder root; the val/ (or test/) split is measured (train/ "
                                            "is not needed).")],
    config: Annotated[Optional[Path], typer.Option(help="Preprocessing TOML (see sample_configs/).")] = None,
    class_map: Annotated[Optional[Path], typer.Option(
        "--class-map", help="Which output each class folder is (as for compress).")] = None,
    max_images: Annotated[Optional[int], typer.Option(
        "--max-images", help="At most N held-out images, stratified by class (seed 0).")] = None,
    model: ModelOption = None,
    allow_pickle: PickleOption = False,
    against: Annotated[Optional[Path], typer.Option(
        "--against", help="Another checkpoint or directory of the same outputs (e.g. the dense model) to measure "
                          "on the same images and pair with, image by image: top-1 agreement, images right by "
                          "one model only, McNemar's exact p.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Measure top-1 and top-5 accuracy on the held-out split."""
    from adntn.cli.render import p_value
    from adntn.pipeline.task import evaluate_model

    if max_images is not None and max_images < 1:
        raise AdntnError(f"--max-images must be a positive integer, not {max_images}.")
    network, metadata, name, num_classes = _evaluated_model(source, model, allow_pickle)
    reference = None
    if against is not None:
        reference, _, reference_name, reference_classes = _evaluated_model(against, model, allow_pickle)
        if reference_classes != num_classes:
            raise AdntnError(f"{against} has {reference_classes} outputs and {source} {num_classes}: "
                             "--against needs a model of the same outputs.")
    result = {"model": name, **evaluate_model(network, metadata, num_classes, data, config, class_map=class_map,
                                              max_images=max_images, against=reference)}
    if against is not None:
        result["against"] = {"path": str(against), "model": reference_name, **result["against"]}
    if as_json:
        _print_json(result)
        return
    typer.echo(f"{source.name} ({result['model']}) on {result['images']:,} {result['split']} images: "
               f"top-1 {result['top1']:.4f}, top-5 {result['top5']:.4f}")
    if against is not None:
        reference_result, paired = result["against"], result["paired"]
        typer.echo(f"{against.name} ({reference_name}) on the same images: top-1 {reference_result['top1']:.4f}, "
                   f"top-5 {reference_result['top5']:.4f}; top-1 agreement {paired['top1_agreement']:.4f}, right by "
                   f"{against.name} only {paired['lost']:,}, by {source.name} only {paired['gained']:,} "
                   f"(McNemar p {p_value(paired['mcnemar_p'])})")


def _evaluated_model(source: Path, model: str | None, allow_pickle: bool) -> tuple[nn.Module, dict, str, int]:
    """(model, metadata, model name, outputs) of a dense checkpoint or a compressed directory (run
    compressed, its generated layers in place)."""
    from adntn.io.archive import read_report
    from adntn.io.checkpoint import check_runnable
    from adntn.pipeline.load import load
    from adntn.pipeline.source import read_source

    if source.is_dir():
        described = read_report(source)["source"]
        return load(source), described.get("metadata") or {}, described["model"], described["num_classes"]
    read = read_source(source, model=model, allow_pickle=allow_pickle, mmap=False)
    check_runnable(read.state, read.name)  # compress checks its own (check_finite); eval runs the file as it is
    return read.dense_model(), read.metadata, read.info.name, read.info.num_classes
