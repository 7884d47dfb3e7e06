"""Recovery points through the running data plane: a lab guest → agent → PS → MT with a journal."""

from __future__ import annotations

import json
import signal
from typing import Any

import pytest

from siterecovery.lab.guest import GuestState
from siterecovery.lab.oracle import verify_image
from tests.conftest import require_tool
from tests.dataplane.conftest import Plane, wait_for, wait_fresh_stats
from tests.points.conftest import MACHINE, Rig, build_rig, qemu_compare


def _wait_points(rig: Rig, kind: str, count: int) -> list[dict[str, Any]]:
    wait_for(lambda: len(rig.points(kind)) >= count, 60, f"{count} {kind} points on the master target")
    return rig.points(kind)


def test_every_point_is_a_clean_prefix_and_the_app_point_ends_quiesced(rig: Rig) -> None:
    """Crash bookmarks become points; each point's copy holds a clean prefix of the guest's log, and
    an app bookmark taken around the lab's quiesce/thaw hooks ends with the quiesce marker."""
    rig.start_guest()
    _wait_points(rig, "crash", 3)
    rig.set_agent(bookmarks=[{"tag": "app-1", "kind": "app", "freeze": True}])
    wait_for(lambda: "app-1" in rig.agent.stats().get("bookmarks_done", []), 60, "the app bookmark")  # type: ignore[operator]
    app = _wait_points(rig, "app", 1)
    assert [p["tag"] for p in app] == ["app-1"]
    # The guest was thawed: it writes on after the app point, and crash points follow it.
    seq_at_app = rig.guest_seq()
    wait_for(lambda: rig.guest_seq() > seq_at_app + 20, 30, "the guest to write after the thaw")
    wait_for(lambda: any(p["seq"] > app[0]["seq"] for p in rig.points("crash")), 30, "a crash point after it")
    assert rig.guest_state() is GuestState.RUNNING

    points = rig.points()
    crash = [p for p in points if p["kind"] == "crash"]
    chosen = crash[-8:] + app + [p for p in points if p["kind"] == "latest"]
    images = rig.copy(chosen, "all")
    records: list[tuple[int, int]] = []
    for point in chosen:
        verdict = verify_image(str(images[point["id"]]), MACHINE)
        assert verdict.ok, (point, verdict)
        records.append((point["seq"], verdict.records))
        if point["kind"] == "app":
            assert verdict.ends_quiesced, (point, verdict)
    records.sort()
    # Later points hold longer prefixes, and the points are distinct states of the log.
    assert [r for _s, r in records] == sorted(r for _s, r in records)
    assert len({r for _s, r in records}) >= 3
    assert rig.mt_pair()["journal_bytes"] > 0
    assert rig.mt_pair()["position"] == "latest"


def test_in_place_point_rolls_the_target_back_and_none_rolls_it_forward(rig: Rig) -> None:
    require_tool("qemu-img")
    rig.start_guest()
    _wait_points(rig, "crash", 4)
    rig.stop_guest()
    rig.wait_applied()
    older = next(p for p in rig.points("crash") if p["seq"] > 0)
    latest = rig.points("latest")[0]
    images = rig.copy([older, latest], "inplace")
    assert qemu_compare(rig.target, images[older["id"]]) == 1, "the older point must differ from latest"

    rig.set_mt(disks=[{**rig.mt_desired["disks"][0], "point": older["id"]}])
    wait_for(lambda: rig.mt_pair().get("position") == older["id"], 60, "the rollback in place")
    assert qemu_compare(rig.target, images[older["id"]]) == 0
    assert verify_image(str(rig.target), MACHINE).ok

    rig.set_mt(disks=[{**rig.mt_desired["disks"][0], "point": None}])
    wait_for(lambda: rig.mt_pair().get("position") == "latest", 60, "the roll forward")
    assert qemu_compare(rig.target, images[latest["id"]]) == 0
    assert qemu_compare(rig.target, rig.source) == 0


def test_full_retention_volume_pauses_applying_and_catches_up_after_more_space(plane: Plane) -> None:
    require_tool("qemu-img")
    rig = build_rig(plane, "--retention-quota", str(48 << 10))
    try:
        rig.start_guest(rate=300.0)
        wait_for(lambda: bool(rig.mt.stats().get("retention_full")), 60, "the retention volume to fill")
        assert rig.mt_pair()["paused"] == "retention-volume-full"
        rig.stop_guest()
        paused_at = rig.mt_pair()["applied_seq"]

        def captured() -> int:
            return max(int(p["captured_seq"]) for p in rig.agent.stats()["pairs"])  # type: ignore[union-attr,index]

        # The two components publish their stats on their own clocks: wait for the agent's report to
        # show what it captured beyond the paused master target.
        wait_for(lambda: captured() > paused_at, 15, "the agent to report writes beyond the pause")
        assert rig.mt_pair()["applied_seq"] == paused_at  # still paused
        # What was applied before the pause is intact: the target holds a clean prefix.
        assert verify_image(str(rig.target), MACHINE).ok

        rig.mt.kill(signal.SIGTERM)
        at = rig.mt.args.index("--retention-quota")
        del rig.mt.args[at : at + 2]
        rig.mt.start()
        rig.mt.wait_address()
        rig.wait_applied()
        wait_for(lambda: not rig.mt.stats().get("retention_full"), 30, "retention_full to clear")
        assert rig.mt_pair()["paused"] == ""
        assert qemu_compare(rig.target, rig.source) == 0
        assert verify_image(str(rig.target), MACHINE).ok
    finally:
        rig.stop_guest()


