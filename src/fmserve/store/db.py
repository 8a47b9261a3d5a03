"""Engine creation and schema migration (Alembic, run programmatically).

Every call here and in the typed stores (``store/*.py``) is blocking I/O. The server
runs them in a worker thread (``asyncio.to_thread``), never on the event loop: the
engine's connection pool is thread-safe, and SQLite connections are opened with
``check_same_thread=False`` so a pooled connection may serve any thread.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, select
from sqlalchemy.orm import Session, sessionmaker

from fmserve.config import ServerConfig
from fmserve.store.models import Setting

MIGRATIONS = Path(__file__).parent / "migrations"


def now_ms() -> int:
    """The time in milliseconds since the Unix epoch: the unit of every stored timestamp
    and of every ``*_timestamp`` field fmserve answers."""
    return int(time.time() * 1000)


def sqlite_url(data_dir: Path) -> str:
    return f"sqlite:///{data_dir / 'fmserve.db'}"


class Database:
    """An engine plus a session factory; :meth:`migrate` brings the schema to head."""

    def __init__(self, url: str) -> None:
        # A plain postgresql:// URL means psycopg 3 (the driver fmserve installs).
        for prefix in ("postgresql://", "postgres://"):
            if url.startswith(prefix):
                url = "postgresql+psycopg://" + url[len(prefix):]
        self.url = url
        kwargs: dict[str, object] = {"pool_pre_ping": True}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        self.engine: Engine = create_engine(url, **kwargs)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    def migrate(self) -> None:
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        cfg.set_main_option("sqlalchemy.url", self.url.replace("%", "%%"))
        with self.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    def session(self) -> Session:
        return self.sessions()

    def workspace_id(self) -> str:
        """A stable numeric workspace id, created on first use."""
        with self.session() as s, s.begin():
            row = s.scalar(select(Setting).where(Setting.key == "workspace_id"))
            if row is None:
                row = Setting(key="workspace_id", value=str(secrets.randbelow(9 * 10**15) + 10**15))
                s.add(row)
            return row.value

    def close(self) -> None:
        self.engine.dispose()


def open_database(cfg: ServerConfig) -> Database:
    """The configured database (``cfg.database_url``, else SQLite in ``cfg.data_dir``),
    migrated to the current schema. Blocking."""
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    db = Database(cfg.database_url or sqlite_url(cfg.data_dir))
    db.migrate()
    return db


def _sqlite_pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()
