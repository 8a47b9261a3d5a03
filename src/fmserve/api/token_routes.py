"""Personal access tokens and token management (governance §4.5)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
