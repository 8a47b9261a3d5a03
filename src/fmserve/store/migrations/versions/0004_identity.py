"""identity: principals, groups, service-principal secrets, permissions, signing keys

Revision ID: 0004
Revises: 0003
"""
import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "principals",
        sa.Column("id", sa.String(20), primary_key=True),
        sa.Column("kind", sa.String(24), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("display_name", sa.String(255), nullable=False, server_default=""),
        sa.Column("active", sa.Boolean, nullable=False, server_default=sa.true()),
        sa.Column("external_id", sa.String(255), nullable=True),
        sa.Column("attrs", sa.JSON, nullable=False),
        sa.Column("creation_time", sa.BigInteger, nullable=False),
        sa.UniqueConstraint("kind", "name", name="uq_principals_kind_name"),
    )
    op.create_table(
        "group_members",
        sa.Column("group_id", sa.String(20), primary_key=True),
        sa.Column("member_id", sa.String(20), primary_key=True, index=True),
    )
    op.create_table(
        "sp_secrets",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("sp_id", sa.String(20), nullable=False, index=True),
        sa.Column("secret_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("secret_hash_prefix", sa.String(8), nullable=False),
        sa.Column("create_time", sa.BigInteger, nullable=False),
        sa.Column("update_time", sa.BigInteger, nullable=False),
        sa.Column("expire_time", sa.BigInteger, nullable=False),
        sa.Column("scopes", sa.JSON, nullable=True),
    )
    op.create_table(
        "endpoint_permissions",
        sa.Column("endpoint_id", sa.String(32), primary_key=True),
        sa.Column("principal_id", sa.String(20), primary_key=True, index=True),
        sa.Column("level", sa.String(16), nullable=False),
    )
    op.create_table(
        "secret_acls",
        sa.Column("scope", sa.String(128), primary_key=True),
        sa.Column("principal", sa.String(255), primary_key=True),
        sa.Column("permission", sa.String(8), nullable=False),
    )
    op.create_table(
        "signing_keys",
        sa.Column("kid", sa.String(64), primary_key=True),
        sa.Column("private_key_encrypted", sa.Text, nullable=False),
        sa.Column("creation_time", sa.BigInteger, nullable=False),
    )
    with op.batch_alter_table("tokens") as t:
        t.add_column(sa.Column("owner_id", sa.String(20), nullable=True))
        t.add_column(sa.Column("created_by_id", sa.String(20), nullable=True))
        t.add_column(sa.Column("last_used_time", sa.BigInteger, nullable=True))
        t.create_index("ix_tokens_owner_id", ["owner_id"])


def downgrade() -> None:
    with op.batch_alter_table("tokens") as t:
        t.drop_index("ix_tokens_owner_id")
        t.drop_column("last_used_time")
        t.drop_column("created_by_id")
        t.drop_column("owner_id")
    for table in ("signing_keys", "secret_acls", "endpoint_permissions", "sp_secrets",
                  "group_members", "principals"):
        op.drop_table(table)
