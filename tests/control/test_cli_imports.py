"""The CLI's start-up imports: `siterecovery …` starts every component (agents, process servers,
master targets, the server, lab guests' hooks), so a command must not load another command's
heavy modules (the server's DBOS and FastAPI, the data plane's services, the Azure SDK, the lab's
fabric) before it runs."""

from __future__ import annotations

import json
import subprocess
import sys

# Each is loaded only by the command that needs it (see the function-level imports in cli/).
HEAVY = (
    "siterecovery.server.main",
    "dbos",
    "fastapi",
    "siterecovery.dataplane.agent",
    "siterecovery.dataplane.process_server",
    "siterecovery.dataplane.master_target",
    "siterecovery.dataplane.page_blob",
    "siterecovery.dataplane.control_client",
    "azure.storage.blob",
    "siterecovery.lab.fabric",
    "siterecovery.lab.runtime",
)


def test_building_the_cli_loads_no_commands_heavy_modules() -> None:
    # A fresh interpreter: this test process has imported most of the product already.
    probe = (
        "import json, sys\n"
        "from siterecovery.cli.main import app\n"
        "import typer.main\n"
        "typer.main.get_command(app)\n"  # what `--help` builds: every command and its options
        f"print(json.dumps([m for m in {list(HEAVY)!r} if m in sys.modules]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )
    assert json.loads(out.stdout) == []


def test_the_agent_command_still_finds_its_service() -> None:
    # The function-level imports run: the agent's module and the control client load with it.
    probe = (
        "import json, sys\n"
        "from siterecovery.cli import dataplane\n"
        "try:\n"
        "    dataplane.agent(machine=None)\n"  # fails on the missing --machine after importing
        "except Exception as exc:\n"
        "    print(json.dumps([type(exc).__name__, 'siterecovery.dataplane.agent' in sys.modules]))\n"
    )
    env_free = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"}
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120, env=env_free
    )
    assert json.loads(out.stdout) == ["BadParameter", True]
