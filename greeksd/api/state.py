"""What the HTTP layer may see of the running service."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from greeksd.config import Settings
from greeksd.sink import ChannelSink
from greeksd.store.writer import Writer
from greeksd.supervisor import Supervisor


@dataclass
class ServiceState:
    settings: Settings
    database_url: str
    supervisor: Supervisor
    writer: Writer
    sink: ChannelSink

    def status_json(self) -> dict[str, Any]:
        writer = self.writer.stats.as_json(queue_depth=self.sink.queue_depth)
        writer["accepted"] = self.sink.accepted
        writer["conflated"] = self.sink.conflated
        return {
            "streams": {name: s.as_json() for name, s in self.supervisor.registry.items()},
            "writer": writer,
        }
