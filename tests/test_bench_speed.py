"""bench/speed.py's --resume: which earlier rows a partial re-run keeps."""
import importlib.util
from pathlib import Path

import pytest

SPEED = Path(__file__).resolve().parents[1] / "bench" / "speed.py"


@pytest.fixture(scope="module")
def speed():
    spec = importlib.util.spec_from_file_location("bench_speed", SPEED)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def row(arch, ratio, finished=True):
    return {"arch": arch, "ratio": ratio, **({"checks": {}} if finished else {})}


def test_resume_keeps_the_rows_outside_this_runs_grid(speed):
    previous = [row("ttn", 2000.0), row("ttn", 50000.0), row("mera", 2000.0), row("mera", 50000.0, finished=False)]
    kept = speed.kept_rows(previous, grid=[("mera", 2000.0)], redo={"mera"})
    assert list(kept) == [("ttn", 2000.0), ("ttn", 50000.0), ("mera", 50000.0)]


def test_resume_reruns_unfinished_and_redone_rows_of_its_grid(speed):
    previous = [row("ttn", 2000.0), row("attn", 2000.0, finished=False), row("mera", 2000.0)]
    grid = [("ttn", 2000.0), ("attn", 2000.0), ("mera", 2000.0)]
    assert list(speed.kept_rows(previous, grid, redo={"mera"})) == [("ttn", 2000.0)]
