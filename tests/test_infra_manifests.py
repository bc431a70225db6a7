"""The production manifests cannot run here (no Docker engine, no cluster), so check what can
be checked statically: they parse, every image is pinned, every process that runs goalrank
code gets every variable flows.settings says a deployment needs, URLs point at ports the
target service really listens on, published ports bind to loopback, and no secret is written
into a manifest or onto a command line."""
from __future__ import annotations

import ast
import json
import re
from importlib.metadata import version
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from flows.settings import DEPLOY_ENV_VARS, SECRET_ENV_VARS, resolve_settings

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
SUBST = re.compile(r"^\$\{[A-Z_]+:\?[^}]+\}$")  # ${VAR:?message}: compose refuses to start without it
PLACEHOLDER = re.compile(r"\{\{\s*([\w.]+)\s*\}\}")


def compose() -> dict:
    return yaml.safe_load((INFRA / "compose.yaml").read_text())


def k8s_docs() -> list[dict]:
    docs = []
    for path in sorted((INFRA / "k8s").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def work_pool() -> dict:
    return json.loads((INFRA / "k8s" / "prefect-work-pool.json").read_text())


def prefect_yaml() -> dict:
    return yaml.safe_load((ROOT / "prefect.yaml").read_text())


def assert_pinned(image: str, where: str) -> None:
    assert image and not image.startswith("{{"), f"{where}: no image"
    if "@sha256:" in image:
        return
    name, _, tag = image.rpartition(":")
    assert name and "/" not in tag, f"{where}: image {image!r} has no explicit tag or digest"
    assert tag != "latest" and not tag.endswith("-latest"), f"{where}: image {image!r} is not pinned"


def env_of(svc: dict) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def runs_goalrank_code(svc: dict) -> bool:
    """The goalrank image, except where it only hosts a third-party server."""
    cmd = svc.get("command") or []
    return svc.get("image", "").startswith("goalrank:") and cmd[:2] not in (["mlflow", "server"], ["prefect", "server"])


def listen_ports(name: str, svc: dict) -> set[int]:
    """Ports the service's own command says it listens on."""
    cmd = [str(c) for c in svc.get("command") or []]
    ports = {5432} if svc.get("image", "").startswith("postgres:") else set()
    for flag, value in zip(cmd, cmd[1:]):
        if flag in ("--port", "--dashboard-port"):
            ports.add(int(value))
        if flag in ("--address", "--console-address") and value.startswith(":"):
            ports.add(int(value[1:]))
    return ports


def interpolate(value: str) -> str:
    """Compose's ${VAR:?message} substitution, with a stand-in value."""
    return re.sub(r"\$\{([A-Z_]+)(?::?[?-][^}]*)?\}", lambda m: m.group(1).lower(), value)


def host_port(value: str) -> tuple[str, int] | None:
    value = interpolate(value)
    if "://" in value:
        parts = urlsplit(value)
        return (parts.hostname, parts.port) if parts.hostname and parts.port else None
    m = re.fullmatch(r"([a-z][\w.\-]*):(\d+)", value)
    return (m.group(1), int(m.group(2))) if m else None


# --- compose ---------------------------------------------------------------------------

def test_compose_has_every_service_and_pinned_images():
    services = compose()["services"]
    assert {"postgres", "minio", "minio-init", "mlflow", "prefect-server", "prefect-worker", "ray-head",
            "ray-worker"} <= set(services)
    for name, svc in services.items():
        assert_pinned(svc.get("image", ""), f"compose service {name}")
    goalrank_images = {svc["image"] for svc in services.values() if svc["image"].startswith("goalrank:")}
    assert goalrank_images == {f"goalrank:{version('goalrank')}"}  # the image tag is the package version


def test_compose_goalrank_services_get_every_deploy_variable():
    services = compose()["services"]
    code = [n for n, s in services.items() if runs_goalrank_code(s)]
    assert {"prefect-worker", "ray-head", "ray-worker"} <= set(code)
    for name in code:
        env = env_of(services[name])
        missing = [v for v in DEPLOY_ENV_VARS if not env.get(v)]
        assert not missing, f"compose service {name} lacks {missing}"
        # and the values are valid settings (same validation the code applies)
        plain = {k: v for k, v in env.items() if not SUBST.match(v)}
        resolve_settings({}, {**plain, "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"}, {})


def test_compose_urls_point_at_ports_their_service_listens_on():
    services = compose()["services"]
    checked = 0
    for name, svc in services.items():
        for key, value in env_of(svc).items():
            hp = host_port(value)
            if hp is None or hp[0] not in services:
                continue
            host, port = hp
            assert port in listen_ports(host, services[host]), \
                f"{name}.{key}={value}: {host} listens on {listen_ports(host, services[host])}"
            checked += 1
    assert checked >= 15  # storage, tracking, prefect, ray, S3 endpoints across services


def test_compose_published_ports_bind_loopback_and_match_listeners():
    services = compose()["services"]
    published = 0
    for name, svc in services.items():
        for spec in svc.get("ports", []):
            host_ip, _, container = str(spec).split(":")
            assert host_ip == "127.0.0.1", f"{name} publishes {spec} beyond loopback"
            assert int(container) in listen_ports(name, svc), f"{name} publishes {spec}, not a listening port"
            published += 1
    assert published >= 4


def test_compose_secrets_come_from_the_env_file_never_literal_or_on_command_lines():
    services = compose()["services"]
    for name, svc in services.items():
        for key, value in env_of(svc).items():
            if key in SECRET_ENV_VARS or "PASSWORD" in key:
                assert SUBST.match(value), f"{name}.{key} must be ${{VAR:?...}} from infra/.env"
            if "://" in value and "@" in value:  # credentials inside a URI
                userinfo = urlsplit(value).netloc.rsplit("@", 1)[0]
                assert "${" in userinfo, f"{name}.{key} has a literal credential"
        cmd = " ".join(map(str, svc.get("command") or []))
        assert not re.search(r"PASSWORD|SECRET|AWS_ACCESS_KEY", cmd), f"{name} puts a credential on its command line"
    example = (INFRA / ".env.example").read_text()
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "POSTGRES_PASSWORD"):
        assert f"{var}=" in example
    assert "/infra/.env" in (ROOT / ".gitignore").read_text().split()


