"""Capture on libvirt through the jobs: which export serves which disk (LV-CAPTURE), and the
agent's report of its exports, validated strictly at the API like its other statistics."""

from __future__ import annotations

from pathlib import Path

import pytest

from siterecovery.control.reports import validated_stats
from siterecovery.dataplane.agent import Agent, AgentOptions
from siterecovery.dataplane.assignments import DiskExport
from siterecovery.dr.libvirt_capture import capture_sources
from siterecovery.errors import SiteRecoveryError
from siterecovery.fabrics import libvirt_xml as lx


def test_each_disk_is_matched_to_the_export_serving_its_volume() -> None:
    exports = [
        DiskExport(disk="vdb", image="/pool/web_vdb.img", socket="/run/sr/web/vdb.sock"),
        DiskExport(disk="vda", image="/pool/web_vda.img", socket="/run/sr/web/vda.sock"),
    ]
    sources, problems = capture_sources(
        "web", [("vda", "/pool/web_vda.img"), ("vdb", "/pool/web_vdb.img")], exports
    )
    assert problems == []
    assert sources == {
        "vda": "nbd+unix://vda@/run/sr/web/vda.sock",
        "vdb": "nbd+unix://vdb@/run/sr/web/vdb.sock",
    }


def test_a_disk_no_export_serves_over_a_socket_is_refused_with_every_such_disk() -> None:
    exports = [
        DiskExport(disk="vda", image="/elsewhere/vda.img", socket="/run/sr/web/vda.sock"),
        DiskExport(disk="vdb", image="/pool/web_vdb.img"),  # TCP only: no --nbd-unix-dir
    ]
    sources, problems = capture_sources(
        "web", [("vda", "/pool/web_vda.img"), ("vdb", "/pool/web_vdb.img")], exports
    )
    assert sources == {}
    assert [(p.code, p.rule) for p in problems] == [("libvirt-capture-not-served", "LV-CAPTURE")] * 2
    assert "/pool/web_vda.img" in problems[0].message and "vda=/elsewhere/vda.img" in problems[0].message
    assert "--disk vda=/pool/web_vda.img" in problems[0].remediation
    assert "Unix socket" in problems[1].message


def test_the_agent_reports_its_exports_as_absolute_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "web.img").write_bytes(bytes(4096))
    agent = Agent(AgentOptions(tmp_path / "state", {"vda": Path("web.img")}, Path("nbd")))
    (export,) = agent.stats().exports
    assert export == DiskExport(
        disk="vda", image=str(tmp_path / "web.img"), socket=str(tmp_path / "nbd/vda.sock")
    )
    report = agent.stats().model_dump(mode="json")
    assert validated_stats("agent", report) == report


@pytest.mark.parametrize(
    ("export", "field"),
    [
        ({"disk": "vda", "image": "relative/web.img"}, "stats.exports.0.image"),
        ({"disk": "vda", "image": "/pool/web.img", "socket": "/run/x\n.sock"}, "stats.exports.0.socket"),
        ({"disk": "vd@a", "image": "/pool/web.img"}, "stats.exports.0.disk"),
        ({"disk": "vda", "image": "/pool/web.img", "extra": 1}, "stats.exports.0.extra"),
    ],
)
def test_a_bad_export_in_a_report_is_refused_naming_the_field(export: dict[str, object], field: str) -> None:
    with pytest.raises(SiteRecoveryError) as refused:
        validated_stats("agent", {"exports": [export]})
    assert [p.detail["field"] for p in refused.value.problems] == [field]


def test_the_domain_xml_names_the_volume_under_each_captured_disk() -> None:
    xml = f"""<domain><metadata><srcap:capture xmlns:srcap="{lx.CAPTURE_NS}">
      <srcap:disk target="vda" volume="/pool/web_vda.img"/></srcap:capture></metadata></domain>"""
    assert lx.captured(lx.parse(xml)) == {"vda": "/pool/web_vda.img"}
    assert lx.captured(lx.parse("<domain><metadata/></domain>")) == {}
