"""Settings: defaults, validation messages, .env handling."""

from __future__ import annotations

from pathlib import Path

import pytest

from greeksd.config import SETTINGS, ConfigError, load_settings


def test_defaults_match_the_documented_ones(tmp_path: Path) -> None:
    settings = load_settings({}, dotenv_path=tmp_path / "none.env")
    assert settings.database_url is None
    assert (settings.api_host, settings.api_port) == ("127.0.0.1", 8765)
    assert (settings.flush_rows, settings.flush_ms) == (1000, 25)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for setting in SETTINGS:
        assert f"GREEKSD_{setting.name}" in readme, f"README does not list GREEKSD_{setting.name}"


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
    ],
)
def test_bad_value_names_the_variable(
    variable: str, value: str, message: str, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({variable: value}, dotenv_path=tmp_path / "none.env")
    assert variable in str(info.value) and message in str(info.value)


def test_secret_values_are_not_echoed_in_errors(tmp_path: Path) -> None:
    from greeksd.config import Setting

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
