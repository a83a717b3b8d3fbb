"""The API over a real service core (read pool, pipeline, writer, supervisor) driven
through Quart's test client (`open_api`: every layer real except the socket), or the
whole service serving HTTP on a real socket (`serve_api`, and `served_in_thread` for
synchronous clients such as schemathesis)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import trio
from quart.typing import TestClientProtocol
from quart_trio import QuartTrio

from greeksd.api.app import create_app
from greeksd.api.state import READ_STATEMENT_TIMEOUT_S, ServiceState, open_read_pool
from greeksd.config import load_settings
from greeksd.model import Snapshot, Source
from greeksd.pipeline import open_pipeline
from greeksd.service import RunningService, open_service
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
    read_statement_timeout_s: float = READ_STATEMENT_TIMEOUT_S,
    settings_env: Mapping[str, str] | None = None,
) -> AsyncIterator[Harness]:
    env = {
        "GREEKSD_DATABASE_URL": db_url,
        "GREEKSD_DATA_DIR": str(tmp_path),
        **(settings_env or {}),
    }
    if token:
        env["GREEKSD_API_TOKEN"] = token
    settings = load_settings(env, dotenv_path=tmp_path / "none.env")
    async with (
        open_read_pool(
            reads_url or db_url, wait_s=1.0, statement_timeout_s=read_statement_timeout_s
        ) as reads,
        open_pipeline(db_url, flush_rows=1000, flush_ms=flush_ms) as pipeline,
    ):
        supervisor = Supervisor(pipeline.sink, stale_s=settings.stale_s)
        for source in sources:
            supervisor.add(source)
        state = ServiceState(settings, db_url, supervisor, pipeline.writer, pipeline.sink, reads)
        app = create_app(state)
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.run)
            async with app.test_app() as test_app:
                yield Harness(state, app, test_app.test_client())
            nursery.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def serve_api(
    db_url: str, tmp_path: Path, *, token: str | None = None, flush_ms: int = 20
) -> AsyncIterator[RunningService]:
    """`open_service` (no broker sources) bound to a free loopback port."""
    env = {
        "GREEKSD_DATABASE_URL": db_url,
        "GREEKSD_DATA_DIR": str(tmp_path),
        "GREEKSD_API_PORT": "0",
        "GREEKSD_FLUSH_MS": str(flush_ms),
    }
    if token:
        env["GREEKSD_API_TOKEN"] = token
    settings = load_settings(env, dotenv_path=tmp_path / "none.env")
    async with open_service(settings, []) as service:
        yield service


@contextlib.contextmanager
def served_in_thread(
    db_url: str,
    tmp_path: Path,
    *,
    token: str | None = None,
    prepare: Callable[[RunningService], Awaitable[None]] | None = None,
    timeout_s: float = 60.0,
) -> Iterator[str]:
    """`serve_api` in its own trio run on a thread, for synchronous clients; yields the
    base URL once `prepare` (e.g. seeding rows) is done, stops the service on exit."""
    ready = threading.Event()
    url: list[str] = []
    failure: list[BaseException] = []
    stop: list[Callable[[], None]] = []

    async def serve() -> None:
        async with serve_api(db_url, tmp_path, token=token) as service:
            if prepare is not None:
                await prepare(service)
            url.append(service.api_url)
            token_ = trio.lowlevel.current_trio_token()
            stop.append(lambda: token_.run_sync_soon(service.stop))
            ready.set()
            await trio.sleep_forever()

    def run() -> None:
        try:
            trio.run(serve)
        except BaseException as exc:  # reported to the test below
            failure.append(exc)
        finally:
            ready.set()

    thread = threading.Thread(target=run, name="greeksd-served", daemon=True)
    thread.start()
    try:
        assert ready.wait(timeout_s) and url, f"the service did not start: {failure}"
        yield url[0]
    finally:
        if stop:
            stop[0]()
        thread.join(timeout_s)
        assert not thread.is_alive(), "the service did not stop"
