"""The configuration server's process: the FastAPI application (API routers and portal) and the
start-up that opens the store, starts the job engine and the monitor, and serves.

The top of the server's layers: it wires `portal`, `control` and `dr` together, none of which
imports it.
"""
