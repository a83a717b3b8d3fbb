"""The settings file: named sources, precedence, one-line errors, secrets."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from greeksd.brokers.ibkr.spec import SPEC as IBKR
from greeksd.brokers.tastytrade.spec import SPEC as TASTYTRADE
from greeksd.cli import _only
from greeksd.config import Settings, load_settings
from greeksd.settings_show import show_settings
from greeksd.settings_table import ConfigError
from tests.test_service import _env, _greeksd

DESK = """
instance = "desk-1"
api_port = 8766
flush_ms = 40

[[sources]]
broker = "ibkr"
name = "alice"
url = "https://gw-alice:5000"

[[sources]]
broker = "ibkr"
name = "bob"
url = "https://gw-bob:5001"
max_lines = 300
verify_tls = true

[[sources]]
broker = "tastytrade"
name = "ira"
secret = "file-secret-1"
refresh = "file-refresh-1"
account = "5WT00002"
"""


def _load(tmp_path: Path, text: str, **env: str) -> Settings:
    config = tmp_path / "greeksd.toml"
    config.write_text(text)
    config.chmod(0o600)
    return load_settings(
        {"GREEKSD_CONFIG_FILE": str(config), **env}, dotenv_path=tmp_path / "none.env"
    )


def test_named_sources_come_from_the_file_with_their_own_settings(tmp_path: Path) -> None:
    settings = _load(tmp_path, DESK)
    assert (settings.instance, settings.api_port, settings.flush_ms) == ("desk-1", 8766, 40)
    sources = {s.name: s for s in settings.sources()}
    # the file has [[sources]] and GREEKSD_BROKERS is set nowhere: only the file's run
    assert list(sources) == ["ibkr:alice", "ibkr:bob", "tastytrade:ira"]
    alice, bob, ira = sources.values()
    assert (alice.spec, alice.settings.url, alice.settings.max_lines) == (
        IBKR,
        "https://gw-alice:5000",
        100,
    )
    assert (bob.settings.url, bob.settings.max_lines, bob.settings.verify_tls) == (
        "https://gw-bob:5001",
        300,
        True,
    )
    assert (ira.spec, ira.settings.account) == (TASTYTRADE, "5WT00002")
    assert {"file-secret-1", "file-refresh-1"} <= set(settings.secrets())


def test_the_environment_overrides_top_level_settings_and_default_sources(tmp_path: Path) -> None:
    text = DESK + '\n[[sources]]\nbroker = "ibkr"\nurl = "https://gw-default:5000"\nmax_lines = 7\n'
    settings = _load(
        tmp_path,
        text,
        GREEKSD_INSTANCE="desk-9",
        GREEKSD_IBKR_URL="https://from-env:5000",
        GREEKSD_FLUSH_MS="30",
    )
    assert (settings.instance, settings.flush_ms, settings.api_port) == ("desk-9", 30, 8766)
    names = [s.name for s in settings.sources()]
    assert names == ["ibkr", "ibkr:alice", "ibkr:bob", "tastytrade:ira"]
    default = settings.source("ibkr").settings
    assert (default.url, default.max_lines) == ("https://from-env:5000", 7)
    # a named source is not touched by the default source's variables
    assert settings.source("ibkr:alice").settings.url == "https://gw-alice:5000"
    # GREEKSD_BROKERS names the default sources that run, beside the named ones
    with_brokers = _load(tmp_path, DESK, GREEKSD_BROKERS="tastytrade")
    names = [s.name for s in with_brokers.sources()]
    assert names == ["tastytrade", "ibkr:alice", "ibkr:bob", "tastytrade:ira"]


def test_without_a_file_nothing_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no ./greeksd.toml here
    settings = load_settings({}, dotenv_path=tmp_path / "none.env")
    assert settings.config_file is None
    assert [s.name for s in settings.sources()] == ["ibkr", "tastytrade"]
    assert settings.instance == socket.gethostname()
    (tmp_path / "greeksd.toml").write_text('instance = "from-cwd"\n')
    assert load_settings({}, dotenv_path=tmp_path / "none.env").instance == "from-cwd"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[sources]]\nbroker = "etrade"\n', "[[sources]] #1: unknown broker 'etrade'; use ibkr"),
        ('[[sources]]\nname = "x"\n', "[[sources]] #1: needs broker = one of ibkr"),
        (
            '[[sources]]\nbroker = "ibkr"\nname = "a"\nurll = "x"\n',
            "[[sources]] #1 (ibkr:a): unknown setting 'urll'; known: url, ca_file",
        ),
        ('[[sources]]\nbroker = "ibkr"\nname = "Alice B"\n', "name='Alice B' must be 1-32"),
        (
            '[[sources]]\nbroker = "ibkr"\nname = "a"\n[[sources]]\nbroker = "ibkr"\nname = "a"\n',
            "[[sources]] #2: duplicate source name 'ibkr:a' (also #1)",
        ),
        (
            '[[sources]]\nbroker = "ibkr"\n[[sources]]\nbroker = "ibkr"\n',
            "duplicate source name 'ibkr' (also #1)",
        ),
        (
            '[[sources]]\nbroker = "ibkr"\nname = "a"\nmax_lines = 0\n',
            "(ibkr:a): invalid max_lines=0: must be a positive integer",
        ),
        ("flush_rows = -1\n", "invalid flush_rows=-1: must be a positive integer"),
        ("flush_row = 5\n", "unknown setting 'flush_row'"),
        ('config_file = "other.toml"\n', "unknown setting 'config_file'"),
        ('instance = "desk 1"\n', "invalid instance='desk 1': must be 1-253"),
        ("api_port = [1, 2]\n", "must be a string, number or boolean"),
        ("sources = 3\n", "sources must be an array of tables"),
        ("instance = \n", "not valid TOML"),
    ],
)
def test_a_bad_file_is_one_line_naming_file_entry_and_key(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, text)
    assert message in str(info.value) and str(tmp_path / "greeksd.toml") in str(info.value)
    assert "\n" not in str(info.value)


def test_a_secret_value_is_never_echoed_in_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        _load(
            tmp_path, '[[sources]]\nbroker = "tastytrade"\nname = "a"\nsecret = {a = "hunter22"}\n'
        )
    assert "secret=<redacted>" in str(info.value) and "hunter22" not in str(info.value)
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, 'database_url = "mysql://u:hunter22@h/db"\n')
    assert "database_url=<redacted>" in str(info.value) and "hunter22" not in str(info.value)


def test_a_missing_file_named_by_the_variable_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"GREEKSD_CONFIG_FILE=.*: no such file"):
        load_settings(
            {"GREEKSD_CONFIG_FILE": str(tmp_path / "nope.toml")}, dotenv_path=tmp_path / "none.env"
        )


def test_a_file_with_secrets_readable_by_others_is_a_warning(tmp_path: Path) -> None:
    assert _load(tmp_path, DESK).warnings == ()
    (tmp_path / "greeksd.toml").chmod(0o644)
    settings = load_settings(
        {"GREEKSD_CONFIG_FILE": str(tmp_path / "greeksd.toml")}, dotenv_path=tmp_path / "none.env"
    )
    assert len(settings.warnings) == 1 and "chmod 600" in settings.warnings[0]
    # no secret in it: nothing to warn about
    (tmp_path / "greeksd.toml").write_text('instance = "x"\n')
    assert (
        load_settings(
            {"GREEKSD_CONFIG_FILE": str(tmp_path / "greeksd.toml")},
            dotenv_path=tmp_path / "none.env",
        ).warnings
        == ()
    )


def test_config_shows_settings_and_sources_with_secrets_masked(tmp_path: Path) -> None:
    shown = show_settings(_load(tmp_path, DESK, GREEKSD_API_TOKEN="tok-123456"))
    assert "GREEKSD_INSTANCE = desk-1" in shown
    assert "GREEKSD_API_TOKEN = <redacted>" in shown
    assert 'name = "bob"' in shown and "url = 'https://gw-bob:5001'" in shown
    assert "secret = '<redacted>'" in shown
    for secret in ("tok-123456", "file-secret-1", "file-refresh-1"):
        assert secret not in shown


def test_brokers_option_selects_sources_by_name(tmp_path: Path) -> None:
    settings = _load(tmp_path, DESK)
    chosen = _only(settings, "ibkr:bob,tastytrade")
    assert [s.name for s in chosen.sources()] == ["tastytrade", "ibkr:bob"]
    with pytest.raises(ConfigError, match="'ibkr:carol' is not configured"):
        _only(settings, "ibkr:carol")


def test_commands_exit_2_on_a_bad_file_and_config_masks_secrets(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[sources]]\nbroker = "ibkr"\nname = "a"\nnope = 1\n')
    proc = _greeksd("config", env=_env(GREEKSD_CONFIG_FILE=str(bad)), cwd=tmp_path)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "unknown setting 'nope'" in err and err.count("\n") == 1
    good = tmp_path / "good.toml"
    good.write_text(DESK)
    good.chmod(0o600)
    proc = _greeksd("config", env=_env(GREEKSD_CONFIG_FILE=str(good)), cwd=tmp_path)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert 'name = "ira"' in out and "file-secret-1" not in out + err
    proc = _greeksd("probe", "ibkr:carol", env=_env(GREEKSD_CONFIG_FILE=str(good)), cwd=tmp_path)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "'ibkr:carol' is not configured" in err
