"""Schemathesis against the running service: every operation of the served OpenAPI
document, fed generated valid (positive) and schema-violating (negative) requests over a
real socket with a real PostgreSQL behind it. Any 5xx fails, as does a response that
contradicts the document (status, content type, body schema, headers). Replaces the
hand-written property test: the document itself drives generation, so a new route or
parameter is tested without touching this file.

Bounded and deterministic: a fixed number of examples per operation and mode,
derandomized, no example database."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Err, Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from greeksd.model import Broker, Trade
from greeksd.service import RunningService
from tests.api_harness import served_in_thread
from tests.factories import BASE_TIME, make_snapshot

TOKEN = "schemathesis-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
EXAMPLES = 25
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


async def _seed(service: RunningService) -> None:
    """Rows for every read route to render, a trade for /v1/trades."""
    for i in range(50):
        service.state.sink.put(make_snapshot(i))
    service.state.sink.put_trade(
        Trade(
            broker=Broker.IBKR,
            broker_trade_id="T1",
            account_id="U1234567",
            contract_key="AAPL 2026-12-18 C 190",
            symbol="AAPL",
            side="buy",
            quantity=Decimal(2),
            price=Decimal("5.3"),
            executed_at=BASE_TIME,
        )
    )
    await service.state.writer.wait_settled(50)


def test_every_operation_holds_to_the_served_document(db_url: str, tmp_path: Path) -> None:
    with (
        served_in_thread(db_url, tmp_path, token=TOKEN, prepare=_seed) as base_url,
        requests.Session() as session,
    ):
        schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
        results = list(schema.get_all_operations())
        assert not [result.err() for result in results if isinstance(result, Err)]
        operations = [result.ok() for result in results if isinstance(result, Ok)]
        assert len(operations) >= 14
        for operation in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

                @settings(
                    max_examples=EXAMPLES,
                    derandomize=True,
                    database=None,
                    deadline=None,
                    suppress_health_check=list(HealthCheck),
                )
                @given(case=operation.as_strategy(generation_mode=mode))
                def check(case: schemathesis.Case) -> None:
                    case.call_and_validate(
                        base_url=base_url, session=session, headers=AUTH, checks=CHECKS
                    )

                try:
                    check()
                except Unsatisfiable:
                    # Nothing to violate (a route without parameters or body).
                    assert mode is GenerationMode.NEGATIVE, operation.label
