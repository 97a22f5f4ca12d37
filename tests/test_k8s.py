"""Kubernetes, Helm and Ray Serve files (issue 15), checked offline: no cluster, no images.

The kustomize overlays are rendered with ``kubectl kustomize`` (the kustomize built into
kubectl) and every object is validated against the Kubernetes OpenAPI schema of
``K8S_VERSION`` with ``kubernetes-validate`` (strict: unknown fields fail). The Prometheus
Operator's PodMonitor is a custom resource without a schema there; it is checked against the
pods it must select. One test checks that the Kubernetes files, the production-stack Helm
values, the Ray Serve config and the compose stack serve the same models on the same port with
the same server flags and metrics path.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml
from test_deploy import compose_config

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu")
HELM_VALUES = ROOT / "deploy" / "helm" / "values-harp.yaml"
RAY_CONFIG = ROOT / "deploy" / "ray" / "serve-harp.yaml"
COMPOSE = ROOT / "deploy" / "docker-compose.yml"
COMPOSE_GPU = ROOT / "deploy" / "docker-compose.gpu.yml"
PROM_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
K8S_VERSION = "1.32.0"  # the schema version objects are validated against (kubectl 1.32 here)
SERVERS = ("vllm-dense", "vllm-harp")


def render(overlay: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is not installed (the machine image provides it)")
    out = subprocess.run([kubectl, "kustomize", str(K8S / "overlays" / overlay)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request) -> tuple[str, list[dict]]:
    return request.param, render(request.param)


def by_kind(objs: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def flags(args: list[str]) -> dict[str, str | None]:
    """``[MODEL, --a, x, --b]`` -> ``{"model": MODEL, "--a": "x", "--b": None}``."""
    out: dict[str, str | None] = {}
    rest = list(args)
    if rest and not rest[0].startswith("-"):
        out["model"] = rest.pop(0)
    while rest:
        key = rest.pop(0)
        assert key.startswith("--"), (key, args)
        out[key] = rest.pop(0) if rest and not rest[0].startswith("--") else None
    return out


def server_flags(objs: list[dict], name: str) -> dict[str, str | None]:
    (c,) = by_kind(objs, "Deployment")[name]["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["harp-vllm", "serve"]
    return flags(c["args"])


# ---------------------------------------------------------------------------- schema


def test_every_object_validates_against_the_kubernetes_schema(rendered):
    import kubernetes_validate

    overlay, objs = rendered
    kinds = sorted(o["kind"] for o in objs)
    assert kinds == ["ConfigMap", "Deployment", "Deployment", "Deployment", "Job", "Namespace",
                     "PersistentVolumeClaim", "PodMonitor", "Service", "Service", "Service"]
    for obj in objs:
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: checked in test_podmonitor_selects_the_servers_and_gateway
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        assert obj["metadata"].get("namespace", "harp-vllm") == "harp-vllm"


def test_schema_validation_catches_a_bad_object():
    """The validator is strict: a misspelt field and a wrong type both fail."""
    import kubernetes_validate

    objs = render("cpu")
    dep = by_kind(objs, "Deployment")["vllm-harp"]
    pod = dep["spec"]["template"]["spec"]
    pod["containers"][0]["readinessprobe"] = pod["containers"][0].pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSION, strict=True)
    job = by_kind(objs, "Job")["harp-prune"]
    job["spec"]["backoffLimit"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, K8S_VERSION, strict=True)


# ---------------------------------------------------------------------------- semantics


def test_servers_probes_shm_resources_and_scrape_annotations(rendered):
    overlay, objs = rendered
    deployments = by_kind(objs, "Deployment")
    image = f"harp-vllm:{'cpu' if overlay == 'cpu' else 'cuda'}"
    for name in SERVERS:
        pod = deployments[name]["spec"]["template"]
        spec = pod["spec"]
        (c,) = spec["containers"]
        assert c["image"] == image and spec["initContainers"][0]["image"] == image
        port = {p["name"]: p["containerPort"] for p in c["ports"]}["http"]
        assert flags(c["args"])["--port"] == str(port) == "8000"
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
        start = c["startupProbe"]
        assert start["periodSeconds"] * start["failureThreshold"] >= 600  # engine start-up
        ann = pod["metadata"]["annotations"]
        assert ann == {"prometheus.io/scrape": "true", "prometheus.io/port": str(port),
                       "prometheus.io/path": "/metrics"}
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
        assert volumes[mounts["/models"]]["persistentVolumeClaim"]["claimName"] == "harp-models"
        assert {"cpu", "memory"} <= set(c["resources"]["requests"])
        if overlay == "gpu":
            assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
        else:
            assert "nvidia.com/gpu" not in str(c["resources"])


def test_references_resolve(rendered):
    """Services select pods and ports that exist; every PVC, ConfigMap and gateway backend
    named anywhere exists; the Job writes the checkpoint the servers wait for and serve."""
    _, objs = rendered
    deployments, services = by_kind(objs, "Deployment"), by_kind(objs, "Service")
    claims, configmaps = by_kind(objs, "PersistentVolumeClaim"), by_kind(objs, "ConfigMap")
    (settings,) = configmaps.values()
    env = settings["data"]
    for svc in services.values():
        sel = svc["spec"]["selector"]
        targets = [d for d in deployments.values()
                   if sel.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert len(targets) == 1, svc["metadata"]["name"]
        (c,) = targets[0]["spec"]["template"]["spec"]["containers"]
        names = {p["name"] for p in c["ports"]}
        assert all(p["targetPort"] in names for p in svc["spec"]["ports"])
    pods = [d["spec"]["template"]["spec"] for d in deployments.values()]
    pods.append(by_kind(objs, "Job")["harp-prune"]["spec"]["template"]["spec"])
    for spec in pods:
        for v in spec.get("volumes", []):
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in claims
        for c in spec["containers"] + spec.get("initContainers", []):
            for ref in c.get("envFrom", []):
                assert ref["configMapRef"]["name"] in configmaps
    gw = deployments["gateway"]["spec"]["template"]["spec"]["containers"][0]
    for probe in ("readinessProbe", "livenessProbe"):  # /live: open even with protect_metrics
        assert gw[probe]["httpGet"] == {"path": "/live", "port": "http"}, probe
    # Keys are optional here, so the gateway must be told it may run open (it refuses else).
    assert "--allow-no-auth" in gw["args"]
    backends = [gw["args"][i + 1] for i, a in enumerate(gw["args"]) if a == "--backend"]
    for b in backends:
        host, port = re.fullmatch(r"\w+=http://([\w-]+):(\d+)", b).groups()
        assert int(port) in [p["port"] for p in services[host]["spec"]["ports"]]
    job = by_kind(objs, "Job")["harp-prune"]["spec"]["template"]["spec"]["containers"][0]
    assert '--out "/models/$HARP_PRUNED_NAME"' in job["command"][2]
    assert env["HARP_VLLM_CACHE"] == "/models"
    harp = server_flags(objs, "vllm-harp")
    assert harp["model"] == f"/models/{env['HARP_PRUNED_NAME']}"
    assert harp["--served-model-name"] == env["HARP_PRUNED_NAME"]
    assert server_flags(objs, "vllm-dense")["model"] == env["HARP_MODEL"]
    for d in SERVERS:
        wait = deployments[d]["spec"]["template"]["spec"]["initContainers"][0]["command"][2]
        assert '"/models/$HARP_PRUNED_NAME/config.json"' in wait


def test_podmonitor_selects_the_servers_and_gateway(rendered):
    _, objs = rendered
    (pm,) = by_kind(objs, "PodMonitor").values()
    assert pm["apiVersion"] == "monitoring.coreos.com/v1"
    (expr,) = pm["spec"]["selector"]["matchExpressions"]
    selected = []
    for name, dep in by_kind(objs, "Deployment").items():
        labels = dep["spec"]["template"]["metadata"]["labels"]
        if expr["operator"] == "In" and labels.get(expr["key"]) in expr["values"]:
            selected.append(name)
            ports = {p["name"] for c in dep["spec"]["template"]["spec"]["containers"]
                     for p in c["ports"]}
            for ep in pm["spec"]["podMetricsEndpoints"]:
                assert ep["port"] in ports
    assert sorted(selected) == ["gateway", *SERVERS]
    (ep,) = pm["spec"]["podMetricsEndpoints"]
    assert ep["path"] == "/metrics"
    assert {"sourceLabels": ["__meta_kubernetes_pod_label_variant"],
            "targetLabel": "variant"} in ep["relabelings"]


# ---------------------------------------------------------------------------- one stack


def chart_engine_flags(spec: dict, container_port: int) -> dict[str, str | None]:
    """The vLLM flags the production-stack chart builds from a ``modelSpec`` entry (its
    deployment template: ``vllm serve MODEL --host --port``, then ``vllmConfig``)."""
    cfg = spec.get("vllmConfig", {})
    args = [spec["modelURL"], "--host", "0.0.0.0", "--port", str(container_port)]
    args.append("--enable-prefix-caching" if cfg.get("enablePrefixCaching")
                else "--no-enable-prefix-caching")
    for key, flag in (("maxModelLen", "--max-model-len"), ("dtype", "--dtype"),
                      ("tensorParallelSize", "--tensor-parallel-size")):
        if key in cfg:
            args += [flag, str(cfg[key])]
    return flags(args + [str(a) for a in cfg.get("extraArgs", [])])


def test_kubernetes_helm_ray_and_compose_agree():
    """Same models and served names, port 8000, /health and /metrics, and the same vLLM flags
    (CPU: the k8s overlay and compose; GPU: the k8s overlay, compose's GPU override, the Helm
    values and the Ray engine_kwargs, except the GPU memory share: compose's two servers share
    one GPU, everywhere else each has its own)."""
    cpu, gpu = render("cpu"), render("gpu")
    compose = compose_config(COMPOSE)["services"]
    compose_gpu = compose_config(COMPOSE, COMPOSE_GPU)["services"]
    helm = yaml.safe_load(HELM_VALUES.read_text())["servingEngineSpec"]
    ray = yaml.safe_load(RAY_CONFIG.read_text())["applications"][0]["args"]["llm_configs"]

    def compose_flags(services: dict, name: str) -> dict:
        cmd = services[name]["command"]
        assert cmd[:2] == ["harp-vllm", "serve"]
        return flags(cmd[2:])

    pruned = "smollm2-harp-p8"
    for name in SERVERS:
        assert server_flags(cpu, name) == compose_flags(compose, name), name
        k8s_gpu = server_flags(gpu, name)
        c_gpu = compose_flags(compose_gpu, name)
        assert k8s_gpu.pop("--gpu-memory-utilization") == "0.9"
        assert c_gpu.pop("--gpu-memory-utilization")
        assert k8s_gpu == c_gpu, name
    # models, served names and paths
    assert server_flags(cpu, "vllm-harp")["model"] == f"/models/{pruned}"
    assert compose["model-prep"]["environment"]["HARP_PRUNED_DIR"] == f"/models/{pruned}"
    served = {"vllm-dense": "smollm2-135m", "vllm-harp": pruned}
    # Helm (the chart's own command line, `vllm serve`): same model names and flags as the
    # k8s GPU servers (the chart always states prefix caching: on, vLLM's default)
    port = helm["containerPort"]
    assert port == 8000
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert helm[probe]["httpGet"] == {"path": "/health", "port": port}
    charts = {s["name"]: chart_engine_flags(s, port) for s in helm["modelSpec"]}
    assert set(charts) == {"smollm2-dense", pruned}
    for name, chart in zip(SERVERS, (charts["smollm2-dense"], charts[pruned]), strict=True):
        k8s = server_flags(gpu, name)
        assert chart.pop("--enable-prefix-caching", "") is None
        assert chart.pop("--served-model-name") == served[name]
        k8s.pop("--served-model-name", None)
        chart_model, k8s_model = chart.pop("model"), k8s.pop("model")
        assert chart_model.rsplit("/", 1)[-1] == k8s_model.rsplit("/", 1)[-1]
        assert chart == k8s, name
    # Ray Serve LLM: engine_kwargs are the same vLLM arguments, keyed by model id
    ray_by_id = {c["model_loading_config"]["model_id"]: c for c in ray}
    assert set(ray_by_id) == set(served.values())
    for name, model_id in served.items():
        k8s = server_flags(gpu, name)
        kw = ray_by_id[model_id]["engine_kwargs"]
        assert ray_by_id[model_id]["model_loading_config"]["model_source"].endswith(
            k8s["model"].rsplit("/", 1)[-1])
        assert {f"--{k.replace('_', '-')}": str(v) for k, v in kw.items()} == {
            k: v for k, v in k8s.items() if k not in ("model", "--served-model-name", "--host",
                                                      "--port")}
        version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
        assert ray_by_id[model_id]["runtime_env"]["pip"] == [f"harp-vllm=={version}"]
    # metrics: one path everywhere (compose's Prometheus, k8s annotations and PodMonitor)
    prom = yaml.safe_load(PROM_CONFIG.read_text())
    paths = {j.get("metrics_path", "/metrics") for j in prom["scrape_configs"]}
    (pm,) = by_kind(cpu, "PodMonitor").values()
    paths |= {ep["path"] for ep in pm["spec"]["podMetricsEndpoints"]}
    for d in by_kind(cpu, "Deployment").values():
        paths.add(d["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"])
    assert paths == {"/metrics"}
    # ports: the servers listen on 8000 and the gateway on 8080 in compose and k8s alike
    gw = by_kind(cpu, "Deployment")["gateway"]["spec"]["template"]["spec"]["containers"][0]
    assert flags(gw["args"])["--port"] == flags(compose["gateway"]["command"][2:])["--port"]
    compose_backends = [a for a in compose["gateway"]["command"] if "=http://" in a]
    assert [a for a in gw["args"] if "=http://" in a] == compose_backends
