"""REST API routers of the configuration server (resource names after Azure Site Recovery)."""
