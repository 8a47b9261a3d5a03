"""External models: one module per provider family, each an :class:`ExternalBackend`.

``build_backend`` picks the module by ``external_model.provider`` (spec §2.4):

=========================  ====================  ==========================================
provider                   module                API spoken
=========================  ====================  ==========================================
openai                     ``openai_compat``     OpenAI / Azure OpenAI (api key, Entra ID)
custom                     ``openai_compat``     any OpenAI-compatible server
databricks-model-serving   ``openai_compat``     another Databricks / fmserve workspace
anthropic                  ``anthropic``         Anthropic Messages API
google                     ``google``            Gemini API (API key) — fmserve extension
google-cloud-vertex-ai     ``google``            Vertex AI Gemini (service-account OAuth)
amazon-bedrock             ``bedrock``           Bedrock Converse / InvokeModel (SigV4)
cohere                     ``cohere``            Cohere v2 chat / embed
=========================  ====================  ==========================================
"""

from __future__ import annotations

import importlib

from fmserve.errors import InvalidParameterValue
from fmserve.protocol.management import ExternalModelInput
from fmserve.providers.base import ExternalBackend, HttpClient, ProviderContext

__all__ = ["ExternalBackend", "HttpClient", "ProviderContext", "build_backend"]

_MODULES = {
    "openai": "openai_compat",
    "custom": "openai_compat",
    "databricks-model-serving": "openai_compat",
    "anthropic": "anthropic",
    "google": "google",
    "google-cloud-vertex-ai": "google",
    "amazon-bedrock": "bedrock",
    "cohere": "cohere",
}


def build_backend(name: str, model: ExternalModelInput, ctx: ProviderContext) -> ExternalBackend:
    """The backend for served entity ``name``; its config is checked now.

    Each provider module exposes ``create(name, model, ctx) -> ExternalBackend``.

    Raises:
        InvalidParameterValue: an unsupported provider (``ai21labs``, ``palm``) or a
            config the provider rejects (missing fields, unknown secrets).
    """
    module = _MODULES.get(model.provider)
    if module is None:
        raise InvalidParameterValue(
            f"served entity '{name}': provider '{model.provider}' is not supported by fmserve; "
            f"supported: {sorted(_MODULES)}.")
    mod = importlib.import_module(f"fmserve.providers.{module}")
    backend: ExternalBackend = mod.create(name, model, ctx)
    return backend
