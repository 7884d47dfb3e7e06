"""Alembic migrations of the configuration server's database."""
