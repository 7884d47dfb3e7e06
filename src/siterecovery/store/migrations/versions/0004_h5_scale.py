"""scale: the items-by-component index, items' details revision, indexes for agent and alert lookups

Revision ID: 0004_h5
Revises: 0003_h3
"""

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0004_h5"
down_revision: str | None = "0003_h3"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "item_components",
        sa.Column("item_id", sa.String(length=64), nullable=False),
        sa.Column("component", sa.String(length=264), nullable=False),
        sa.ForeignKeyConstraint(["item_id"], ["replicated_items.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("item_id", "component"),
    )
    with op.batch_alter_table("item_components", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_item_components_component"), ["component"], unique=False)
    with op.batch_alter_table("replicated_items", schema=None) as batch_op:
        batch_op.add_column(sa.Column("details_rev", sa.Integer(), server_default="0", nullable=False))
    with op.batch_alter_table("components", schema=None) as batch_op:
        batch_op.create_index("ix_components_kind_name", ["kind", "name"], unique=False)
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.create_index("ix_events_object", ["object_type", "object_id", "code"], unique=False)

    # Existing items: build their index rows the way the flush hook does.
    from siterecovery.store.item_index import write_links

    conn = op.get_bind()
    items = sa.table("replicated_items", sa.column("id", sa.String), sa.column("details", sa.JSON))
    for row in conn.execute(sa.select(items.c.id, items.c.details)).all():
        details: dict[str, Any] = row[1]
        write_links(conn, str(row[0]), details)


def downgrade() -> None:
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.drop_index("ix_events_object")
    with op.batch_alter_table("components", schema=None) as batch_op:
        batch_op.drop_index("ix_components_kind_name")
    with op.batch_alter_table("replicated_items", schema=None) as batch_op:
        batch_op.drop_column("details_rev")
    with op.batch_alter_table("item_components", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_item_components_component"))
    op.drop_table("item_components")