def test_compose_buckets_cover_storage_and_mlflow_artifacts():
    services = compose()["services"]
    made = {a.split("/", 1)[1] for a in services["minio-init"]["command"] if a.startswith("store/")}
    storage = env_of(services["prefect-worker"])["GOALRANK_STORAGE"]
    cmd = services["mlflow"]["command"]
    artifacts = cmd[cmd.index("--artifacts-destination") + 1]
    assert {urlsplit(storage).netloc, urlsplit(artifacts).netloc} <= made


def test_dockerfile_pins_its_base_and_copies_what_exists():
    text = (INFRA / "Dockerfile").read_text()
    for m in re.finditer(r"^FROM\s+(\S+)", text, re.M):
        assert_pinned(m.group(1), "Dockerfile FROM")
    for m in re.finditer(r"^COPY\s+(.+?)\s+\S+$", text, re.M):
        for src in m.group(1).split():
            assert (ROOT / src).exists(), f"Dockerfile copies missing {src}"
    assert f"torch=={version('torch').split('+')[0]}" in text
    assert (INFRA / "ray-join").stat().st_mode & 0o111


# --- Kubernetes ------------------------------------------------------------------------

def _containers(doc: dict) -> list[dict]:
    spec = doc["spec"]
    pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    return [c for p in pods for c in p["spec"]["containers"]]


def test_raycluster_is_complete_and_pinned():
    docs = k8s_docs()
    clusters = [d for d in docs if d["kind"] == "RayCluster"]
    assert len(clusters) == 1
    rc = clusters[0]
    assert rc["apiVersion"] == "ray.io/v1" and rc["spec"]["rayVersion"] == version("ray")
    assert rc["spec"]["workerGroupSpecs"] and all(g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
                                                  for g in rc["spec"]["workerGroupSpecs"])
    for c in _containers(rc):
        assert_pinned(c["image"], f"RayCluster container {c['name']}")
        res = c["resources"]
        assert res["requests"]["cpu"] and res["requests"]["memory"] and res["limits"]["memory"], c["name"]


def _k8s_env_names(container: dict, configmaps: dict[str, dict]) -> set[str]:
    names = {e["name"] for e in container.get("env", [])}
    for src in container.get("envFrom", []):
        ref = src["configMapRef"]["name"]
        assert ref in configmaps, f"container {container['name']} reads missing ConfigMap {ref}"
        names |= set(configmaps[ref]["data"])
    return names


