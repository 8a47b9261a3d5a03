"""Identity administration: the stores behind the directory, written off the event loop.

:class:`Identity` bundles the blocking stores (principals, tokens, OAuth client
secrets, grants and ACLs) with the in-memory :class:`~fmserve.gateway.directory.Directory`
and the :class:`~fmserve.gateway.auth.Authenticator`. Routes call :meth:`Identity.read`
for a store read and :meth:`Identity.write` for a change: both run the store call in a
worker thread; ``write`` then reloads the directory, so the change holds for the next
request on this server (other replicas see it within the sync interval).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from fmserve.errors import PermissionDenied
from fmserve.gateway.auth import Authenticator
from fmserve.gateway.directory import Directory, Principal
from fmserve.gateway.oauth import TokenSigner
from fmserve.store.credentials import CredentialStore
from fmserve.store.permissions import PermissionStore
from fmserve.store.principals import PrincipalStore
from fmserve.store.tokens import TokenStore

T = TypeVar("T")


@dataclass
class Identity:
    principals: PrincipalStore
    tokens: TokenStore
    credentials: CredentialStore
    permissions: PermissionStore
    directory: Directory
    signer: TokenSigner
    auth: Authenticator

    async def read(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        """``fn(*args, **kw)`` (a blocking store call) in a worker thread."""
        return await asyncio.to_thread(fn, *args, **kw)

    async def write(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        """A blocking store write in a worker thread, then a directory reload (also when
        the write raised, since it may have partly applied nothing but the caller retries
        against fresh state)."""
        try:
            return await asyncio.to_thread(fn, *args, **kw)
        finally:
            await asyncio.to_thread(self.directory.refresh)

    async def refresh(self) -> None:
        await asyncio.to_thread(self.directory.refresh)


def require_admin(principal: Principal, action: str) -> None:
    """Raises: PermissionDenied (403) unless the caller is a workspace admin."""
    if not principal.is_admin:
        raise PermissionDenied(f"Only workspace admins may {action}; principal "
                               f"'{principal.name}' is not in the 'admins' group.")
