"""The Kubernetes manifests are consistent with the service they deploy."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from twin_service.api.app import create_app
from twin_service.settings import Settings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"


def documents() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def env_names(model: type[BaseModel] = Settings, prefix: str = "TWIN_") -> set[str]:
    names: set[str] = set()
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            names |= env_names(annotation, f"{prefix}{name.upper()}__")
        else:
            names.add(f"{prefix}{name.upper()}")
    return names


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    present = {p.name for p in DEPLOY.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


def test_every_twin_setting_named_in_manifests_exists() -> None:
    known = env_names()
    used: set[str] = set()
    for doc in documents():
        if doc["kind"] == "ConfigMap":
            used |= {k for k in doc["data"] if k.startswith("TWIN_")}
        for container in _containers(doc):
            used |= {e["name"] for e in container.get("env", []) if e["name"].startswith("TWIN_")}
    assert used, "the manifests configure nothing"
    assert used <= known, f"unknown settings: {sorted(used - known)}"


def test_probes_point_at_real_endpoints_and_resources_are_set() -> None:
    app = create_app(Settings(auth={"disabled": True}))  # type: ignore[arg-type]
    routes = set(app.openapi()["paths"])
    deployments = [d for d in documents() if d["kind"] in ("Deployment", "StatefulSet")]
    assert {d["metadata"]["name"] for d in deployments} == {"twin-service", "mosquitto"}
    for doc in deployments:
        for container in _containers(doc):
            assert "limits" in container["resources"] and "requests" in container["resources"]
            for probe in ("readinessProbe", "livenessProbe"):
                assert probe in container
                path = container[probe].get("httpGet", {}).get("path")
                if path is not None:
                    assert path.split("?")[0] in routes


def test_mosquitto_queue_limit_is_large_and_not_zero() -> None:
    config = next(
        d for d in documents() if d["metadata"]["name"] == "mosquitto" and d["kind"] == "ConfigMap"
    )
    text = config["data"]["mosquitto.conf"]
    queued = int(re.search(r"^max_queued_messages (\d+)$", text, re.M).group(1))  # type: ignore[union-attr]
    assert queued >= 10_000
    assert "allow_anonymous false" in text
    assert "set_tcp_nodelay true" in text  # else 40 ms more on every device round trip
    # Bounded, and above what the service answers with 413 (limits.max_twin_bytes).
    assert "max_packet_size 2097152" in text


def test_each_replica_has_its_own_stable_mqtt_client_id() -> None:
    """Replicas sharing a client id take the broker session from each other without end, and
    one that comes back under a new id strands the messages queued for its old session: the
    replicas are a StatefulSet and the pod name is their id."""
    docs = documents()
    workloads = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    service = next(d for d in workloads if d["metadata"]["name"] == "twin-service")
    assert service["kind"] == "StatefulSet" and service["spec"]["replicas"] > 1
    governing = next(
        d
        for d in docs
        if d["kind"] == "Service" and d["metadata"]["name"] == service["spec"]["serviceName"]
    )
    assert governing["spec"]["clusterIP"] == "None"
    (container,) = _containers(service)
    env = [e["name"] for e in container["env"]]
    values = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
    assert values["TWIN_MQTT__CLIENT_ID"] == "$(POD_NAME)"
    assert values["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    # Kubernetes expands $(NAME) only from variables defined before it.
    assert env.index("POD_NAME") < env.index("TWIN_MQTT__CLIENT_ID")


def test_every_statefulset_is_governed_by_a_headless_service() -> None:
    """Kubernetes gives a StatefulSet's pods their stable DNS names only through a headless
    governing Service; a normal one (a cluster IP) gives them none."""
    docs = documents()
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    statefulsets = [d for d in docs if d["kind"] == "StatefulSet"]
    assert statefulsets
    for workload in statefulsets:
        governing = services.get(workload["spec"]["serviceName"])
        assert governing is not None, workload["metadata"]["name"]
        assert governing["spec"].get("clusterIP") == "None", workload["metadata"]["name"]
        assert governing["spec"]["selector"] == workload["spec"]["selector"]["matchLabels"]


def test_mosquitto_runs_the_shipped_configuration_and_the_service_uses_its_listener() -> None:
    """deploy/mosquitto/mosquitto.conf (tests/sync/test_shipped_mosquitto.py runs it) with the
    pod's paths: devices on the listener where a client id is the username, so none can take
    another's session; the replicas on the listener where devices cannot log in."""
    shipped = Path(__file__).resolve().parents[2] / "deploy" / "mosquitto" / "mosquitto.conf"
    paths = {
        "/etc/mosquitto/twin-service.passwd": "/mosquitto/auth/passwd",
        "/etc/mosquitto/twin-service-service.passwd": "/mosquitto/auth/service-passwd",
        "/etc/mosquitto/twin-service.acl": "/mosquitto/auth/acl",
        "/var/lib/mosquitto/": "/mosquitto/data/",
    }

    def directives(text: str) -> list[str]:
        found = []
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                name, _, value = line.partition(" ")
                found.append(f"{name} {paths.get(value, value)}")
        return found

    docs = documents()
    config = next(
        d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "mosquitto"
    )
    assert directives(config["data"]["mosquitto.conf"]) == directives(shipped.read_text())
    twin_config = next(
        d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "twin-service"
    )
    assert twin_config["data"]["TWIN_MQTT_URL"] == "mqtt://mosquitto:1884"
    service = next(
        d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "mosquitto"
    )
    assert {p["port"] for p in service["spec"]["ports"]} == {1883, 1884}


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    containers: list[dict[str, Any]] = spec.get("containers", [])
    return containers


