"""Schemathesis against a real configuration server: every operation of /openapi.json, all phases.

Examples, coverage, fuzzing and stateful (links inferred from the schema), with a fixed seed and a
bounded number of examples per operation so the run is deterministic and fits its time budget.
The fabric routes are pinned to this machine (tests/control/schemathesis_hooks.py says how).

The run must find no server error and no conformance failure: every status code, content type,
header and body the server answers is the one its schema declares, every unsupported method is
a 405 with Allow, every operation refuses a missing token, every request that breaks the schema
is refused. One of schemathesis's checks is not run, `positive_data_acceptance`: it expects every
schema-valid request to succeed, and the schema cannot express the rules that depend on other
fields or on the database (a plan's items must exist; a fabric's connection depends on its kind).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT
from tests.control.conftest import ConfigServer

SEED = 20261201
MAX_EXAMPLES = 15
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "missing_required_header",
    "unsupported_method",
    "allow_header_conformance",
    "ignored_auth",
    "negative_data_rejection",
    "use_after_free",
    "ensure_resource_availability",
)


def test_no_server_error_and_no_conformance_failure(cs: ConfigServer, tmp_path: Path) -> None:
    report = tmp_path / "report"
    cassette = report / "cassette.yaml"
    proc = subprocess.run(
        [
            str(Path(sys.executable).with_name("schemathesis")),
            "run",
            f"{cs.url}/openapi.json",
            "--header",
            f"Authorization: Bearer {cs.token}",
            "--phases",
            "examples,coverage,fuzzing,stateful",
            "--checks",
            ",".join(CHECKS),
            "--seed",
            str(SEED),
            "--max-examples",
            str(MAX_EXAMPLES),
            "--workers",
            "1",
            "--no-shrink",
            "--request-timeout",
            "60",
            "--report",
            "json,vcr",
            "--report-dir",
            str(report),
            "--report-vcr-path",
            str(cassette),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={
            **os.environ,
            "SCHEMATHESIS_HOOKS": "tests.control.schemathesis_hooks",
            "SITERECOVERY_TEST_SANDBOX": str(tmp_path / "sandbox"),
            "PYTHONPATH": str(ROOT),
        },
    )
    summary = json.loads(next(report.glob("json-*.json")).read_text())
    requests = sum(1 for line in cassette.read_text().splitlines() if line.startswith("- id:"))
    figures = (
        f"schemathesis {summary['schemathesis_version']}: {summary['operations']['tested']} operations, "
        f"{summary['test_cases']['generated']} test cases, {requests} requests, "
        f"{summary['test_cases']['unique_failures']} failures, phases "
        + ", ".join(f"{name} {p['status']}" for name, p in summary["phases"].items())
        + f", {summary['running_time']:.0f} s"
    )
    print(figures)
    assert proc.returncode == 0, f"{figures}\n{proc.stdout[-20000:]}\n{proc.stderr[-3000:]}"
    assert summary["failures"] == [] and summary["errors"] == [], figures
    assert summary["operations"]["tested"] == summary["operations"]["total"] >= 45, figures
    assert all(p["status"] == "success" for p in summary["phases"].values()), figures
    assert requests > 1000, figures
    # Nothing a hostile client sent left the server in a state it cannot serve from.
    assert cs.api("GET", "/api/server").status_code == 200
