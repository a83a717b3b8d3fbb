"""The synthetic "broker": market ticks straight into the sink, no protocol, no settings
(greeksd.sim.synthetic). It stands in for brokers where only the pipeline matters."""

from __future__ import annotations

from datetime import UTC, datetime

from greeksd.brokers.spec import BrokerSpec, NoSettings
from greeksd.model import Recorder, Source
from greeksd.sim.market import SyntheticMarket, default_contracts
from greeksd.sim.synthetic import SyntheticSource


def _stream(name: str, settings: NoSettings, recorder: Recorder | None) -> Source:
    today = datetime.now(UTC).date()
    return SyntheticSource(SyntheticMarket(default_contracts(today), as_of=today), name=name)


SPEC = BrokerSpec(name="synthetic", settings=NoSettings, prefix="SYNTHETIC_", stream=_stream)
