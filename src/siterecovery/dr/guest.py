"""The crash-consistency oracle as the workflows read it from a fabric's guests.

A lab guest checks its self-verifying log when it starts and reports whether the disk holds a
clean prefix. Workflows record that verdict after every failover and failback, and compare it
with what the source guest had made durable before it was shut down: a planned failover must
lose no flushed record. A fabric with such guests (the lab) implements `GuestOracle`
(fabrics.base), and so does libvirt for a domain booting the lab's VM guest image; on other
fabrics (a real vCenter) or other domains there is no such guest and the verdict is "not observable".
"""

from __future__ import annotations

import time
from typing import Any

from siterecovery.dr.fabric_access import recorded
from siterecovery.fabrics.base import Fabric, GuestOracle, PowerState
from siterecovery.store.models import Fabric as FabricRow

VERDICT_TIMEOUT = 180.0  # a VM guest boots, replays its journal and runs e2fsck twice first


def _oracle(fabric: Fabric) -> GuestOracle | None:
    return fabric if isinstance(fabric, GuestOracle) else None


def adopt_log(fabric: Fabric, machine: str, owner: str) -> None:
    """A copy of `owner`'s disks (test failover) continues `owner`'s log: tell the lab guest so."""
    oracle = _oracle(fabric)
    if oracle is not None:
        oracle.set_log_owner(machine, owner)


def last_flushed(fabric: Fabric, machine: str) -> int | None:
    """The last log record the machine's guest knew durable (after a clean shutdown)."""
    oracle = _oracle(fabric)
    return oracle.guest_flushed(machine) if oracle is not None else None


def await_verdict(
    fabric: Fabric, machine: str, since: float, timeout: float = VERDICT_TIMEOUT
) -> dict[str, Any]:
    """Wait for the guest started after `since` to report its start-up verdict."""
    oracle = _oracle(fabric)
    if oracle is None:
        return {"ok": True, "observable": False, "reason": "no guest oracle on this fabric"}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        verdict = oracle.guest_start_verdict(machine, since)
        if verdict is not None:  # a fabric may say at once that this machine has no oracle
            return {"observable": True, **verdict}
        time.sleep(0.2)
    return {
        "ok": False,
        "observable": True,
        "reason": f"guest of {machine} reported no verdict in {timeout:.0f} s",
    }


def guest_warnings(record: Any, machine: Any) -> list[str]:
    """FB-3 / FB-4 after a failback: static IPs the cloud turned into DHCP, packages it removed.

    `machine` is the cloud machine the guest last ran as; `record` what was recorded on-premises
    when protection began.
    """
    if machine is None:
        return []
    warnings = []
    now = {n.name: n for n in machine.nics}
    for nic in record.nics:
        current = now.get(nic.name)
        if nic.ip_mode == "static" and (current is None or current.ip_mode.value != "static"):
            warnings.append(
                f"FB-3: NIC {nic.name} of {machine.name} had static IP {nic.address}/{nic.prefix} "
                f"(gateway {nic.gateway or '-'}) before failover and got DHCP in the cloud; "
                "set the static address again in the guest."
            )
    missing = [p for p in record.packages if p not in machine.packages]
    for package in missing:
        warnings.append(
            f"FB-4: package {package} was removed from {machine.name} while it ran in the "
            "cloud; reinstall it in the guest."
        )
    return warnings


def powered_on(cp: Any, fabric_id: str, machine: str) -> bool:
    """Whether a machine runs, from the fabric's last discovery (cheap: no live call per second)."""
    with cp.db.session() as s:
        row = s.get(FabricRow, fabric_id)
        machines = recorded(row).machines if row is not None else ()
    return any(m.name == machine and m.power_state is PowerState.ON for m in machines)
