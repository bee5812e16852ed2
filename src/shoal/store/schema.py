"""The tables of Shoal's database as SQLAlchemy 2 declarative models.

Times are float unix seconds; JSON columns hold what the OpenAI objects carry. There are no ORM
relationships: the store hands rows out detached, so every link is a plain id column. The
migration in `migrations/versions/` creates exactly these tables (a test compares the two).
Not here: queries (the store modules) or id generation (ids.py).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, BigInteger, Double, ForeignKey, Index, Integer, MetaData, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING = {
    "pk": "pk_%(table_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
}
BIGINT = BigInteger().with_variant(Integer(), "sqlite")
"""64-bit on Postgres; INTEGER on SQLite, where only that type makes a rowid primary key."""
TERMINAL = ("succeeded", "failed", "cancelled")
"""Job statuses that never change again."""


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {float: Double(), dict[str, Any]: JSON(), list[Any]: JSON()}

    def __repr__(self) -> str:
        key = self.__mapper__.primary_key[0].key
        return f"<{type(self).__name__} {getattr(self, key)!r}>"


class Organization(Base):
    """A tenant: keys, files, jobs and models belong to one."""

    __tablename__ = "organizations"
    id: Mapped[str] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(unique=True)
    created_at: Mapped[float]


class ApiKey(Base):
    """An API key; only the sha256 of its plaintext is kept, and its first 12 chars for display."""

    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(primary_key=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"), index=True)
    name: Mapped[str | None]
    prefix: Mapped[str]
    key_hash: Mapped[str] = mapped_column(unique=True)
    is_admin: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[float]
    revoked_at: Mapped[float | None]
    last_used_at: Mapped[float | None]


class Usage(Base):
    """Tokens used by requests: one row per request, or per batch of requests (`num_requests`)."""

    __tablename__ = "usage"
    __table_args__ = (Index("ix_usage_org_id_created_at", "org_id", "created_at"),)
    id: Mapped[int] = mapped_column(BIGINT, primary_key=True, autoincrement=True)
    org_id: Mapped[str]
    api_key_id: Mapped[str | None]
    model: Mapped[str]
    """The served name (a base model or an `ft:` model)."""
    base_model: Mapped[str]
    kind: Mapped[str]
    """completions, chat, embeddings or fine-tune (trained tokens count as prompt_tokens)."""
    prompt_tokens: Mapped[int] = mapped_column(BIGINT)
    completion_tokens: Mapped[int] = mapped_column(BIGINT)
    num_requests: Mapped[int] = mapped_column(default=1)
    request_id: Mapped[str | None]
    created_at: Mapped[float]


class Price(Base):
    """USD per million tokens for one served model name."""

    __tablename__ = "prices"
    model: Mapped[str] = mapped_column(primary_key=True)
    prompt_per_1m: Mapped[float]
    completion_per_1m: Mapped[float]
    training_per_1m: Mapped[float] = mapped_column(default=0.0)


class FileRow(Base):
    """An uploaded file; the bytes live in a blob named by `sha256` (shared by equal uploads)."""

    __tablename__ = "files"
    __table_args__ = (Index("ix_files_org_id_created_at", "org_id", "created_at"),)
    id: Mapped[str] = mapped_column(primary_key=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"))
    filename: Mapped[str]
    purpose: Mapped[str]
    bytes: Mapped[int] = mapped_column(BIGINT)
    sha256: Mapped[str] = mapped_column(index=True)
    status: Mapped[str]
    """uploaded, processed or error."""
    status_details: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[float]


class ModelRow(Base):
    """A fine-tuned model (an adapter directory on top of a base model), or one checkpoint of it."""

    __tablename__ = "fine_tuned_models"
    name: Mapped[str] = mapped_column(primary_key=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"), index=True)
    base_model: Mapped[str]
    job_id: Mapped[str | None]
    path: Mapped[str]
    checkpoint_step: Mapped[int | None]
    created_at: Mapped[float]


class Job(Base):
    """A fine-tuning job (or another kind of queued work) and its lease by a worker."""

    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_org_id_created_at", "org_id", "created_at"),
                      Index("ix_jobs_status_created_at", "status", "created_at"))
    id: Mapped[str] = mapped_column(primary_key=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"))
    kind: Mapped[str] = mapped_column(default="fine_tune")
    model: Mapped[str]
    training_file: Mapped[str]
    validation_file: Mapped[str | None]
    suffix: Mapped[str | None]
    seed: Mapped[int]
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata")
    hyperparameters: Mapped[dict[str, Any]]
    """As requested, with "auto" left in."""
    resolved: Mapped[dict[str, Any] | None]
    """The concrete hyperparameters once the worker has chosen them."""
    status: Mapped[str]
    """validating_files, queued, running, paused, succeeded, failed or cancelled."""
    error: Mapped[dict[str, Any] | None]
    fine_tuned_model: Mapped[str | None]
    result_files: Mapped[list[Any]] = mapped_column(default=list)
    trained_tokens: Mapped[int | None] = mapped_column(BIGINT)
    estimated_finish: Mapped[float | None]
    created_at: Mapped[float]
    started_at: Mapped[float | None]
    finished_at: Mapped[float | None]
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    pause_requested: Mapped[bool] = mapped_column(default=False)
    lease_owner: Mapped[str | None]
    lease_expires_at: Mapped[float | None]
    heartbeat_at: Mapped[float | None]
    attempts: Mapped[int] = mapped_column(default=0)
    curve_id: Mapped[str | None] = mapped_column(index=True)
    """The learning curve this job is a point of, if any."""
    extra: Mapped[dict[str, Any] | None]
    """Free-form settings (e.g. LoRA rank and targets)."""


class Event(Base):
    """A line of a job's log; `seq` orders them, `id` is what clients page by."""

    __tablename__ = "job_events"
    __table_args__ = (Index("ix_job_events_job_id_seq", "job_id", "seq"),)
    seq: Mapped[int] = mapped_column(BIGINT, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(unique=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"))
    created_at: Mapped[float]
    level: Mapped[str]
    """info, warn or error."""
    message: Mapped[str] = mapped_column(Text)
    type: Mapped[str]
    """message or metrics."""
    data: Mapped[dict[str, Any] | None]


class Checkpoint(Base):
    """An adapter saved at one step of a job, served as `model_name`."""

    __tablename__ = "checkpoints"
    id: Mapped[str] = mapped_column(primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    step: Mapped[int]
    created_at: Mapped[float]
    model_name: Mapped[str]
    metrics: Mapped[dict[str, Any]]
    path: Mapped[str]


class Curve(Base):
    """A learning-curve request: several fine-tuning jobs on growing slices of one dataset."""

    __tablename__ = "learning_curves"
    __table_args__ = (Index("ix_learning_curves_org_id_created_at", "org_id", "created_at"),)
    id: Mapped[str] = mapped_column(primary_key=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"))
    status: Mapped[str]
    request: Mapped[dict[str, Any]]
    result: Mapped[dict[str, Any] | None]
    error: Mapped[dict[str, Any] | None]
    created_at: Mapped[float]
    finished_at: Mapped[float | None]
    cancel_requested: Mapped[bool] = mapped_column(default=False)
