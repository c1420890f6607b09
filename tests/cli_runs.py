"""Running the CLI in-process and checking its one-sentence errors (shared by the CLI tests)."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from adntn.cli import app

runner = CliRunner()


def invoke(*args):
    """``adntn ARGS...`` in this process (arguments str()-ed), its typer Result."""
    return runner.invoke(app, [str(a) for a in args])


def fails_in_one_sentence(args, fragment: str, folder: Path) -> str:
    """``adntn ARGS`` exits 1 with one ``adntn: error:`` line holding ``fragment``, no traceback,
    and nothing written to ``folder``; returns the line."""
    before = sorted(p.name for p in folder.iterdir())
    result = invoke(*args)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("adntn: error: "), result.stderr
    assert fragment in lines[0], lines[0]
    assert sorted(p.name for p in folder.iterdir()) == before  # nothing written
    return lines[0]
