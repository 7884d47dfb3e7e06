"""`siterecovery demo`: build a lab, start every service, run the whole DR cycle, print the table."""

from __future__ import annotations

import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from siterecovery.demo.cycle import Cycle, CycleError, StepRow
from siterecovery.demo.environment import Environment
from siterecovery.fabrics.lab_model import Accel, GuestKind

# Piped output (make demo in CI, a log) would wrap the table at 80 columns.
console = Console(width=None if sys.stdout.isatty() else 132)


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _seconds(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f} s"


def table(rows: list[StepRow]) -> Table:
    out = Table(title="siterecovery demo: the DR cycle on the embedded lab")
    for col in ("step", "time", "bytes changed", "bytes sent", "RPO held", "downtime", "oracle"):
        out.add_column(col, justify="left" if col in ("step", "oracle") else "right")
    for r in rows:
        style = "red" if not r.ok else ""
        out.add_row(
            r.step,
            _seconds(r.seconds),
            _bytes(r.bytes_changed),
            _bytes(r.bytes_sent),
            _seconds(r.rpo_held),
            _seconds(r.downtime),
            r.oracle or "-",
            style=style,
        )
    return out


def run_demo(
    disk_size: int,
    keep: bool,
    directory: Path | None,
    guest: GuestKind = GuestKind.PYTHON,
    accel: Accel = Accel.AUTO,
) -> int:
    root = directory or Path(tempfile.mkdtemp(prefix="siterecovery-demo-"))
    env = Environment(root, disk_size=disk_size, guest=guest, accel=accel)
    console.print(f"[bold]siterecovery demo[/] in {root} ({guest.value} guests)")
    failed = False
    try:
        with console.status("starting the lab, the configuration server, process servers and master targets"):
            env.start()
        console.print(
            f"configuration server {env.url}; process servers ps-onprem, ps-cloud; "
            "master targets mt-cloud, mt-linux (all real processes)"
        )
        columns = (
            TextColumn("{task.description:<42}"),
            BarColumn(),
            TextColumn("{task.percentage:>5.1f}%"),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=console) as progress:
            bars: dict[str, TaskID] = {}

            def update(step: str, job: dict[str, Any]) -> None:
                if step not in bars:
                    bars[step] = progress.add_task(step, total=100, detail="")
                running = next((t for t in job["tasks"] if t["state"] in ("running", "waiting")), None)
                detail = running["name"] if running else job["state"]
                progress.update(bars[step], completed=job["percent"], detail=detail[:40])

            cycle = Cycle(env, progress=update)
            try:
                cycle.run()
            except CycleError as exc:
                failed = True
                console.print(f"[red]the cycle stopped: {exc}[/]")
        console.print(table(cycle.rows))
        failed = failed or not all(r.ok for r in cycle.rows)
        console.print("[red]FAILED[/]" if failed else "[green]every oracle verdict passed[/]")
        if keep:
            console.print(f"\nleft running: API {env.url}  portal {env.url}/  token {env.token}")
            console.print(f"  export SITERECOVERY_SERVER={env.url} SITERECOVERY_TOKEN={env.token}")
            console.print("press Ctrl-C to stop everything")
            stop = threading.Event()
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
            try:
                while not stop.wait(1.0):
                    time.sleep(0)
            except KeyboardInterrupt:
                pass
    finally:
        env.stop()
    return 1 if failed else 0
