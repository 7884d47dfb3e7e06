"""The embedded lab's machines: guest workload, crash-consistency oracle and machine runtime.

`verify_log`/`verify_image` are the oracle every failover and failback test asks; `runtime`
starts and stops a lab machine's agent export and guest processes.
"""

from siterecovery.lab.oracle import OracleVerdict, verify_image, verify_log

__all__ = ["OracleVerdict", "verify_image", "verify_log"]
