"""External models: one module per provider family, each an :class:`ExternalBackend`.

``build_backend`` picks the module by ``external_model.provider`` from the one provider
table, :data:`fmserve.protocol.management.EXTERNAL_PROVIDERS` (provider → config field,
module, API spoken; spec §2.4). HTTP goes through ``providers.upstream``; what every
backend shares is in ``providers.base``.
"""

from __future__ import annotations

import importlib

from fmserve.errors import InvalidParameterValue
from fmserve.protocol.management import EXTERNAL_PROVIDERS, ExternalModelInput
from fmserve.providers.base import ExternalBackend, ProviderContext
from fmserve.providers.upstream import HttpClient, Upstream

__all__ = ["ExternalBackend", "HttpClient", "ProviderContext", "Upstream", "build_backend"]


def build_backend(name: str, model: ExternalModelInput, ctx: ProviderContext) -> ExternalBackend:
    """The backend for served entity ``name``; its config is checked now.

    Each provider module exposes ``create(name, model, ctx) -> ExternalBackend``.

    Raises:
        InvalidParameterValue: an unsupported provider (``ai21labs``, ``palm``) or a
            config the provider rejects (missing fields, unknown secrets).
    """
    spec = EXTERNAL_PROVIDERS.get(model.provider)
    if spec is None or spec.module is None:
        supported = sorted(p for p, s in EXTERNAL_PROVIDERS.items() if s.module)
        raise InvalidParameterValue(
            f"served entity '{name}': provider '{model.provider}' is not supported by fmserve; "
            f"supported: {supported}.")
    mod = importlib.import_module(f"fmserve.providers.{spec.module}")
    backend: ExternalBackend = mod.create(name, model, ctx)
    return backend
