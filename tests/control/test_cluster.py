"""Two configuration-server processes on one PostgreSQL: one job queue, one leader for the periodic
work. A job survives kill -9 of the process running it and finishes on the other; the RPO monitor
and scheduled bookmarks run in one process only, and move to the survivor (counted, not timed)."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.hollow import seed
from sqlalchemy import update

from siterecovery.store.database import Database
from siterecovery.store.models import Policy, ReplicatedItem
from siterecovery.store.record import ItemRecord
from tests.conftest import free_port, run_cli
from tests.control.conftest import ConfigServer
from tests.control.test_postgres import postgres  # noqa: F401 - the real PostgreSQL fixture


class _Plane:
    """Just what `seed` needs of a control plane: its database."""

    def __init__(self, url: str) -> None:
        self.db = Database(url)


def _wait(what: str, check: Callable[[], Any], timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _self(cs: ConfigServer) -> dict[str, Any]:
    body: dict[str, Any] = cs.api("GET", "/api/cluster/self").json()
    return body


def _bookmark_times(plane: _Plane) -> list[float]:
    with plane.db.session() as s:
        item = s.query(ReplicatedItem).one()
        return [b.requested_at for b in ItemRecord.model_validate(item.details).bookmarks]


def test_two_servers_share_jobs_and_one_leader_survives_kill9(
    postgres: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    a = ConfigServer(state_dir=state, port=free_port(), log=tmp_path / "a.log", database_url=postgres)
    b = ConfigServer(state_dir=state, port=free_port(), log=tmp_path / "b.log", database_url=postgres)
    a.start()  # the first migrates the schema; the second joins the same database and state
    b.start()
    servers = {a.proc.pid: a, b.proc.pid: b}  # type: ignore[union-attr]
    plane = _Plane(postgres)
    try:
        # One protected item whose policy asks for an app-consistent bookmark every 2 s.
        seed(plane, 1)  # type: ignore[arg-type]
        with plane.db.session() as s:
            s.execute(update(Policy).values(app_consistent_frequency_seconds=2))

        # Exactly one process does the periodic work; the other only asks whether it leads.
        leader = _wait(
            "a leader with passes",
            lambda: next(
                (c for c in (a, b) if _self(c)["leader"] and _self(c)["periodic_passes"] >= 3), None
            ),
        )
        follower = b if leader is a else a
        assert (_self(follower)["leader"], _self(follower)["periodic_passes"]) == (False, 0)
        assert _self(follower)["executor_id"] != _self(leader)["executor_id"]
        times = _wait(
            "three scheduled bookmarks", lambda: len(_bookmark_times(plane)) >= 3 and _bookmark_times(plane)
        )
        gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
        assert all(g >= 2.0 for g in gaps), gaps  # once per interval, not once per process
        assert _self(follower)["periodic_passes"] == 0

        # A job, queued to the cluster, killed with the process that runs it.
        out, started, release = tmp_path / "out.txt", tmp_path / "started", tmp_path / "release"
        spec = tmp_path / "plan.json"
        # The second step runs until the test lets it go (after the kill): a fixed `sleep 3` let a
        # slow test finish it on the process about to be killed, which then ran nothing twice.
        step = f"echo $PPID > {started}; while [ ! -e {release} ]; do sleep 0.1; done; echo two >> {out}"
        spec.write_text(
            json.dumps(
                {
                    "groups": [
                        {
                            "items": [],
                            "actions_after": [
                                {"kind": "script", "name": "one", "command": f"echo one >> {out}"}
                            ],
                        },
                        {"items": [], "actions_after": [{"kind": "script", "name": "two", "command": step}]},
                    ]
                }
            )
        )
        run_cli("plans", "create", "drill", "--file", str(spec), env=a.env)
        job_id = json.loads(
            run_cli("-o", "json", "plans", "failover", "drill", "--no-wait", env=a.env).stdout
        )["job_id"]
        _wait("the second task to start", lambda: started.exists() and started.read_text().strip())
        runner = servers[int(started.read_text())]
        survivor = b if runner is a else a
        passes_before, dead = _self(survivor)["periodic_passes"], _self(runner)["executor_id"]
        runner.kill9()
        release.touch()

        job = survivor.wait_job(job_id, timeout=90)
        assert job["state"] == "succeeded", job
        assert out.read_text() == "one\ntwo\n"
        assert [t["attempts"] for t in job["tasks"]] == [1, 2]  # the finished task did not run again
        # The periodic work moved to (or stayed with) the survivor, which took over the dead one's job.
        _wait(
            "the survivor to lead",
            lambda: _self(survivor)["leader"] and _self(survivor)["periodic_passes"] > passes_before,
        )
        assert _self(survivor)["recovered_executors"] == [dead]
        # The CLI pages through lists (here against the survivor).
        jobs = json.loads(run_cli("-o", "json", "jobs", "list", "--all", env=survivor.env).stdout)
        items = json.loads(run_cli("-o", "json", "items", "list", env=survivor.env).stdout)
        assert [j["id"] for j in jobs] == [job_id] and [i["name"] for i in items] == ["vm00000"]
    finally:
        a.stop()
        b.stop()
        plane.db.engine.dispose()
