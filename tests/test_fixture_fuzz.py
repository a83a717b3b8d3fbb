"""The fixture reader and replay never crash on damaged input: bad lines are counted,
logged and skipped; bad frames inside good lines are the protocol parsers' business and
are counted as malformed. Property-tested with hypothesis."""

from __future__ import annotations

import gzip
from pathlib import Path

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from greeksd.recording import read_fixture
from greeksd.replay import replay_fixture
from tests.helpers import count_rows

FIXTURE = Path(__file__).parent / "fixtures" / "mixed-session.jsonl.gz"
HEADER = gzip.decompress(FIXTURE.read_bytes()).decode().splitlines(keepends=True)[0]
GOOD = gzip.decompress(FIXTURE.read_bytes()).decode().splitlines(keepends=True)[1:300]

_junk_line = st.one_of(
    st.text(max_size=80).map(lambda t: t.replace("\n", " ").replace("\r", " ")),
    st.builds(
        lambda d: orjson.dumps(d).decode(),
        st.dictionaries(
            st.sampled_from(["t", "b", "k", "d", "bin", "x"]),
            st.one_of(st.text(max_size=20), st.integers(-(2**63), 2**63 - 1), st.none()),
            max_size=5,
        ),
    ),
    st.builds(
        lambda b, d: orjson.dumps(
            {"t": "2026-11-25T15:30:00+00:00", "b": b, "k": "frame", "d": d}
        ).decode(),
        st.sampled_from(["ibkr", "tastytrade", "etrade"]),
        st.text(max_size=60),
    ),
)


@settings(max_examples=200, deadline=None)
@given(lines=st.lists(st.one_of(st.sampled_from(GOOD), _junk_line), max_size=30))
def test_reader_never_raises_and_counts_what_it_skips(lines: list[str]) -> None:
    path = Path("/tmp") / f"greeksd-fuzz-{abs(hash(tuple(lines)))}.jsonl"
    path.write_text(
        HEADER + "".join(line if line.endswith("\n") else line + "\n" for line in lines)
    )
    try:
        _, records = read_fixture(path)
        read = list(records)
    finally:
        path.unlink()
    non_blank = [line for line in lines if line.strip()]
    assert len(read) + records.rejected == len(non_blank)


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(junk=st.lists(_junk_line, min_size=1, max_size=20))
async def test_replay_of_damaged_fixture_keeps_every_good_row(
    db_url: str, other_db_url: str, tmp_path: Path, junk: list[str]
) -> None:
    clean = tmp_path / "clean.jsonl"
    clean.write_text(HEADER + "".join(GOOD))
    damaged = tmp_path / "damaged.jsonl"
    damaged.write_text(HEADER + "".join([*GOOD[:150], *(j + "\n" for j in junk), *GOOD[150:]]))
    await replay_fixture(other_db_url, clean)
    stats = await replay_fixture(db_url, damaged)
    assert stats.frames >= len([g for g in GOOD if '"k":"frame"' in g])
    assert count_rows(db_url) == count_rows(other_db_url) > 0, "junk cost no good row"
