"""Reconnect backoff: exponential, capped, jittered so components cut off together spread out.

The distribution is checked with seeded generators (deterministic); the registration loop is
checked against a real refused TCP port with a stop event that records the waits instead of
sleeping them.
"""

from __future__ import annotations

import random
import threading
from pathlib import Path

from tests.conftest import free_port

from siterecovery.cli.dataplane import _register_until_stopped
from siterecovery.dataplane.control_client import ControlClient, Registration
from siterecovery.retry import Backoff


def test_delays_grow_to_the_cap_and_stay_between_half_and_whole_ceiling() -> None:
    backoff = Backoff(0.1, 5.0, rng=random.Random(1))
    delays = [backoff.next() for _ in range(12)]
    for n, delay in enumerate(delays):
        ceiling = min(5.0, 0.1 * 2**n)
        assert ceiling / 2 <= delay <= ceiling, (n, delay)
    assert delays[-1] > 2.5 - 1e-9  # capped: never below half the cap once there
    backoff.reset()
    assert 0.05 <= backoff.next() <= 0.1


def test_components_cut_off_together_do_not_retry_in_lockstep() -> None:
    # 100 agents lose their process server at the same instant; each has its own generator.
    agents = [Backoff(1.0, 30.0, rng=random.Random(seed)) for seed in range(100)]
    first = [a.next() for a in agents]
    assert all(0.5 <= d <= 1.0 for d in first)
    # Spread over the interval: each tenth of [0.5, 1.0] gets some of them, none gets most.
    buckets = [0] * 10
    for d in first:
        buckets[min(9, int((d - 0.5) / 0.05))] += 1
    assert min(buckets) >= 3 and max(buckets) <= 25, buckets
    # And they stay apart: after four attempts, hardly any two retry within the same millisecond.
    instants = [sum([d, *(a.next() for _ in range(3))]) for d, a in zip(first, agents, strict=True)]
    distinct = {round(t, 3) for t in instants}
    assert len(distinct) >= 95


def test_unseeded_backoffs_draw_their_own_sequences() -> None:
    a, b = Backoff(1.0, 30.0), Backoff(1.0, 30.0)
    assert [a.next() for _ in range(5)] != [b.next() for _ in range(5)]


class StopFake(threading.Event):
    """A stop event that records the waits asked of it instead of sleeping, and stops after `n`."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n
        self.waits: list[float] = []

    def wait(self, timeout: float | None = None) -> bool:
        assert timeout is not None
        self.waits.append(timeout)
        if len(self.waits) >= self.n:
            self.set()
        return self.is_set()


def test_registration_retries_with_the_jittered_backoff(tmp_path: Path) -> None:
    # A real refused port: every registration attempt fails with a connection error.
    server = f"http://127.0.0.1:{free_port()}"
    client = ControlClient(server, tmp_path, Registration("agent", "onprem/web1", "onprem"))
    passphrase = tmp_path / "passphrase"
    passphrase.write_text("secret\n")
    stop = StopFake(5)
    identity = _register_until_stopped(
        tmp_path, client, passphrase, stop, Backoff(1.0, 30.0, rng=random.Random(7))
    )
    assert identity is None
    expected = Backoff(1.0, 30.0, rng=random.Random(7))
    assert stop.waits == [expected.next() for _ in range(5)]
    assert stop.waits != [1.0, 2.0, 4.0, 8.0, 16.0]  # not the old lockstep doubling
