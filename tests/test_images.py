"""Image inputs for external models (providers/images.py): limits, resizing, safe fetching."""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from conftest import Server, create_external
from fakes import openai as fake_openai
from fakes.server import FakeServer
from PIL import Image
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from fmserve.errors import InvalidParameterValue
from fmserve.protocol.chat import ChatCompletionRequest
from fmserve.protocol.management import ExternalModelInput
from fmserve.providers import ExternalBackend, HttpClient, ProviderContext
from fmserve.providers.images import WARNING_HEADER


def image_bytes(w: int, h: int, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 120, 200)).save(buf, fmt)
    return buf.getvalue()


def data_url(w: int, h: int, fmt: str = "PNG", mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(image_bytes(w, h, fmt)).decode()


def request(*urls: str) -> ChatCompletionRequest:
    parts: list[dict[str, Any]] = [{"type": "text", "text": "look"}]
    parts += [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": parts}]})


def _backend(allow_private: bool) -> ExternalBackend:
    """A provider backend (no provider of its own): images load as in every provider."""
    model = ExternalModelInput.model_validate({"provider": "custom", "name": "m",
                                               "task": "llm/v1/chat",
                                               "custom_provider_config": {}})
    ctx = ProviderContext(http=HttpClient(10), allow_private_image_urls=allow_private)
    return ExternalBackend("images", model, ctx)


def prepare(req: ChatCompletionRequest, allow_private: bool = False) -> Any:
    async def run() -> Any:
        backend = _backend(allow_private)
        try:
            return await backend.load_images(req)
        finally:
            await backend.ctx.http.close()
    return asyncio.run(run())


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP"])
def test_supported_formats_by_content(fmt: str) -> None:
    # The declared type is ignored: the bytes decide (a JPEG sent as image/png is fine).
    images = prepare(request(data_url(400, 300, fmt, "image/png")))
    img = images.get(0, 1)
    assert img.media_type == f"image/{fmt.lower()}"
    assert (img.width, img.height) == (400, 300)
    assert images.tokens == 400 * 300 // 750


def test_unsupported_format_and_garbage_are_400() -> None:
    with pytest.raises(InvalidParameterValue, match="BMP is not supported"):
        prepare(request(data_url(300, 300, "BMP", "image/bmp")))
    with pytest.raises(InvalidParameterValue, match="not a readable image"):
        prepare(request("data:image/png;base64," + base64.b64encode(b"nope").decode()))
    with pytest.raises(InvalidParameterValue, match="not valid base64"):
        prepare(request("data:image/png;base64,@@@"))


def test_long_edge_is_downscaled_keeping_aspect() -> None:
    images = prepare(request(data_url(3136, 1000)))
    img = images.get(0, 1)
    assert (img.width, img.height) == (1568, 500)
    assert Image.open(io.BytesIO(img.data)).size == (1568, 500)
    assert images.tokens == 1568 * 500 // 750


def test_too_large_is_400() -> None:
    with pytest.raises(InvalidParameterValue, match="at most 8000x8000"):
        prepare(request(data_url(8001, 10)))


def test_many_images_limits() -> None:
    small, big = data_url(300, 300), data_url(2100, 300)
    assert len(prepare(request(*[small] * 19, big)).by_part) == 20  # 20 images: no cap
    with pytest.raises(InvalidParameterValue, match="more than 20 images"):
        prepare(request(*[small] * 20, big))
    assert len(prepare(request(*[small] * 100)).by_part) == 100
    with pytest.raises(InvalidParameterValue, match="at most 100"):
        prepare(request(*[small] * 101))


def test_small_image_is_allowed_with_a_warning() -> None:
    req = request(data_url(150, 400))
    prepare(req)
    assert "150x400" in req.response_headers[WARNING_HEADER]


@pytest.fixture(scope="module")
def image_host() -> Iterator[FakeServer]:
    png = image_bytes(600, 400)

    async def img(request: Request) -> Response:
        return Response(png, media_type="image/png")

    async def moved(request: Request) -> Response:
        return RedirectResponse("/img.png")
    with FakeServer([Route("/img.png", img), Route("/moved", moved)]) as srv:
        yield srv


def test_private_and_loopback_urls_are_refused(image_host: FakeServer) -> None:
    for url in ("https://127.0.0.1/x.png", "https://10.0.0.7/x.png", "https://169.254.169.254/x",
                "https://[::1]/x.png"):
        with pytest.raises(InvalidParameterValue, match="private"):
            prepare(request(url))
    with pytest.raises(InvalidParameterValue, match="non-public address"):
        prepare(request("https://localhost:1/x.png"))  # a name that resolves to loopback
    with pytest.raises(InvalidParameterValue, match="https:// or data:"):
        prepare(request(f"{image_host.url}/img.png"))
    with pytest.raises(InvalidParameterValue, match="https:// or data:"):
        prepare(request("file:///etc/passwd"))


def test_fetch_when_private_addresses_are_allowed(image_host: FakeServer) -> None:
    images = prepare(request(f"{image_host.url}/img.png"), allow_private=True)
    assert (images.get(0, 1).width, images.get(0, 1).height) == (600, 400)
    with pytest.raises(InvalidParameterValue, match="HTTP 307"):  # redirects are not followed
        prepare(request(f"{image_host.url}/moved"), allow_private=True)


@pytest.fixture(scope="module")
def openai_upstream() -> Iterator[FakeServer]:
    with fake_openai.fake() as srv:
        yield srv


def test_end_to_end_images_reach_the_provider_resized(gateway: Server,
                                                      openai_upstream: FakeServer) -> None:
    create_external(gateway, "img-openai", fake_openai.external_model(openai_upstream.url))
    with gateway.client() as c:
        r = c.post("/serving-endpoints/chat/completions", json={
            "model": "img-openai", "messages": [{"role": "user", "content": [
                {"type": "text", "text": "what is it"},
                {"type": "image_url", "image_url": {"url": data_url(3000, 150)}}]}]})
        assert r.status_code == 200, r.text
        assert "3000x150" in r.headers[WARNING_HEADER]  # under 200 px: allowed, with a warning
        sent = openai_upstream.last().json()["messages"][0]["content"][1]["image_url"]["url"]
        head, payload = sent.split(",", 1)
        assert head == "data:image/png;base64"
        assert Image.open(io.BytesIO(base64.b64decode(payload))).size == (1568, 78)
        r = c.post("/serving-endpoints/chat/completions", json={
            "model": "img-openai", "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "https://127.0.0.1/a.png"}}]}]})
        assert r.status_code == 400, r.text
        assert r.json()["error_code"] == "INVALID_PARAMETER_VALUE"
        c.delete("/api/2.0/serving-endpoints/img-openai")


def test_local_model_without_vision_is_a_400(http: httpx.Client) -> None:
    r = http.post("/serving-endpoints/chat/completions", json={
        "model": "databricks-smollm2-135m-instruct", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(300, 300)}}]}]})
    assert r.status_code == 400, r.text
    assert "Image input is not supported" in r.json()["message"]


