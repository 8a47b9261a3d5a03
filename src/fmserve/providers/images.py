"""Image inputs for external models: validated, fetched safely, resized, counted.

Every ``image_url`` (OpenAI) or ``image`` (FMAPI) content part of a chat request is
loaded once, before any provider call, and checked against the limits the hosted
service documents (Anthropic/Databricks vision limits):

* formats JPEG, PNG, GIF and WebP only (by content, not by the declared type);
* larger than 8000x8000 px → 400; more than 100 images → 400; more than 20 images in
  one request → each at most 2000x2000 px;
* a long edge above 1568 px is downscaled, aspect ratio kept;
* an edge under 200 px is allowed, with an ``x-fmserve-warning`` response header;
* estimated tokens = width x height / 750 (after resizing), for providers that do
  not report usage.

Sources: ``data:<mime>;base64,<data>`` URLs, and ``https://`` URLs fetched by the
gateway. Fetches never reach private, loopback, link-local, multicast or reserved
addresses (checked on every resolved address, so DNS rebinding cannot get around it)
and do not follow redirects, unless the server runs with
``FMSERVE_ALLOW_PRIVATE_IMAGE_URLS=1`` (which also allows plain ``http://``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from PIL import Image

from fmserve.errors import InvalidParameterValue
from fmserve.protocol.chat import ChatCompletionRequest
from fmserve.providers.common import image_url_of, parts

if TYPE_CHECKING:
    from fmserve.providers.upstream import HttpClient

FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "GIF": "image/gif", "WEBP": "image/webp"}
MAX_EDGE_PX = 8000
MANY_IMAGES = 20
MANY_IMAGES_MAX_EDGE_PX = 2000
MAX_IMAGES = 100
RESIZE_LONG_EDGE_PX = 1568
SMALL_EDGE_PX = 200
MAX_FETCH_BYTES = 20 * 1024 * 1024
FETCH_TIMEOUT_S = 15.0
WARNING_HEADER = "x-fmserve-warning"


@dataclass
class LoadedImage:
    """One validated image, as bytes ready to send (re-encoded when resized)."""

    media_type: str
    data: bytes
    width: int  # px, after resizing
    height: int  # px

    def b64(self) -> str:
        return base64.b64encode(self.data).decode("ascii")

    def data_url(self) -> str:
        return f"data:{self.media_type};base64,{self.b64()}"

    @property
    def tokens(self) -> int:
        """Estimated prompt tokens: width x height / 750."""
        return max(1, self.width * self.height // 750)


@dataclass
class Images:
    """The request's images by ``(message index, part index in common.parts(msg))``."""

    by_part: dict[tuple[int, int], LoadedImage] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def get(self, msg_index: int, part_index: int) -> LoadedImage:
        return self.by_part[(msg_index, part_index)]

    @property
    def tokens(self) -> int:
        """Estimated prompt tokens of all the images (see :attr:`LoadedImage.tokens`)."""
        return sum(i.tokens for i in self.by_part.values())

    def headers(self) -> dict[str, str]:
        """Response headers for the caller: the warnings in :data:`WARNING_HEADER`
        (joined by `` | ``, at most 1000 characters), or none."""
        if not self.warnings:
            return {}
        return {WARNING_HEADER: " | ".join(self.warnings)[:1000]}


def _public(host: str) -> bool:
    ip = ipaddress.ip_address(host)
    return not (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast
                or ip.is_reserved or ip.is_unspecified)


class PublicOnlyResolver(AbstractResolver):
    """Resolves like aiohttp's default resolver but refuses non-public addresses."""

    def __init__(self) -> None:
        self._inner = DefaultResolver()

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        bad = [r["host"] for r in results if not _public(r["host"])]
        if bad:
            raise InvalidParameterValue(
                f"image_url host '{host}' resolves to a non-public address ({bad[0]}); "
                f"fmserve does not fetch images from private networks.")
        return results

    async def close(self) -> None:
        await self._inner.close()


def image_session(allow_private: bool) -> aiohttp.ClientSession:
    """A session for image fetches (public addresses only unless ``allow_private``)."""
    connector = aiohttp.TCPConnector(resolver=None if allow_private else PublicOnlyResolver())
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(
        total=FETCH_TIMEOUT_S))


async def _fetch(url: str, where: str, http: HttpClient, allow_private: bool) -> bytes:
    scheme = url.split(":", 1)[0].lower()
    if scheme != "https" and not (allow_private and scheme == "http"):
        raise InvalidParameterValue(f"{where}: image URLs must be https:// or data: URLs.")
    host = aiohttp.helpers.URL(url).host or ""
    try:
        if not allow_private and not _public(host):
            raise InvalidParameterValue(f"{where}: fmserve does not fetch images from "
                                        f"private, loopback or link-local addresses ({host}).")
    except ValueError:
        pass  # a host name: checked on resolution by PublicOnlyResolver
    session = http.image_session(allow_private, image_session)
    try:
        async with session.get(url, allow_redirects=False) as resp:
            if resp.status != 200:
                raise InvalidParameterValue(f"{where}: fetching the image returned HTTP "
                                            f"{resp.status}.")
            data = await resp.content.read(MAX_FETCH_BYTES + 1)
    except (TimeoutError, aiohttp.ClientError) as exc:
        cause = exc.__cause__ if isinstance(exc.__cause__, InvalidParameterValue) else None
        if cause is not None:
            raise InvalidParameterValue(f"{where}: {cause.message}") from None
        raise InvalidParameterValue(f"{where}: the image could not be fetched: "
                                    f"{type(exc).__name__}") from None
    if len(data) > MAX_FETCH_BYTES:
        raise InvalidParameterValue(f"{where}: the image is larger than "
                                    f"{MAX_FETCH_BYTES // (1024 * 1024)} MB.")
    return data


