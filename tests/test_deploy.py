"""deploy/: the manifests validate offline against their schemas, agree with each other, and the
containerless topology (scripts/local_cluster.py) really starts, serves and stops.

Schemas (no network, see deploy/schemas/README.md): Kubernetes core kinds from the `kubernetes-validate`
package (strict), the Compose Specification from the copy vendored by `check-jsonschema`, and a
hand-written subset of the CloudNativePG `Cluster` CRD in deploy/schemas/.
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
import signal
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import jsonschema
import kubernetes_validate
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.config import config_from_mapping
from tests.pgfixtures import free_port, reachable_temp_dir
from tests.processes import child_env
from tests.support import wait_until_blocking

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
COMPOSE_TOML = DEPLOY / "config" / "dialog-shard.compose.toml"
CNPG_SCHEMA = DEPLOY / "schemas" / "cnpg-cluster-v1.trimmed.schema.json"
#: Validate against this Kubernetes version's schemas (the `grpc:` probe needs 1.24+).
K8S_VERSION = "1.30"
NUM_SHARDS = 4
SERVICE_PORT = 50051
METRICS_PORT = 9464
DUMMY_ENV = {"DIALOG_JWT_SECRET": "x" * 48}


# -- loading ---------------------------------------------------------------------------------------


def _yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _k8s_resources() -> list[tuple[Path, dict[str, Any]]]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return [(K8S / name, doc) for name in kustomization["resources"] for doc in _yaml_docs(K8S / name)]


def _of_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in _k8s_resources() if doc["kind"] == kind]


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return data


def _compose_schema() -> dict[str, Any]:
    vendor = resources.files("check_jsonschema.builtin_schemas.vendor")
    schema: dict[str, Any] = json.loads(vendor.joinpath("compose-spec.json").read_text())
    return schema


def _k8s_toml() -> dict[str, Any]:
    (configmap,) = _of_kind("ConfigMap")
    return tomllib.loads(configmap["data"]["dialog-shard.toml"])


def _port_of(listen: str) -> int:
    return int(listen.rsplit(":", 1)[1])


def _validate_k8s(doc: dict[str, Any]) -> None:
    """Raise jsonschema.ValidationError when `doc` does not match its kind's schema."""
    if doc["apiVersion"] == "postgresql.cnpg.io/v1":
        jsonschema.validate(doc, json.loads(CNPG_SCHEMA.read_text()))
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def _validate_compose(doc: dict[str, Any]) -> None:
    jsonschema.validate(doc, _compose_schema())


# -- schema validation -----------------------------------------------------------------------------


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    listed = kustomization["resources"]
    on_disk = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == on_disk
    assert len(set(listed)) == len(listed)


@pytest.mark.parametrize(
    "path", sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"), ids=str
)
def test_k8s_manifest_matches_schema(path: Path) -> None:
    docs = _yaml_docs(path)
    assert docs, f"{path} has no documents"
    for doc in docs:
        _validate_k8s(doc)
        assert doc["metadata"].get("namespace", "dialog-shard") == "dialog-shard"


def test_expected_kinds_present() -> None:
    kinds = sorted(doc["kind"] for _, doc in _k8s_resources())
    assert kinds == sorted(
        ["Namespace", "ConfigMap", "Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy"]
        + ["Cluster"] * NUM_SHARDS
    )


def test_compose_file_matches_compose_spec() -> None:
    _validate_compose(_compose())


@pytest.mark.parametrize(
    ("kind", "break_it"),
    [
        ("Deployment", lambda d: d["spec"].__setitem__("replicas", "two")),
        ("Deployment", lambda d: d["spec"]["template"]["spec"]["containers"][0].__setitem__("livenes", {})),
        ("Service", lambda d: d["spec"]["ports"][0].__setitem__("port", "fifty")),
        ("PodDisruptionBudget", lambda d: d["spec"].__setitem__("minAvaliable", 1)),
        ("NetworkPolicy", lambda d: d["spec"]["ingress"][0]["ports"][0].__setitem__("protocl", "TCP")),
        ("NetworkPolicy", lambda d: d["spec"].__setitem__("policyTypes", "Ingress")),
        ("Cluster", lambda d: d["spec"].__setitem__("instances", 0)),
        ("Cluster", lambda d: d["spec"]["storage"].__setitem__("size", "twenty gigs")),
        ("Cluster", lambda d: d["spec"]["bootstrap"]["initdb"].__setitem__("ownr", "dialog")),
    ],
)
def test_broken_k8s_manifest_is_rejected(kind: str, break_it: Any) -> None:
    broken = copy.deepcopy(_of_kind(kind)[0])
    _validate_k8s(broken)  # the original passes ...
    break_it(broken)
    with pytest.raises(jsonschema.ValidationError):  # ... the broken copy does not
        _validate_k8s(broken)


