"""Server configuration: CLI flags over ``FMSERVE_*`` environment variables over defaults."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


def default_data_dir() -> Path:
    """``$FMSERVE_HOME`` or ``~/.fmserve``."""
    return Path(os.environ.get("FMSERVE_HOME") or Path.home() / ".fmserve").expanduser()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


@dataclass
class ServerConfig:
    """Everything ``fmserve serve`` needs.

    Attributes:
        data_dir: database (SQLite default), worker logs.
        database_url: SQLAlchemy URL; default SQLite file in ``data_dir``.
        llama_threads: CPU threads per llama.cpp worker (default: all cores).
        embed_threads: torch threads for the embeddings worker.
        max_queue: requests allowed to wait per worker before 503 + Retry-After.
        max_body_bytes: request body limit (4 MB for foundation-model endpoints, spec §10).
        max_tokens_default: tokens a local model generates for a request that sets no
            ``max_tokens`` (``FMSERVE_MAX_TOKENS_DEFAULT``): a ceiling, so a forgotten
            parameter cannot hold a batch slot until the context is full.
        n_ctx: llama.cpp context in tokens (0 = the model's training context), shared by
            the requests a worker runs at once.
        llama_max_seqs: requests one llama.cpp worker decodes together (continuous
            batching); 1 = one at a time.
        llama_prefill_chunk: prompt tokens a batched llama.cpp worker evaluates per step
            while other requests are decoding (bounds their pause during a long prefill).
        llama_weights: the weights every llama.cpp worker loads (``gguf`` = the file as
            is, ``auto``, ``bf16``, ``q8_0``, ... see ``engines/weights.py``); empty = each
            model's default (the bundled SmolLM2: ``auto``; a user's GGUF: ``gguf``). A
            served entity's ``environment_vars.FMSERVE_LLAMA_WEIGHTS`` overrides it.
        sync_interval_s: how often (s) to pick up endpoint and secret changes made by
            other server processes (or the CLI) sharing the database.
        scale_to_zero_idle_s: idle seconds before a scale-to-zero entity stops its workers.
        bundled: start the bundled pay-per-token endpoints.
        external_timeout_s: seconds an external model provider may stay silent (connect,
            or between reads) before the request fails with 504.
        allow_private_image_urls: let ``image_url`` fetches reach private, loopback and
            link-local addresses (off by default: no SSRF through the gateway).
        admin_user: ``userName`` of the first admin, created on first start
            (``FMSERVE_ADMIN_USER``).
        redis_url: Redis for rate-limit counters shared by replicas (``FMSERVE_REDIS_URL``;
            None = counters in this process).
        rate_limit_fail_open: admit (and log) when Redis is unreachable instead of
            answering 503 (``FMSERVE_RATE_LIMIT_FAIL_OPEN=1``).
        request_log_sync: ``write`` (default: survives a killed process, not a power
            loss) or ``fsync`` (survives power loss; a disk flush in every governed
            answer's latency) — ``FMSERVE_REQUEST_LOG_SYNC``.
        tables_url: where the Delta tables (inference tables, ``system.serving.*``) live:
            any URL deltalake writes to, or a path (``FMSERVE_TABLES_URL``; None =
            ``<data dir>/tables``).
        tables_interval_s: seconds between Delta commits of the inference and usage tables
            (``FMSERVE_TABLES_INTERVAL_S``, default 5: a row is readable within about
            that long; shorter costs a Delta commit per table that often).
        safety_endpoint: the chat endpoint the ``safety`` guardrail asks, prompted as a
            Llama Guard classifier (``FMSERVE_SAFETY_ENDPOINT``; None: ``safety`` cannot
            be enabled).
        topic_endpoint: the embeddings endpoint ``valid_topics`` uses
            (``FMSERVE_TOPIC_ENDPOINT``; default the bundled all-MiniLM-L6-v2).
    """

    host: str = "127.0.0.1"
    port: int = 8080
    data_dir: Path = field(default_factory=default_data_dir)
    database_url: str | None = field(default_factory=lambda: os.environ.get("FMSERVE_DATABASE_URL"))
    llama_threads: int = field(default_factory=lambda: _env_int("FMSERVE_LLAMA_THREADS", 0))
    embed_threads: int = field(default_factory=lambda: _env_int("FMSERVE_EMBED_THREADS", 0))
    max_queue: int = field(default_factory=lambda: _env_int("FMSERVE_MAX_QUEUE", 64))
    max_body_bytes: int = 4 * 1024 * 1024
    max_tokens_default: int = field(
        default_factory=lambda: _env_int("FMSERVE_MAX_TOKENS_DEFAULT", 4096))
    n_ctx: int = field(default_factory=lambda: _env_int("FMSERVE_N_CTX", 8192))
    llama_max_seqs: int = field(default_factory=lambda: _env_int("FMSERVE_LLAMA_MAX_SEQS", 8))
    llama_prefill_chunk: int = field(
        default_factory=lambda: _env_int("FMSERVE_LLAMA_PREFILL_CHUNK", 64))
    llama_weights: str = field(default_factory=lambda: os.environ.get("FMSERVE_LLAMA_WEIGHTS", ""))
    sync_interval_s: float = 2.0
    scale_to_zero_idle_s: float = field(
        default_factory=lambda: float(os.environ.get("FMSERVE_SCALE_TO_ZERO_IDLE_S") or 900))
    bundled: bool = True
    external_timeout_s: float = field(
        default_factory=lambda: float(os.environ.get("FMSERVE_EXTERNAL_TIMEOUT_S") or 600))
    allow_private_image_urls: bool = field(
        default_factory=lambda: os.environ.get("FMSERVE_ALLOW_PRIVATE_IMAGE_URLS", "")
        .lower() in ("1", "true", "yes"))
    print_token: bool = True
    redis_url: str | None = field(default_factory=lambda: os.environ.get("FMSERVE_REDIS_URL")
                                  or None)
    rate_limit_fail_open: bool = field(
        default_factory=lambda: os.environ.get("FMSERVE_RATE_LIMIT_FAIL_OPEN", "").lower()
        in ("1", "true", "yes"))
    request_log_sync: str = field(
        default_factory=lambda: os.environ.get("FMSERVE_REQUEST_LOG_SYNC") or "write")
    tables_url: str | None = field(
        default_factory=lambda: os.environ.get("FMSERVE_TABLES_URL") or None)
    tables_interval_s: float = field(
        default_factory=lambda: float(os.environ.get("FMSERVE_TABLES_INTERVAL_S") or 5.0))
    safety_endpoint: str | None = field(
        default_factory=lambda: os.environ.get("FMSERVE_SAFETY_ENDPOINT") or None)
    topic_endpoint: str = field(
        default_factory=lambda: os.environ.get("FMSERVE_TOPIC_ENDPOINT")
        or "databricks-all-minilm-l6-v2")
    admin_user: str = field(
        default_factory=lambda: os.environ.get("FMSERVE_ADMIN_USER") or "admin@fmserve.local")


def tables_base(data_dir: Path, tables_url: str | None) -> str:
    """The Delta tables' base location: ``tables_url`` or ``<data dir>/tables``."""
    return tables_url or str(data_dir / "tables")
