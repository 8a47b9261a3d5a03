"""``fmserve tokens``: personal access tokens, as a client of ``/api/2.0/token``."""

from __future__ import annotations

import typer

app = typer.Typer(help="Personal access tokens (yours; admins: --all / on-behalf-of).",
                  no_args_is_help=True)
