"""The architecture boundaries: pure decision logic imports no SDK and no driver, and the layers'
arrows point down (cli > demo > loops > runtime > adapters > domain > common).

`lint-imports` checks the contracts in pyproject.toml ([tool.importlinter]). The scratch-tree
tests run the same contracts over a tree with one bad import each (risk importing psycopg,
common importing an adapter, one loop importing another...), to prove the contracts catch a
violation (directly and through a shared module) and are not vacuous.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    if not LINT_IMPORTS.exists():
        pytest.fail(f"{LINT_IMPORTS} not found: install the test extras (import-linter)")
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "pyproject.toml"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _contracts() -> list[dict]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def layer_modules() -> list[str]:
    """Every module a `layers` contract names, top layer first."""
    return [
        m.strip()
        for c in _contracts() if c["type"] == "layers"
        for layer in c["layers"]
        for m in layer.replace("|", ":").split(":")
    ]


def contract_source_modules() -> set[str]:
    return {m for c in _contracts() for m in c.get("source_modules", [])} | set(layer_modules())


def test_every_module_a_contract_names_exists():
    """lint-imports refuses a contract over a missing module; say which one, plainly."""
    named = contract_source_modules()
    assert named, "no contract names a source module"
    missing = sorted(
        m for m in named
        if not (REPO / m.replace(".", "/")).with_suffix(".py").exists()
        and not (REPO / m.replace(".", "/") / "__init__.py").exists()
    )
    assert missing == []


def test_pyproject_import_contracts_hold():
    proc = lint_imports(REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout


def test_every_module_of_the_product_is_in_a_layer():
    """A new module outside every layer would escape the layers contract: name its layer in pyproject.toml."""
    layered = layer_modules()
    assert layered, "no layers contract"
    modules = []
    for path in (REPO / "services").rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        modules.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    # A package that only holds layered modules (services, services.dispatcher...) is no layer's.
    holders = {m.rsplit(".", i)[0] for m in layered for i in range(1, m.count(".") + 1)}
    outside = sorted(
        m for m in modules
        if m not in holders and not any(m == l or m.startswith(l + ".") for l in layered)
    )
    assert outside == []


def _scratch_tree(root: Path, files: dict[str, str]) -> None:
    """A `services` package holding, as empty packages, every module the contracts name."""
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    paths = [Path(*m.split(".")) / "__init__.py" for m in contract_source_modules()]
    paths += [Path(rel) for rel in files]
    for rel in paths:
        for parent in reversed(rel.parents[:-1]):
            init = root / parent / "__init__.py"
            init.parent.mkdir(parents=True, exist_ok=True)
            init.touch()
        (root / rel).touch()
    for rel, text in files.items():
        (root / rel).write_text(text)


def test_scratch_tree_without_violations_passes(tmp_path):
    _scratch_tree(tmp_path, {})
    proc = lint_imports(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize(
    "files, offender",
    [
        pytest.param({"services/dispatcher/risk/gates.py": "import psycopg\n"}, "psycopg", id="risk-imports-psycopg"),
        pytest.param(
            {"services/signal_engine/rules/__init__.py": "from alpaca.trading.client import TradingClient\n"},
            "alpaca", id="rules-imports-alpaca",
        ),
        pytest.param({"services/watchlist_engine/scoring/__init__.py": "import boto3\n"}, "boto3", id="scoring-imports-boto3"),
        pytest.param(
            {
                "services/common/db.py": "import psycopg\n",
                "services/dispatcher/risk/gates.py": "from services.common import db\n",
            },
            "psycopg",
            id="risk-imports-psycopg-through-a-shared-module",
        ),
    ],
)
def test_contract_catches_a_forbidden_import(tmp_path, files, offender):
    _scratch_tree(tmp_path, files)
    proc = lint_imports(tmp_path)
    assert proc.returncode != 0, proc.stdout
    assert "BROKEN" in proc.stdout
    assert offender in proc.stdout


@pytest.mark.parametrize(
    "files, offender",
    [
        pytest.param({"services/common/numbers.py": "import services.adapters.sim\n"}, "services.adapters",
                     id="common-imports-an-adapter"),
        pytest.param({"services/dispatcher/risk/gates.py": "import services.dispatcher.main\n"}, "services.dispatcher.main",
                     id="domain-imports-the-dispatcher-loop"),
        pytest.param({"services/signal_engine/main/__init__.py": "import services.watchlist_engine.main\n"},
                     "services.watchlist_engine.main", id="one-loop-imports-another"),
        pytest.param({"services/adapters/sim/__init__.py": "import services.cli\n"}, "services.cli",
                     id="adapter-imports-the-cli"),
        pytest.param(
            {
                "services/domain/relay.py": "import services.runtime\n",
                "services/domain/__init__.py": "from services.domain import relay\n",
            },
            "services.runtime",
            id="domain-imports-the-runtime-through-a-module-of-its-own",
        ),
    ],
)
def test_layers_contract_catches_an_upward_import(tmp_path, files, offender):
    _scratch_tree(tmp_path, files)
    proc = lint_imports(tmp_path)
    assert proc.returncode != 0, proc.stdout
    assert "Layers:" in proc.stdout and "BROKEN" in proc.stdout
    assert offender in proc.stdout
