"""Task handlers for recovery-plan actions: scripts run between boot groups (FW-5).

A script runs on the configuration server (as ASR runs automation runbooks) with the job's
identity in its environment; a non-zero exit fails the task and stops the plan. Only an admin
may put a script into a plan, since it runs with the server's rights.
"""

from __future__ import annotations

import os
import subprocess
from typing import Any

from siterecovery.errors import Problem, SiteRecoveryError
from siterecovery.store.jobs import TaskContext, task_handler

_OUTPUT_TAIL = 2000


@task_handler("script")
def run_script(ctx: TaskContext) -> dict[str, Any]:
    command = str(ctx.args["command"])
    timeout = float(ctx.args.get("timeout_seconds", 600))
    env = {
        **os.environ,
        "SITERECOVERY_JOB_ID": ctx.job_id,
        "SITERECOVERY_PLAN": str(ctx.args.get("plan", "")),
        "SITERECOVERY_OPERATION": str(ctx.args.get("operation", "")),
    }
    ctx.progress(message=f"running: {command}")
    try:
        proc = subprocess.run(
            ["/bin/sh", "-c", command], capture_output=True, text=True, timeout=timeout, env=env
        )
    except subprocess.TimeoutExpired as exc:
        raise SiteRecoveryError(
            Problem(
                "script-timeout",
                f"Plan script {command!r} ran longer than {timeout:.0f} s.",
                "Make the script finish sooner or raise its timeout in the plan.",
            )
        ) from exc
    output = (proc.stdout + proc.stderr)[-_OUTPUT_TAIL:]
    ctx.progress(message=output.strip())
    if proc.returncode != 0:
        raise SiteRecoveryError(
            Problem(
                "script-failed",
                f"Plan script {command!r} exited with status {proc.returncode}.",
                "Read the script's output in the task message, fix it, and run the plan again.",
                detail={"output": output},
            )
        )
    return {"exit_code": proc.returncode}
