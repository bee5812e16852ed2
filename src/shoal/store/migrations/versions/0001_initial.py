"""Initial schema: organizations, API keys, usage, prices, files, fine-tuned models, jobs, job
events, checkpoints and learning curves.

Revision ID: 0001
Revises:
Create Date: 2025-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

BIGINT = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _time(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.Double(), nullable=nullable)


def _str(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.String(), nullable=nullable)


def _org_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(["org_id"], ["organizations.id"],
                                   name=f"fk_{table}_org_id_organizations")


def upgrade() -> None:
    op.create_table(
        "organizations",
        _str("id"), _str("name"), _time("created_at"),
        sa.PrimaryKeyConstraint("id", name="pk_organizations"),
        sa.UniqueConstraint("name", name="uq_organizations_name"),
    )
    op.create_table(
        "api_keys",
        _str("id"), _str("org_id"), _str("name", True), _str("prefix"), _str("key_hash"),
        sa.Column("is_admin", sa.Boolean(), nullable=False),
        _time("created_at"), _time("revoked_at", True), _time("last_used_at", True),
        sa.PrimaryKeyConstraint("id", name="pk_api_keys"),
        _org_fk("api_keys"),
        sa.UniqueConstraint("key_hash", name="uq_api_keys_key_hash"),
    )
    op.create_index("ix_api_keys_org_id", "api_keys", ["org_id"])
    op.create_table(
        "usage",
        sa.Column("id", BIGINT, autoincrement=True, nullable=False),
        _str("org_id"), _str("api_key_id", True), _str("model"), _str("base_model"), _str("kind"),
        sa.Column("prompt_tokens", BIGINT, nullable=False),
        sa.Column("completion_tokens", BIGINT, nullable=False),
        sa.Column("num_requests", sa.Integer(), nullable=False),
        _str("request_id", True), _time("created_at"),
        sa.PrimaryKeyConstraint("id", name="pk_usage"),
    )
    op.create_index("ix_usage_org_id_created_at", "usage", ["org_id", "created_at"])
    op.create_table(
        "prices",
        _str("model"),
        sa.Column("prompt_per_1m", sa.Double(), nullable=False),
        sa.Column("completion_per_1m", sa.Double(), nullable=False),
        sa.Column("training_per_1m", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("model", name="pk_prices"),
    )
    op.create_table(
        "files",
        _str("id"), _str("org_id"), _str("filename"), _str("purpose"),
        sa.Column("bytes", BIGINT, nullable=False),
        _str("sha256"), _str("status"), sa.Column("status_details", sa.Text(), nullable=True),
        _time("created_at"),
        sa.PrimaryKeyConstraint("id", name="pk_files"),
        _org_fk("files"),
    )
    op.create_index("ix_files_org_id_created_at", "files", ["org_id", "created_at"])
    op.create_index("ix_files_sha256", "files", ["sha256"])
    op.create_table(
        "fine_tuned_models",
        _str("name"), _str("org_id"), _str("base_model"), _str("job_id", True), _str("path"),
        sa.Column("checkpoint_step", sa.Integer(), nullable=True),
        _time("created_at"),
        sa.PrimaryKeyConstraint("name", name="pk_fine_tuned_models"),
        _org_fk("fine_tuned_models"),
    )
    op.create_index("ix_fine_tuned_models_org_id", "fine_tuned_models", ["org_id"])
    op.create_table(
        "jobs",
        _str("id"), _str("org_id"), _str("kind"), _str("model"), _str("training_file"),
        _str("validation_file", True), _str("suffix", True),
        sa.Column("seed", sa.Integer(), nullable=False),
        sa.Column("metadata", sa.JSON(), nullable=True),
        sa.Column("hyperparameters", sa.JSON(), nullable=False),
        sa.Column("resolved", sa.JSON(), nullable=True),
        _str("status"),
        sa.Column("error", sa.JSON(), nullable=True),
        _str("fine_tuned_model", True),
        sa.Column("result_files", sa.JSON(), nullable=False),
        sa.Column("trained_tokens", BIGINT, nullable=True),
        _time("estimated_finish", True), _time("created_at"), _time("started_at", True),
        _time("finished_at", True),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("pause_requested", sa.Boolean(), nullable=False),
        _str("lease_owner", True), _time("lease_expires_at", True), _time("heartbeat_at", True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        _str("curve_id", True),
        sa.Column("extra", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_jobs"),
        _org_fk("jobs"),
    )
    op.create_index("ix_jobs_org_id_created_at", "jobs", ["org_id", "created_at"])
    op.create_index("ix_jobs_status_created_at", "jobs", ["status", "created_at"])
    op.create_index("ix_jobs_curve_id", "jobs", ["curve_id"])
    op.create_table(
        "job_events",
        sa.Column("seq", BIGINT, autoincrement=True, nullable=False),
        _str("id"), _str("job_id"), _time("created_at"), _str("level"),
        sa.Column("message", sa.Text(), nullable=False),
        _str("type"), sa.Column("data", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("seq", name="pk_job_events"),
        sa.UniqueConstraint("id", name="uq_job_events_id"),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name="fk_job_events_job_id_jobs"),
    )
    op.create_index("ix_job_events_job_id_seq", "job_events", ["job_id", "seq"])
    op.create_table(
        "checkpoints",
        _str("id"), _str("job_id"), sa.Column("step", sa.Integer(), nullable=False),
        _time("created_at"), _str("model_name"),
        sa.Column("metrics", sa.JSON(), nullable=False), _str("path"),
        sa.PrimaryKeyConstraint("id", name="pk_checkpoints"),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name="fk_checkpoints_job_id_jobs"),
    )
    op.create_index("ix_checkpoints_job_id", "checkpoints", ["job_id"])
    op.create_table(
        "learning_curves",
        _str("id"), _str("org_id"), _str("status"),
        sa.Column("request", sa.JSON(), nullable=False),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("error", sa.JSON(), nullable=True),
        _time("created_at"), _time("finished_at", True),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_learning_curves"),
        _org_fk("learning_curves"),
    )
    op.create_index("ix_learning_curves_org_id_created_at", "learning_curves",
                    ["org_id", "created_at"])


def downgrade() -> None:
    for table in ("learning_curves", "checkpoints", "job_events", "jobs", "fine_tuned_models",
                  "files", "prices", "usage", "api_keys", "organizations"):
        op.drop_table(table)
