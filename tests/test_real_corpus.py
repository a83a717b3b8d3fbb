"""Real-world conformance: frames and bodies from real IBKR gateways and real DXLink /
Tastytrade servers (tests/fixtures/real/, see its README) must decode to what they say.

One test case per corpus item. Where today's parser gets a real shape wrong the case is an
`xfail(strict=True)` naming the bug, so the mismatch stays visible until the parser is fixed.
REST bodies go through the real clients (`GatewayClient`, the tastytrade SDK behind
`TastytradeApi`) over a real loopback HTTP socket that answers with the recorded body.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
import trio

from greeksd.brokers.ibkr import protocol as ib
from greeksd.brokers.ibkr.gateway import GatewayClient
from greeksd.brokers.tastytrade import protocol as dx
from greeksd.brokers.tastytrade.session import TastytradeApi
from tests.ibkr_commands import parse_command

CORPUS = Path(__file__).parent / "fixtures" / "real"
PROVENANCE_KINDS = {"live capture", "test fixture from live", "documentation example"}
ITEM_KINDS = {"ws_in", "ws_out", "rest"}
_GITHUB_SOURCE = re.compile(r"github:[\w.-]+/[\w.-]+ \S+@[0-9a-f]{40}")
_URL_SOURCE = re.compile(r"https://\S+")
_DATE = re.compile(r"\d{4}(-\d{2}(-\d{2})?)?")

# Items today's parsers get wrong, each with the reason: a strict xfail, so a fix shows.
XFAIL: dict[str, str] = {}


# ---- corpus ------------------------------------------------------------------------------
def load(broker: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    for path in sorted((CORPUS / broker).glob("*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                items.append(json.loads(line))
    return items


ALL = {broker: load(broker) for broker in ("ibkr", "dxlink")}


def cases(broker: str, kinds: set[str], rest_if: Callable[[str], bool] | None = None) -> list[Any]:
    """The broker's items of these kinds (REST ones filtered by endpoint) as pytest params."""
    params = []
    for item in ALL[broker]:
        if item["kind"] not in kinds:
            continue
        if item["kind"] == "rest" and rest_if is not None and not rest_if(item["endpoint"]):
            continue
        marks = (
            [pytest.mark.xfail(strict=True, reason=XFAIL[item["id"]])]
            if item["id"] in XFAIL
            else []
        )
        params.append(pytest.param(item, id=item["id"], marks=marks))
    return params


def frame_text(item: Mapping[str, Any]) -> str:
    """The frame as the server sent it: logged Python reprs go back to JSON."""
    if item.get("frame_format") == "python_repr":
        return json.dumps(ast.literal_eval(item["frame"]))
    return str(item["frame"])


def same(actual: Any, expected: Any) -> bool:
    """Equality that also keeps int and float apart (an index must stay an exact int)."""
    if isinstance(expected, dict):
        return (
            isinstance(actual, dict)
            and actual.keys() == expected.keys()
            and all(same(actual[k], v) for k, v in expected.items())
        )
    if isinstance(expected, list):
        return (
            isinstance(actual, list | tuple)
            and len(actual) == len(expected)
            and all(same(a, e) for a, e in zip(actual, expected, strict=True))
        )
    if isinstance(expected, bool) or expected is None:
        return actual is expected
    if isinstance(expected, int | float):
        return type(actual) is type(expected) and actual == expected
    return bool(actual == expected)


# ---- a loopback HTTP server answering with recorded bodies -------------------------------
@dataclass
class Canned:
    url: str = ""
    requests: list[tuple[str, str]] = field(default_factory=list)


async def _read_request(stream: trio.SocketStream) -> tuple[str, str] | None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    length = next(
        (int(h.split(":", 1)[1]) for h in lines[1:] if h.lower().startswith("content-length:")),
        0,
    )
    while len(body) < length:
        body += await stream.receive_some(65536)
    return method, unquote(urlsplit(target).path)


