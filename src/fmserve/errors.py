"""The one error hierarchy of fmserve, and its Databricks wire form.

Every failure a client can see is an :class:`FmserveError`. Lower layers
(pydantic validation, the engine workers, the store, the external providers)
translate their own exceptions into one of these where they arise;
``api/`` maps them to the HTTP body in exactly one handler::

    FmserveError                      500 INTERNAL_ERROR
    ├── BadRequest                    400 BAD_REQUEST
    │   ├── InvalidParameterValue     400 INVALID_PARAMETER_VALUE
    │   └── ContextLengthExceeded     400 INVALID_PARAMETER_VALUE
    ├── ScimError                     4xx, SCIM's error shape (RFC 7644 §3.12)
    ├── OAuthError                    400/401, RFC 6749 §5.2's error shape
    ├── Unauthenticated               401 UNAUTHENTICATED
    ├── PermissionDenied              403 PERMISSION_DENIED
    ├── ResourceDoesNotExist          404 RESOURCE_DOES_NOT_EXIST
    ├── ResourceAlreadyExists         409 RESOURCE_ALREADY_EXISTS
    ├── PayloadTooLarge               413 BAD_REQUEST
    ├── RequestLimitExceeded          429 REQUEST_LIMIT_EXCEEDED   (+ Retry-After)
    └── TemporarilyUnavailable        503 TEMPORARILY_UNAVAILABLE  (+ Retry-After)

Wire format (spec §8.7, as databricks-sdk ``errors/deserializer.py`` parses it)::

    {"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "..."}

except where a route's own standard shapes errors: SCIM (:class:`ScimError`) and the
OAuth token endpoint (:class:`OAuthError`); each overrides :meth:`FmserveError.to_body`.

The SDK, mlflow and openai retry 429 and 503 honouring the integer
``Retry-After`` header, so every throttling error carries one.
"""

from __future__ import annotations

from typing import Any


class FmserveError(Exception):
    """Base class: an HTTP status, a Databricks ``error_code`` and a message."""

    status_code: int = 500
    error_code: str = "INTERNAL_ERROR"

    def __init__(
        self, message: str, *, error_code: str | None = None, retry_after: int | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        if error_code is not None:
            self.error_code = error_code
        self.retry_after = retry_after

    def to_body(self) -> dict[str, Any]:
        """The Databricks error body ``{"error_code", "message"}``."""
        return {"error_code": self.error_code, "message": self.message}

    def headers(self) -> dict[str, str]:
        """Extra response headers (``Retry-After`` in whole seconds when set)."""
        return {"Retry-After": str(int(self.retry_after))} if self.retry_after is not None else {}


class BadRequest(FmserveError):
    status_code = 400
    error_code = "BAD_REQUEST"


class InvalidParameterValue(BadRequest):
    error_code = "INVALID_PARAMETER_VALUE"


class ContextLengthExceeded(InvalidParameterValue):
    """The prompt (in tokens) does not fit the model's context window."""


class Unauthenticated(FmserveError):
    status_code = 401
    error_code = "UNAUTHENTICATED"


class PermissionDenied(FmserveError):
    status_code = 403
    error_code = "PERMISSION_DENIED"


class ScimError(FmserveError):
    """A SCIM request failed: RFC 7644 §3.12's body, which databricks-sdk parses by its
    ``detail`` and ``status`` keys::

        {"schemas": ["urn:ietf:params:scim:api:messages:2.0:Error"],
         "detail": "...", "status": "400", "scimType": "invalidFilter"}

    ``scim_type`` is one of RFC 7644's ``scimType`` values (``invalidFilter``,
    ``invalidSyntax``, ``invalidPath``, ``invalidValue``, ``noTarget``, ``mutability``,
    ``uniqueness``, ``tooMany``) or None.
    """

    _CODES = {400: "INVALID_PARAMETER_VALUE", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
              404: "RESOURCE_DOES_NOT_EXIST", 409: "RESOURCE_ALREADY_EXISTS"}

    def __init__(self, status: int, detail: str, scim_type: str | None = None) -> None:
        super().__init__(detail, error_code=self._CODES.get(status, "BAD_REQUEST"))
        self.status_code = status
        self.scim_type = scim_type

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"schemas": ["urn:ietf:params:scim:api:messages:2.0:Error"],
                                "detail": self.message, "status": str(self.status_code)}
        if self.scim_type:
            body["scimType"] = self.scim_type
        return body


class OAuthError(FmserveError):
    """The token endpoint refused a request: RFC 6749 §5.2's body
    ``{"error": "invalid_client", "error_description": "..."}`` (databricks-sdk
    ``oauth.retrieve_token`` reads ``error``/``error_description``).

    ``invalid_client`` is 401 (with ``WWW-Authenticate: Basic``); ``invalid_request``,
    ``invalid_grant``, ``unsupported_grant_type`` and ``invalid_scope`` are 400.
    """

    def __init__(self, error: str, description: str) -> None:
        super().__init__(description, error_code=error)
        self.status_code = 401 if error == "invalid_client" else 400

    def to_body(self) -> dict[str, Any]:
        return {"error": self.error_code, "error_description": self.message}

    def headers(self) -> dict[str, str]:
        return ({"WWW-Authenticate": 'Basic realm="fmserve"'}
                if self.status_code == 401 else {})


class ResourceDoesNotExist(FmserveError):
    status_code = 404
    error_code = "RESOURCE_DOES_NOT_EXIST"


class ResourceAlreadyExists(FmserveError):
    status_code = 409
    error_code = "RESOURCE_ALREADY_EXISTS"


class PayloadTooLarge(FmserveError):
    status_code = 413
    error_code = "BAD_REQUEST"


class RequestLimitExceeded(FmserveError):
    status_code = 429
    error_code = "REQUEST_LIMIT_EXCEEDED"


class TemporarilyUnavailable(FmserveError):
    status_code = 503
    error_code = "TEMPORARILY_UNAVAILABLE"


class BadGateway(FmserveError):
    """An external model provider failed or answered something unusable (HTTP 502)."""

    status_code = 502
    error_code = "BAD_GATEWAY"


class DeadlineExceeded(FmserveError):
    """An external model provider did not answer in time (HTTP 504)."""

    status_code = 504
    error_code = "DEADLINE_EXCEEDED"


_BY_CODE: dict[str, type[FmserveError]] = {
    "BAD_REQUEST": BadRequest,
    "INVALID_PARAMETER_VALUE": InvalidParameterValue,
    "CONTEXT_LENGTH_EXCEEDED": ContextLengthExceeded,
    "RESOURCE_DOES_NOT_EXIST": ResourceDoesNotExist,
    "REQUEST_LIMIT_EXCEEDED": RequestLimitExceeded,
    "TEMPORARILY_UNAVAILABLE": TemporarilyUnavailable,
}


def from_code(code: str, message: str, retry_after: int | None = None) -> FmserveError:
    """Rebuild an error sent as ``{"code", "message"}`` by an engine worker."""
    cls = _BY_CODE.get(code, FmserveError)
    err = cls(message, retry_after=retry_after)
    if cls is ContextLengthExceeded:
        err.error_code = "INVALID_PARAMETER_VALUE"
    return err
