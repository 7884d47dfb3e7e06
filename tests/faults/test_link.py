"""The link between the process server and the master target cut for 30 s under a live writer:
replication catches up once it is back, and every flushed record reaches the recovered disk."""

from __future__ import annotations

import time
from pathlib import Path

from tests.faults.checks import fail_over_and_check
from tests.faults.conftest import Deploy, FaultOptions, data_writer, env_root
from tests.faults.proxy import LinkProxy
from tests.faults.report import Report, Row

CUT_SECONDS = 30.0


def test_link_cut_for_30_seconds_catches_up(
    deploy: Deploy, fault_options: FaultOptions, fault_report: Report, tmp_path: Path
) -> None:
    mt_address = env_root(tmp_path) / "components" / "mt-cloud" / "address"  # where mt-cloud listens
    proxy = LinkProxy(mt_address.read_text).start()
    try:
        env = deploy(mt_cloud_args=("--advertise", proxy.address))
        started = time.monotonic()
        assert proxy.forwarded > 0  # the initial replication went through the relay
        writer = data_writer(env, fault_options).start()
        writer.wait_written(64)
        proxy.cut()
        during = proxy.forwarded
        cut_until = time.monotonic() + CUT_SECONDS
        while time.monotonic() < cut_until:  # the guest goes on writing; nothing crosses the link
            writer.wait_written(writer.written + 1)
            time.sleep(0.5)
        assert proxy.forwarded == during
        written_in_cut = writer.written
        proxy.restore()
        writer.wait_written(written_in_cut + 64)
        recovered = fail_over_and_check(env, writer)
        assert proxy.forwarded > during  # it caught up through the link, not around it
        fault_report.add(
            Row(
                "PS-MT link cut for 30 s, then planned failover",
                "link cut x1",
                flushed=writer.flushed,
                recovered=recovered.prefix,
                records_checked=recovered.prefix,
                seconds=time.monotonic() - started,
            )
        )
    finally:
        proxy.stop()
