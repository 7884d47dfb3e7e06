"""Connecting to vCenter with pyVmomi, awaiting its tasks, and turning its faults into `FabricError`s.

Every call into vCenter may fail in a handful of ways an operator can act on — vCenter not
answering, a certificate not trusted, a wrong password, a missing privilege — and each becomes a
`FabricError` with a stable code and a remediation. Tasks are polled until they finish so that
progress can be reported and a hung task ends in an error instead of blocking a workflow forever.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable
from typing import Any

from pyVim.connect import Disconnect, SmartConnect
from pyVmomi import vim as _vim
from pyVmomi import vmodl as _vmodl

from siterecovery.fabrics.base import FabricError

# pyVmomi's stubs leave its data-object constructors untyped; its types are dynamic: use them as Any.
vim: Any = _vim
vmodl: Any = _vmodl

# Task progress callback: (task description, percent done).
Progress = Callable[[str, int], None]

_POLL_SECONDS = 0.2


def connect(host: str, port: int, user: str, password: str, insecure: bool) -> Any:
    """Log in and return the pyVmomi ServiceInstance."""
    # pyVmomi silently skips certificate checks for loopback hosts unless given a context.
    context = ssl._create_unverified_context() if insecure else ssl.create_default_context()
    try:
        return SmartConnect(  # type: ignore[no-untyped-call]
            host=host, port=port, user=user, pwd=password, sslContext=context, connectionPoolTimeout=30
        )
    except Exception as exc:
        raise fabric_error(exc, f"log in to vCenter {host}:{port} as {user}", host=f"{host}:{port}") from exc


def disconnect(si: Any) -> None:
    Disconnect(si)  # type: ignore[no-untyped-call]


# What OpenSSL says when the peer answers the ClientHello with something that is not TLS at all
# (an HTTP server's "HTTP/1.1 400" reads as a bad record version or length).
_NOT_TLS_REASONS = frozenset(
    {
        "WRONG_VERSION_NUMBER",
        "PACKET_LENGTH_TOO_LONG",
        "HTTP_REQUEST",
        "UNKNOWN_PROTOCOL",
        "RECORD_LAYER_FAILURE",
    }
)


def _not_tls(exc: ssl.SSLError) -> bool:
    return (exc.reason or "") in _NOT_TLS_REASONS


def fabric_error(exc: BaseException, doing: str, host: str = "vCenter") -> FabricError:
    """The `FabricError` an operator can act on for a failure while `doing` something."""
    if isinstance(exc, FabricError):
        return exc
    if isinstance(exc, ssl.SSLError) and _not_tls(exc):
        return FabricError(
            "vcenter-not-tls",
            f"Could not {doing}: {host} does not speak TLS on this port ({exc.reason or exc}); it looks "
            "like a plain-HTTP endpoint.",
            "Give vCenter's HTTPS port (443 unless changed) in the site's address.",
        )
    if isinstance(exc, ssl.SSLError):
        return FabricError(
            "vcenter-tls-untrusted",
            f"Could not {doing}: the TLS certificate of {host} is not trusted ({exc}).",
            "Install vCenter's CA certificate in the system trust store, or mark the site insecure "
            "only on a lab network.",
        )
    if isinstance(exc, vim.fault.InvalidLogin):
        return FabricError(
            "vcenter-login-failed",
            f"Could not {doing}: vCenter rejected the user name or password.",
            "Update the vCenter credentials of the site and retry.",
        )
    if isinstance(exc, vim.fault.NoPermission):
        privilege = getattr(exc, "privilegeId", "") or "a required privilege"
        target = getattr(exc, "object", None)
        on = f" on {target._moId}" if target is not None else ""
        return FabricError(
            "vcenter-insufficient-privileges",
            f"Could not {doing}: the vCenter account lacks {privilege}{on}.",
            f"Grant {privilege} to the vCenter account's role (see docs/vsphere.md), or update the site's "
            "credentials, then retry.",
        )
    if isinstance(exc, vim.fault.DuplicateName):
        return FabricError(
            "machine-exists",
            f"Could not {doing}: the name is already in use ({exc.msg}).",
            "Choose another name or delete the existing machine first.",
        )
    if isinstance(exc, vim.fault.FileNotFound):
        return FabricError(
            "disk-not-found",
            f"Could not {doing}: file {exc.file} does not exist.",
            "Rediscover the site and use disks that exist.",
        )
    if isinstance(exc, vim.fault.InvalidPowerState):
        return FabricError(
            "machine-power-state",
            f"Could not {doing}: {exc.msg or 'wrong power state'}.",
            "Rediscover the site; power the machine on or off as the operation needs.",
        )
    if isinstance(exc, vmodl.fault.ManagedObjectNotFound):
        return FabricError(
            "vcenter-object-gone",
            f"Could not {doing}: the object no longer exists.",
            "Rediscover the site and retry with a current object.",
        )
    if isinstance(exc, vmodl.MethodFault):
        return FabricError(
            "vcenter-task-failed",
            f"Could not {doing}: {exc.msg or type(exc).__name__}.",
            "Look at the task in the vSphere Client for details, fix the cause and retry.",
        )
    if isinstance(exc, OSError):
        return FabricError(
            "vcenter-unreachable",
            f"Could not {doing}: {host} does not answer ({exc}).",
            "Check the vCenter address and port, that vCenter is running, and the network path to it.",
        )
    raise exc


def wait_task(task: Any, doing: str, progress: Progress | None, timeout: float) -> Any:
    """Poll a vCenter task to its end; its result, or a `FabricError` for its fault."""
    deadline = time.monotonic() + timeout
    last = -1
    while True:
        info = task.info
        if info.state == vim.TaskInfo.State.success:
            if progress is not None:
                progress(doing, 100)
            return info.result
        if info.state == vim.TaskInfo.State.error:
            raise fabric_error(info.error, doing)
        percent = info.progress or 0
        if progress is not None and percent != last:
            progress(doing, percent)
            last = percent
        if time.monotonic() > deadline:
            raise FabricError(
                "vcenter-task-timeout",
                f"vCenter task {task._moId} to {doing} did not finish within {timeout:.0f} s.",
                "Look at the task in the vSphere Client; cancel it or wait for it, then retry.",
            )
        time.sleep(_POLL_SECONDS)
