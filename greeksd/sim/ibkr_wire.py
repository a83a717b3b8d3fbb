"""The Client Portal Gateway's websocket as the gateway reads and writes it, written from
the protocol notes (`/work/shared/protocols/ibkr-cpapi.md`), independent of greeksd's
client (`greeksd.brokers.ibkr`): a simulator parsing with the client's own code would
accept whatever the client sends and never catch a misunderstanding.

Client commands are plain text, `TOPIC+{ARGS}`: `smd+<conid>[@EXCH]+{"fields":[...]}`,
`umd+<conid>+{}`, `tic`, `ech+<text>`, `str+{}`, `utr`, and the legacy handshake
`{"session": "<token>"}`. `parse_command` raises `CommandError` for anything else, with
the frame the gateway answers (the notes: "Unknown text commands get
`{"error":"Topic unknown …","code":1}`"), or None where the gateway answers nothing: an
`smd` that parses but asks for something it cannot serve gets no data and no error,
which is what a client sees from a real gateway it has misused ("connected but no data").
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

LAST, BID, ASK, MARK = "31", "84", "86", "7635"
DELTA, GAMMA, THETA, VEGA, IV = "7308", "7309", "7310", "7311", "7633"
AVAILABILITY, MARKER = "6509", "6119"
REALTIME, DELAYED, FROZEN = "RpB", "DpB", "ZpB"
WAITING_FOR_SESSION = '{"message":"waiting for session"}'

_TARGET = re.compile(r"(\d+)(?:@([A-Z0-9]+))?")
_FIELD_ID = re.compile(r"\d+")
_PLAIN_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


class CommandError(Exception):
    """A command the gateway does not act on: `answer` is the frame it replies with, or
    None when it stays silent."""

    def __init__(self, reason: str, answer: str | None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.answer = answer


@dataclass(frozen=True, slots=True)
class Command:
    topic: str  # smd, umd, tic, ech, str, utr, or "session" for the legacy handshake
    conid: int | None = None
    exchange: str = ""
    fields: tuple[str, ...] = ()
    text: str = ""  # the echo payload, or the legacy handshake's session token


def topic_unknown(text: str) -> str:
    return error("Topic unknown: " + text[:20], 1)


def _unknown(text: str, reason: str) -> CommandError:
    return CommandError(reason, topic_unknown(text))


def _json_object(text: str, args: str) -> dict[str, Any]:
    try:
        obj = orjson.loads(args)
    except orjson.JSONDecodeError:
        raise _unknown(text, f"arguments are not JSON: {args[:40]!r}") from None
    if not isinstance(obj, dict):
        raise _unknown(text, "arguments are not a JSON object")
    return obj


def parse_command(text: str) -> Command:
    """One client text frame -> Command; CommandError when the gateway would not act."""
    if text.startswith("{"):
        obj = _json_object(text, text)
        token = obj.get("session")
        if set(obj) != {"session"} or not isinstance(token, str):
            raise _unknown(text, "a JSON frame that is not the legacy session handshake")
        return Command("session", text=token)
    if text == "tic":
        return Command("tic")
    topic, plus, rest = text.partition("+")
    if topic == "ech" and plus:
        return Command("ech", text=rest)
    if topic == "utr" and rest in ("", "{}"):
        return Command("utr")
    if topic == "str" and plus:
        if _json_object(text, rest):
            raise CommandError(f"str takes {{}}, got {rest[:40]!r}", None)
        return Command("str")
    if topic not in ("smd", "umd") or not plus:
        raise _unknown(text, f"unknown topic {topic[:20]!r}")
    target, plus, args = rest.partition("+")
    match = _TARGET.fullmatch(target)
    if match is None or not plus:
        raise _unknown(text, f"{topic} needs <conid>[@EXCHANGE]+{{...}}, got {rest[:40]!r}")
    obj = _json_object(text, args)
    conid, exchange = int(match[1]), match[2] or ""
    if topic == "umd":
        if obj:
            raise CommandError(f"umd takes {{}}, got {args[:40]!r}", None)
        return Command("umd", conid, exchange)
    unknown = set(obj) - {"fields"}
    if unknown:
        raise CommandError(f"smd: unknown arguments {sorted(unknown)}", None)
    fields = obj.get("fields")
    if (
        not isinstance(fields, list)
        or not fields
        or not all(isinstance(f, str) and _FIELD_ID.fullmatch(f) for f in fields)
    ):
        raise CommandError(f"smd: fields must be a list of field-id strings: {args[:60]}", None)
    return Command("smd", conid, exchange, tuple(fields))


def session_from_cookie(header: str | None) -> str | None:
    """The session token in `Cookie: api={"session": "<token>"}` (other cookies may
    share the header)."""
    for part in (header or "").split(";"):
        name, _, value = part.strip().partition("=")
        if name != "api":
            continue
        try:
            obj = orjson.loads(value)
        except orjson.JSONDecodeError:
            return None
        token = obj.get("session") if isinstance(obj, dict) else None
        return token if isinstance(token, str) else None
    return None


# ---- frames the gateway sends --------------------------------------------------------
def frame(obj: Mapping[str, Any]) -> str:
    return orjson.dumps(dict(obj)).decode()


def error(message: str, code: int) -> str:
    return frame({"error": message, "code": code})


def logged_in(username: str) -> str:
    return frame({"topic": "system", "success": username, "isFT": False, "isPaper": False})


def heartbeat(epoch_ms: int) -> str:
    return frame({"topic": "system", "hb": epoch_ms})


def accounts(account: str) -> str:
    return frame(
        {
            "topic": "act",
            "args": {
                "accounts": [account],
                "selectedAccount": account,
                "acctProps": {account: {"hasChildAccounts": False}},
                "isPaper": False,
            },
        }
    )


def sts(args: Mapping[str, Any]) -> str:
    return frame({"topic": "sts", "args": dict(args)})


def tic_reply(alive: bool, ident: str, last_accessed_ms: int) -> str:
    return frame({"topic": "tic", "alive": alive, "id": ident, "lastAccessed": last_accessed_ms})


def trades(executions: Iterable[Mapping[str, Any]]) -> str:
    return frame({"topic": "str", "args": [dict(e) for e in executions]})


def _as_number(value: str) -> Any:
    return float(value) if _PLAIN_NUMBER.fullmatch(value) else value


def market_data(
    conid: int, values: Mapping[str, str], updated_ms: int, *, numeric: bool = False
) -> str:
    """One `smd+<conid>` message. Values are strings; with `numeric` plain numbers go as
    JSON numbers (`"84": 0.56`), as some gateways send them."""
    fields = {k: _as_number(v) for k, v in values.items()} if numeric else dict(values)
    return frame(
        {
            "server_id": "q0",
            "conidEx": str(conid),
            "conid": conid,
            "_updated": updated_ms,
            **fields,
            "topic": f"smd+{conid}",
        }
    )
