"""Printing: Rich tables for people, `--output json` for scripts, problems on stderr."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

import typer
from rich.console import Console, Group, RenderableType
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from siterecovery.api_client import ApiError

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
    console.print(fit(table))


def fit(table: Table, out: Console = console) -> RenderableType:
    """The table if it fits the terminal, else one block per row ("column  value"), wrapped rather
    than cut: at 80 columns, or piped, a wide table shrank every name to `mt-…`."""
    # Measured without the terminal's limit: Rich clamps a measurement to the width it is given.
    natural = Measurement.get(out, out.options.update(max_width=1 << 16), table).maximum
    if natural <= out.width:
        return table
    headers = [str(col.header) for col in table.columns]
    cells = [list(col.cells) for col in table.columns]
    blocks: list[RenderableType] = [Text(str(table.title), style="bold")] if table.title else []
    for i in range(table.row_count):
        block = Table.grid(padding=(0, 2))
        block.add_column(style="bold", no_wrap=True)
        block.add_column(overflow="fold")
        for header, column in zip(headers, cells, strict=True):
            block.add_row(header, column[i])
        blocks += [block, Text("")]
    return Group(*blocks)


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
