"""Configuration server's API: REST routes, heartbeats, admission, metrics, plans, problems.

Sits on the DR workflows (`dr`) and the store (`store`); the server (`server`) mounts it.
"""
