"""OIDC discovery, JWKS and the OAuth token endpoint (governance §4.1–4.2)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
