"""``python -m adntn`` runs the command line (e.g. under ``torchrun``)."""

from adntn.cli import app

app(prog_name="adntn")
