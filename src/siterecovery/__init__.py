"""siterecovery: continuous block replication, failover, reprotect and failback of machines.

Layout, top to bottom (each package imports only from those below it; see docs/architecture.md):
`cli` the one command line; `demo` the lab-driven walkthrough; `server` the configuration
server's process; `portal` its web pages; `control` the REST API; `dr` the disaster-recovery
rules and workflows; `store` the database, its models, states, jobs and context; `lab` the
embedded lab's fabric and guests; `fabrics` the sites (vSphere, Azure, libvirt); `dataplane`
moves disk writes (agent, process server, master target).
"""

__version__ = "0.1.0"
