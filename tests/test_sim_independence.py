"""The simulators speak the brokers' protocols with their own code, never greeksd's clients.

A simulator built on the client's parser accepts whatever the client sends by
construction, so it can never catch the client misreading the protocol. The rule, kept
simple on purpose: a module under greeksd/sim may import, from greeksd, only
`greeksd.model`, `greeksd.logs` (with the `greeksd.redact` it uses) and other
`greeksd.sim` modules. Everything else in
greeksd is client-side (greeksd.brokers, replay and recording, which decode with the
clients' parsers, the pipeline...). Code that *runs* the clients against the simulators,
like the fixture generator (greeksd/fixtures.py), lives outside greeksd/sim.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import greeksd.sim

SIM_DIR = Path(greeksd.sim.__file__).parent
ALLOWED = ("greeksd.model", "greeksd.logs", "greeksd.redact", "greeksd.sim")  # redact: logs


def _allowed(module: str) -> bool:
    if module != "greeksd" and not module.startswith("greeksd."):
        return True  # the standard library and third-party packages
    return any(module == a or module.startswith(a + ".") for a in ALLOWED)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) for every import in the file, relative ones resolved, and
    every `importlib.import_module("...")` / `__import__("...")` with a literal name."""
    package = "greeksd.sim"
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            # `from greeksd import brokers` imports greeksd.brokers
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
        elif (
            isinstance(node, ast.Call)
            and (
                (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                or (isinstance(node.func, ast.Name) and node.func.id == "__import__")
            )
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value))
    return found


def test_no_simulator_module_imports_client_code() -> None:
    modules = sorted(SIM_DIR.glob("*.py"))
    assert len(modules) >= 8, modules  # the glob really found the simulators
    offenders = [
        f"{path.name}:{line}: {module}"
        for path in modules
        for line, module in _imports(path)
        if not _allowed(module)
    ]
    assert offenders == [], "greeksd/sim must not import client code:\n" + "\n".join(offenders)


def test_the_rule_sees_every_spelling_of_a_client_import(tmp_path: Path) -> None:
    spellings = [
        "from greeksd.brokers.tastytrade import protocol as dx",
        "import greeksd.brokers.ibkr.protocol",
        "from greeksd import brokers",
        "from ..brokers.ibkr import protocol",
        "from greeksd.replay import replay_fixture",
        "importlib.import_module('greeksd.brokers.ibkr.protocol')",
    ]
    for text in spellings:
        module = tmp_path / "probe.py"
        module.write_text(text + "\n")
        assert [m for _, m in _imports(module) if not _allowed(m)], text
    fine = tmp_path / "fine.py"
    fine.write_text("from greeksd.model import ContractKey\nfrom . import market\nimport orjson\n")
    assert [m for _, m in _imports(fine) if not _allowed(m)] == []


def test_importing_every_simulator_loads_no_client_module() -> None:
    """The same rule at run time, so an indirect import through an allowed module
    (greeksd.model or greeksd.logs growing an import) is caught too."""
    names = [f"greeksd.sim.{p.stem}" for p in sorted(SIM_DIR.glob("*.py")) if p.stem != "__init__"]
    script = (
        "import importlib, json, sys\n"
        f"for name in {names!r}: importlib.import_module(name)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('greeksd.'))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], check=True, capture_output=True, text=True
    ).stdout
    loaded = json.loads(out)
    assert [m for m in loaded if not _allowed(m)] == []
    assert "greeksd.sim.dxlink_server" in loaded and "greeksd.sim.ibkr_gateway" in loaded
