"""Coverage: which subscribed contracts actually receive Greeks (pure, no clocks, no I/O).

A socket that is up says nothing about the book: a refused feed channel, subscriptions a
gateway silently ignores past its line limit, or an smd stream that ended all leave a
"connected" link that carries no Greeks. So each stream has one `Coverage`, kept on its
`StreamStatus` across links, that its Connection feeds from the updates themselves
(which fields an update carried, not the merged row: a price-only IBKR update does not
make an old delta fresh). Status, /v1/coverage, the gauges and the probe all read it,
with these definitions (the README's "Coverage" section):

- `last_greeks_at`: receive time of the last update carrying a delta for the contract;
  `last_price_at`: of the last one carrying a price of the option (last/bid/ask/mark);
  `market_data`: 'live', 'delayed' or 'frozen' when the broker says, else None.
- A contract's state at `now`: `never` (no Greeks on this stream run), `delayed` (Greeks
  received, but delayed or frozen data), `stale` (Greeks older than `stale_s`, when
  `stale_s` > 0), else `fresh`. Exactly one each.
- The stream is degraded by coverage when its link has been up for `stale_s` and no
  contract is fresh; `assess` names why where it can tell.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from greeksd.model import Contract

DEFAULT_STALE_S = 120.0
STATES = ("fresh", "stale", "never", "delayed")
NOT_LIVE = frozenset({"delayed", "frozen"})


@dataclass(slots=True)
class ContractCoverage:
    """What one subscribed contract (per account) has received so far."""

    broker: str
    account_id: str
    contract_key: str
    last_greeks_at: datetime | None = None
    last_price_at: datetime | None = None
    market_data: str | None = None

    def state(self, now: datetime, stale_s: float) -> str:
        greeks_at = self.last_greeks_at
        if greeks_at is None:
            return "never"
        if self.market_data in NOT_LIVE:
            return "delayed"
        if stale_s > 0 and (now - greeks_at).total_seconds() > stale_s:
            return "stale"
        return "fresh"

    def as_json(self, now: datetime, stale_s: float) -> dict[str, Any]:
        return {
            "broker": self.broker,
            "account_id": self.account_id,
            "contract_key": self.contract_key,
            "state": self.state(now, stale_s),
            "last_greeks_at": _iso(self.last_greeks_at),
            "last_price_at": _iso(self.last_price_at),
            "market_data": self.market_data,
        }


@dataclass(frozen=True, slots=True)
class Assessment:
    """What coverage says about a stream: `degraded` (no fresh Greeks anywhere, past the
    grace), and `reason`: the causes it can name (also for partial coverage), or None."""

    degraded: bool
    reason: str | None


class Coverage:
    """The subscribed contracts of one stream and what each received.

    Connections address contracts by their own `handle` (IBKR's conid, DXLink's contract
    key text): `track` says which contracts a handle stands for (one symbol held in two
    accounts is two contracts), `update` records an update in a dict lookup and a loop
    over one or two entries, cheap enough for the tick path. Entries outlive links and
    re-subscriptions, so a reconnect does not forget what was received before."""

    def __init__(self, broker: str, stale_s: float = DEFAULT_STALE_S) -> None:
        self.broker = broker
        self.stale_s = stale_s
        self.data = "data"
        """What the broker calls its market data, for reasons (the Connection that feeds
        this tracker names it: "smd data")."""
        self.left_out = 0
        """Held contracts the stream could not subscribe (IBKR's line limit)."""
        self._entries: dict[tuple[str, str], ContractCoverage] = {}
        self._by_handle: dict[Hashable, list[ContractCoverage]] = {}

    # ---- fed by the Connections ---------------------------------------------------------
    def track(self, contracts: Iterable[tuple[Hashable, Contract]]) -> None:
        """These (handle, contract) pairs are the subscribed set from now on."""
        by_handle: dict[Hashable, list[ContractCoverage]] = {}
        entries = self._entries
        for handle, contract in contracts:
            ident = (contract.account_id, contract.key_text)
            entry = entries.get(ident)
            if entry is None:
                entry = ContractCoverage(self.broker, *ident)
                entries[ident] = entry
            by_handle.setdefault(handle, []).append(entry)
        self._by_handle = by_handle
        kept = {(e.account_id, e.contract_key) for es in by_handle.values() for e in es}
        for ident in [i for i in entries if i not in kept]:
            del entries[ident]

    def update(self, handle: Hashable, at: datetime, greeks: bool, price: bool) -> None:
        """An update for `handle` received at `at` carried Greeks and/or a price."""
        for entry in self._by_handle.get(handle, ()):
            if greeks:
                entry.last_greeks_at = at
            if price:
                entry.last_price_at = at

    def quality(self, handle: Hashable, market_data: str | None) -> None:
        """The broker says the data of `handle` is live, delayed or frozen."""
        for entry in self._by_handle.get(handle, ()):
            entry.market_data = market_data

    # ---- read by status, API, metrics and the probe ---------------------------------------
    def entries(self) -> list[ContractCoverage]:
        return sorted(self._entries.values(), key=lambda e: (e.contract_key, e.account_id))

    def summary(self, now: datetime) -> dict[str, Any]:
        counts = dict.fromkeys(STATES, 0)
        for entry in self._entries.values():
            counts[entry.state(now, self.stale_s)] += 1
        return {"subscribed": len(self._entries), **counts, "stale_s": self.stale_s}

    def assess(
        self, now: datetime, up_since: datetime | None, last_message_at: datetime | None
    ) -> Assessment:
        """Whether the stream is degraded by coverage, and the causes it can name.

        Degraded only when the link has been up for `stale_s` (time to receive a first
        image) and no subscribed contract is fresh: partial coverage is named in the
        reason but never flips the state. `stale_s` <= 0 turns this off."""
        stale_s, total = self.stale_s, len(self._entries)
        if stale_s <= 0 or total == 0:
            return Assessment(False, None)
        counts = dict.fromkeys(STATES, 0)
        silent = prices_only = 0
        for entry in self._entries.values():
            state = entry.state(now, stale_s)
            counts[state] += 1
            if state in ("fresh", "delayed"):
                continue
            if _recent(entry.last_price_at, now, stale_s):
                prices_only += 1
            else:
                silent += 1
        causes = []
        if silent:
            causes.append(f"no {self.data} for {silent} of {total} contracts")
        if prices_only:
            causes.append(f"prices but no Greeks for {prices_only} of {total} contracts")
        if counts["delayed"]:
            only = counts["delayed"] == total
            causes.append(
                "delayed data only" if only else f"delayed data for {counts['delayed']} of {total}"
            )
        if self.left_out:
            causes.append(f"line limit: {self.left_out} left out")
        graced = up_since is not None and (now - up_since).total_seconds() >= stale_s
        degraded = graced and counts["fresh"] == 0
        reason = "; ".join(causes) or None
        if degraded:
            alive = _recent(last_message_at, now, stale_s)
            link = "link alive, no Greeks" if alive else "link silent"
            reason = f"{link}: {reason}" if reason else link
        return Assessment(degraded, reason)


def _recent(at: datetime | None, now: datetime, stale_s: float) -> bool:
    return at is not None and (now - at).total_seconds() <= stale_s


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None
