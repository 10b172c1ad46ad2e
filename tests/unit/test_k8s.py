"""deploy/k8s: each overlay renders with ``kubectl kustomize``, every object validates
against the Kubernetes schemas (``kubernetes-validate``), and the Deployment drains,
probes and runs as promised; no secret sits in a ConfigMap, and the configuration in
the ConfigMap passes ``mandant check-config`` once the Secret's variables are set.
The custom resources (KServe, prometheus-adapter, ServiceMonitor) are checked field by
field: their schemas are not Kubernetes'."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu")
KUBECTL = shutil.which("kubectl", path=f"{os.environ.get('PATH', '')}{os.pathsep}/usr/bin")
NO_KUBECTL = "kubectl missing: it renders the kustomize overlays"
GRPC_PORT = 8001
KEY_HASH = re.compile(r"sha256:[0-9a-f]{64}")
#: A password in a Redis URL (redis://user:password@host) or a requirepass argument.
REDIS_PASSWORD = re.compile(r"rediss?://[^:/@\s]*:(?!\$\{)[^@\s]+@|requirepass\s+(?!\$)\S+")
ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def render(overlay: str) -> list[dict[str, Any]]:
    assert KUBECTL is not None
    out = subprocess.run(
        [KUBECTL, "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    if KUBECTL is None:
        pytest.skip(NO_KUBECTL)
    return request.param, render(request.param)


def only(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [obj for obj in objects if obj["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in only(objects, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def mandant_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    pod = one(objects, "Deployment", "mandant")["spec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == "mandant"]
    return dict(container)


def config_text(objects: list[dict[str, Any]]) -> str:
    (config_map,) = [
        c for c in only(objects, "ConfigMap") if c["metadata"]["name"].startswith("mandant-config")
    ]
    return str(config_map["data"]["mandant.yaml"])


def prestop_sleep_s(container: dict[str, Any]) -> float:
    pre_stop = container["lifecycle"]["preStop"]
    if "sleep" in pre_stop:
        return float(pre_stop["sleep"]["seconds"])
    command = pre_stop["exec"]["command"]
    assert command[0] == "sleep", command
    return float(command[1])


def test_every_object_validates_against_the_kubernetes_schemas(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate missing: `make test` installs it"
    )
    version = kubernetes_validate.latest_version()
    _, objects = rendered
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{obj['kind']} {obj['metadata']['name']}: {exc.message}")


def test_the_overlays_hold_every_part(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, objects = rendered
    one(objects, "Deployment", "mandant")
    one(objects, "StatefulSet", "mandant-redis")
    one(objects, "Service", "mandant-redis")
    one(objects, "PodDisruptionBudget", "mandant")
    assert {p["metadata"]["name"] for p in only(objects, "NetworkPolicy")} == {
        "mandant-data-plane",
        "mandant-http-monitoring",
        "mandant-redis",
    }
    assert not only(objects, "Secret"), "secrets are created by the operator, not kept in git"


def test_probes_are_grpc_health_and_startup_covers_loading(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    _, objects = rendered
    container = mandant_container(objects)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": GRPC_PORT}, probe
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": 8001, "rest": 8000, "http": 8002}


def test_a_draining_pod_finishes_its_calls_before_it_is_killed(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    _, objects = rendered
    grace_s = float(yaml.safe_load(config_text(objects))["server"]["grace_s"])
    pod = one(objects, "Deployment", "mandant")["spec"]["template"]["spec"]
    sleep_s = prestop_sleep_s(mandant_container(objects))
    assert sleep_s >= 1
    assert pod["terminationGracePeriodSeconds"] > grace_s + sleep_s


def test_containers_run_unprivileged_on_a_read_only_root(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    _, objects = rendered
    for workload in only(objects, "Deployment") + only(objects, "StatefulSet"):
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, container["name"]
            assert context["allowPrivilegeEscalation"] is False, container["name"]
            assert context["capabilities"]["drop"] == ["ALL"], container["name"]
    pod = one(objects, "Deployment", "mandant")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == 10001  # the Dockerfile's user
    mounts = {m["mountPath"] for m in mandant_container(objects)["volumeMounts"]}
    assert {"/tmp", "/var/lib/mandant/models", "/etc/mandant"} <= mounts


def test_no_secret_sits_in_a_config_map(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, objects = rendered
    for config_map in only(objects, "ConfigMap"):
        text = yaml.safe_dump(config_map)
        assert not KEY_HASH.search(text), config_map["metadata"]["name"]
        assert not REDIS_PASSWORD.search(text), config_map["metadata"]["name"]


def test_the_secret_patterns_catch_what_they_guard() -> None:
    assert KEY_HASH.search('api_keys: ["sha256:' + "0" * 64 + '"]')
    assert REDIS_PASSWORD.search("url: redis://:hunter2@mandant-redis:6379/0")
    assert REDIS_PASSWORD.search("url: rediss://default:hunter2@redis:6380")
    assert not REDIS_PASSWORD.search("url: redis://:${MANDANT_REDIS_PASSWORD}@redis:6379/0")


def test_the_config_map_passes_check_config_with_the_secret_set(
    rendered: tuple[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    _, objects = rendered
    text = config_text(objects)
    referenced = set(ENV_REFERENCE.findall(yaml.safe_dump(yaml.safe_load(text))))
    secret_keys = set(secret_example_keys())
    assert referenced == secret_keys, "mandant.yaml's ${NAME}s are the Secret's keys"
    container = mandant_container(objects)
    assert {"secretRef": {"name": "mandant-secrets"}} in container["envFrom"]
    path = tmp_path / "mandant.yaml"
    path.write_text(text)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    hashes = iter(f"sha256:{digit * 64}" for digit in "0123456789abcdef")
    for name in sorted(secret_keys):
        env[name] = "test-password" if "PASSWORD" in name else next(hashes)
    ok = subprocess.run(
        [sys.executable, "-m", "mandant", "check-config", str(path)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert ok.returncode == 0, ok.stderr
    del env["MANDANT_KEY_ACME"]
    missing = subprocess.run(
        [sys.executable, "-m", "mandant", "check-config", str(path)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert missing.returncode == 1
    assert "tenants.0.api_keys.0: environment variable MANDANT_KEY_ACME is not set" in (
        missing.stderr
    )


def secret_example_keys() -> Iterator[str]:
    for line in (K8S / "base" / "secret.env.example").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            yield line.split("=", 1)[0]


def test_redis_takes_its_password_from_the_secret(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    _, objects = rendered
    config = yaml.safe_load(config_text(objects))
    assert config["limits"]["store"] == "redis"
    assert "${MANDANT_REDIS_PASSWORD}@mandant-redis:6379" in config["limits"]["url"]
    (redis,) = one(objects, "StatefulSet", "mandant-redis")["spec"]["template"]["spec"][
        "containers"
    ]
    assert {
        "name": "REDIS_PASSWORD",
        "valueFrom": {"secretKeyRef": {"name": "mandant-secrets", "key": "MANDANT_REDIS_PASSWORD"}},
    } in redis["env"]
    assert redis["args"][:2] == ["--requirepass", "$(REDIS_PASSWORD)"]


def test_a_changed_config_rolls_the_deployment() -> None:
    """The ConfigMap's name carries a hash of its content, and the Deployment mounts
    it by that name: a new mandant.yaml is a new pod template."""
    if KUBECTL is None:
        pytest.skip(NO_KUBECTL)
    objects = render("cpu")
    name = one(objects, "ConfigMap")["metadata"]["name"]
    assert re.fullmatch(r"mandant-config-[a-z0-9]{10}", name)
    volumes = one(objects, "Deployment", "mandant")["spec"]["template"]["spec"]["volumes"]
    assert {"name": "config", "configMap": {"name": name}} in volumes


def test_the_gpu_overlay_asks_for_a_gpu_and_the_cpu_overlay_does_not() -> None:
    if KUBECTL is None:
        pytest.skip(NO_KUBECTL)
    gpu = mandant_container(render("gpu"))["resources"]
    assert gpu["limits"]["nvidia.com/gpu"] == "1"
    pod = one(render("gpu"), "Deployment", "mandant")["spec"]["template"]["spec"]
    assert pod["nodeSelector"] and pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    cpu = mandant_container(render("cpu"))["resources"]
    assert "nvidia.com/gpu" not in cpu.get("limits", {}) | cpu.get("requests", {})


def test_the_gpu_overlay_runs_a_front_end_per_requested_core_but_the_engines() -> None:
    if KUBECTL is None:
        pytest.skip(NO_KUBECTL)
    container = mandant_container(render("gpu"))
    args = container["args"]
    workers = int(args[args.index("--workers") + 1])
    assert workers + 1 == int(container["resources"]["requests"]["cpu"])
    assert "--workers" not in mandant_container(render("cpu"))["args"]


def test_the_autoscaler_scales_on_inflight_calls_with_cpu_as_fallback(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    _, objects = rendered
    hpa = one(objects, "HorizontalPodAutoscaler", "mandant")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == "mandant"
    by_type = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert by_type["Pods"]["pods"]["metric"]["name"] == "mandant_inflight_requests"
    assert by_type["Resource"]["resource"]["name"] == "cpu"
    assert by_type["Resource"]["resource"]["target"]["type"] == "Utilization"


def test_the_adapter_rule_serves_inflight_calls_summed_per_pod() -> None:
    rules = K8S / "monitoring" / "prometheus-adapter-rules.yaml"
    (config_map,) = yaml.safe_load_all(rules.read_text())
    (rule,) = yaml.safe_load(config_map["data"]["config.yaml"])["rules"]
    assert rule["seriesQuery"].startswith("mandant_inflight_requests{")
    assert rule["resources"]["overrides"] == {
        "namespace": {"resource": "namespace"},
        "pod": {"resource": "pod"},
    }
    assert rule["name"]["as"] == "mandant_inflight_requests"
    assert rule["metricsQuery"] == "sum(<<.Series>>{<<.LabelMatchers>>}) by (<<.GroupBy>>)"


async def test_the_inflight_metric_is_one_mandant_exports(tmp_path: Path) -> None:
    from mandant.app import App
    from tests.servers import demo_config

    app = App(demo_config(), tmp_path)  # the registry is filled when the app is made
    names = {sample.name for family in app.metrics.collect() for sample in family.samples}
    assert "mandant_inflight_requests" in names


def test_network_policies_guard_each_port(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, objects = rendered
    policies = {p["metadata"]["name"]: p["spec"] for p in only(objects, "NetworkPolicy")}
    http = policies["mandant-http-monitoring"]["ingress"]
    monitoring = {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
    assert http == [
        {"from": [{"namespaceSelector": monitoring}], "ports": [{"port": 8002, "protocol": "TCP"}]}
    ]
    data_rules = policies["mandant-data-plane"]["ingress"]
    data_ports = {port["port"] for rule in data_rules for port in rule["ports"]}
    assert data_ports == {8000, 8001}
    (redis_rule,) = policies["mandant-redis"]["ingress"]
    (redis_from,) = redis_rule["from"]
    assert list(redis_from) == ["podSelector"]
    # Mandant's pods, the Deployment's and KServe's predictor's: each policy of theirs
    # selects them, Redis admits them, and nothing else of the kit.
    (deployment,) = only(objects, "Deployment")
    (kserve,) = yaml.safe_load_all((K8S / "kserve" / "inferenceservice.yaml").read_text())
    mandant_pods = [
        deployment["spec"]["template"]["metadata"]["labels"],
        {**kserve["metadata"]["labels"], "component": "predictor"},  # KServe adds its own
    ]
    for labels in mandant_pods:
        for name in ("mandant-data-plane", "mandant-http-monitoring"):
            assert _selects(policies[name]["podSelector"], labels), (name, labels)
        assert _selects(redis_from["podSelector"], labels), labels
    redis_pods = only(objects, "StatefulSet")[0]["spec"]["template"]["metadata"]["labels"]
    assert not _selects(redis_from["podSelector"], redis_pods)
    services = {s["metadata"]["name"]: s["spec"] for s in only(objects, "Service")}
    assert {p["port"] for p in services["mandant"]["ports"]} == {8000, 8001}
    assert [p["port"] for p in services["mandant-internal"]["ports"]] == [8002]
    assert services["mandant-internal"]["type"] == "ClusterIP"


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a label selector (``matchLabels``, ``matchExpressions`` with In)
    selects a pod of these labels, as Kubernetes reads it."""
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        assert expression["operator"] == "In", expression  # the only one the kit uses
        if labels.get(expression["key"]) not in expression["values"]:
            return False
    return True


def test_the_kserve_example_is_a_raw_deployment_serving_grpc() -> None:
    (service,) = yaml.safe_load_all((K8S / "kserve" / "inferenceservice.yaml").read_text())
    assert service["apiVersion"] == "serving.kserve.io/v1beta1"
    assert service["kind"] == "InferenceService"
    assert service["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == (
        "RawDeployment"
    )
    predictor = service["spec"]["predictor"]
    # KServe reads the HPA's metric from here (or serving.kserve.io/metrics), and
    # ignored the serving.kserve.io/metric annotation that stood in its place.
    assert (predictor["scaleMetric"], predictor["scaleTarget"]) == ("cpu", 70)
    assert not any(key.endswith("/metric") for key in service["metadata"]["annotations"])
    (container,) = predictor["containers"]
    assert container["ports"] == [{"name": "h2c", "containerPort": GRPC_PORT, "protocol": "TCP"}]
    assert container["args"] == ["--config", "/etc/mandant/mandant.yaml"]
    assert container["readinessProbe"]["grpc"] == {"port": GRPC_PORT}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