def _decode_data_url(url: str, where: str) -> bytes:
    head, _, payload = url.partition(",")
    if ";base64" not in head:
        raise InvalidParameterValue(f"{where}: data URLs must be base64-encoded.")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidParameterValue(f"{where}: the data URL is not valid base64.") from None


def _load(raw: bytes, where: str, many: bool) -> tuple[LoadedImage, str | None]:
    """Validate, resize if needed; returns the image and an optional warning (CPU work)."""
    try:
        img = Image.open(io.BytesIO(raw))
        fmt = img.format or ""
        w, h = img.size
    except (OSError, Image.DecompressionBombError):
        raise InvalidParameterValue(f"{where}: not a readable image; send JPEG, PNG, GIF "
                                    f"or WebP.") from None
    if fmt not in FORMATS:
        raise InvalidParameterValue(f"{where}: image format {fmt or 'unknown'} is not "
                                    f"supported; send JPEG, PNG, GIF or WebP.")
    if w > MAX_EDGE_PX or h > MAX_EDGE_PX:
        raise InvalidParameterValue(f"{where}: image is {w}x{h} px; at most "
                                    f"{MAX_EDGE_PX}x{MAX_EDGE_PX} px is accepted.")
    if many and (w > MANY_IMAGES_MAX_EDGE_PX or h > MANY_IMAGES_MAX_EDGE_PX):
        raise InvalidParameterValue(
            f"{where}: image is {w}x{h} px; with more than {MANY_IMAGES} images in one "
            f"request each may be at most {MANY_IMAGES_MAX_EDGE_PX}x{MANY_IMAGES_MAX_EDGE_PX}.")
    warning = None
    if min(w, h) < SMALL_EDGE_PX:
        warning = (f"{where}: image is {w}x{h} px; edges under {SMALL_EDGE_PX} px may "
                   f"degrade the model's answer.")
    if max(w, h) > RESIZE_LONG_EDGE_PX:
        scale = RESIZE_LONG_EDGE_PX / max(w, h)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        try:
            resized = img.convert("RGB" if fmt == "JPEG" else "RGBA").resize(
                size, Image.Resampling.LANCZOS)
        except OSError:
            raise InvalidParameterValue(f"{where}: the image data is truncated or "
                                        f"corrupt.") from None
        out_fmt = fmt if fmt in ("JPEG", "WEBP") else "PNG"
        buf = io.BytesIO()
        resized.save(buf, format=out_fmt, **({"quality": 90} if out_fmt == "JPEG" else {}))
        return LoadedImage(FORMATS[out_fmt], buf.getvalue(), size[0], size[1]), warning
    return LoadedImage(FORMATS[fmt], raw, w, h), warning


def image_parts(req: ChatCompletionRequest) -> list[tuple[int, int, str | None]]:
    """``(message index, part index, url)`` of every image part."""
    found = []
    for mi, msg in enumerate(req.messages):
        for pi, part in enumerate(parts(msg)):
            if part.get("type") in ("image_url", "image"):
                found.append((mi, pi, image_url_of(part)))
    return found


async def prepare_images(req: ChatCompletionRequest, http: HttpClient,
                         allow_private: bool = False) -> Images:
    """Load and validate every image of ``req`` (concurrently); see the module docstring.

    ``http`` holds the sessions for ``https://`` fetches; ``allow_private`` lets them
    reach private addresses (and plain ``http://``). The request is not changed: the
    images, their estimated tokens and the small-image warnings are in the result.

    Raises:
        InvalidParameterValue: 400 for any rule above, a bad data URL, a refused or
            failed fetch.
    """
    found = image_parts(req)
    images = Images()
    if not found:
        return images
    if len(found) > MAX_IMAGES:
        raise InvalidParameterValue(f"{len(found)} images in one request; at most "
                                    f"{MAX_IMAGES} are accepted.")
    many = len(found) > MANY_IMAGES

    async def one(mi: int, pi: int, url: Any) -> None:
        where = f"messages[{mi}].content[{pi}]"
        if not isinstance(url, str) or not url:
            raise InvalidParameterValue(f"{where}: image_url.url is required.")
        raw = (_decode_data_url(url, where) if url.startswith("data:")
               else await _fetch(url, where, http, allow_private))
        img, warning = await asyncio.to_thread(_load, raw, where, many)
        images.by_part[(mi, pi)] = img
        if warning:
            images.warnings.append(warning)

    results = await asyncio.gather(*(one(*f) for f in found), return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return images
