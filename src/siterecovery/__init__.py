"""siterecovery: continuous block replication, failover, reprotect and failback of machines.

Layout: `control` is the configuration server (API, database, jobs, portal); `dataplane` moves
disk writes (agent, process server, master target); `fabrics` are the sites (lab, vSphere);
`dr` holds the disaster-recovery rules and workflows; `lab` the embedded lab's guest workload;
`cli` the one command line.
"""

__version__ = "0.1.0"
