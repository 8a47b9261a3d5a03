"""secret scopes and secrets

Revision ID: 0003
Revises: 0002
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "secret_scopes",
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("creation_timestamp", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "secrets",
        sa.Column("scope", sa.String(128), primary_key=True),
        sa.Column("key", sa.String(128), primary_key=True),
        sa.Column("value_encrypted", sa.Text, nullable=False),
        sa.Column("last_updated_timestamp", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("secrets")
    op.drop_table("secret_scopes")