@pytest.mark.parametrize(
    "break_it",
    [
        lambda c: c["services"]["shard-0"].__setitem__("healthcheck", {"test": ["CMD"], "intervall": "5s"}),
        lambda c: c["services"]["dialog-shard"].__setitem__("ports", "50051"),
        lambda c: c["secrets"]["jwt_secret"].__setitem__("file", 42),
        lambda c: c.__setitem__("servics", {}),
    ],
)
def test_broken_compose_file_is_rejected(break_it: Any) -> None:
    broken = copy.deepcopy(_compose())
    break_it(broken)
    with pytest.raises(jsonschema.ValidationError):
        _validate_compose(broken)


# -- cross-file consistency ------------------------------------------------------------------------


def test_both_configs_are_accepted_by_the_server_with_four_shards() -> None:
    for data, base in ((tomllib.loads(COMPOSE_TOML.read_text()), COMPOSE_TOML.parent), (_k8s_toml(), K8S)):
        config = config_from_mapping(data, DUMMY_ENV, base_dir=base)
        assert config.num_shards == NUM_SHARDS
        assert _port_of(config.listen) == SERVICE_PORT
        # Inside a container the service must be reachable from outside its loopback.
        assert config.listen.rsplit(":", 1)[0] == "0.0.0.0"
        assert config.metrics.listen == f"0.0.0.0:{METRICS_PORT}"
        hosts = {urlsplit(s.dsn).hostname for s in config.shards}
        assert len(hosts) == NUM_SHARDS, "every shard on its own PostgreSQL server"
    # Behind a Kubernetes Service (which balances connections, not calls), long-lived channels
    # reconnect now and then, so new pods get their share.
    k8s = config_from_mapping(_k8s_toml(), DUMMY_ENV, base_dir=K8S)
    assert 60 <= k8s.max_connection_age_seconds <= 3600


def test_compose_shard_dsns_name_postgres_services() -> None:
    compose = _compose()
    services = compose["services"]
    postgres = {name for name, svc in services.items() if str(svc.get("image", "")).startswith("postgres:")}
    assert len(postgres) == NUM_SHARDS
    data = tomllib.loads(COMPOSE_TOML.read_text())
    dsn_hosts = [urlsplit(shard["dsn"]).hostname for shard in data["shards"]]
    assert sorted(dsn_hosts) == sorted(postgres)
    service = services["dialog-shard"]
    for host in dsn_hosts:
        assert service["depends_on"][host]["condition"] == "service_healthy"
    for name in postgres:
        svc = services[name]
        assert "healthcheck" in svc
        (volume,) = svc["volumes"]
        assert volume.split(":")[0] in compose["volumes"]
        assert volume.endswith(":/var/lib/postgresql/data")
    assert len({services[n]["volumes"][0] for n in postgres}) == NUM_SHARDS, "one volume per shard"


