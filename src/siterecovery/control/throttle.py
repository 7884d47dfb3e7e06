"""Rate limit on wrong registration passphrases, per source address.

The passphrase is the only thing between a network peer and a component certificate, so it must
not be guessable at network speed. After `passphrase_failures_per_minute` wrong passphrases from
one address within a minute, that address's registrations are refused with 429 and a
Retry-After (even with the right passphrase) until the oldest failure is a minute old, and an
alert names the address; a later successful registration from it clears the alert.

The counts live in this process's memory: a restart forgets them, and several API processes
each count on their own (the limit then applies per process).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque

from fastapi import HTTPException
from sqlalchemy.orm import Session

from siterecovery.store.events import clear_alert, raise_alert
from siterecovery.store.states import Severity

WINDOW = 60.0
ALERT = "passphrase-attempts-throttled"


class PassphraseThrottle:
    def __init__(self) -> None:
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, address: str, now: float) -> deque[float]:
        times = self._failures.setdefault(address, deque())
        while times and times[0] <= now - WINDOW:
            times.popleft()
        if not times:
            del self._failures[address]  # keeps the table as small as the set of current offenders
        return times

    def check(self, address: str, limit: int) -> None:
        """Refuse with 429 while `address` has `limit` failures within the last minute."""
        now = time.monotonic()
        with self._lock:
            times = self._recent(address, now)
            if len(times) < limit:
                return
            retry = max(1, math.ceil(times[0] + WINDOW - now))
        raise HTTPException(
            429,
            f"Too many wrong registration passphrases from {address}; try again in {retry} s.",
            headers={"Retry-After": str(retry)},
        )

    def failed(self, s: Session, address: str, limit: int) -> None:
        now = time.monotonic()
        with self._lock:
            times = self._recent(address, now)
            times.append(now)
            self._failures[address] = times
            reached = len(times) >= limit
        if reached:
            raise_alert(
                s,
                Severity.WARNING,
                ALERT,
                f"{limit} wrong registration passphrases from {address} within a minute: its "
                "registrations are refused for a while. Someone may be guessing the passphrase.",
                "address",
                address,
            )

    def succeeded(self, s: Session, address: str) -> None:
        with self._lock:
            self._failures.pop(address, None)
        clear_alert(s, ALERT, "address", address)


THROTTLE = PassphraseThrottle()
