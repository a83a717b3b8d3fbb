"""The API over a real service core (read pool, pipeline, writer, supervisor) driven
through Quart's test client: every layer real except the socket."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import trio
from quart.typing import TestClientProtocol
from quart_trio import QuartTrio

from greeksd.api.app import create_app
from greeksd.api.state import ServiceState, open_read_pool
from greeksd.config import load_settings
from greeksd.model import Snapshot, Source
from greeksd.pipeline import open_pipeline
from greeksd.supervisor import Supervisor


@dataclass
class Harness:
    state: ServiceState
    app: QuartTrio
    client: TestClientProtocol

    async def put(self, snapshots: Sequence[Snapshot]) -> None:
        """Write through the real pipeline and wait until every row is settled."""
        before = self.state.writer.stats.rows_written + self.state.writer.stats.duplicates
        for s in snapshots:
            self.state.sink.put(s)
        await self.state.writer.wait_settled(before + len(snapshots))

    async def get_json(self, path: str, **query: Any) -> tuple[int, Any]:
        response = await self.client.get(path, query_string=query or None)
        return response.status_code, orjson.loads(await response.get_data())


@contextlib.asynccontextmanager
async def open_api(
    db_url: str,
    tmp_path: Path,
    *,
    sources: Iterable[Source] = (),
    token: str | None = None,
    flush_ms: int = 20,
    reads_url: str | None = None,
) -> AsyncIterator[Harness]:
    env = {"GREEKSD_DATABASE_URL": db_url, "GREEKSD_DATA_DIR": str(tmp_path)}
    if token:
        env["GREEKSD_API_TOKEN"] = token
    settings = load_settings(env, dotenv_path=tmp_path / "none.env")
    async with (
        open_read_pool(reads_url or db_url, wait_s=1.0) as reads,
        open_pipeline(db_url, flush_rows=1000, flush_ms=flush_ms) as pipeline,
    ):
        supervisor = Supervisor(pipeline.sink)
        for source in sources:
            supervisor.add(source)
        state = ServiceState(settings, db_url, supervisor, pipeline.writer, pipeline.sink, reads)
        app = create_app(state)
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.run)
            async with app.test_app() as test_app:
                yield Harness(state, app, test_app.test_client())
            nursery.cancel_scope.cancel()
