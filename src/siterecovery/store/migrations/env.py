"""Alembic environment: runs against the URL the server passes in (SQLite or PostgreSQL)."""

from alembic import context

from siterecovery.store.database import make_engine
from siterecovery.store.models import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_online() -> None:
    connectable = config.attributes.get("connection")
    if connectable is None:
        engine = make_engine(config.get_main_option("sqlalchemy.url") or "")
        with engine.connect() as connection:
            _run(connection)
    else:
        _run(connectable)


def _run(connection: object) -> None:
    context.configure(
        connection=connection,  # type: ignore[arg-type]
        target_metadata=target_metadata,
        render_as_batch=True,  # SQLite can only ALTER through batch (copy-and-move) operations
    )
    with context.begin_transaction():
        context.run_migrations()


run_migrations_online()
