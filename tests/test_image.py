"""The container image: the Dockerfile's instructions are well formed, and the
image and the Kubernetes manifests agree (user, port, command, health check).

No container engine runs here, so the image itself is not built: these checks
parse the Dockerfile the way an engine would read its instructions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "kubernetes"
KNOWN = {
    "FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME",
    "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL",
}


@pytest.fixture(scope="module")
def instructions() -> list[dict[str, Any]]:
    parser = DockerfileParser(path=str(ROOT / "Dockerfile"))
    found = [i for i in parser.structure if i["instruction"] != "COMMENT"]
    return found


def _last(instructions: list[dict[str, Any]], name: str) -> str:
    values = [i["value"] for i in instructions if i["instruction"] == name]
    assert values, f"the Dockerfile has no {name}"
    return str(values[-1])


def _deployment_container(name: str) -> dict[str, Any]:
    doc = yaml.safe_load((DEPLOY / "deployment.yaml").read_text())
    pod = doc["spec"]["template"]["spec"]
    for container in pod["containers"] + pod.get("initContainers", []):
        if container["name"] == name:
            return dict(container)
    raise AssertionError(f"no container {name}")


def test_every_instruction_is_known(instructions: list[dict[str, Any]]) -> None:
    assert instructions
    for instruction in instructions:
        assert instruction["instruction"] in KNOWN, instruction
    json_forms = [i for i in instructions if i["value"].lstrip().startswith("[")]
    for instruction in json_forms:  # exec form must be a JSON array of strings
        value = json.loads(instruction["value"])
        assert isinstance(value, list) and all(isinstance(v, str) for v in value)


def test_multi_stage_from_a_slim_python(instructions: list[dict[str, Any]]) -> None:
    stages = [i["value"] for i in instructions if i["instruction"] == "FROM"]
    assert len(stages) >= 2
    assert all("python:3.11-slim" in stage for stage in stages)
    copies = [i["value"] for i in instructions if i["instruction"] == "COPY"]
    assert any(c.startswith("--from=build ") for c in copies)


def test_production_image_installs_no_extras(instructions: list[dict[str, Any]]) -> None:
    runs = " ".join(i["value"] for i in instructions if i["instruction"] == "RUN")
    assert "pip install" in runs
    for extra in ("[embedded]", "[test]", "[dev]"):
        assert extra not in runs


def test_image_user_matches_the_pod_security_context(
    instructions: list[dict[str, Any]],
) -> None:
    user = _last(instructions, "USER")
    uid, _, gid = user.partition(":")
    doc = yaml.safe_load((DEPLOY / "deployment.yaml").read_text())
    security = doc["spec"]["template"]["spec"]["securityContext"]
    assert int(uid) == security["runAsUser"] == 10001
    assert int(gid) == security["runAsGroup"]
    assert security["runAsNonRoot"] is True


def test_image_port_matches_the_container_port(instructions: list[dict[str, Any]]) -> None:
    exposed = {int(p.split("/")[0]) for p in _last(instructions, "EXPOSE").split()}
    ports = {p["containerPort"] for p in _deployment_container("worker")["ports"]}
    assert exposed == ports == {8080}
    env = _last(instructions, "ENV")
    assert "ABSENCE_SYNC_HTTP_PORT=8080" in env


def test_entrypoint_and_command_match_the_manifests(instructions: list[dict[str, Any]]) -> None:
    entrypoint = json.loads(_last(instructions, "ENTRYPOINT"))
    command = json.loads(_last(instructions, "CMD"))
    worker = _deployment_container("worker")
    assert worker["command"] == entrypoint == ["absence-sync"]
    assert worker["args"] == command == ["run"]
    migrate = _deployment_container("migrate")
    assert migrate["command"] == entrypoint and migrate["args"] == ["migrate"]


def test_health_check_probes_healthz(instructions: list[dict[str, Any]]) -> None:
    check = _last(instructions, "HEALTHCHECK")
    assert "/healthz" in check and "8080" in check
    probe = _deployment_container("worker")["livenessProbe"]["httpGet"]
    assert probe["path"] == "/healthz"


def test_manifests_deploy_the_image_the_readme_builds() -> None:
    readme = (ROOT / "README.md").read_text()
    build = "docker build -t registry.example.com/absence-sync:0.1.0 ."
    assert build in readme
    assert build in (ROOT / "Dockerfile").read_text()
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    (image,) = kustomization["images"]
    assert f"{image['newName']}:{image['newTag']}" == "registry.example.com/absence-sync:0.1.0"
    for manifest in ("deployment.yaml", "migrate-job.yaml"):
        assert "image: registry.example.com/absence-sync:0.1.0" in (DEPLOY / manifest).read_text()


def test_build_context_holds_what_the_build_copies() -> None:
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert "*" in ignore
    for needed in ("!pyproject.toml", "!README.md", "!consumer/"):
        assert needed in ignore
    assert (ROOT / "consumer" / "schemas" / "absence-event.v1.json").is_file()
