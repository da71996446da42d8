"""The compose file and the Kubernetes manifests: they parse and have what deploy/README.md says.

No Docker engine or cluster is needed: these read the files. PyYAML is a test dependency
for them; without it they are skipped.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pytest

from mailworker.backoff import parse_duration
from mailworker.celery_app import celery_config
from mailworker.config import Settings, load_settings

from ._files import DEPLOY, K8S, ROOT, by_kind, interpolate

yaml = pytest.importorskip("yaml", reason="PyYAML is not installed (pip install pyyaml)")

WORKER_LABELS = {"app.kubernetes.io/name": "mailworker", "app.kubernetes.io/component": "worker"}


def load_all(path: Path) -> list[Any]:
    with path.open() as fh:
        return [doc for doc in yaml.safe_load_all(fh) if doc is not None]


def one(path: Path, kind: str) -> dict[str, Any]:
    docs = by_kind(load_all(path))
    assert list(docs) == [kind] and len(docs[kind]) == 1, f"{path.name}: {list(docs)}"
    return docs[kind][0]


def effective_time_limit(settings: Settings) -> int:
    return int(celery_config(settings)["task_time_limit"])


@pytest.mark.parametrize("path", sorted(
    p.relative_to(ROOT).as_posix() for p in DEPLOY.rglob("*") if p.suffix in (".yml", ".yaml")))
def test_every_yaml_file_parses(path: str) -> None:
    assert load_all(ROOT / path), f"{path} is empty"


# --- docker compose ----------------------------------------------------------------------

def compose() -> dict[str, Any]:
    doc = load_all(DEPLOY / "docker-compose.yml")
    assert len(doc) == 1
    return dict(doc[0])


def test_compose_services() -> None:
    services = compose()["services"]
    assert set(services) == {"redis", "worker", "scheduler", "smtp-sink"}
    worker, scheduler = services["worker"], services["scheduler"]
    assert worker["command"] == ["worker", "--no-scheduler", "-Q", "transactional,bulk"]
    assert worker["deploy"]["replicas"] == 2
    assert scheduler["command"] == ["scheduler"]
    for svc in (worker, scheduler):
        assert svc["build"]["dockerfile"] == "deploy/Dockerfile"
        assert (DEPLOY / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file()
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
    sink = services["smtp-sink"]
    assert sink["entrypoint"][sink["entrypoint"].index("-m") + 1] == "aiosmtpd"
    assert "0.0.0.0:1025" in sink["entrypoint"]


def test_compose_redis_persists() -> None:
    doc = compose()
    redis = doc["services"]["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command
    assert "--appendfsync everysec" in command
    assert "--maxmemory-policy noeviction" in command
    volume, _, target = redis["volumes"][0].partition(":")
    assert target == "/data" and volume in doc["volumes"], "AOF must live on a named volume"


def test_compose_worker_config_and_grace() -> None:
    services = compose()["services"]
    env = {k: interpolate(str(v)) for k, v in services["worker"]["environment"].items()}
    settings = load_settings(environ=env)
    assert settings.relay().address == "smtp-sink:1025"
    # Warm shutdown must finish before compose sends SIGKILL.
    grace = parse_duration(services["worker"]["stop_grace_period"])
    assert grace > effective_time_limit(settings)


def test_env_example_names_compose_variables() -> None:
    example = (DEPLOY / ".env.example").read_text()
    names = {line.split("=", 1)[0] for line in example.splitlines()
             if line and not line.startswith("#")}
    used = {v for v in compose()["services"]["worker"]["environment"].values()
            if str(v).startswith("${")}
    assert {interpolate_name(v) for v in used} <= names


def interpolate_name(value: str) -> str:
    return value.removeprefix("${").split(":", 1)[0].split("}", 1)[0]


# --- kubernetes --------------------------------------------------------------------------

def test_kustomization_lists_existing_manifests() -> None:
    kust = one(K8S / "kustomization.yaml", "Kustomization")
    resources = kust["resources"]
    assert all((K8S / r).is_file() for r in resources)
    assert "secret.example.yaml" not in resources, "placeholder secrets must not be applied"
    assert {p.name for p in K8S.glob("*.yaml")} - set(resources) == {
        "kustomization.yaml", "secret.example.yaml"}


def test_manifest_kinds() -> None:
    assert one(K8S / "worker-deployment.yaml", "Deployment")
    assert one(K8S / "scheduler-deployment.yaml", "Deployment")
    assert one(K8S / "keda-scaledobject.yaml", "ScaledObject")
    assert one(K8S / "pdb.yaml", "PodDisruptionBudget")
    assert one(K8S / "secret.example.yaml", "Secret")
    maps = by_kind(load_all(K8S / "configmap.yaml"))
    assert list(maps) == ["ConfigMap"]
    assert {m["metadata"]["name"] for m in maps["ConfigMap"]} == {
        "mailworker-env", "mailworker-config"}


def configmaps() -> dict[str, dict[str, str]]:
    return {m["metadata"]["name"]: m["data"] for m in load_all(K8S / "configmap.yaml")}


def pod_env() -> dict[str, str]:
    """The environment the worker pods get: both envFrom sources."""
    secret = one(K8S / "secret.example.yaml", "Secret")["stringData"]
    return {**configmaps()["mailworker-env"], **secret}


def k8s_settings() -> Settings:
    env = pod_env()
    toml = configmaps()["mailworker-config"]["mailworker.toml"]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mailworker.toml"
        path.write_text(toml)
        assert env["MAILWORKER_CONFIG"] == "/etc/mailworker/mailworker.toml"
        return load_settings(path, environ=env)


def test_configmap_carries_production_toml() -> None:
    toml = configmaps()["mailworker-config"]["mailworker.toml"]
    assert toml == (ROOT / "config" / "production.toml").read_text(), (
        "the ConfigMap's mailworker.toml must be a copy of config/production.toml")
    settings = k8s_settings()
    assert settings.redis_url.startswith("redis://:")  # the Secret's URL, with password


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def test_worker_deployment() -> None:
    dep = one(K8S / "worker-deployment.yaml", "Deployment")
    spec, pod = dep["spec"], dep["spec"]["template"]["spec"]
    assert spec["selector"]["matchLabels"] == WORKER_LABELS
    assert spec["template"]["metadata"]["labels"] == WORKER_LABELS
    assert "replicas" not in spec, "KEDA owns the replica count"
    c = container(dep)
    assert c["args"][0] == "worker" and "--no-scheduler" in c["args"]
    assert {"requests", "limits"} <= set(c["resources"])
    refs = {next(iter(ref)): ref[next(iter(ref))]["name"] for ref in c["envFrom"]}
    assert refs == {"configMapRef": "mailworker-env", "secretRef": "mailworker-secrets"}
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts["config"] == "/etc/mailworker"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0


def test_worker_grace_period_exceeds_task_time_limit() -> None:
    grace = one(K8S / "worker-deployment.yaml", "Deployment")[
        "spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    settings = k8s_settings()
    assert grace > settings.task_time_limit
    assert grace > effective_time_limit(settings)


def test_scheduler_deployment() -> None:
    dep = one(K8S / "scheduler-deployment.yaml", "Deployment")
    assert dep["spec"]["replicas"] == 1
    assert container(dep)["args"] == ["scheduler"]
    assert dep["spec"]["selector"]["matchLabels"] == dep["spec"]["template"]["metadata"]["labels"]


def test_keda_scales_on_the_queue_lists() -> None:
    scaled = one(K8S / "keda-scaledobject.yaml", "ScaledObject")
    worker = one(K8S / "worker-deployment.yaml", "Deployment")
    assert scaled["spec"]["scaleTargetRef"]["name"] == worker["metadata"]["name"]
    triggers = scaled["spec"]["triggers"]
    assert {t["type"] for t in triggers} == {"redis"}
    lists = {t["metadata"]["listName"] for t in triggers}
    # Celery's Redis transport keeps each queue as a LIST named after the queue.
    args = container(worker)["args"]
    assert lists == set(args[args.index("-Q") + 1].split(",")) == {"transactional", "bulk"}
    env = pod_env()
    for t in triggers:
        meta = t["metadata"]
        assert int(meta["listLength"]) > 0
        for key in ("addressFromEnv", "passwordFromEnv"):
            assert meta[key] in env, f"{key}={meta[key]} is not in the worker's environment"
        # The lists are in the broker's database.
        assert meta["databaseIndex"] == env["MAILWORKER_REDIS_URL"].rsplit("/", 1)[1]
    assert scaled["spec"]["minReplicaCount"] >= 1


def test_pdb_selects_the_workers() -> None:
    pdb = one(K8S / "pdb.yaml", "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == WORKER_LABELS
    assert pdb["spec"]["minAvailable"] >= 1
