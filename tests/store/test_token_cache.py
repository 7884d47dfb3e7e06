"""Remembered API tokens: a verified token skips the database, and a revoke voids it at once.

Against a real SQLite database made by the store's Alembic migrations. The TTL is an hour, so
only the revoke (or the token's own expiry) can make a remembered token be refused.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy import select, update

from siterecovery.store import desired_epoch, migrate
from siterecovery.store.database import Database
from siterecovery.store.models import Token, now
from siterecovery.store.states import Role
from siterecovery.store.tokens import Principal, TokenCache, TokenRefusal, create_token


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(f"sqlite:///{tmp_path / 'store.sqlite'}")
    migrate.upgrade(database)
    yield database
    database.engine.dispose()


def _token(db: Database, name: str) -> str:
    with db.session() as s:
        return create_token(s, name, Role.READER)


def test_a_verified_token_is_remembered_until_it_is_revoked(db: Database) -> None:
    cache = TokenCache(3600)
    secret, other = _token(db, "a"), _token(db, "b")
    assert cache.get(secret) is None
    with db.session() as s:
        who = cache.check(s, secret)
        assert isinstance(who, Principal) and who.name == "a"
        assert isinstance(cache.check(s, other), Principal)
    assert cache.get(secret) == who
    # Behind the server's back (another process's edit) the remembered answer still holds ...
    with db.session() as s:
        s.execute(update(Token).where(Token.name == "a").values(name="renamed"))
    assert cache.get(secret) == who
    # ... but a revoke through the store voids every remembered token, not only its own.
    with db.session() as s:
        row = s.scalar(select(Token).where(Token.name == "b"))
        assert row is not None
        row.revoked = True
    assert cache.get(secret) is None and cache.get(other) is None
    with db.session() as s:
        assert cache.check(s, other) is TokenRefusal.REVOKED
        assert isinstance(cache.check(s, secret), Principal)
    assert cache.get(secret) is not None and cache.get(other) is None


def test_a_remembered_token_expires_on_time_and_a_zero_ttl_remembers_nothing(db: Database) -> None:
    secret = _token(db, "a")
    with db.session() as s:
        s.execute(update(Token).values(expires_at=now() + 3600))
    cache, uncached = TokenCache(3600), TokenCache(0)
    with db.session() as s:
        assert isinstance(cache.check(s, secret), Principal)
        assert isinstance(uncached.check(s, secret), Principal)
    assert cache.get(secret) is not None and uncached.get(secret) is None
    # The token's own expiry is checked on every use, remembered or not (edited here, no waiting).
    cache._entries = {k: replace(e, expires_at=now() - 1) for k, e in cache._entries.items()}
    assert cache.get(secret) is None
    with db.session() as s:
        assert isinstance(cache.check(s, secret), Principal)  # the database says it is still valid


def test_past_its_ttl_a_token_is_trusted_only_while_the_desired_epoch_is_unchanged(db: Database) -> None:
    """An agent heartbeats every 10 s, the TTL is 5 s: the token stays trusted while the
    database's desired epoch (read by the heartbeat writer) is the one read before the token was;
    a revoke by another process gives the epoch a new value, so the token is read again."""
    secret = _token(db, "agent")

    def epoch() -> int:
        with db.session() as s:
            return desired_epoch.read(s)

    cache = TokenCache(5)
    before = epoch()
    with db.session() as s:
        assert isinstance(cache.check(s, secret, before), Principal)
    cache._entries = {k: replace(e, until=0.0) for k, e in cache._entries.items()}  # the TTL passed
    assert cache.get(secret, before) is not None
    assert cache.get(secret, None) is None  # no epoch read lately: the TTL alone applies
    with db.session() as s:
        assert isinstance(cache.check(s, secret, before), Principal)
    cache._entries = {k: replace(e, until=0.0) for k, e in cache._entries.items()}
    revoke = (
        "import sys; from sqlalchemy import select; from siterecovery.store.database import Database;"
        "from siterecovery.store.models import Token; db = Database(sys.argv[1]);"
        "s = db.session().__enter__(); s.scalar(select(Token).where(Token.name == 'agent')).revoked = True;"
        "s.commit()"
    )
    subprocess.run([sys.executable, "-c", revoke, str(db.engine.url)], check=True, timeout=120)
    after = epoch()
    assert after != before
    assert cache.get(secret, after) is None
    with db.session() as s:
        assert cache.check(s, secret, after) is TokenRefusal.REVOKED
