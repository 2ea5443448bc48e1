"""The image, the example ECS task definition and the README's variable table agree with the code."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from services.adapters.alpaca.settings import AlpacaSettings
from services.cli import build_parser
from services.common.settings import Settings
from services.cli.config_errors import env_name

REPO = Path(__file__).resolve().parents[1]
TASK_DEFINITION = REPO / "deploy" / "ecs-task-definition.json"
_ENV_LITERAL = re.compile(r'"((?:OPS|ALPACA|AWS|DATABASE|ACCOUNT|LOG)_[A-Z0-9_]*[A-Z0-9])"')


def env_names_the_code_reads() -> set[str]:
    """Settings fields by their variable, and every variable-like string literal in services/."""
    names: set[str] = set()
    for model in (Settings, AlpacaSettings):
        for field in model.model_fields:
            names.update(env_name(model, field).split(" or "))
    for path in (REPO / "services").rglob("*.py"):
        names.update(_ENV_LITERAL.findall(path.read_text()))
    return names


def subcommands() -> set[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return set(action.choices)


# --- the task definition ----------------------------------------------------------------------------


def test_each_container_runs_a_real_subcommand_with_variables_the_code_reads_and_a_healthz_check():
    doc = json.loads(TASK_DEFINITION.read_text())
    known, commands = env_names_the_code_reads(), subcommands()
    containers = doc["containerDefinitions"]

    assert {c["name"] for c in containers} == {"dispatcher", "signal-engine", "feature-computer",
                                               "watchlist-engine", "telemetry", "position-manager", "news", "watchdog"}
    ports = []
    for c in containers:
        assert c["command"][0] in commands, c["name"]
        env = {e["name"]: e["value"] for e in c["environment"]}
        secrets = {s["name"]: s["valueFrom"] for s in c["secrets"]}
        assert set(env) | set(secrets) <= known, (c["name"], (set(env) | set(secrets)) - known)
        assert not set(env) & set(secrets)
        # Secrets come from Secrets Manager or SSM, never as plain values.
        assert "DATABASE_URL" in secrets and not {"ALPACA_API_KEY", "ALPACA_SECRET_KEY"} & set(env)
        assert all(v.startswith(("arn:aws:secretsmanager:", "arn:aws:ssm:")) for v in secrets.values())
        port = env["OPS_METRICS_PORT"]
        ports.append(port)
        assert f"127.0.0.1:{port}/healthz" in " ".join(c["healthCheck"]["command"])
        assert [m["containerPort"] for m in c["portMappings"]] == [int(port)]
    assert len(set(ports)) == len(ports)  # one network namespace per awsvpc task


def test_the_readme_lists_every_variable_the_code_reads():
    readme = (REPO / "README.md").read_text()
    missing = sorted(name for name in env_names_the_code_reads() if f"`{name}`" not in readme)
    assert missing == []


# --- the image ----------------------------------------------------------------------------------------


def _container_engine() -> tuple[str | None, str]:
    for engine in ("docker", "podman"):
        if shutil.which(engine) is None:
            continue
        probe = subprocess.run([engine, "info"], capture_output=True, text=True, timeout=30)
        if probe.returncode == 0:
            return engine, ""
        return None, f"{engine} is installed but not usable: {(probe.stderr or probe.stdout).strip()[:200]}"
    return None, "no container engine (docker or podman) on this machine"


def test_the_dockerfile_runs_any_service_through_the_cli_and_checks_healthz():
    text = (REPO / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["ops-pipeline"]' in text
    assert 'CMD ["dispatcher"]' in text
    assert re.search(r"HEALTHCHECK .*\n.*/healthz", text)


@pytest.mark.slow
def test_the_image_builds_and_a_service_answers_healthz():
    engine, reason = _container_engine()
    if engine is None:
        pytest.skip(reason)
    tag = f"ops-pipeline-test:{uuid.uuid4().hex[:8]}"
    subprocess.run([engine, "build", "-t", tag, str(REPO)], check=True, timeout=1200)
    name = f"ops-test-{uuid.uuid4().hex[:8]}"
    try:
        subprocess.run([engine, "run", "-d", "--name", name, "-p", "127.0.0.1::9108", tag, "feature-computer"],
                       check=True, timeout=60)
        port = subprocess.run([engine, "port", name, "9108"], capture_output=True, text=True,
                              check=True).stdout.strip().rsplit(":", 1)[-1]
        import urllib.request

        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                    assert r.status == 200
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
    finally:
        subprocess.run([engine, "rm", "-f", name], capture_output=True, timeout=60)
        subprocess.run([engine, "rmi", "-f", tag], capture_output=True, timeout=60)