@asynccontextmanager
async def canned_http(routes: Mapping[tuple[str, str], bytes]) -> AsyncIterator[Canned]:
    """HTTP/1.1 on 127.0.0.1: each (method, path) answers 200 with its body; anything else
    404, so a client asking for something unrecorded fails loudly."""
    canned = Canned()

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            request = await _read_request(stream)
            if request is None:
                return
            canned.requests.append(request)
            body = routes.get(request)
            status = "200 OK" if body is not None else "404 Not Found"
            body = body if body is not None else b'{"error":"not recorded"}'
            head = (
                f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            await stream.send_all(head.encode() + body)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
        canned.url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        yield canned
        nursery.cancel_scope.cancel()


# ---- IBKR websocket ----------------------------------------------------------------------
def _tri_state(value: bool | None, expected: bool | str) -> bool:
    return value is None if expected == "unknown" else value is expected


@pytest.mark.parametrize("item", cases("ibkr", {"ws_in"}))
def test_ibkr_server_frame(item: dict[str, Any]) -> None:
    expect = item["expect"]
    event = ib.parse_frame(frame_text(item))
    assert type(event).__name__ == expect["event"], event
    if isinstance(event, ib.MarketData):
        assert (event.conid, event.updated_ms) == (expect["conid"], expect["updated_ms"])
        assert event.fields == expect["fields"]
        parsed = {k: ib.parse_value(event.fields.get(k)) for k in expect["values"]}
        assert same(parsed, expect["values"])
    elif isinstance(event, ib.AuthStatus):
        authenticated: Any = event.authenticated
        competing: Any = event.competing
        assert _tri_state(authenticated, expect["authenticated"]), event
        assert _tri_state(competing, expect["competing"]), event
        assert (event.message, event.fail) == (expect["message"], expect["fail"])
    elif isinstance(event, ib.LoggedIn):
        assert (event.username, event.is_paper) == (expect["username"], expect["is_paper"])
    elif isinstance(event, ib.Heartbeat):
        assert event.epoch_ms == expect["epoch_ms"]
    elif isinstance(event, ib.Trades):
        assert len(event.executions) == len(expect["executions"])
        for raw, want in zip(event.executions, expect["executions"], strict=True):
            trade = ib.execution_trade(raw, None)
            assert {
                "broker_trade_id": trade.broker_trade_id,
                "account_id": trade.account_id,
                "symbol": trade.symbol,
                "side": trade.side,
                "quantity": str(trade.quantity),
                "price": str(trade.price),
                "executed_at": trade.executed_at.isoformat(),
                "conid": ib.execution_conid(raw),
                "is_option": ib.is_option_execution(raw),
            } == want
    else:
        assert set(expect) == {"event"}, "add a check for this event type"


@pytest.mark.parametrize("item", cases("ibkr", {"ws_out"}))
def test_ibkr_client_frame(item: dict[str, Any]) -> None:
    command = parse_command(frame_text(item))
    assert command is not None
    expect = item["expect"]
    assert (command.topic, command.target, command.conid) == (
        expect["command"],
        expect["target"],
        expect["conid"],
    )
    assert command.args == expect["args"]


# ---- IBKR REST ---------------------------------------------------------------------------
def _ibkr_path(template: str, account: str | None) -> str:
    method, path = template.split(" ", 1)
    path = path.replace("{accountId}", account or "").replace("{pageId}", "0")
    return f"{method} /v1/api{path}"


@pytest.mark.parametrize("item", cases("ibkr", {"rest"}))
async def test_ibkr_rest_body(item: dict[str, Any]) -> None:
    expect, account = item["expect"], item.get("account")
    method, path = _ibkr_path(item["endpoint"], account).split(" ", 1)
    routes = {(method, path): frame_text(item).encode()}
    if path.endswith("/positions/0"):
        routes[("GET", path[: -len("0")] + "1")] = b"[]"  # the page after the last is empty
    async with canned_http(routes) as server, GatewayClient(server.url, min_interval=0) as gw:
        if path.endswith("/auth/status") or path.endswith("/tickle"):
            info = await (gw.auth_status() if path.endswith("/auth/status") else gw.tickle())
            got = {
                "session": info.session,
                "authenticated": info.authenticated,
                "competing": info.competing,
                "message": info.message,
                "problem": info.problem,
            }
            assert {k: got[k] for k in expect} == expect
        elif path.endswith("/portfolio/accounts"):
            assert await gw.portfolio_accounts() == expect["accounts"]
        elif path.endswith("/iserver/accounts"):
            assert await gw.iserver_accounts() == expect["accounts"]
        elif path.endswith("/trsrv/secdef"):
            details = await gw.secdef(expect["conids"])
            assert sorted(details) == expect["conids"]
        else:
            positions = await gw.positions(str(account))
            _check_positions(positions, str(account), expect)
    assert (method, path) in server.requests


def _check_positions(
    positions: list[dict[str, Any]], account: str, expect: Mapping[str, Any]
) -> None:
    assert [
        {
            "conid": p["conid"],
            "assetClass": p["assetClass"],
            "is_option": ib.is_option(p),
            "is_future_option": ib.is_future_option(p),
        }
        for p in positions
    ] == expect["positions"]
    options = {}
    for p in filter(ib.is_option, positions):
        option = ib.parse_option_position(p, account)
        options[str(option.conid)] = {
            "contract_key": str(option.contract.key),
            "und_conid": option.und_conid,
            "underlying": option.contract.underlying,
            "multiplier": str(option.contract.multiplier),
            "quantity": str(option.contract.quantity),
            "account_id": option.contract.account_id,
        }
    assert options == expect["options"]


# ---- DXLink websocket --------------------------------------------------------------------
def _fields(value: Mapping[str, tuple[str, ...]] | None) -> dict[str, list[str]] | None:
    return None if value is None else {k: list(v) for k, v in value.items()}


def _decoded(message: dx.Message, item: Mapping[str, Any]) -> dict[str, Any]:
    """The message as the corpus' `expect` describes it."""
    out: dict[str, Any] = {"message": type(message).__name__}
    if isinstance(message, dx.Malformed):
        return out | {"reason": message.reason}
    out["channel"] = message.channel
    if isinstance(message, dx.Setup):
        out |= {
            "version": message.version,
            "keepalive_timeout": message.keepalive_timeout,
            "accept_keepalive_timeout": message.accept_keepalive_timeout,
        }
    elif isinstance(message, dx.AuthState):
        out |= {"state": message.state, "user_id": message.user_id}
    elif isinstance(message, dx.Auth):
        out |= {"token": message.token}
    elif isinstance(message, dx.ChannelRequest | dx.ChannelOpened):
        out |= {"service": message.service, "parameters": dict(message.parameters)}
    elif isinstance(message, dx.FeedSetup | dx.FeedConfig):
        out |= {
            "data_format": message.data_format,
            "aggregation_period": message.aggregation_period,
            "event_fields": _fields(message.event_fields),
        }
    elif isinstance(message, dx.FeedSubscription):
        out |= {
            "reset": message.reset,
            "add": [list(s) for s in message.add],
            "remove": [list(s) for s in message.remove],
        }
    elif isinstance(message, dx.Error):
        out |= {"error": message.error, "text": message.message}
    elif isinstance(message, dx.FeedData):
        layout = item["layout"]
        config = dx.parse(layout["config"]) if layout["config"] else None
        assert config is None or isinstance(config, dx.FeedConfig), config
        events, problems = dx.decode_feed_data(
            message.data, dx.field_layouts(layout["requested"], config)
        )
        out |= {"events": events, "problems": problems}
    return out


@pytest.mark.parametrize("item", cases("dxlink", {"ws_in", "ws_out"}))
def test_dxlink_frame(item: dict[str, Any]) -> None:
    decoded = _decoded(dx.parse(frame_text(item)), item)
    assert same(decoded, item["expect"]), decoded


# ---- Tastytrade REST ---------------------------------------------------------------------
OAUTH = b'{"access_token":"corpus-access","expires_in":900,"token_type":"Bearer"}'


def _account_body(number: str) -> bytes:
    """Scaffolding, not corpus: the account lookup `TastytradeApi.positions` makes first."""
    account = {
        "account-number": number,
        "opened-at": "2020-01-02T14:30:00.000+00:00",
        "nickname": "corpus",
        "account-type-name": "Individual",
        "is-closed": False,
        "day-trader-status": False,
        "is-firm-error": False,
        "is-firm-proprietary": False,
        "is-futures-approved": False,
        "is-test-drive": False,
        "margin-or-cash": "Margin",
        "is-foreign": False,
        "created-at": "2020-01-02T14:30:00.000+00:00",
    }
    return json.dumps({"data": account}).encode()


def _is_api_call(endpoint: str) -> bool:
    return endpoint.endswith("/api-quote-tokens") or endpoint.endswith("/positions")


@pytest.mark.parametrize("item", cases("dxlink", {"rest"}, rest_if=_is_api_call))
async def test_tastytrade_rest_body(item: dict[str, Any]) -> None:
    expect, body = item["expect"], frame_text(item).encode()
    account = item.get("account")
    routes = {("POST", "/oauth/token"): OAUTH}
    if account is None:
        routes[("GET", "/api-quote-tokens")] = body
    else:
        routes[("GET", f"/customers/me/accounts/{account}")] = _account_body(account)
        routes[("GET", f"/accounts/{account}/positions")] = body
    async with canned_http(routes) as server:
        api = TastytradeApi("corpus-secret", "corpus-refresh", account=account, api_url=server.url)
        async with api.open():
            if account is None:
                token = await api.quote_token()
                assert {"token": token.token, "dxlink_url": token.dxlink_url} == expect
            else:
                positions = await api.positions()
                got = {
                    "contracts": [
                        {
                            "contract_key": str(c.key),
                            "quantity": str(c.quantity),
                            "multiplier": str(c.multiplier),
                            "account_id": c.account_id,
                        }
                        for c in positions.contracts
                    ],
                    "unsupported": dict(positions.unsupported),
                    "skipped_unparsable": positions.skipped_unparsable,
                }
                assert got == expect
    assert all(request in server.requests for request in routes)


def _streamer_symbols(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key.endswith("streamer-symbol") and isinstance(value, str):
                yield value
            else:
                yield from _streamer_symbols(value)
    elif isinstance(node, list):
        for value in node:
            yield from _streamer_symbols(value)


@pytest.mark.parametrize(
    "item", cases("dxlink", {"rest"}, rest_if=lambda endpoint: not _is_api_call(endpoint))
)
def test_tastytrade_streamer_symbols(item: dict[str, Any]) -> None:
    """greeksd derives streamer symbols from OCC keys instead of asking the instruments API,
    so the derivation must give back exactly the symbols Tastytrade publishes."""
    expect = item["expect"]["streamer_symbols"]
    assert sorted(_streamer_symbols(json.loads(frame_text(item)))) == sorted(expect)
    for symbol, want in expect.items():
        try:
            key = dx.parse_streamer_symbol(symbol)
        except dx.SymbolError as exc:
            assert type(exc).__name__ == want
            continue
        assert str(key) == want
        assert dx.streamer_symbol(key) == symbol


# ---- the corpus itself -------------------------------------------------------------------
def test_every_item_has_complete_provenance() -> None:
    """Each item names its source exactly (a repository file at a commit, or a URL), when it
    was captured and how that is known, and what kind of source it is."""
    seen: set[str] = set()
    for broker, items in ALL.items():
        assert len(items) >= 25, f"{broker}: the corpus shrank to {len(items)} items"
        for item in items:
            where = f"{broker}:{item.get('id')}"
            assert isinstance(item.get("id"), str) and item["id"] not in seen, where
            seen.add(item["id"])
            assert item.get("kind") in ITEM_KINDS, where
            assert isinstance(item.get("frame"), str) and item["frame"].strip(), where
            assert ("endpoint" in item) == (item["kind"] == "rest"), where
            assert isinstance(item.get("expect"), dict) and item["expect"], where
            frame_text(item)  # a python_repr frame must be a Python literal
            source = item["provenance"]
            assert _GITHUB_SOURCE.fullmatch(source["source"]) or _URL_SOURCE.fullmatch(
                source["source"]
            ), where
            assert _DATE.fullmatch(source["date"]), where
            assert source["kind"] in PROVENANCE_KINDS, where
            assert source["date_basis"].strip(), where


def test_xfail_marks_name_real_items() -> None:
    """A stale mark (item renamed or removed) must not silently stop guarding a mismatch."""
    ids = {item["id"] for items in ALL.values() for item in items}
    assert set(XFAIL) <= ids
