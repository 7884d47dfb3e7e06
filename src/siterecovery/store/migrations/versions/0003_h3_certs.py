"""component certificates: serials, expiry and revocation (issue 13)

Revision ID: 0003_h3
Revises: 0002_h4
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_h3"
down_revision: str | None = "0002_h4"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "component_certificates",
        sa.Column("serial", sa.String(length=64), nullable=False),
        sa.Column("component_id", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=30), nullable=False),
        sa.Column("not_after", sa.Float(), nullable=False),
        sa.Column("issued_at", sa.Float(), nullable=False),
        sa.Column("revoked_at", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("serial"),
    )
    with op.batch_alter_table("component_certificates", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_component_certificates_component_id"), ["component_id"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("component_certificates", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_component_certificates_component_id"))
    op.drop_table("component_certificates")
