"""Reading IBKR client text commands back, for tests only.

The client only writes commands (greeksd.brokers.ibkr.protocol); the simulator parses
them strictly, as a gateway acting on them (greeksd.sim.ibkr_wire). Tests that check the
shape of a command, ours or one recorded from a real client (with arguments the
simulator does not take, like `tempo`), read it with this lenient parser instead."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import orjson


@dataclass(frozen=True, slots=True)
class Command:
    """A client text command as the gateway sees it: `smd+265598@CBOE+{...}`."""

    topic: str
    target: str = ""
    args: dict[str, Any] = field(default_factory=dict)

    @property
    def conid(self) -> int | None:
        conid = self.target.split("@")[0]
        return int(conid) if conid.isdigit() else None


def parse_command(text: str) -> Command | None:
    """Parse a client frame; None when it is not `TOPIC[+TARGET][+{JSON}]` text."""
    head, _, rest = text.strip().partition("+")
    if not re.fullmatch(r"[a-z]{3}", head):
        return None
    target, _, args = ("", "", rest) if rest.startswith("{") else rest.partition("+")
    if not args:
        return Command(head, target)
    try:
        obj = orjson.loads(args)
    except orjson.JSONDecodeError:
        return None
    return Command(head, target, obj) if isinstance(obj, dict) else None
