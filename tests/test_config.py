"""Settings: defaults, validation messages, .env handling."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, fields
from pathlib import Path

import pytest

from greeksd.brokers import registry
from greeksd.brokers.ibkr.spec import SPEC as IBKR
from greeksd.brokers.tastytrade.spec import SPEC as TASTYTRADE
from greeksd.config import SETTINGS, Settings, all_settings, load_settings
from greeksd.settings_table import NOT_A_ROW, ConfigError, Setting, setting, settings_table
from tests.test_service import _env, _greeksd


def test_defaults_match_the_documented_ones(tmp_path: Path) -> None:
    settings = load_settings({}, dotenv_path=tmp_path / "none.env")
    assert settings.database_url is None
    assert (settings.api_host, settings.api_port) == ("127.0.0.1", 8765)
    assert (settings.flush_rows, settings.flush_ms) == (1000, 25)
    assert settings.brokers == ("ibkr", "tastytrade")
    assert settings.stale_s == 120.0
    ibkr = settings.broker(IBKR)
    assert (ibkr.url, ibkr.ca_file, ibkr.verify_tls) == ("https://localhost:5000", None, False)
    assert (ibkr.heartbeat_s, ibkr.positions_refresh_s, ibkr.max_lines) == (60.0, 60.0, 100)
    tasty = settings.broker(TASTYTRADE)
    assert (tasty.secret, tasty.refresh, tasty.account, tasty.api_url) == (None,) * 4
    assert tasty.positions_refresh_s == 60.0
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for row in all_settings():
        assert f"`GREEKSD_{row.name}`" in readme, f"README does not list GREEKSD_{row.name}"


def test_every_broker_reads_its_own_variables(tmp_path: Path) -> None:
    """Each broker's settings come from its own GREEKSD_<prefix>* variables, by the names
    they always had."""
    settings = load_settings(
        {
            "GREEKSD_IBKR_URL": "https://gw:5001",
            "GREEKSD_IBKR_CA_FILE": "~/ca.pem",
            "GREEKSD_IBKR_VERIFY_TLS": "yes",
            "GREEKSD_IBKR_HEARTBEAT_S": "5",
            "GREEKSD_IBKR_POSITIONS_REFRESH_S": "7.5",
            "GREEKSD_IBKR_MAX_LINES": "40",
            "GREEKSD_TT_SECRET": "tt-secret-1",
            "GREEKSD_TT_REFRESH": "tt-refresh-1",
            "GREEKSD_TT_ACCOUNT": "5WT00001",
            "GREEKSD_TT_API_URL": "http://127.0.0.1:9",
            "GREEKSD_TT_POSITIONS_REFRESH_S": "30",
        },
        dotenv_path=tmp_path / "none.env",
    )
    ibkr = settings.broker(IBKR)
    assert (ibkr.url, ibkr.ca_file, ibkr.verify_tls) == (
        "https://gw:5001",
        Path("~/ca.pem").expanduser(),
        True,
    )
    assert (ibkr.heartbeat_s, ibkr.positions_refresh_s, ibkr.max_lines) == (5.0, 7.5, 40)
    tasty = settings.broker(TASTYTRADE)
    assert (tasty.secret, tasty.refresh, tasty.account, tasty.api_url) == (
        "tt-secret-1",
        "tt-refresh-1",
        "5WT00001",
        "http://127.0.0.1:9",
    )
    assert tasty.positions_refresh_s == 30.0
    assert set(settings.secrets()) == {"tt-secret-1", "tt-refresh-1"}


def test_a_setting_cannot_exist_in_the_table_and_not_in_settings() -> None:
    """The tables are read off the dataclasses' fields: same names, same order, and a
    field declared without its table row stops the import instead of going unlisted."""
    assert [s.name for s in SETTINGS] == [
        f.name.upper() for f in fields(Settings) if NOT_A_ROW not in f.metadata
    ]
    assert [s.name for s in all_settings()] == [s.name for s in SETTINGS] + [
        (spec.prefix + f.name).upper() for spec in registry.specs() for f in fields(spec.settings)
    ]

    @dataclass(frozen=True)
    class HalfDeclared:
        flush_rows: int = setting("1", int, "listed")
        forgotten: int = 0

    with pytest.raises(TypeError, match=r"HalfDeclared\.forgotten has no settings-table row"):
        settings_table(HalfDeclared)


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("GREEKSD_FLUSH_ROWS", "0", "positive integer"),
        ("GREEKSD_FLUSH_ROWS", "ten", "positive integer"),
        ("GREEKSD_FLUSH_MS", "-5", "positive integer"),
        ("GREEKSD_API_PORT", "70000", "TCP port"),
        ("GREEKSD_LOG_LEVEL", "LOUD", "DEBUG, INFO"),
        ("GREEKSD_BROKERS", "ibkr,etrade", "etrade"),
        ("GREEKSD_IBKR_VERIFY_TLS", "maybe", "1/0"),
        ("GREEKSD_IBKR_HEARTBEAT_S", "nan", "positive number"),
        ("GREEKSD_STALE_S", "-1", "zero or a positive number"),
    ],
)
def test_bad_value_names_the_variable(
    variable: str, value: str, message: str, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({variable: value}, dotenv_path=tmp_path / "none.env")
    assert variable in str(info.value) and message in str(info.value)


def test_secret_values_are_not_echoed_in_errors(tmp_path: Path) -> None:
    assert any(s.secret for s in SETTINGS if isinstance(s, Setting))
    settings = load_settings(
        {"GREEKSD_DATABASE_URL": "postgresql://u:hunter22@db/x", "GREEKSD_API_TOKEN": "tok-123456"},
        dotenv_path=tmp_path / "none.env",
    )
    assert set(settings.secrets()) == {"hunter22", "tok-123456"}


def test_environment_wins_over_dotenv(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text("GREEKSD_FLUSH_ROWS=7\nGREEKSD_FLUSH_MS=250\n")
    settings = load_settings({"GREEKSD_FLUSH_ROWS": "9"}, dotenv_path=dotenv)
    assert (settings.flush_rows, settings.flush_ms) == (9, 250)


BAD_DATABASE_URLS = ["postgresql+psycopg://u:S3cretPW@h/db", "mysql://u:S3cretPW@h/db"]


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("postgresql+psycopg://u:S3cretPW@h/db", "scheme 'postgresql+psycopg' is not supported"),
        ("mysql://u:S3cretPW@h/db", "scheme 'mysql' is not supported"),
        ("Postgresql://u:S3cretPW@h/db", "scheme 'Postgresql' is not supported"),
        ("host=h password=S3cretPW junk", 'missing "=" after "…"'),
        ("host=h password=S3cretPW=x junk", "not a PostgreSQL URL"),
        ("postgresql://u:S3cretPW@[::1/db", "IPv6 host address"),
        ("postgresql://u:S3cretPW%zz@h/db", "invalid percent-encoded token"),
        ("host=h password='S3cretPW", "unterminated quoted string"),
        ("h.example.com", "not a PostgreSQL URL or key=value"),
    ],
)
def test_unusable_database_url_names_the_problem_without_the_password(
    url: str, why: str, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({"GREEKSD_DATABASE_URL": url}, dotenv_path=tmp_path / "none.env")
    message = str(info.value)
    assert message.startswith("invalid GREEKSD_DATABASE_URL=<redacted>: ")
    assert why in message and "postgresql://user:password@host:port/dbname" in message
    assert "S3cretPW" not in message


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:S3cretPW@db.example.com:5433/greeks?sslmode=require",
        "postgres://u:S3cretPW@db/x",
        "host=db port=5433 dbname=greeks user=u password=S3cretPW",
        "postgresql:///greeks?host=/var/run/postgresql",
    ],
)
def test_libpq_urls_and_key_value_strings_are_accepted_and_their_password_is_secret(
    url: str, tmp_path: Path
) -> None:
    settings = load_settings({"GREEKSD_DATABASE_URL": url}, dotenv_path=tmp_path / "none.env")
    assert settings.database_url == url
    if "S3cretPW" in url:
        assert "S3cretPW" in settings.secrets()


def _assert_one_clean_line(proc: subprocess.Popen[str], prefix: str, why: str) -> None:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err
    assert "S3cretPW" not in out + err
    assert "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith(f"greeksd: invalid {prefix}=<redacted>: "), err
    assert why in err


@pytest.mark.parametrize("url", BAD_DATABASE_URLS)
@pytest.mark.parametrize("command", [["run"], ["db", "status"], ["replay", "none.jsonl"]])
def test_every_command_refuses_a_bad_database_url_in_one_line(
    url: str, command: list[str], tmp_path: Path
) -> None:
    proc = _greeksd(*command, env=_env(GREEKSD_DATABASE_URL=url), cwd=tmp_path)
    scheme = url.split("://")[0]
    _assert_one_clean_line(proc, "GREEKSD_DATABASE_URL", f"scheme {scheme!r} is not supported")


@pytest.mark.parametrize("command", [["replay", "none.jsonl"], ["bench", "--quick"]])
def test_database_url_option_gets_the_same_check(command: list[str], tmp_path: Path) -> None:
    url = "mysql://u:S3cretPW@h/db"
    proc = _greeksd(*command, "--database-url", url, env=_env(), cwd=tmp_path)
    _assert_one_clean_line(proc, "--database-url", "scheme 'mysql' is not supported")