def test_k8s_goalrank_pods_get_every_deploy_variable_and_secrets_from_a_secret():
    docs = k8s_docs()
    configmaps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    rc = next(d for d in docs if d["kind"] == "RayCluster")
    job = work_pool()["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    for c in _containers(rc) + [job]:
        missing = set(DEPLOY_ENV_VARS) - _k8s_env_names(c, configmaps)
        assert not missing, f"container {c['name']} lacks {sorted(missing)}"
        for e in c.get("env", []):
            if e["name"] in SECRET_ENV_VARS:
                assert "secretKeyRef" in e.get("valueFrom", {}) and "value" not in e, e["name"]
    for cm in configmaps.values():
        assert not set(cm["data"]) & set(SECRET_ENV_VARS), "secrets belong in a Secret, not a ConfigMap"
        resolve_settings({}, dict(cm["data"]), {})  # valid settings


def test_k8s_ray_address_points_at_the_kuberay_head_service_gcs_port():
    docs = k8s_docs()
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    rc = next(d for d in docs if d["kind"] == "RayCluster")
    host, port = host_port(cm["data"]["RAY_ADDRESS"])
    assert host.split(".")[0] == f"{rc['metadata']['name']}-head-svc"
    assert host.split(".")[1] == rc["metadata"]["namespace"]
    head = rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert port in {p["containerPort"] for p in head["ports"]} and port == 6379


def test_work_pool_template_renders_with_prefect_and_is_a_valid_job():
    from prefect.utilities.templating import apply_values

    tpl = work_pool()
    props = tpl["variables"]["properties"]
    used = set(PLACEHOLDER.findall(json.dumps(tpl["job_configuration"])))
    assert used <= set(props), f"placeholders without a variable: {used - set(props)}"
    assert_pinned(props["image"]["default"], "work pool default image")
    values = {k: v["default"] for k, v in props.items() if "default" in v}
    values.update(name="goalrank-daily-run", command="prefect flow-run execute", env={}, labels={})
    job = apply_values(tpl["job_configuration"]["job_manifest"], values, remove_notset=True)
    # The structure prefect-kubernetes insists on (its _get_base_job_manifest).
    assert job["apiVersion"] == "batch/v1" and job["kind"] == "Job"
    pod = job["spec"]["template"]["spec"]
    assert (pod["parallelism"], pod["completions"], pod["restartPolicy"]) == (1, 1, "Never")
    c = pod["containers"][0]
    assert c["name"] == "prefect-job" and c["image"] == "goalrank:0.1.0"
    assert c["resources"]["requests"]["memory"] == "4Gi"
    assert c["command"] == ["/app/infra/ray-join"] and (INFRA / "ray-join").exists()


# --- prefect.yaml ----------------------------------------------------------------------

def _flow_params(entrypoint: str) -> list[str]:
    path, func = entrypoint.split(":")
    tree = ast.parse((ROOT / path).read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == func)
    assert any("flow" in ast.unparse(d) for d in fn.decorator_list), f"{entrypoint} is not a Prefect flow"
    return [a.arg for a in fn.args.args + fn.args.kwonlyargs]


def test_prefect_yaml_schedules_the_daily_flow():
    from prefect.client.schemas.schedules import CronSchedule

    data = prefect_yaml()
    deps = {d["name"]: d for d in data["deployments"]}
    assert "goalrank-daily" in deps
    if not (ROOT / "flows" / "daily.py").exists():
        pytest.skip("flows/daily.py not written yet")
    defaults = resolve_settings({}, {}, {})
    for name, d in deps.items():
        params = _flow_params(d["entrypoint"])
        assert set(d.get("parameters", {})) <= set(params), f"{name}: parameters not in the flow's signature"
        (sched,) = d["schedules"]
        CronSchedule(cron=sched["cron"], timezone=sched["timezone"])  # Prefect's own validation
        assert (sched["cron"], sched["timezone"]) == (defaults.schedule_cron, defaults.schedule_timezone)
        assert d["work_pool"]["name"]
        if "image" in d["work_pool"].get("job_variables", {}):
            assert_pinned(d["work_pool"]["job_variables"]["image"], f"prefect.yaml {name}")
        assert not set(d.get("parameters", {})) & {"aws_access_key_id", "aws_secret_access_key"}
    assert data["prefect-version"] == version("prefect")
