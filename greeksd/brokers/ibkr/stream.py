"""`IbkrStream`: the IBKR `Source`, which is the link runner (greeksd.brokers.link) with
an `IbkrClient` per run; its settings are mapped here and nowhere else."""

from __future__ import annotations

from pathlib import Path

from greeksd.backoff import Backoff
from greeksd.brokers.ibkr.client import IbkrClient
from greeksd.brokers.ibkr.connection import DEFAULT_MAX_LINES, LinkSettings
from greeksd.brokers.ibkr.gateway import GatewayClient
from greeksd.brokers.ibkr.spec import IbkrSettings
from greeksd.brokers.link import BrokerStream
from greeksd.model import ContractKey, Recorder


class IbkrStream(BrokerStream):
    """Every Greeks tick and execution of every option position, through the gateway."""

    def __init__(
        self,
        url: str = "https://localhost:5000",
        *,
        ca_file: Path | None = None,
        verify_tls: bool = False,
        heartbeat_s: float = 60.0,
        tickle_s: float = 60.0,
        watchdog_s: float = 30.0,
        positions_refresh_s: float = 60.0,
        smd_refresh_s: float = 540.0,
        max_lines: int = DEFAULT_MAX_LINES,
        rest_min_interval: float = 0.1,
        backoff: Backoff | None = None,
        probe_interval_s: float = 2.0,
        recorder: Recorder | None = None,
        name: str = "ibkr",
    ) -> None:
        settings = LinkSettings(
            heartbeat_s, tickle_s, watchdog_s, positions_refresh_s, smd_refresh_s, max_lines
        )
        # Every option conid ever seen (positions, secdef), across links and runs: an
        # execution names its option only by conid, and a closing fill comes after the
        # position is gone.
        self.option_keys: dict[int, ContractKey] = {}

        def open_client() -> IbkrClient:
            gw = GatewayClient(
                url, ca_file=ca_file, verify_tls=verify_tls, min_interval=rest_min_interval
            )
            return IbkrClient(gw, settings, self.option_keys)

        super().__init__(
            name,
            open_client,
            backoff=backoff,
            probe_interval_s=probe_interval_s,
            recorder=recorder,
        )

    @classmethod
    def from_settings(
        cls, settings: IbkrSettings, recorder: Recorder | None, *, name: str = "ibkr"
    ) -> IbkrStream:
        return cls(
            settings.url,
            ca_file=settings.ca_file,
            verify_tls=settings.verify_tls,
            heartbeat_s=settings.heartbeat_s,
            positions_refresh_s=settings.positions_refresh_s,
            max_lines=settings.max_lines,
            recorder=recorder,
            name=name,
        )
