"""`jobs watch`: a live progress bar per task until the job finishes."""

from __future__ import annotations

import time
from typing import Any

from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from siterecovery.api_client import Api
from siterecovery.cli.output import console

FINISHED = ("succeeded", "failed", "cancelled")
_STYLE = {
    "succeeded": "green",
    "failed": "red",
    "cancelled": "yellow",
    "waiting": "magenta",
    "running": "cyan",
}


def watch_job(api: Api, job_id: str, poll: float = 0.5, quiet: bool = False) -> dict[str, Any]:
    """Follow a job until it finishes; returns its final state. Paused jobs keep being watched."""
    job: dict[str, Any] = api.get(f"/api/jobs/{job_id}")
    if quiet:
        while job["state"] not in FINISHED:
            time.sleep(poll)
            job = api.get(f"/api/jobs/{job_id}")
        return job
    columns = (
        TextColumn("{task.description}", justify="left"),
        BarColumn(),
        TextColumn("{task.percentage:>5.1f}%"),
        TextColumn("{task.fields[state]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        bars: dict[int, TaskID] = {}
        paused_shown = False
        while True:
            for t in job["tasks"]:
                style = _STYLE.get(t["state"], "white")
                if t["ordinal"] not in bars:
                    bars[t["ordinal"]] = progress.add_task(t["name"], total=100, state="")
                progress.update(bars[t["ordinal"]], completed=t["percent"], state=f"[{style}]{t['state']}[/]")
            if job["state"] == "paused" and not paused_shown:
                progress.console.print(
                    f"[magenta]job {job_id} is paused for a manual action; "
                    f"run `siterecovery jobs resume {job_id}` when done[/]"
                )
                paused_shown = True
            if job["state"] in FINISHED:
                break
            time.sleep(poll)
            job = api.get(f"/api/jobs/{job_id}")
    if job["state"] == "failed" and job.get("error"):
        console.print(f"[red]job failed: [{job['error'].get('code')}] {job['error'].get('message')}[/]")
        if job["error"].get("remediation"):
            console.print(f"  remediation: {job['error']['remediation']}")
    return job
