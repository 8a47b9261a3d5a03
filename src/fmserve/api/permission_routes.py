"""Serving-endpoint permissions API (governance §4.6)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
