"""``fmserve users|service-principals|groups``: clients of the workspace SCIM API."""

from __future__ import annotations

import typer

from fmserve import cli_sp_secrets

users_app = typer.Typer(help="Users (SCIM).", no_args_is_help=True)
sps_app = typer.Typer(help="Service principals (SCIM) and their OAuth secrets.",
                      no_args_is_help=True)
groups_app = typer.Typer(help="Groups (SCIM) and their members.", no_args_is_help=True)
sps_app.add_typer(cli_sp_secrets.app, name="secrets")