README = DEPLOY / "README.md"
ROOT = DEPLOY.parents[1]
# Volume types the "restricted" Pod Security Standard allows (kubernetes.io/docs/concepts/
# security/pod-security-standards/, "Volume Types").
RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def workloads() -> list[dict[str, Any]]:
    return [d for d in documents() if d["kind"] in ("Deployment", "StatefulSet")]


def workload(name: str) -> dict[str, Any]:
    return next(d for d in workloads() if d["metadata"]["name"] == name)


def restricted_violations(doc: dict[str, Any]) -> list[str]:
    """What the pod template breaks of the "restricted" Pod Security Standard (v1.30), and
    of our own rule that containers write only to volumes (readOnlyRootFilesystem)."""
    name = doc["metadata"]["name"]
    pod = doc["spec"]["template"]["spec"]
    pod_context = pod.get("securityContext", {})
    found = [
        f"{name}: {field}" for field in ("hostNetwork", "hostPID", "hostIPC") if pod.get(field)
    ]
    for volume in pod.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            found.append(f"{name}: volume {volume['name']} is {sorted(kinds)}")
    containers = pod.get("initContainers", []) + pod["containers"]
    for container in containers:
        where = f"{name}/{container['name']}"
        context = container.get("securityContext", {})
        inherited = {**pod_context, **context}  # a container's own settings win
        if inherited.get("runAsNonRoot") is not True:
            found.append(f"{where}: runAsNonRoot is not true")
        if inherited.get("runAsUser") == 0:
            found.append(f"{where}: runAsUser is 0")
        if context.get("privileged"):
            found.append(f"{where}: privileged")
        if context.get("allowPrivilegeEscalation") is not False:
            found.append(f"{where}: allowPrivilegeEscalation is not false")
        capabilities = context.get("capabilities", {})
        if "ALL" not in capabilities.get("drop", []):
            found.append(f"{where}: capabilities.drop lacks ALL")
        if not set(capabilities.get("add", [])) <= {"NET_BIND_SERVICE"}:
            found.append(f"{where}: adds capabilities {capabilities['add']}")
        seccomp = inherited.get("seccompProfile", {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            found.append(f"{where}: seccompProfile is {seccomp}")
        if context.get("readOnlyRootFilesystem") is not True:
            found.append(f"{where}: readOnlyRootFilesystem is not true")
    return found


def test_readme_creates_the_namespace_before_anything_in_it() -> None:
    """`kubectl -n twin-service create secret` fails while the namespace does not exist."""
    text = README.read_text()
    created = re.search(
        r"kubectl (?:apply -f deploy/kubernetes/namespace\.yaml|create namespace twin-service)",
        text,
    )
    used = re.search(r"kubectl (?:-n|--namespace)[ =]twin-service", text)
    assert created is not None, "the README never creates the namespace on its own"
    assert used is not None
    assert created.start() < used.start()


def test_the_image_is_set_in_one_place_with_the_package_version() -> None:
    """A bare `twin-service:<tag>` is looked up on Docker Hub, where there is none: every real
    cluster pulls from a registry of the user's, named once in kustomization.yaml."""
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    (entry,) = [i for i in kustomization.get("images", []) if i["name"] == "twin-service"]
    assert entry["newTag"] == version
    assert "/" in entry["newName"], "newName names no registry"
    (container,) = _containers(workload("twin-service"))
    assert container["image"] == entry["name"], "the tag belongs in kustomization.yaml alone"
    tags = re.findall(r"/?twin-service:([\w.-]+)", README.read_text())
    assert tags and set(tags) == {version}


def test_pods_meet_the_restricted_pod_security_standard() -> None:
    found = [v for doc in workloads() for v in restricted_violations(doc)]
    assert found == []
    # Only once every pod passes, so the namespace enforces it.
    (namespace,) = [d for d in documents() if d["kind"] == "Namespace"]
    labels = namespace["metadata"].get("labels", {})
    assert labels.get("pod-security.kubernetes.io/enforce") == "restricted"


def test_the_check_of_the_restricted_standard_sees_what_it_forbids() -> None:
    doc = {
        "metadata": {"name": "p"},
        "spec": {
            "template": {
                "spec": {
                    "hostNetwork": True,
                    "volumes": [{"name": "h", "hostPath": {"path": "/"}}],
                    "containers": [
                        {"name": "c", "securityContext": {"capabilities": {"add": ["NET_ADMIN"]}}}
                    ],
                }
            }
        },
    }
    assert restricted_violations(doc) == [
        "p: hostNetwork",
        "p: volume h is ['hostPath']",
        "p/c: runAsNonRoot is not true",
        "p/c: allowPrivilegeEscalation is not false",
        "p/c: capabilities.drop lacks ALL",
        "p/c: adds capabilities ['NET_ADMIN']",
        "p/c: seccompProfile is None",
        "p/c: readOnlyRootFilesystem is not true",
    ]


def test_a_stopping_replica_leaves_the_service_before_it_stops_listening() -> None:
    """uvicorn closes its listening socket at SIGTERM, while kube-proxy and ingress
    controllers may still route to the pod for a few seconds: the preStop hook holds SIGTERM
    back, and the grace period covers that wait, the service's shutdown timeout, and the
    closing after it (20-23 s in all measured with the default 20 s timeout)."""
    doc = workload("twin-service")
    (container,) = _containers(doc)
    pre_stop = container.get("lifecycle", {}).get("preStop", {})
    assert "sleep" in pre_stop, "no preStop delay"
    delay = pre_stop["sleep"]["seconds"]
    assert delay >= 5
    config = next(
        d
        for d in documents()
        if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "twin-service"
    )
    shutdown = int(
        config["data"].get(
            "TWIN_SHUTDOWN_TIMEOUT_SECONDS",
            Settings.model_fields["shutdown_timeout_seconds"].default,
        )
    )
    grace = doc["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= delay + shutdown + 10


def test_the_broker_image_is_pinned_and_its_version_documented() -> None:
    """The delivery measurements (docs/scaling.md) hold for a mosquitto version: a floating
    tag changes the broker under a running deployment at its next restart."""
    (container,) = _containers(workload("mosquitto"))
    image = container["image"]
    assert re.fullmatch(r"eclipse-mosquitto:\d+\.\d+\.\d+", image), image
    assert image in README.read_text()


def test_only_the_replicas_reach_the_brokers_service_listener() -> None:
    """Port 1884 takes the service account's password alone; still, nothing but the
    replicas has business there, while devices must reach 1883."""
    replicas = {"podSelector": {"matchLabels": {"app": "twin-service"}}}
    (policy,) = [
        d
        for d in documents()
        if d["kind"] == "NetworkPolicy"
        and d["spec"]["podSelector"] == {"matchLabels": {"app": "mosquitto"}}
    ]
    assert "Ingress" in policy["spec"]["policyTypes"]
    service_port = {1884, "mqtt-service"}
    device_port = {1883, "mqtt"}
    opened: dict[str, list[Any]] = {"service": [], "device": []}
    for rule in policy["spec"].get("ingress", []):
        ports = rule.get("ports")  # none: every port
        sources = rule.get("from") or [{}]  # none: everyone
        covered = {p["port"] for p in ports} if ports else service_port | device_port
        if covered & service_port:
            assert sources == [replicas], rule
            opened["service"] += sources
        if covered & device_port:
            opened["device"] += sources
    assert opened["service"] == [replicas]
    assert {} in opened["device"], "devices cannot reach 1883"
