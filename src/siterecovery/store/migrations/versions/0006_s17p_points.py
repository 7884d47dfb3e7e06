"""master target points as rows: a heartbeat writes only the points that changed (issue 17)

Revision ID: 0006_s17p
Revises: 0005_lead
"""

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0006_s17p"
down_revision: str | None = "0005_lead"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = ("master_target_id", "pair_id", "position", "point_id", "kind", "time", "seq", "tag", "unusable")


def upgrade() -> None:
    op.create_table(
        "mt_points",
        sa.Column("master_target_id", sa.String(length=64), nullable=False),
        sa.Column("pair_id", sa.String(length=200), nullable=False),
        sa.Column("position", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("point_id", sa.Text(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("time", sa.Float(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("tag", sa.Text(), nullable=False),
        sa.Column("unusable", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("master_target_id", "pair_id", "position"),
    )
    op.create_index("ix_mt_points_id", "mt_points", ["master_target_id", "pair_id", "point_id"])
    op.create_index(
        "ix_mt_points_unusable",
        "mt_points",
        ["master_target_id", "pair_id", "position"],
        sqlite_where=sa.text("unusable != ''"),
        postgresql_where=sa.text("unusable != ''"),
    )
    # The lists master targets reported so far move from `components.stats` into the table.
    components = sa.table(
        "components", sa.column("id", sa.String), sa.column("kind", sa.String), sa.column("stats", sa.JSON)
    )
    points = sa.table("mt_points", *(sa.column(c) for c in COLUMNS))
    bind = op.get_bind()
    rows = bind.execute(
        sa.select(components.c.id, components.c.stats).where(components.c.kind == "master-target")
    )
    for mt_id, held in list(rows):
        stats: dict[str, Any] = held if isinstance(held, dict) else {}
        pairs: list[dict[str, Any]] = [p for p in stats.get("pairs") or [] if isinstance(p, dict)]
        out = [
            {
                "master_target_id": mt_id,
                "pair_id": str(pair.get("pair_id")),
                "position": i,
                "point_id": str(p.get("id")),
                "kind": str(p.get("kind")),
                "time": float(p.get("time", 0)),
                "seq": int(p.get("seq", 0)),
                "tag": str(p.get("tag", "")),
                "unusable": str(p.get("unusable", "")),
            }
            for pair in pairs
            for i, p in enumerate(pair.get("points") or [])
        ]
        if out:
            bind.execute(points.insert(), out)
        stripped = {**stats, "pairs": [{**pair, "points": []} for pair in pairs]} if pairs else stats
        bind.execute(components.update().where(components.c.id == mt_id).values(stats=stripped))


def downgrade() -> None:
    op.drop_index("ix_mt_points_unusable", table_name="mt_points")
    op.drop_index("ix_mt_points_id", table_name="mt_points")
    op.drop_table("mt_points")