@pytest.mark.parametrize(
    ("volume", "eligible", "reason"),
    [
        pytest.param("retention", True, "", id="rp-ret-eligible"),
        pytest.param("targets", False, "replication-target", id="rp-ret-replication-target"),
    ],
)
def test_retention_volumes_are_reported_with_their_eligibility(
    rig: Rig, volume: str, eligible: bool, reason: str
) -> None:
    path = str((rig.plane.root / volume).resolve())

    def described() -> dict[str, Any]:
        for v in rig.mt.stats().get("retention_volumes", []):  # type: ignore[union-attr]
            if v["path"] == path:  # type: ignore[index]
                return dict(v)  # type: ignore[arg-type]
        return {}

    wait_for(lambda: bool(described()), 30, f"volume {volume} in the stats")
    v = described()
    assert v["eligible"] is eligible
    assert v["reason"].split(":")[0] == reason
    assert v["capacity_bytes"] > 0

    # A refresh rediscovers at once: a lock file makes any volume ineligible (RP-RET locked).
    (rig.plane.root / volume / ".siterecovery-locked").touch()
    rig.set_mt(refresh=1)
    wait_for(lambda: described().get("locked") is True, 30, "the lock to be seen")
    assert described()["eligible"] is False
    assert json.dumps(described())  # plain JSON, as the configuration server stores it


def test_failed_freeze_hook_is_reported_and_inserts_no_bookmark(rig: Rig) -> None:
    """The lab's quiesce fails when the machine has no running guest: the bookmark is not taken."""
    wait_for(
        lambda: [p.get("state") for p in rig.agent.stats().get("pairs", [])] == ["protected"],  # type: ignore[union-attr]
        60,
        "the pair to be protected",
    )
    rig.set_agent(bookmarks=[{"tag": "app-frozen-fails", "kind": "app", "freeze": True}])
    wait_for(lambda: bool(rig.agent.stats().get("bookmark_errors")), 60, "the bookmark error")
    stats = rig.agent.stats()
    assert stats["bookmark_errors"]["app-frozen-fails"].startswith("freeze-hook-failed")  # type: ignore[index]
    assert "app-frozen-fails" not in stats["bookmarks_done"]  # type: ignore[operator]
    assert rig.points("app") == []


def test_a_frozen_pair_applies_nothing_until_it_is_released(rig: Rig) -> None:
    """A failover's pairs are held frozen while its point changes: what the process server still
    has for them must not move the disk past the failover; released, everything applies again."""
    require_tool("qemu-img")
    rig.start_guest()
    _wait_points(rig, "crash", 2)
    # The freeze and a copy request in one desired state: the master target takes the disk's new
    # state before it queues the copy (of a pair it does not hold: it fails at once), so once the
    # copy's result is listed the pair is frozen. A fixed sleep here once read the position before
    # a loaded master target had taken the freeze.
    out = str(rig.plane.root / "copies" / "none.img")
    marker = {"request_id": "freeze-taken", "pair_id": "p-none", "point": "latest", "out_path": out}
    rig.set_mt(disks=[{**rig.mt_desired["disks"][0], "frozen": True}], copies=[marker])

    def copied() -> set[str]:
        return {c["request_id"] for c in rig.mt.stats().get("copies_done", [])}  # type: ignore[union-attr,index]

    wait_for(lambda: "freeze-taken" in copied(), 60, "the master target to take the freeze")

    def acked() -> int:
        pairs = rig.agent.stats().get("pairs", [])
        return int(next(p for p in pairs if p["pair_id"] == rig.mt_pair()["pair_id"])["acked_seq"])  # type: ignore[index]

    def applied() -> int:
        return int(rig.mt_pair()["applied_seq"])

    # Writes applied just before the freeze become durable (and reported) when the next frame is
    # refused; the process server acknowledges writes past the master target's only once that
    # acknowledged none of its held frames for a while (it caches them): from then on, and on
    # statistics written after that, the frozen position no longer moves.
    wait_for(lambda: acked() > applied() + 100, 60, "the process server to hold writes it refuses")
    wait_fresh_stats(rig.mt)
    frozen_at = applied()
    written = rig.guest_seq()
    wait_for(lambda: rig.guest_seq() >= written + 200, 60, "the guest to write on")
    rig.stop_guest()
    wait_for(lambda: acked() > frozen_at + 300, 60, "the process server to hold the new writes")
    wait_fresh_stats(rig.mt)
    assert applied() == frozen_at  # held: nothing new reached the disk

    rig.set_mt(disks=[{**rig.mt_desired["disks"][0], "frozen": False}])
    rig.wait_applied()
    assert qemu_compare(rig.target, rig.source) == 0
