"""Workspace SCIM API (governance §4.3): Users, ServicePrincipals, Groups, Me."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
