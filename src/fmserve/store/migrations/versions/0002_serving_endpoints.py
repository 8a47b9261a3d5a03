"""serving endpoints

Revision ID: 0002
Revises: 0001
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "serving_endpoints",
        sa.Column("name", sa.String(63), primary_key=True),
        sa.Column("id", sa.String(32), nullable=False, unique=True),
        sa.Column("creator", sa.String(255), nullable=False),
        sa.Column("creation_timestamp", sa.BigInteger, nullable=False),
        sa.Column("last_updated_timestamp", sa.BigInteger, nullable=False),
        sa.Column("description", sa.Text, nullable=False, server_default=""),
        sa.Column("task", sa.String(64), nullable=False),
        sa.Column("config_version", sa.Integer, nullable=False),
        sa.Column("config", sa.JSON, nullable=False),
        sa.Column("tags", sa.JSON, nullable=False),
        sa.Column("ai_gateway", sa.JSON, nullable=True),
        sa.Column("rate_limits", sa.JSON, nullable=True),
    )


def downgrade() -> None:
    op.drop_table("serving_endpoints")
