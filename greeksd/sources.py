"""Source names: `<broker>` (a broker's default source) or `<broker>:<name>` (a named one,
e.g. `ibkr:alice`), and the configured source a stream is built from.

The source name is the key of everything per stream: the supervisor's scope, the status
entry, coverage, the recording's records, the probe target and the rows' `source`
column. One instance may run several sources of one broker (one per gateway or login),
so a broker's name alone no longer says which stream a row came from.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from greeksd.brokers import registry
from greeksd.brokers.spec import BrokerSpec

NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
"""A source's own name (after the colon): lower-case, digits, `_`, `-`; at most 32."""
NAME_RULE = "1-32 of a-z, 0-9, '_', '-', starting with a letter or digit"

INSTANCE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}")
"""An instance's name (GREEKSD_INSTANCE): any host name fits."""
INSTANCE_RULE = "1-253 of A-Z, a-z, 0-9, '.', '_', '-', starting with a letter or digit"


def source_name(broker: str, name: str | None) -> str:
    return broker if name is None else f"{broker}:{name}"


def broker_of(source: str) -> str:
    """The broker part of a source name ('ibkr:alice' -> 'ibkr', 'ibkr' -> 'ibkr')."""
    return source.partition(":")[0]


def source_pattern() -> str:
    """`parse_source`'s rule as a regular expression over the registered brokers (the
    OpenAPI document's, so a generated value that matches is one the API accepts)."""
    brokers = "|".join(re.escape(name) for name in registry.names())
    return f"^({brokers})(:{NAME.pattern})?$"


def parse_source(text: str) -> str:
    """A well-formed source name of a registered broker; ValueError says what is wrong."""
    broker, colon, name = text.partition(":")
    if registry.get(broker) is None:
        raise ValueError(f"unknown broker {broker!r}; use {', '.join(registry.names())}")
    if colon and NAME.fullmatch(name) is None:
        raise ValueError(f"source name {name!r} must be {NAME_RULE}")
    return text


def parse_instance(text: str) -> str:
    if INSTANCE.fullmatch(text) is None:
        raise ValueError(f"must be {INSTANCE_RULE}")
    return text


@dataclass(frozen=True)
class SourceConfig:
    """One stream `greeksd run` starts: its name, its broker and that broker's settings."""

    name: str
    spec: BrokerSpec[Any]
    settings: Any
