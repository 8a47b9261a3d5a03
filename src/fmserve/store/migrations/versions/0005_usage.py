"""usage tracking: endpoint_usage, served_entities, request-log checkpoints

Revision ID: 0005
Revises: 0004
"""
import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "endpoint_usage",
        sa.Column("databricks_request_id", sa.String(64), primary_key=True),
        sa.Column("client_request_id", sa.String(128), nullable=True),
        sa.Column("workspace_id", sa.String(32), nullable=False),
        sa.Column("requester", sa.String(255), nullable=False),
        sa.Column("status_code", sa.Integer, nullable=False),
        sa.Column("request_time", sa.BigInteger, nullable=False),
        sa.Column("input_token_count", sa.BigInteger, nullable=False),
        sa.Column("output_token_count", sa.BigInteger, nullable=False),
        sa.Column("input_character_count", sa.BigInteger, nullable=False),
        sa.Column("output_character_count", sa.BigInteger, nullable=False),
        sa.Column("usage_context", sa.JSON, nullable=True),
        sa.Column("request_streaming", sa.Boolean, nullable=False),
        sa.Column("served_entity_id", sa.String(32), nullable=True),
        sa.Column("endpoint_name", sa.String(63), nullable=False),
    )
    op.create_index("ix_endpoint_usage_requester", "endpoint_usage", ["requester"])
    op.create_index("ix_endpoint_usage_request_time", "endpoint_usage", ["request_time"])
    op.create_index("ix_endpoint_usage_endpoint_name", "endpoint_usage", ["endpoint_name"])
    op.create_table(
        "served_entities",
        sa.Column("served_entity_id", sa.String(32), primary_key=True),
        sa.Column("workspace_id", sa.String(32), nullable=False),
        sa.Column("created_by", sa.String(255), nullable=False),
        sa.Column("endpoint_name", sa.String(63), nullable=False),
        sa.Column("endpoint_id", sa.String(32), nullable=False),
        sa.Column("served_entity_name", sa.String(255), nullable=False),
        sa.Column("entity_type", sa.String(32), nullable=False),
        sa.Column("entity_name", sa.String(255), nullable=True),
        sa.Column("entity_version", sa.String(64), nullable=True),
        sa.Column("endpoint_config_version", sa.Integer, nullable=False),
        sa.Column("task", sa.String(64), nullable=True),
        sa.Column("external_model_config", sa.JSON, nullable=True),
        sa.Column("foundation_model_config", sa.JSON, nullable=True),
        sa.Column("change_time", sa.BigInteger, nullable=False),
        sa.Column("endpoint_delete_time", sa.BigInteger, nullable=True),
    )
    op.create_index("ix_served_entities_endpoint_name", "served_entities", ["endpoint_name"])
    op.create_table(
        "log_checkpoints",
        sa.Column("consumer", sa.String(32), primary_key=True),
        sa.Column("replica", sa.String(255), primary_key=True),
        sa.Column("segment", sa.String(64), nullable=False),
        sa.Column("offset", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    for table in ("log_checkpoints", "served_entities", "endpoint_usage"):
        op.drop_table(table)