def test_compose_service_wiring() -> None:
    compose = _compose()
    service = compose["services"]["dialog-shard"]
    assert service["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
    assert (COMPOSE_FILE.parent / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
    published = [p.rsplit(":", 2) for p in service["ports"]]
    assert [int(container) for *_, container in published] == [SERVICE_PORT]
    assert service["healthcheck"]["test"][-1].endswith(f":{SERVICE_PORT}")
    source, target, _mode = service["volumes"][0].split(":")
    assert (COMPOSE_FILE.parent / source).resolve() == COMPOSE_TOML
    assert target in service["command"]
    # The JWT key comes from a compose secret whose file is not in git.
    data = tomllib.loads(COMPOSE_TOML.read_text())
    assert data["auth"]["jwt_secret_file"] == "/run/secrets/jwt_secret"
    assert "jwt_secret" in service["secrets"]
    for secret in compose["secrets"].values():
        path = (COMPOSE_FILE.parent / secret["file"]).resolve()
        tracked = subprocess.run(
            ["git", "ls-files", "--error-unmatch", str(path)], cwd=ROOT, capture_output=True, check=False
        )
        assert tracked.returncode != 0, f"{path} must not be committed"
    # Prometheus scrapes the service's metrics port, which the container exposes.
    assert [int(p) for p in service["expose"]] == [METRICS_PORT]
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = [
        t for job in prometheus["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]
    ]
    assert targets == [f"dialog-shard:{METRICS_PORT}"]
    mounted = compose["services"]["prometheus"]["volumes"][0].split(":")[0]
    assert (COMPOSE_FILE.parent / mounted).resolve() == DEPLOY / "prometheus" / "prometheus.yml"


def test_k8s_dsns_point_at_cnpg_rw_services() -> None:
    clusters = {doc["metadata"]["name"]: doc for doc in _of_kind("Cluster")}
    assert len(clusters) == NUM_SHARDS
    hosts = [urlsplit(shard["dsn"]).hostname or "" for shard in _k8s_toml()["shards"]]
    assert all(h.endswith("-rw") for h in hosts), hosts
    assert sorted(h.removesuffix("-rw") for h in hosts) == sorted(clusters)
    for shard in _k8s_toml()["shards"]:
        dsn = urlsplit(shard["dsn"])
        initdb = clusters[dsn.hostname.removesuffix("-rw")]["spec"]["bootstrap"]["initdb"]
        assert dsn.path.lstrip("/") == initdb["database"]
        assert dsn.username == initdb["owner"]
        assert dsn.password is None, "passwords come from Secrets, never the ConfigMap"


def test_k8s_deployment_wiring() -> None:
    (deployment,) = _of_kind("Deployment")
    (service,) = _of_kind("Service")
    (pdb,) = _of_kind("PodDisruptionBudget")
    (configmap,) = _of_kind("ConfigMap")
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert spec["replicas"] == 2
    labels = spec["template"]["metadata"]["labels"]
    for selector in (
        spec["selector"]["matchLabels"],
        service["spec"]["selector"],
        pdb["spec"]["selector"]["matchLabels"],
    ):
        assert selector.items() <= labels.items()
    assert [p["containerPort"] for p in container["ports"]] == [SERVICE_PORT, METRICS_PORT]
    annotations = spec["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert (
        int(annotations["prometheus.io/port"]) == _port_of(_k8s_toml()["metrics"]["listen"]) == METRICS_PORT
    )
    assert _port_of(_k8s_toml()["listen"]) == SERVICE_PORT
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["grpc"]["port"] == SERVICE_PORT
    (svc_port,) = service["spec"]["ports"]
    assert svc_port["targetPort"] in (SERVICE_PORT, container["ports"][0]["name"])
    # Non-root, read-only root filesystem, secrets by reference only.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    env = {e["name"]: e for e in container["env"]}
    assert set(env) >= {"DIALOG_JWT_SECRET", "PGPASSWORD"}
    for item in env.values():
        assert "value" not in item and "secretKeyRef" in item["valueFrom"]
    db_secret = env["PGPASSWORD"]["valueFrom"]["secretKeyRef"]["name"]
    for cluster in _of_kind("Cluster"):
        assert cluster["spec"]["bootstrap"]["initdb"]["secret"]["name"] == db_secret
    # The config file is mounted where the args say.
    (config_volume,) = [v for v in pod["volumes"] if "configMap" in v]
    assert config_volume["configMap"]["name"] == configmap["metadata"]["name"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == config_volume["name"]]
    config_arg = container["args"][container["args"].index("--config") + 1]
    assert config_arg == f"{mount['mountPath']}/dialog-shard.toml"
    assert "dialog-shard.toml" in configmap["data"]


def _port_numbers(rule: dict[str, Any], container: dict[str, Any]) -> set[tuple[int, str]]:
    """(number, protocol) of a NetworkPolicy rule's ports; named ports resolved on the container."""
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    return {(named.get(p["port"], p["port"]), p.get("protocol", "TCP")) for p in rule["ports"]}


def test_k8s_network_policy() -> None:
    (policy,) = _of_kind("NetworkPolicy")
    (deployment,) = _of_kind("Deployment")
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    spec = policy["spec"]
    # It applies to the service's pods, both ways: whatever is not listed is dropped.
    assert spec["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert sorted(spec["policyTypes"]) == ["Egress", "Ingress"]
    # Every rule names its peers and ports: none allows everyone or every port.
    for rule in spec["ingress"] + spec["egress"]:
        assert rule.get("from", rule.get("to")) and rule["ports"], rule

    grpc_rule, metrics_rule = spec["ingress"]
    assert _port_numbers(grpc_rule, container) == {(SERVICE_PORT, "TCP")}
    (clients,) = grpc_rule["from"]
    assert clients["podSelector"]["matchLabels"] == {"dialog-shard/client": "true"}
    assert _port_numbers(metrics_rule, container) == {(METRICS_PORT, "TCP")}
    (monitoring,) = metrics_rule["from"]
    assert monitoring == {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}

    postgres_rule, dns_rule = spec["egress"]
    (shards,) = postgres_rule["to"]
    (selector,) = shards["podSelector"]["matchExpressions"]
    assert (selector["key"], selector["operator"]) == ("cnpg.io/cluster", "In")
    assert sorted(selector["values"]) == sorted(c["metadata"]["name"] for c in _of_kind("Cluster"))
    assert "namespaceSelector" not in shards  # the shards' pods in this namespace only
    dsn_ports = {urlsplit(s["dsn"]).port or 5432 for s in _k8s_toml()["shards"]}
    assert _port_numbers(postgres_rule, container) == {(p, "TCP") for p in dsn_ports}
    (dns,) = dns_rule["to"]
    assert dns["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}
    assert _port_numbers(dns_rule, container) == {(53, "UDP"), (53, "TCP")}


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_dockerfile() -> None:
    instructions = _dockerfile_instructions()
    stages = [arg for op, arg in instructions if op == "FROM"]
    assert len(stages) >= 2, "multi-stage build"
    base = next(arg for op, arg in instructions if op == "ARG" and arg.startswith("PYTHON_IMAGE="))
    assert re.fullmatch(r"PYTHON_IMAGE=python:3\.11-slim(-\w+)?", base)
    # USER of the final stage is not root.
    final = instructions[max(i for i, (op, _) in enumerate(instructions) if op == "FROM") :]
    users = [arg for op, arg in final if op == "USER"]
    assert users, "the runtime stage sets USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    expose = [arg for op, arg in instructions if op == "EXPOSE"]
    assert expose == [f"{SERVICE_PORT} {METRICS_PORT}"]
    (healthcheck,) = [arg for op, arg in final if op == "HEALTHCHECK"]
    probe = json.loads(healthcheck.split("CMD", 1)[1])
    assert probe[-1] == f"127.0.0.1:{SERVICE_PORT}"
    assert probe[1].endswith("healthcheck.py")
    assert [json.loads(arg) for op, arg in final if op == "ENTRYPOINT"] == [["dialog-server"]]
    # Everything COPY'd from the context is let through by the .dockerignore allow-list.
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for op, arg in instructions:
        if op == "COPY" and not arg.startswith("--from"):
            for source in arg.split()[:-1]:
                assert source.rstrip("/") in allowed, f"{source} is excluded by .dockerignore"
                assert (ROOT / source).exists()


def test_healthcheck_script_reports_unreachable_server() -> None:
    port = free_port()  # nothing listens there
    proc = subprocess.run(
        [sys.executable, str(DEPLOY / "healthcheck.py"), f"127.0.0.1:{port}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 1
    assert "UNAVAILABLE" in proc.stderr


# -- the containerless topology --------------------------------------------------------------------


def _postgres_pids_for(directory: Path) -> list[int]:
    """PIDs of postgres processes whose command line names a path under `directory`."""
    found = []
    needle = str(directory).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmdline = (entry / "cmdline").read_bytes()
            if needle in cmdline and (entry / "comm").read_text().strip() in ("postgres", "postmaster"):
                found.append(int(entry.name))
    return found


def _health_status(target: str) -> int | None:
    try:
        with grpc.insecure_channel(target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
    except grpc.RpcError:
        return None
    status: int = reply.status
    return status


@pytest.fixture
def cluster_dir() -> Iterator[Path]:
    with reachable_temp_dir("dialog-shard-cluster-") as base:
        yield base


def test_local_cluster_starts_serves_and_stops(cluster_dir: Path) -> None:
    listen = f"127.0.0.1:{free_port()}"
    pg_ports = [free_port(), free_port()]
    log = cluster_dir / "local_cluster.out"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "scripts" / "local_cluster.py"),
                "--shards",
                "2",
                "--data-dir",
                str(cluster_dir),
                "--pg-ports",
                ",".join(map(str, pg_ports)),
                "--listen",
                listen,
                "--no-fsync",
            ],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=child_env(),
        )
    try:

        def serving() -> bool:
            assert proc.poll() is None, f"the cluster exited: {log.read_text()}"
            return bool(_health_status(listen) == health_pb2.HealthCheckResponse.SERVING)

        wait_until_blocking(serving, "the service is SERVING", within=120, every=0.5, explain=log.read_text)
        # The container's probe script agrees.
        probe = subprocess.run(
            [sys.executable, str(DEPLOY / "healthcheck.py"), listen],
            capture_output=True,
            timeout=30,
            check=False,
        )
        assert probe.returncode == 0, probe.stderr
        config = tomllib.loads((cluster_dir / "dialog-shard.toml").read_text())
        assert [urlsplit(s["dsn"]).port for s in config["shards"]] == pg_ports
        assert len(_postgres_pids_for(cluster_dir)) >= 2

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = log.read_text()
    assert "stopped; data kept" in output, output
    assert _health_status(listen) is None
    wait_until_blocking(
        lambda: _postgres_pids_for(cluster_dir) == [],
        "the cluster's PostgreSQL servers exit",
        within=10,
        every=0.2,
        explain=lambda: _postgres_pids_for(cluster_dir),
    )
    for i in range(2):
        assert not (cluster_dir / f"shard-{i}" / "postmaster.pid").exists()
        assert (cluster_dir / f"shard-{i}" / "PG_VERSION").exists(), "data are kept for the next run"
    assert (cluster_dir / "jwt-secret").stat().st_mode & 0o077 == 0
