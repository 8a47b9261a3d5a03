"""Persistent state: SQLAlchemy 2 models, Alembic migrations, typed stores.

SQLite file in the data dir by default; any SQLAlchemy URL (PostgreSQL) by
``--database-url`` / ``FMSERVE_DATABASE_URL``.
"""
