"""desired epoch: one value that changes with whatever may change a component's desired state

Revision ID: 0007_s17hb
Revises: 0006_s17p
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007_s17hb"
down_revision: str | None = "0006_s17p"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    table = op.create_table(
        "desired_epoch",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("value", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.bulk_insert(table, [{"id": 1, "value": 0}])


def downgrade() -> None:
    op.drop_table("desired_epoch")
