"""Typed records the API answers with serialise exactly as the dicts they replaced did.

`Readiness.problems` (what-if answers) lists `ProblemItem`s, which must read byte for byte like the
entries of a problem+json body (`Problem.as_dict`); a fabric's recorded discovery is read through
`RecordedInventory`, whose counts make the fabric `summary`.
"""

from __future__ import annotations

import json

from fastapi.encoders import jsonable_encoder

from siterecovery.control.schemas import ProblemItem
from siterecovery.dr.fabric_access import recorded, summary, to_jsonable
from siterecovery.errors import Problem
from siterecovery.fabrics.base import Host as HostInfo
from siterecovery.fabrics.base import (
    HypervisorKind,
    Inventory,
    LicenceEdition,
    Machine,
    Network,
    OsType,
    PowerState,
    SiteKind,
)
from siterecovery.store.models import Fabric as FabricRow
from siterecovery.store.states import FabricKind


def _wire(value: object) -> str:
    return json.dumps(jsonable_encoder(value))


def test_problem_item_reads_as_the_problem_dict_without_rule_or_detail() -> None:
    p = Problem("mt-not-discovered", "Master target mt1 is not discovered.", "Discover the site.")
    assert _wire(ProblemItem.of(p)) == json.dumps(p.as_dict())
    assert "rule" not in _wire(ProblemItem.of(p))


def test_problem_item_reads_as_the_problem_dict_with_rule_and_detail() -> None:
    p = Problem("invalid-input", "Bad.", "Fix it.", rule="RP-1", detail={"field": "vcenter", "n": 2})
    assert _wire(ProblemItem.of(p)) == json.dumps(p.as_dict())
    assert json.loads(_wire(ProblemItem.of(p)))["detail"] == {"field": "vcenter", "n": 2}


def _machine(name: str, power: PowerState) -> Machine:
    return Machine(f"id-{name}", name, "uuid", OsType.LINUX, "", power, host="esx1")


def test_recorded_inventory_reads_the_stored_discovery() -> None:
    inv = Inventory(
        site="onprem",
        kind=SiteKind.VCENTER,
        discovered_at=1.0,
        hosts=(HostInfo("h1", "esx1", HypervisorKind.ESXI, LicenceEdition.ENTERPRISE),),
        machines=(_machine("web", PowerState.ON), _machine("db", PowerState.OFF)),
        networks=(Network("default", True),),
        warnings=("read-only account",),
    )
    row = FabricRow(id="f1", name="site", kind=FabricKind.LAB, inventory=to_jsonable(inv))
    got = recorded(row)
    assert got.kind is SiteKind.VCENTER
    assert [(m.name, m.power_state) for m in got.machines] == [("web", PowerState.ON), ("db", PowerState.OFF)]
    assert got.holds("db") and not got.holds("mt1")
    assert summary(row).model_dump() == {
        "hosts": 1,
        "datastores": 0,
        "machines": 2,
        "resource_groups": 0,
        "networks": 1,
        "warnings": ["read-only account"],
    }


def test_a_fabric_never_discovered_reads_as_empty() -> None:
    row = FabricRow(id="f2", name="new", kind=FabricKind.LAB, inventory={})
    assert recorded(row).kind is None and not recorded(row).holds("any")
    assert summary(row).model_dump()["machines"] == 0
