"""`--log-format json`: real services write one JSON object per line, naming the pair they work on.

An agent replicates pair p1 through a process server to a master target that is not up yet: the
process server's forwarder for p1 logs each refused attempt (at INFO) from its pair's log context.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.dataplane.conftest import Component, Plane, free_addresses, make_image, replication, wait_for

JSON = ("--log-format", "json", "--log-level", "INFO")


def _lines(component: Component) -> list[str]:
    return [line for line in component.log.read_text().splitlines() if line.strip()]


def test_services_write_json_lines_carrying_the_pair_id(plane: Plane, tmp_path: Path) -> None:
    ps_addr, mt_addr = free_addresses(2)  # nothing listens on mt_addr: the master target is down
    ps = plane.process_server(listen=ps_addr)
    ps.args += JSON
    ps.start()
    ps.wait_address()
    src = make_image(tmp_path / "src.img", 1 << 20, [(0, 65536, 7)])
    agent = plane.agent([replication("p1", "d0", ps_addr, mt_addr)], {"d0": src}, "agent", *JSON).start()

    def forwarder_logged() -> bool:
        return any('"pair_id": "p1"' in line for line in _lines(ps))

    wait_for(forwarder_logged, 90, "the process server's forwarder to log about p1")
    agent.kill()
    ps.kill()
    records = [json.loads(line) for line in _lines(ps)]  # every line parses: nothing but JSON
    about_p1 = [r for r in records if r.get("pair_id") == "p1"]
    first = about_p1[0]
    assert {"time", "level", "logger", "message"} <= first.keys()
    assert first["level"] == "INFO" and first["logger"] == "siterecovery.dataplane.process_server"
    assert "p1" in first["message"] and mt_addr in first["message"]
    assert first["time"].endswith("+00:00")
    assert all(isinstance(json.loads(line), dict) for line in _lines(agent))
