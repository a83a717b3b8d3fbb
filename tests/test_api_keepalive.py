"""HTTP/1.1 keep-alive over a raw socket: an answer sent before the request body arrived
(401, 404, 405) must not wedge the connection; plus the smaller HTTP contract points
(405 carries Allow, a body over the limit closes the connection, null broker refused)."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
import trio

from greeksd.api.state import HTTP_GATE_SIZE, HTTP_GATE_WAIT_S
from tests.api_harness import open_api, serve_api

TOKEN = "keepalive-token"
BODY = orjson.dumps({"broker": "ibkr"})


class RawHttp:
    """Bytes out, responses (Content-Length bodies) in: nothing between the test and the
    server's socket handling."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""
        self.eof = False

    async def _more(self) -> None:
        data = await self.stream.receive_some(65536)
        if not data:
            self.eof = True
        self.buffer += data

    async def response(self) -> tuple[int, dict[str, str], bytes] | None:
        """The next response, or None if the server closed the connection first."""
        while b"\r\n\r\n" not in self.buffer:
            if self.eof:
                return None
            await self._more()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        status_line, *lines = head.decode().split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (h.split(":", 1) for h in lines)}
        length = int(headers.get("content-length", "0"))
        while len(self.buffer) < length and not self.eof:
            await self._more()
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return int(status_line.split()[1]), headers, body

    async def closed(self) -> bool:
        while not self.eof:
            await self._more()
        return True


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("POST", "/v1/trades", 401),  # no token: refused before the body is parsed
        ("POST", "/v1/streaming/stop", 401),
        ("POST", "/v1/nothing", 404),
        ("POST", "/healthz", 405),
        ("PUT", "/v1/trades", 405),
    ],
)
async def test_an_early_answer_leaves_the_connection_usable(
    db_url: str, tmp_path: Path, method: str, path: str, status: int
) -> None:
    async with serve_api(db_url, tmp_path, token=TOKEN) as service:
        host, port = service.api_url.removeprefix("http://").rsplit(":", 1)
        http = RawHttp(await trio.open_tcp_stream(host, int(port)))
        await http.stream.send_all(
            f"{method} {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(BODY)}\r\n\r\n".encode()
        )
        await trio.sleep(0.01)  # the scenario itself: the body arrives 10 ms late
        await http.stream.send_all(BODY + b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        with trio.fail_after(10):
            first = await http.response()
            assert first is not None and first[0] == status, first
            second = await http.response()
            if second is None:
                # Allowed only when announced: the first answer said it would close.
                assert first[1].get("connection") == "close"
            else:
                assert second[0] == 200 and orjson.loads(second[2])["status"] == "ok"
        await http.stream.aclose()


async def test_a_busy_answer_also_leaves_the_connection_usable(db_url: str, tmp_path: Path) -> None:
    """The gate's 503 is written outside the app: it must read the late body too."""
    async with serve_api(db_url, tmp_path, token=TOKEN) as service:
        holders = [object() for _ in range(HTTP_GATE_SIZE)]
        for holder in holders:
            service.state.http_gate.acquire_on_behalf_of_nowait(holder)
        host, port = service.api_url.removeprefix("http://").rsplit(":", 1)
        http = RawHttp(await trio.open_tcp_stream(host, int(port)))
        await http.stream.send_all(
            b"POST /v1/trades HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(BODY)}\r\n\r\n".encode()
        )
        # The scenario itself: the body arrives after the gate has given up waiting.
        await trio.sleep(HTTP_GATE_WAIT_S + 0.1)
        await http.stream.send_all(BODY + b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        with trio.fail_after(10):
            first = await http.response()
            assert first is not None and first[0] == 503, first
            assert first[1]["retry-after"] == "1" and orjson.loads(first[2])["error"] == "busy"
            second = await http.response()
            assert second is not None and second[0] == 200, second
        for holder in holders:
            service.state.http_gate.release_on_behalf_of(holder)
        await http.stream.aclose()


async def test_a_body_over_the_limit_is_refused_and_the_connection_closed(
    db_url: str, tmp_path: Path
) -> None:
    async with serve_api(db_url, tmp_path, token=TOKEN) as service:
        host, port = service.api_url.removeprefix("http://").rsplit(":", 1)
        http = RawHttp(await trio.open_tcp_stream(host, int(port)))
        await http.stream.send_all(
            b"POST /v1/trades HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
            b"Content-Length: 100000\r\n\r\n" + b" " * 1000
        )
        with trio.fail_after(10):
            first = await http.response()
            assert first is not None and first[0] == 413, first
            assert first[1]["connection"] == "close"
            assert orjson.loads(first[2])["error"] == "request_entity_too_large"
            assert await http.closed()


async def test_405_names_the_allowed_methods(db_url: str, tmp_path: Path) -> None:
    async with open_api(db_url, tmp_path) as h:
        response = await h.client.post("/healthz")
        assert response.status_code == 405
        assert {m.strip() for m in response.headers["Allow"].split(",")} >= {"GET"}
        response = await h.client.delete("/v1/trades")
        assert response.status_code == 405
        assert {m.strip() for m in response.headers["Allow"].split(",")} >= {"GET", "POST"}


async def test_a_null_broker_is_refused_not_read_as_every_stream(
    db_url: str, tmp_path: Path
) -> None:
    async with open_api(db_url, tmp_path) as h:
        for verb in ("start", "stop"):
            response = await h.client.post(f"/v1/streaming/{verb}", json={"broker": None})
            body = orjson.loads(await response.get_data())
            assert (response.status_code, body["error"]) == (400, "bad_broker"), body
        _, spec = await h.get_json("/openapi.json")
        schema = spec["paths"]["/v1/streaming/stop"]["post"]["requestBody"]["content"][
            "application/json"
        ]["schema"]
        assert schema["properties"]["broker"]["type"] == "string"


async def test_the_document_says_empty_query_parameters_are_refused(
    db_url: str, tmp_path: Path
) -> None:
    async with open_api(db_url, tmp_path) as h:
        _, spec = await h.get_json("/openapi.json")
        for path, operations in spec["paths"].items():
            for parameter in operations.get("get", {}).get("parameters", []):
                schema = parameter["schema"]
                if schema["type"] == "string" and "enum" not in schema:
                    assert schema["minLength"] == 1, (path, parameter["name"])
                    status, body = await h.get_json(path, **{parameter["name"]: ""})
                    assert (status, body["error"]) == (400, "empty_parameter"), (path, body)
