"""The architecture boundary: pure decision logic imports no SDK and no driver.

`lint-imports` checks the contracts in pyproject.toml ([tool.importlinter]). The second test
runs the same contract over a scratch tree whose risk package imports psycopg, to prove the
contract catches a violation (directly and through a shared module) and is not vacuous.
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


def contract_source_modules() -> set[str]:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    return {m for c in config["contracts"] for m in c.get("source_modules", [])}


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