def test_image_tokens_counted_when_the_provider_reports_no_usage(gateway: Server) -> None:
    async def chat(request: Request) -> Response:  # an OpenAI-compatible server, no usage
        return Response('{"id": "x", "object": "chat.completion", "created": 1, "model": "m",'
                        ' "choices": [{"index": 0, "finish_reason": "stop", "message":'
                        ' {"role": "assistant", "content": "a red square"}}]}',
                        media_type="application/json")
    with FakeServer([Route("/v1/chat/completions", chat, methods=["POST"])]) as upstream:
        create_external(gateway, "img-nousage", {
            "provider": "custom", "name": "local-vlm", "task": "llm/v1/chat",
            "custom_provider_config": {"custom_provider_url": f"{upstream.url}/v1"}})
        with gateway.client() as c:
            r = c.post("/serving-endpoints/chat/completions", json={
                "model": "img-nousage", "messages": [{"role": "user", "content": [
                    {"type": "text", "text": "what is this?"},
                    {"type": "image_url", "image_url": {"url": data_url(750, 750)}}]}]})
            assert r.status_code == 200, r.text
            usage = r.json()["usage"]
            assert usage["prompt_tokens"] == 750 * 750 // 750 + len("what is this?") // 4
            assert usage["completion_tokens"] == len("a red square") // 4
            c.delete("/api/2.0/serving-endpoints/img-nousage")
