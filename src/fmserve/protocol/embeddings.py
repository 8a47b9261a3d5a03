"""Embeddings request (spec §8.5; OpenAI ``/v1/embeddings``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, field_validator


class EmbeddingsRequest(BaseModel):
    """``{"input": str | [str], "encoding_format"?: "float" | "base64"}``.

    ``encoding_format`` ``base64`` returns each vector as little-endian float32
    bytes, base64-encoded — what openai-python asks for by default
    (``openai/resources/embeddings.py``).
    """

    model_config = ConfigDict(extra="allow")
    input: str | list[str]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    instruction: str | None = None
    extra_params: dict[str, Any] | None = None
    client_request_id: str | None = None
    usage_context: dict[str, Any] | None = None
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _not_empty(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list):
            if not v:
                raise ValueError("input must not be an empty list")
            if len(v) > 2048:
                raise ValueError("at most 2048 inputs are allowed per request")
        return v

    def texts(self) -> list[str]:
        texts = [self.input] if isinstance(self.input, str) else list(self.input)
        if self.instruction:
            texts = [f"{self.instruction}{t}" for t in texts]
        return texts
