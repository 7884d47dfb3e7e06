"""Schemathesis hooks for test_schemathesis.py: fabric requests may reach only this machine.

Loaded by schemathesis (SCHEMATHESIS_HOOKS) in its own process. Every request schemathesis
sends passes `before_call`, whatever the phase (examples, coverage, fuzzing, stateful), so this
is where a generated fabric connection is pinned down before it is sent:
- a vSphere `host` becomes 127.0.0.1 (discovery would otherwise connect to whatever host name
  was generated, out to the internet);
- a lab `path` becomes the test's sandbox folder (discovery takes a lock file in the folder it is
  given, and must not do so in `/` or `/etc`);
- an Azure connection loses its `subscription`, so it is always refused (422) before anything is
  opened: discovery would call Azure's public endpoints (and, without a secret, the instance
  metadata service for a managed identity);
- a libvirt `uri` becomes `test:///default`, libvirt's built-in test driver (a generated
  `qemu+ssh://host/…` would open SSH to that host).
The rest of the body, the port included, stays as generated, so validation is still fuzzed.
"""

from __future__ import annotations

import os
from typing import Any

import schemathesis

SANDBOX = os.environ.get("SITERECOVERY_TEST_SANDBOX", "/nonexistent-sandbox")


def pin(body: Any) -> None:
    if not isinstance(body, dict):
        return
    connection = body.get("connection")
    if not isinstance(connection, dict):
        return
    if isinstance(connection.get("host"), str):
        connection["host"] = "127.0.0.1"
    if isinstance(connection.get("path"), str):
        connection["path"] = SANDBOX
    if isinstance(connection.get("uri"), str):
        connection["uri"] = "test:///default"
    if body.get("kind") == "azure" or "storage_account" in connection:
        connection.pop("subscription", None)


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    if case.operation.path.startswith("/api/fabrics"):
        pin(case.body)
