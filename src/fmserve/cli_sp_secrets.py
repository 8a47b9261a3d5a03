"""``fmserve service-principals secrets``: OAuth client secrets of service principals."""

from __future__ import annotations

import typer

app = typer.Typer(help="OAuth client secrets (client_id = the applicationId).",
                  no_args_is_help=True)
