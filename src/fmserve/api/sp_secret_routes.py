"""Service-principal OAuth secrets (governance §4.4)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
