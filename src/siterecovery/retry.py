"""When to try again: jittered exponential backoff for reconnects, and which errors are transient.

Every component that reconnects — the agent to its process server, the process server to its
master target, a component registering with the configuration server — waits `Backoff.next()`
between attempts: exponential up to a cap, with "equal jitter" (a delay is drawn between half the
ceiling and the ceiling). Without the jitter, every agent cut off by one process-server restart
retried at the same instants and reconnected in lockstep; with it they spread over each interval,
while each still waits at least half of the exponential delay. `after_busy` is the wait after a
server answered 429/503: at least its Retry-After, stretched by up to 100 %.

`is_transient` classifies a provider (fabric) error for the job engine: connection resets and
refusals, timeouts, HTTP 5xx and 429, libvirt's RPC and timeout errors are worth retrying (the job
step is retried by DBOS); anything carrying an operator-facing `code` is permanent, unless it was
raised from one of those (the providers wrap them: `vcenter-unreachable`), as is the rest.
This module imports nothing of the project: the data plane and the control plane both use it.
"""

from __future__ import annotations

import errno
import random

from siterecovery.errors import SiteRecoveryError

# libvirt's virErrorNumber values that mean "the link or the daemon hiccupped", not "no": the
# numbers (virterror.h) rather than the names, so this needs no libvirt-python.
VIR_ERR_NO_CONNECT = 5
VIR_ERR_SYSTEM_ERROR = 38
VIR_ERR_RPC = 39
VIR_ERR_OPERATION_TIMEOUT = 68
VIR_ERR_AGENT_UNRESPONSIVE = 86
_LIBVIRT_TRANSIENT = frozenset(
    {
        VIR_ERR_NO_CONNECT,
        VIR_ERR_SYSTEM_ERROR,
        VIR_ERR_RPC,
        VIR_ERR_OPERATION_TIMEOUT,
        VIR_ERR_AGENT_UNRESPONSIVE,
    }
)
_TRANSIENT_ERRNOS = frozenset(
    {
        errno.ECONNRESET,
        errno.ECONNREFUSED,
        errno.ECONNABORTED,
        errno.EPIPE,
        errno.ETIMEDOUT,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.ENETDOWN,
        errno.EAGAIN,
    }
)
# Names of exception classes of the HTTP stacks the fabrics use (httpx, requests/urllib3 under
# pyVmomi, azure-core) whose instances are failures of the transport, not answers.
_TRANSPORT_ERRORS = frozenset(
    {
        "TransportError",  # httpx: ConnectError, ReadTimeout, RemoteProtocolError ... derive from it
        "ServiceRequestError",  # azure-core: the request never reached the service
        "ServiceResponseError",  # azure-core: the connection broke before a response
        "ConnectionError",  # requests
        "Timeout",  # requests
        "ProtocolError",  # urllib3
    }
)


class Backoff:
    """Delays between successive attempts: `initial` times `factor` per attempt up to `cap`, jittered."""

    def __init__(
        self, initial: float, cap: float, factor: float = 2.0, rng: random.Random | None = None
    ) -> None:
        self.initial = initial
        self.cap = cap
        self.factor = factor
        # Each instance draws from its own generator: components started at the same moment must
        # not share a sequence (a test passes a seeded one).
        self._rng = rng or random.Random()
        self._attempt = 0

    def ceiling(self, attempt: int) -> float:
        return min(self.cap, self.initial * self.factor ** min(attempt, 64))

    def next(self) -> float:
        """The wait before the next attempt, in [ceiling/2, ceiling]; the ceiling then grows."""
        top = self.ceiling(self._attempt)
        self._attempt += 1
        return top / 2 + self._rng.random() * top / 2

    def reset(self) -> None:
        """After a success: the next failure starts again from `initial`."""
        self._attempt = 0


def after_busy(retry_after: str | None, rng: random.Random | None = None) -> float:
    """How long to wait after a busy answer: Retry-After (default 2 s), stretched by 0-100 % jitter.

    The jitter spreads the components the server shed over the next interval instead of having
    them all come back at the same instant.
    """
    try:
        base = float(retry_after) if retry_after else 2.0
    except ValueError:
        base = 2.0
    base = min(max(base, 0.5), 60.0)
    return base * (1.0 + (rng or random).random())


def _status(exc: BaseException) -> int | None:
    for holder in (exc, getattr(exc, "response", None)):
        for attr in ("status_code", "status"):
            value = getattr(holder, attr, None)
            if isinstance(value, int):
                return value
    return None


def is_transient(exc: BaseException) -> bool:
    """True if retrying the operation that raised `exc` may well succeed."""
    if isinstance(exc, SiteRecoveryError):
        return False
    if isinstance(getattr(exc, "code", None), str):
        # An operator-facing code means the operator must act, unless it only names a transient
        # failure it was raised from (`vcenter-unreachable` from a reset connection,
        # `libvirt-operation-failed` from an RPC error): that is worth retrying, and the code is
        # what the operator reads if the retries run out.
        cause = exc.__cause__
        return cause is not None and is_transient(cause)
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return True
    get_code = getattr(exc, "get_error_code", None)  # libvirt.libvirtError
    if callable(get_code):
        return get_code() in _LIBVIRT_TRANSIENT
    status = _status(exc)
    if status is not None:
        return status == 429 or 500 <= status <= 599
    return any(cls.__name__ in _TRANSPORT_ERRORS for cls in type(exc).__mro__)
