# greeksd tasks. Every recipe prepares .venv itself: a fresh clone needs only Python 3.11+ and just.
set shell := ["bash", "-euo", "pipefail", "-c"]

python := env_var_or_default("PYTHON", "python3")
bin := ".venv/bin"

# List recipes
default:
    @just --list

# Create or refresh .venv when pyproject.toml changed (idempotent, quiet when up to date)
setup:
    #!/usr/bin/env bash
    set -euo pipefail
    if [ ! -x {{bin}}/python ]; then
        {{python}} -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
            || { echo "greeksd needs Python 3.11+; set PYTHON=/path/to/python3.11" >&2; exit 1; }
        {{python}} -m venv .venv
    fi
    if [ ! -f .venv/.installed ] || [ pyproject.toml -nt .venv/.installed ]; then
        {{bin}}/python -m pip install --quiet --upgrade pip
        {{bin}}/python -m pip install --quiet -e '.[dev]'
        touch .venv/.installed
    fi

# Run the service against simulated brokers with an embedded PostgreSQL
demo *ARGS: setup
    {{bin}}/greeksd demo {{ARGS}}

# Run the test suite on 4 workers (real PostgreSQL: embedded, or GREEKSD_TEST_DATABASE_URL); `-n 0` runs it in one process
test *ARGS: setup
    {{bin}}/python -m pytest -m "not slow" -n 4 --dist worksteal {{ARGS}}

# The ten-minute soak (200 contracts, 50 ticks/s per broker); report in artifacts/
soak *ARGS: setup
    {{bin}}/python -m pytest -m slow -s tests/test_soak.py -k ten_minutes {{ARGS}}

# Replay a recorded fixture into the database
replay FIXTURE="tests/fixtures/mixed-session.jsonl.gz" *ARGS: setup
    {{bin}}/greeksd replay {{FIXTURE}} {{ARGS}}

# Regenerate the mixed IBKR + Tastytrade fixture from the simulators (about 30 s)
fixtures *ARGS: setup
    {{bin}}/python -m greeksd.fixtures --out tests/fixtures/mixed-session.jsonl.gz --duration 30 {{ARGS}}

# Run the foreground service (reads GREEKSD_* from the environment / .env)
run *ARGS: setup
    {{bin}}/greeksd run {{ARGS}}

# Benchmarks: print tables, write JSON
bench *ARGS: setup
    {{bin}}/greeksd bench {{ARGS}}

# Lint and type-check
lint: setup
    {{bin}}/ruff check greeksd tests
    {{bin}}/ruff format --check greeksd tests
    {{bin}}/mypy greeksd tests
