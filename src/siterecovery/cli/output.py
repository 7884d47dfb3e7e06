"""Printing: Rich tables for people, `--output json` for scripts, problems on stderr."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from siterecovery.cli.client import ApiError

console = Console()
err_console = Console(stderr=True)


def emit(data: Any, as_json: bool, columns: Sequence[str] = (), title: str = "") -> None:
    if as_json:
        typer.echo(json.dumps(data, indent=2, default=str))
        return
    rows = data if isinstance(data, list) else [data]
    if not columns:
        columns = list(rows[0].keys()) if rows and isinstance(rows[0], dict) else []
    table = Table(title=title or None)
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*(fmt(row.get(c)) for c in columns))
    console.print(table)


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, default=str)
    return str(value)


def age(ts: float | None) -> str:
    return "-" if ts is None else f"{max(0.0, time.time() - ts):.0f}s ago"


def fail(exc: ApiError, as_json: bool) -> typer.Exit:
    """Print a problem response and return the exit to raise (2 for client errors, 1 otherwise)."""
    if as_json:
        typer.echo(json.dumps(exc.body, indent=2, default=str), err=True)
    else:
        for p in exc.problems:
            code, message = escape(f"[{p.get('code', '?')}]"), escape(str(p.get("message", "")))
            err_console.print(f"[bold red]error[/] {code} {message}")
            if p.get("remediation"):
                err_console.print(f"  remediation: {escape(str(p['remediation']))}")
    return typer.Exit(2 if 400 <= exc.status < 500 else 1)
