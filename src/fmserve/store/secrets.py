"""Secret scopes and secrets, encrypted at rest with Fernet (``cryptography``).

The key comes from ``FMSERVE_SECRETS_KEY`` (a urlsafe-base64 Fernet key, shared by
every server process on one database) or, if unset, from ``<data dir>/secrets.key``,
created on first use with mode 0600.

Values are never returned by the API: :meth:`SecretStore.value` is for the server's
own use (resolving ``{{secrets/scope/key}}`` references in external-model configs).
``*_plaintext`` credentials in endpoint configs are kept as :meth:`SecretStore.seal`
tokens (``fernet:<token>``) and opened with :meth:`SecretStore.open`.

:meth:`SecretStore.resolve` (called on the event loop, by every request's credential
re-check) reads only an in-memory copy of the secrets: writes through this store
update the copy as they commit, and :meth:`SecretStore.refresh` reloads it from the
database (the server runs it in a thread with every endpoint sync, so secrets another
process or the CLI wrote are seen within ``sync_interval_s``).
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet, InvalidToken
from sqlalchemy import delete, select

from fmserve.errors import InvalidParameterValue, ResourceAlreadyExists, ResourceDoesNotExist
from fmserve.store.db import Database, now_ms
from fmserve.store.models import Secret, SecretAcl, SecretScope

SECRET_REF = re.compile(r"\{\{\s*secrets/([^/\s}]+)/([^/\s}]+)\s*\}\}")
SEALED_PREFIX = "fernet:"
NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")
MAX_VALUE_BYTES = 128 * 1024  # Databricks: a secret value is at most 128 KB


def load_key(data_dir: Path) -> bytes:
    """``FMSERVE_SECRETS_KEY`` or the key file in ``data_dir`` (created 0600 if missing)."""
    env = os.environ.get("FMSERVE_SECRETS_KEY")
    if env:
        return env.encode()
    path = Path(data_dir) / "secrets.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(Fernet.generate_key())
    return path.read_bytes().strip()


@dataclass(frozen=True)
class SecretMetadata:
    key: str
    last_updated_timestamp: int  # ms


def _check_name(what: str, name: str) -> None:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InvalidParameterValue(f"{what} must be 1-128 characters: letters, digits, "
                                    f"'-', '_' and '.'; got {name!r}")


class SecretStore:
    """Scopes and encrypted secrets in the database.

    Every method but :meth:`seal`, :meth:`open` and :meth:`resolve` is blocking I/O
    (run it in a thread from async code).

    Raises (every method): ResourceDoesNotExist (404) for an unknown scope or key,
    ResourceAlreadyExists (409) for a scope that exists, InvalidParameterValue (400)
    for a bad name or value.
    """

    def __init__(self, db: Database, key: bytes) -> None:
        self.db = db
        try:
            self._fernet = Fernet(key)
        except (ValueError, TypeError):
            raise ValueError("FMSERVE_SECRETS_KEY is not a valid Fernet key (32 url-safe "
                             "base64-encoded bytes)") from None
        # (scope, key) -> (encrypted token, decrypted bytes or None where the token does not
        # open with this key); replaced whole, never mutated.
        self._copy: dict[tuple[str, str], tuple[str, bytes | None]] = {}
        # Held over each write and its update of the copy, so the copy ends as the
        # database does; briefly by refresh().
        self._lock = threading.Lock()
        self._writes = 0  # bumped by every write; a refresh that raced one is dropped

    # -- the in-memory copy -------------------------------------------------------
    def refresh(self) -> None:
        """Reload the in-memory copy that :meth:`resolve` reads from the database."""
        with self._lock:
            writes, old = self._writes, self._copy
        with self.db.session() as s:
            rows = s.execute(select(Secret.scope, Secret.key, Secret.value_encrypted)).all()
        copy: dict[tuple[str, str], tuple[str, bytes | None]] = {}
        for scope, key, token in rows:
            hit = old.get((scope, key))
            copy[(scope, key)] = hit if hit is not None and hit[0] == token else \
                (token, self._decrypt(token))
        with self._lock:
            if self._writes == writes:  # else a newer write is in the copy; next time
                self._copy = copy

    def _decrypt(self, token: str) -> bytes | None:
        try:
            return self._fernet.decrypt(token.encode())
        except InvalidToken:
            return None

    def _written(self, scope: str, key: str | None = None,
                 entry: tuple[str, bytes | None] | None = None) -> None:
        """Apply a committed write to the copy (holding ``_lock``): ``key`` None drops the
        scope, ``entry`` None drops the key, else the key now holds ``entry``."""
        copy = {ref: v for ref, v in self._copy.items()
                if ref[0] != scope or key not in (None, ref[1])}
        if key is not None and entry is not None:
            copy[(scope, key)] = entry
        self._copy, self._writes = copy, self._writes + 1

    # -- scopes -----------------------------------------------------------------
    def create_scope(self, scope: str) -> None:
        _check_name("scope", scope)
        with self.db.session() as s, s.begin():
            if s.get(SecretScope, scope) is not None:
                raise ResourceAlreadyExists(f"Scope {scope} already exists!")
            s.add(SecretScope(name=scope, creation_timestamp=now_ms()))

    def delete_scope(self, scope: str) -> None:
        with self._lock:
            with self.db.session() as s, s.begin():
                row = s.get(SecretScope, scope)
                if row is None:
                    raise ResourceDoesNotExist(f"Scope {scope} does not exist!")
                s.execute(delete(Secret).where(Secret.scope == scope))
                s.execute(delete(SecretAcl).where(SecretAcl.scope == scope))
                s.delete(row)
            self._written(scope)

    def list_scopes(self) -> list[str]:
        with self.db.session() as s:
            return list(s.scalars(select(SecretScope.name).order_by(SecretScope.name)))

    def _scope(self, s: Any, scope: str) -> None:
        if s.get(SecretScope, scope) is None:
            raise ResourceDoesNotExist(f"Scope {scope} does not exist!")

    # -- secrets ------------------------------------------------------------------
    def put(self, scope: str, key: str, value: str | bytes) -> None:
        """Create or overwrite a secret (``value`` as text or bytes, at most 128 KB)."""
        _check_name("key", key)
        raw = value.encode() if isinstance(value, str) else value
        if len(raw) > MAX_VALUE_BYTES:
            raise InvalidParameterValue(f"A secret value is at most {MAX_VALUE_BYTES} bytes.")
        token = self._fernet.encrypt(raw).decode()
        with self._lock:
            with self.db.session() as s, s.begin():
                self._scope(s, scope)
                row = s.get(Secret, (scope, key))
                if row is None:
                    s.add(Secret(scope=scope, key=key, value_encrypted=token,
                                 last_updated_timestamp=now_ms()))
                else:
                    row.value_encrypted, row.last_updated_timestamp = token, now_ms()
            self._written(scope, key, (token, raw))

    def delete(self, scope: str, key: str) -> None:
        with self._lock:
            with self.db.session() as s, s.begin():
                self._scope(s, scope)
                row = s.get(Secret, (scope, key))
                if row is None:
                    raise ResourceDoesNotExist(
                        f"Secret {key} does not exist in scope {scope}!")
                s.delete(row)
            self._written(scope, key)

    def list(self, scope: str) -> list[SecretMetadata]:
        """Keys and update times of a scope's secrets (never values)."""
        with self.db.session() as s:
            self._scope(s, scope)
            rows = s.scalars(select(Secret).where(Secret.scope == scope).order_by(Secret.key))
            return [SecretMetadata(r.key, r.last_updated_timestamp) for r in rows]

    def value(self, scope: str, key: str) -> str:
        """The decrypted value, read from the database, for the server's own use only
        (never an API answer)."""
        with self.db.session() as s:
            row = s.get(Secret, (scope, key))
        if row is None:
            raise ResourceDoesNotExist(f"Secret {key} does not exist in scope {scope}!")
        return self._fernet.decrypt(row.value_encrypted.encode()).decode()

    # -- values inside configs -------------------------------------------------------
    def seal(self, value: str) -> str:
        """``fernet:<token>`` for a ``*_plaintext`` credential (idempotent)."""
        if value.startswith(SEALED_PREFIX):
            return value
        return SEALED_PREFIX + self._fernet.encrypt(value.encode()).decode()

    def open(self, value: str) -> str:
        if not value.startswith(SEALED_PREFIX):
            return value
        try:
            return self._fernet.decrypt(value[len(SEALED_PREFIX):].encode()).decode()
        except InvalidToken:
            raise InvalidParameterValue(
                "A stored credential cannot be decrypted: the secrets key changed "
                "(FMSERVE_SECRETS_KEY / secrets.key). Update the endpoint's config.") from None

    def resolve(self, value: str) -> str:
        """A config credential as text: a sealed value opened, ``{{secrets/s/k}}`` replaced.

        Never blocks: references are looked up in the in-memory copy (see :meth:`refresh`).

        Raises:
            InvalidParameterValue: a reference to a secret that does not exist (or that
                another process wrote since the last refresh).
        """
        if value.startswith(SEALED_PREFIX):
            return self.open(value)

        def sub(m: re.Match[str]) -> str:
            scope, key = m.group(1), m.group(2)
            hit = self._copy.get((scope, key))
            if hit is None:
                raise InvalidParameterValue(
                    f"Secret reference {{{{secrets/{scope}/{key}}}}} does not exist; create "
                    f"it with 'fmserve secrets put {scope} {key}' or the secrets API.")
            if hit[1] is None:
                raise InvalidParameterValue(
                    f"Secret reference {{{{secrets/{scope}/{key}}}}} cannot be decrypted: it "
                    f"was stored with another secrets key (FMSERVE_SECRETS_KEY / "
                    f"secrets.key); put it again.")
            try:
                return hit[1].decode()
            except UnicodeDecodeError:
                raise InvalidParameterValue(
                    f"Secret reference {{{{secrets/{scope}/{key}}}}} holds bytes that are "
                    f"not UTF-8 text; a credential must be text.") from None
        return SECRET_REF.sub(sub, value)


def seal_plaintext(obj: Any, store: SecretStore) -> Any:
    """A copy of ``obj`` with every ``*_plaintext`` string value sealed (encrypted)."""
    if isinstance(obj, dict):
        return {k: (store.seal(v) if k.endswith("_plaintext") and isinstance(v, str)
                    else seal_plaintext(v, store)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [seal_plaintext(v, store) for v in obj]
    return obj


def redact_plaintext(obj: Any) -> Any:
    """A copy of ``obj`` without ``*_plaintext`` keys (what GET answers show)."""
    if isinstance(obj, dict):
        return {k: redact_plaintext(v) for k, v in obj.items() if not k.endswith("_plaintext")}
    if isinstance(obj, list):
        return [redact_plaintext(v) for v in obj]
    return obj
