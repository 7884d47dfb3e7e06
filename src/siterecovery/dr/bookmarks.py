"""App-consistent and group recovery points: asking agents for bookmarks, now or on schedule.

An app-consistent point is a bookmark the agent inserts after the guest's freeze hook; a group
point is one tag given to every member's agent, so all their disks share that point (FW-4,
RP-GROUP-MT). The monitor asks at each policy's app-consistent frequency; operators can ask now.
"""

from __future__ import annotations

import time

from sqlalchemy import select
from sqlalchemy.orm import Session

from siterecovery.store.models import Policy, ReplicatedItem
from siterecovery.store.record import BookmarkRecord, ItemRecord
from siterecovery.store.states import ProtectionState

KEEP = 10  # bookmark requests kept per item (agents remember which tags they did)


def _members(s: Session, item: ReplicatedItem) -> list[ReplicatedItem]:
    if item.group_id is None:
        return [item]
    return list(s.scalars(select(ReplicatedItem).where(ReplicatedItem.group_id == item.group_id)))


def request_bookmark(s: Session, item: ReplicatedItem, now: float | None = None) -> str:
    """Ask for an app-consistent point of the item, or a group point of its whole group; returns the tag."""
    now = now or time.time()
    members = _members(s, item)
    kind = "group" if item.group_id is not None else "app"
    tag = f"{kind}-{int(now * 1000)}"
    for member in members:
        rec = ItemRecord.model_validate(member.details)
        rec.bookmarks = [*rec.bookmarks, BookmarkRecord(tag=tag, kind=kind, requested_at=now)][-KEEP:]
        member.details = rec.model_dump(mode="json")
    return tag


def schedule_bookmarks(s: Session, now: float) -> list[str]:
    """Ask for every point that is due at its policy's app-consistent frequency."""
    asked: list[str] = []
    seen_groups: set[str] = set()
    # Only items whose policy asks for app-consistent points: the others are not even loaded.
    scheduled = list(s.scalars(select(Policy.id).where(Policy.app_consistent_frequency_seconds > 0)))
    if not scheduled:
        return asked
    for item in s.scalars(
        select(ReplicatedItem).where(
            ReplicatedItem.state == ProtectionState.PROTECTED, ReplicatedItem.policy_id.in_(scheduled)
        )
    ):
        if item.group_id is not None and item.group_id in seen_groups:
            continue
        policy = s.get(Policy, item.policy_id)
        frequency = float(policy.app_consistent_frequency_seconds) if policy is not None else 0.0
        if frequency <= 0:
            continue
        members = _members(s, item)
        if item.group_id is not None:
            seen_groups.add(item.group_id)
            if any(m.state != ProtectionState.PROTECTED for m in members):
                continue
        last = max(
            (b.requested_at for m in members for b in ItemRecord.model_validate(m.details).bookmarks),
            default=min(m.updated_at for m in members),
        )
        if now - last >= frequency:
            asked.append(request_bookmark(s, item, now))
    return asked
