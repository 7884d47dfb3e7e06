"""The suite's figures: each scenario adds a row, and `make faults` writes them to
bench/results/faults.md (SITERECOVERY_FAULT_RESULTS names the file)."""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Row:
    scenario: str
    faults: str  # what was injected, e.g. "agent x3, process-server x3, ..."
    flushed: int  # records the writer had flushed before the end of the scenario
    recovered: int  # whole records found on the recovered or target disk
    points: str = "-"  # crash points checked / clean
    records_checked: int = 0
    seconds: float = 0.0

    @property
    def lost(self) -> int:
        return max(0, self.flushed - self.recovered)


@dataclass
class Report:
    seed: int
    kills: int
    rows: list[Row] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def add(self, row: Row) -> None:
        self.rows.append(row)

    def markdown(self) -> str:
        lines = [
            "# Fault-injection suite (tests/faults)",
            "",
            f"`make faults` with SITERECOVERY_FAULT_KILLS={self.kills} SITERECOVERY_FAULT_SEED={self.seed}, "
            f"on {platform.node() or 'this host'} ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}), "
            f"{time.monotonic() - self.started:.0f} s in total, load average {os.getloadavg()[1]:.1f} on "
            f"{os.cpu_count()} CPUs (a shared machine). Lost = flushed records missing from the "
            "recovered disk; every crash point must be a clean prefix of the writer's records.",
            "",
            "| scenario | faults injected | records flushed | records recovered | lost | crash points "
            "(clean/checked) | records checked | seconds |",
            "|---|---|---:|---:|---:|---|---:|---:|",
        ]
        for r in self.rows:
            lines.append(
                f"| {r.scenario} | {r.faults} | {r.flushed} | {r.recovered} | {r.lost} | {r.points} "
                f"| {r.records_checked} | {r.seconds:.0f} |"
            )
        return "\n".join(lines) + "\n"

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.markdown())
