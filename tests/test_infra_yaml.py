"""The cluster YAMLs: launcher configs against the schema Ray ships and Ray's own (offline) config
preparation, KubeRay manifests for the fields KubeRay needs and for a run root in object storage
(every stage on one s3:// root with --tracking-uri, no volume for it, credentials on every Ray pod),
the RayService's Serve config against Serve's schema model. Each check also runs on a broken copy,
to show that it can fail.

Fast and offline: nothing here starts Ray or contacts a cloud or a Kubernetes cluster.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import tomllib
from pathlib import Path

import click
import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

PROJECT = Path(__file__).resolve().parents[1]
LAUNCHER_CONFIGS = {
    "aws": PROJECT / "ray_cluster.yaml",
    "local": PROJECT / "infra" / "cluster-local.yaml",
}
RAYJOB = PROJECT / "infra" / "kuberay" / "rayjob.yaml"
RAYSERVICE = PROJECT / "infra" / "kuberay" / "rayservice.yaml"
RAY_SCHEMA = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"

TELEMETRY_OFF = {"RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true"}
SHELL_OPERATORS = {";", "&&", "||", "|", "&", ";;", "(", ")", "<", ">", ">>"}
# KubeRay validates RayJob/RayService names: DNS-1035 labels, at most 53 - 6 = 47 characters
# (it appends 6 characters for the cluster and "-serve-svc" for a Service).
DNS_1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
MAX_KUBERAY_NAME = 47
# The RayJob runs the whole pipeline, in this order, on a run root in object storage.
PIPELINE_STAGES = ["prepare", "train-experts", "cache", "sweep", "report"]
OBJECT_STORE_URI = re.compile(r"(s3|gs)://[^/\s]+(/\S*)?")
# Pod volumes that hold no run data (scratch, credentials, config); anything else (a PVC, NFS, a host
# path, a CSI volume) would be a shared volume for the run root, which now lives in the bucket.
SCRATCH_VOLUMES = {"emptyDir", "secret", "configMap", "projected", "downwardAPI"}


def load(path: Path) -> dict:
    docs = list(yaml.safe_load_all(path.read_text()))
    assert len(docs) == 1, f"{path.name}: expected one YAML document, found {len(docs)}"
    assert isinstance(docs[0], dict), f"{path.name}: not a mapping"
    return docs[0]


@pytest.fixture(scope="module")
def schema() -> dict:
    return json.loads(RAY_SCHEMA.read_text())


@pytest.fixture(params=sorted(LAUNCHER_CONFIGS))
def launcher(request) -> tuple[str, dict]:
    return request.param, load(LAUNCHER_CONFIGS[request.param])


# ---------------------------------------------------------------- shell command parsing helpers


def simple_commands(script: str) -> list[list[str]]:
    """Split a shell string into simple commands (token lists) at ; && || | & and newlines."""
    lexer = shlex.shlex(script.replace("\n", " ; "), posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, current = [], []
    for token in lexer:
        if token in SHELL_OPERATORS:
            if current:
                commands.append(current)
            current = []
        else:
            current.append(token)
    if current:
        commands.append(current)
    return commands


def options(tokens: list[str]) -> dict[str, str | None]:
    """--key=value and --key value (or a bare --flag) from a token list."""
    found: dict[str, str | None] = {}
    for i, token in enumerate(tokens):
        if not token.startswith("--"):
            continue
        if "=" in token:
            key, value = token[2:].split("=", 1)
        else:
            following = tokens[i + 1] if i + 1 < len(tokens) else None
            key = token[2:]
            value = following if following is not None and not following.startswith("-") else None
        found[key] = value
    return found


def ray_starts(commands: list[str]) -> list[tuple[dict[str, str], dict[str, str | None]]]:
    """Each `ray start` in a list of launcher commands: (environment it runs with, its options)."""
    starts = []
    for command in commands:
        env: dict[str, str] = {}
        for tokens in simple_commands(command):
            if tokens[0] == "export":
                env.update(t.split("=", 1) for t in tokens[1:] if "=" in t)
                continue
            inline = {}
            while tokens and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", tokens[0]):
                key, value = tokens.pop(0).split("=", 1)
                inline[key] = value
            if tokens[:2] == ["ray", "start"]:
                starts.append(({**env, **inline}, options(tokens[2:])))
    return starts


# ---------------------------------------------------------------- launcher config checks


def check_launcher_config(cfg: dict) -> None:
    """What this project needs of a launcher config beyond Ray's schema."""
    heads = ray_starts(cfg.get("head_start_ray_commands", []))
    assert len(heads) == 1, f"expected one `ray start` on the head, found {len(heads)}"
    env, opts = heads[0]
    assert "head" in opts, "the head's `ray start` lacks --head"
    assert opts.get("port") == "6379", f"head GCS port {opts.get('port')!r}, expected 6379"
    assert opts.get("dashboard-host") == "127.0.0.1", (
        f"dashboard bound to {opts.get('dashboard-host')!r}: it must be 127.0.0.1 (SSH tunnel only)"
    )
    assert opts.get("autoscaling-config") == "~/ray_bootstrap_config.yaml", (
        "the head's `ray start` must pass --autoscaling-config=~/ray_bootstrap_config.yaml"
    )
    workers = ray_starts(cfg.get("worker_start_ray_commands", []))
    assert len(workers) == 1, f"expected one `ray start` on workers, found {len(workers)}"
    address = workers[0][1].get("address")
    assert address == "$RAY_HEAD_IP:6379", f"workers join {address!r}, not $RAY_HEAD_IP:6379"
    for where, (env, _) in (("head", heads[0]), ("worker", workers[0])):
        for key, value in TELEMETRY_OFF.items():
            assert env.get(key) == value, f"{where} `ray start` runs without {key}={value}"

    mounts = cfg.get("file_mounts") or {}
    project_mounts = [remote for remote, local in mounts.items() if local in (".", "./")]
    assert project_mounts, "file_mounts do not copy the project ('.')"
    installs = [
        tokens
        for command in cfg.get("setup_commands", [])
        for tokens in simple_commands(command)
        if "pip" in tokens and "install" in tokens
    ]
    editable = [tokens[i + 1] for tokens in installs for i, t in enumerate(tokens[:-1]) if t == "-e"]
    assert set(editable) & set(project_mounts), (
        f"no setup command runs `pip install -e` on the mounted project {project_mounts}"
    )
    assert ".venv" in (cfg.get("rsync_exclude") or []), "the local .venv (GBs) would be copied"


def test_ray_ships_its_cluster_schema():
    assert RAY_SCHEMA.is_file(), f"no schema at {RAY_SCHEMA}"


def test_launcher_config_matches_rays_schema(launcher, schema):
    _, cfg = launcher
    jsonschema.validate(cfg, schema)


@pytest.mark.parametrize(
    "breakage",
    ["no provider type", "unknown top-level key", "negative max_workers", "resources as text"],
)
def test_rays_schema_rejects_a_broken_copy(launcher, schema, breakage):
    _, cfg = launcher
    broken = copy.deepcopy(cfg)
    if breakage == "no provider type":
        del broken["provider"]["type"]
    elif breakage == "unknown top-level key":
        broken["head_node_typ"] = "typo"
    elif breakage == "negative max_workers":
        broken["max_workers"] = -1
    else:
        broken["available_node_types"] = {"x": {"resources": {"GPU": "one"}, "node_config": {}}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_ray_prepares_and_validates_the_config_offline(launcher):
    name, cfg = launcher
    prepared = prepare_config(cfg)
    validate_config(prepared)
    types = prepared["available_node_types"]
    if name == "local":
        # One node type for every machine; all listed workers are kept in the cluster.
        n = len(cfg["provider"]["worker_ips"])
        assert prepared["max_workers"] == n
        assert types[prepared["head_node_type"]]["min_workers"] == n
    else:
        assert types[prepared["head_node_type"]]["max_workers"] == 0
        check_gpu_worker_type(prepared)
    # Ray's default setup commands must not leak in: ours replace them.
    assert prepared["setup_commands"] == cfg["setup_commands"]


def test_ray_rejects_a_prepared_config_with_an_unknown_head_type():
    prepared = prepare_config(load(LAUNCHER_CONFIGS["aws"]))
    prepared["head_node_type"] = "no.such.type"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(prepared)


@pytest.mark.parametrize("breakage", ["node types given", "no worker_ips"])
def test_ray_rejects_a_broken_local_config(breakage):
    broken = load(LAUNCHER_CONFIGS["local"])
    if breakage == "node types given":
        broken["available_node_types"] = {"a": {"resources": {}, "node_config": {}}}
    else:
        del broken["provider"]["worker_ips"]
    with pytest.raises(click.ClickException):
        prepare_config(broken)


def test_local_config_placeholders_are_plain_strings():
    provider = load(LAUNCHER_CONFIGS["local"])["provider"]
    assert provider["type"] == "local"
    assert isinstance(provider["head_ip"], str) and provider["head_ip"]
    assert provider["worker_ips"] and all(isinstance(ip, str) for ip in provider["worker_ips"])


def test_launcher_config_binds_dashboard_to_loopback_and_installs_the_project(launcher):
    _, cfg = launcher
    check_launcher_config(cfg)


def _set_head_start(cfg: dict, old: str, new: str) -> None:
    commands = cfg["head_start_ray_commands"]
    assert any(old in c for c in commands), f"{old!r} not in the head start commands"
    cfg["head_start_ray_commands"] = [c.replace(old, new) for c in commands]


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("dashboard on all interfaces", "dashboard bound to '0.0.0.0'"),
        ("dashboard host left to Ray", "dashboard bound to None"),
        ("telemetry on", "RAY_USAGE_STATS_ENABLED"),
        ("no autoscaling config", "autoscaling-config"),
        ("installs something else", "pip install -e"),
        ("project not mounted", "do not copy the project"),
        ("venv copied", ".venv"),
        ("workers join elsewhere", "RAY_HEAD_IP"),
    ],
)
def test_launcher_checks_catch_a_broken_copy(launcher, breakage, message):
    _, cfg = launcher
    broken = copy.deepcopy(cfg)
    if breakage == "dashboard on all interfaces":
        _set_head_start(broken, "--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0")
    elif breakage == "dashboard host left to Ray":
        _set_head_start(broken, "--dashboard-host=127.0.0.1", "")
    elif breakage == "telemetry on":
        _set_head_start(broken, "RAY_USAGE_STATS_ENABLED=0", "")
    elif breakage == "no autoscaling config":
        _set_head_start(broken, "--autoscaling-config=~/ray_bootstrap_config.yaml", "")
    elif breakage == "installs something else":
        broken["setup_commands"] = ["pip install bmoe"]
    elif breakage == "project not mounted":
        broken["file_mounts"] = {}
    elif breakage == "venv copied":
        broken["rsync_exclude"] = [p for p in broken["rsync_exclude"] if p != ".venv"]
    else:
        starts = broken["worker_start_ray_commands"]
        broken["worker_start_ray_commands"] = [
            c.replace("$RAY_HEAD_IP:6379", "10.9.9.9:6379") for c in starts
        ]
    with pytest.raises(AssertionError, match=re.escape(message)):
        check_launcher_config(broken)


def check_gpu_worker_type(cfg: dict) -> None:
    head = cfg["head_node_type"]
    gpu_types = {
        name: node
        for name, node in cfg["available_node_types"].items()
        if name != head and node.get("resources", {}).get("GPU", 0) >= 1
    }
    assert gpu_types, "no worker node type offers a GPU"
    for name, node in gpu_types.items():
        assert node.get("min_workers", 0) == 0, f"{name}: GPU workers should scale from 0"
        assert node.get("max_workers", 0) >= 1, f"{name}: GPU workers cannot scale up"
        assert cfg["max_workers"] >= node["max_workers"], f"{name}: above the global max_workers"
    head_resources = cfg["available_node_types"][head].get("resources", {})
    assert "GPU" not in head_resources, "the head is a CPU node"


def test_aws_config_has_a_cpu_head_and_autoscaled_gpu_workers():
    cfg = load(LAUNCHER_CONFIGS["aws"])
    assert cfg["provider"]["type"] == "aws" and cfg["cluster_name"] == "bmoe"
    check_gpu_worker_type(cfg)


def test_gpu_worker_check_catches_a_cpu_only_copy():
    broken = load(LAUNCHER_CONFIGS["aws"])
    for node in broken["available_node_types"].values():
        node["resources"].pop("GPU", None)
    with pytest.raises(AssertionError, match="GPU"):
        check_gpu_worker_type(broken)


def test_the_mounted_project_is_installable_as_bmoe():
    # file_mounts copy "." (the repository root, where `ray up` runs): it must be this package.
    pyproject = tomllib.loads((PROJECT / "pyproject.toml").read_text())
    assert pyproject["project"]["name"] == "bmoe"
    assert "bmoe" in pyproject["project"]["scripts"]


# ---------------------------------------------------------------- KubeRay manifests


def _quantity(value) -> float:
    return float(value) if str(value).replace(".", "", 1).isdigit() else 0.0


def _walk(node, key):
    """Every value stored under `key` anywhere in a nested structure."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from _walk(v, key)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item, key)


def check_header(doc: dict, kind: str) -> None:
    assert doc.get("apiVersion") == "ray.io/v1", f"apiVersion {doc.get('apiVersion')!r}"
    assert doc.get("kind") == kind, f"kind {doc.get('kind')!r}, expected {kind}"
    name = (doc.get("metadata") or {}).get("name")
    ok = isinstance(name, str) and DNS_1035_LABEL.fullmatch(name) and len(name) <= MAX_KUBERAY_NAME
    assert ok, f"metadata.name {name!r}: not a DNS-1035 label of at most {MAX_KUBERAY_NAME} chars"


def check_container(template: dict, where: str) -> dict:
    containers = ((template or {}).get("spec") or {}).get("containers") or []
    assert containers, f"{where}: template.spec.containers is empty"
    container = containers[0]
    assert isinstance(container.get("name"), str) and container["name"], f"{where}: container name"
    image = container.get("image")
    assert isinstance(image, str) and image, f"{where}: container image"
    return container


def check_start_params(params, where: str) -> None:
    assert isinstance(params, dict), f"{where}: rayStartParams missing"
    bad = {k: v for k, v in params.items() if not isinstance(v, str)}
    # KubeRay's rayStartParams is a map[string]string.
    assert not bad, f"{where}: rayStartParams values must be strings: {bad}"


def check_ray_cluster_spec(spec: dict) -> None:
    assert isinstance(spec, dict), "no Ray cluster spec"
    head = spec.get("headGroupSpec") or {}
    check_start_params(head.get("rayStartParams"), "headGroupSpec")
    assert head["rayStartParams"].get("dashboard-host") in ("0.0.0.0", "127.0.0.1"), (
        "headGroupSpec.rayStartParams.dashboard-host not set"
    )
    check_container(head.get("template"), "headGroupSpec")
    groups = spec.get("workerGroupSpecs")
    assert isinstance(groups, list) and groups, "workerGroupSpecs is empty"
    gpu_groups = []
    for group in groups:
        name = group.get("groupName")
        assert isinstance(name, str) and name, "a worker group has no groupName"
        counts = [group.get(k) for k in ("minReplicas", "replicas", "maxReplicas")]
        ints = all(isinstance(c, int) and c >= 0 for c in counts)
        assert ints, f"{name}: replica counts {counts}"
        ordered = counts[0] <= counts[1] <= counts[2]
        assert ordered, f"{name}: not minReplicas <= replicas <= maxReplicas"
        check_start_params(group.get("rayStartParams"), name)
        container = check_container(group.get("template"), name)
        limits = (container.get("resources") or {}).get("limits") or {}
        if _quantity(limits.get("nvidia.com/gpu", 0)) >= 1:
            gpu_groups.append(name)
    assert gpu_groups, "no worker group's container has an nvidia.com/gpu limit"
    exposed = [t for t in _walk(spec, "serviceType") if t != "ClusterIP"]
    exposed += [t for t in _walk(spec, "type") if t in ("LoadBalancer", "NodePort")]
    assert not exposed, f"a Service would be exposed outside the cluster: {exposed}"
    check_object_store_access(spec)


def _pod_templates(spec: dict) -> list[tuple[str, dict]]:
    head = ("headGroupSpec", (spec.get("headGroupSpec") or {}).get("template") or {})
    workers = [(g.get("groupName"), g.get("template") or {}) for g in spec.get("workerGroupSpecs") or []]
    return [head, *workers]


def _has_secret_credentials(container: dict) -> bool:
    from_secret = any((source or {}).get("secretRef", {}).get("name") for source in container.get("envFrom") or [])
    keyed = {
        item.get("name")
        for item in container.get("env") or []
        if ((item.get("valueFrom") or {}).get("secretKeyRef") or {}).get("name")
    }
    return from_secret or "AWS_ACCESS_KEY_ID" in keyed


def check_object_store_access(spec: dict) -> None:
    """The run root is in a bucket: no pod mounts a volume for it, and every Ray pod (head and each
    worker group) gets the bucket's credentials: from a Secret (envFrom / secretKeyRef) or through a
    service account (IRSA, workload identity)."""
    for where, template in _pod_templates(spec):
        pod = template.get("spec") or {}
        for volume in pod.get("volumes") or []:
            kinds = set(volume) - {"name"}
            assert kinds <= SCRATCH_VOLUMES, (
                f"{where}: volume {volume.get('name')!r} ({', '.join(sorted(kinds))}) looks like a volume for "
                "the run root; the run root is in object storage"
            )
        containers = pod.get("containers") or []
        ok = bool(pod.get("serviceAccountName")) or (containers and _has_secret_credentials(containers[0]))
        assert ok, f"{where}: no object-store credentials (envFrom a Secret, secretKeyRef or serviceAccountName)"


def rayjob_stages(entrypoint: str) -> list[list[str]]:
    """The `bmoe` commands the RayJob's entrypoint runs, in order (inside its `bash -c '...'`)."""
    tokens = simple_commands(entrypoint)[0]
    script = tokens[2] if tokens[:2] in (["bash", "-c"], ["sh", "-c"]) else shlex.join(tokens)
    return [t for t in simple_commands(script) if t and t[0] == "bmoe" and len(t) > 1]


def check_rayjob_stages(entrypoint: str) -> None:
    """Every stage, in order, on one object-store root, each with an MLflow server to log to."""
    stages = rayjob_stages(entrypoint)
    names = [t[1] for t in stages]
    ordered = [n for n in names if n in PIPELINE_STAGES]
    assert ordered == PIPELINE_STAGES, (
        f"the entrypoint runs stages {names}; expected {', '.join(PIPELINE_STAGES)} in that order"
    )
    roots = set()
    for tokens in stages:
        opts = options(tokens[2:])
        root = opts.get("root")
        assert root and OBJECT_STORE_URI.fullmatch(root), (
            f"bmoe {tokens[1]}: --root {root!r} is not an object-store URI (s3://bucket/...)"
        )
        roots.add(root)
        tracking = opts.get("tracking-uri")
        assert tracking and "://" in tracking, (
            f"bmoe {tokens[1]}: no --tracking-uri (a URI root needs an MLflow server)"
        )
    assert len(roots) == 1, f"the stages use different run roots: {sorted(roots)}"
    prepare = options(stages[names.index("prepare")][2:])
    data_root = prepare.get("data-root")
    assert data_root and OBJECT_STORE_URI.fullmatch(data_root), (
        f"bmoe prepare: --data-root {data_root!r} is not an object-store URI (no volume holds the data)"
    )


def check_rayjob(doc: dict) -> None:
    check_header(doc, "RayJob")
    spec = doc.get("spec") or {}
    entrypoint = spec.get("entrypoint")
    assert isinstance(entrypoint, str) and entrypoint.strip(), "spec.entrypoint missing"
    # KubeRay pastes the entrypoint into a shell line after `ray job submit --`: a bare ; or &&
    # would run the rest in the submitter pod, outside Ray. Chains go inside `bash -c '...'`.
    outer = simple_commands(entrypoint)
    assert len(outer) == 1, f"entrypoint has shell operators outside quotes: {outer}"
    tokens = outer[0]
    script = tokens[2] if tokens[:2] in (["bash", "-c"], ["sh", "-c"]) else shlex.join(tokens)
    sweeps = [t for t in simple_commands(script) if t[:2] == ["bmoe", "sweep"]]
    assert sweeps, "the entrypoint does not run `bmoe sweep`"
    opts = options(sweeps[-1][2:])
    wanted = opts.get("task") == "superres" and opts.get("profile") == "paper"
    assert wanted, f"sweep options {opts}"
    assert spec.get("shutdownAfterJobFinishes") is True, "shutdownAfterJobFinishes must be true"
    ttl = spec.get("ttlSecondsAfterFinished")
    assert isinstance(ttl, int) and ttl >= 0, f"ttlSecondsAfterFinished {ttl!r}"
    deadline = spec.get("activeDeadlineSeconds", 1)
    assert isinstance(deadline, int) and deadline > 0, f"activeDeadlineSeconds {deadline!r}"
    check_rayjob_stages(entrypoint)
    check_ray_cluster_spec(spec.get("rayClusterSpec"))


def check_rayservice(doc: dict) -> dict:
    check_header(doc, "RayService")
    spec = doc.get("spec") or {}
    text = spec.get("serveConfigV2")
    assert isinstance(text, str), "spec.serveConfigV2 must be a YAML string"
    serve_config = yaml.safe_load(text)
    apps = (serve_config or {}).get("applications") or []
    assert apps, "serveConfigV2 has no applications"
    import_path = apps[0].get("import_path")
    assert import_path == "serving.app:build_app", f"import_path {import_path!r}"
    assert apps[0].get("route_prefix") == "/", f"route_prefix {apps[0].get('route_prefix')!r}"
    root = str((apps[0].get("args") or {}).get("root"))
    assert OBJECT_STORE_URI.fullmatch(root), f"serve root {root!r} is not an object-store URI"
    check_ray_cluster_spec(spec.get("rayClusterConfig"))
    return serve_config


def test_rayjob_has_what_kuberay_needs():
    doc = load(RAYJOB)
    check_rayjob(doc)
    head_params = doc["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]
    assert head_params["dashboard-host"] == "0.0.0.0"


def test_rayjob_runs_every_stage_on_the_bucket():
    stages = rayjob_stages(load(RAYJOB)["spec"]["entrypoint"])
    assert [t[1] for t in stages] == PIPELINE_STAGES
    for tokens in stages:
        opts = options(tokens[2:])
        assert opts["root"].startswith("s3://"), tokens
        assert opts["tracking-uri"], tokens
        assert (opts.get("task"), opts.get("profile")) == ("superres", "paper"), tokens
    gpu = {t[1] for t in stages if "gpu" in options(t[2:])}
    assert gpu == {"train-experts", "cache"}


@pytest.mark.parametrize("path", [RAYJOB, RAYSERVICE], ids=["rayjob", "rayservice"])
def test_kuberay_manifests_mount_no_volume_for_the_run_root(path):
    doc = load(path)
    assert not list(_walk(doc, "persistentVolumeClaim")), "a PersistentVolumeClaim is still mounted"
    paths = [mount.get("mountPath") for mounts in _walk(doc, "volumeMounts") for mount in mounts]
    assert paths == [p for p in paths if p == "/dev/shm"], f"mounts besides /dev/shm: {paths}"
    for where, template in _pod_templates(_cluster(doc)):
        container = template["spec"]["containers"][0]
        secrets = [s["secretRef"]["name"] for s in container.get("envFrom") or [] if "secretRef" in s]
        assert secrets == ["bmoe-object-store"], f"{where}: credentials from {secrets}"


def test_rayservice_has_what_kuberay_needs_and_serve_accepts_its_config():
    from ray.serve.schema import ServeDeploySchema

    serve_config = check_rayservice(load(RAYSERVICE))
    parsed = ServeDeploySchema.model_validate(serve_config)
    assert parsed.applications[0].import_path == "serving.app:build_app"


def test_serve_schema_rejects_a_broken_serve_config():
    import pydantic
    from ray.serve.schema import ServeDeploySchema

    serve_config = yaml.safe_load(load(RAYSERVICE)["spec"]["serveConfigV2"])
    serve_config["applications"][0]["import_path"] = "serving"
    with pytest.raises(pydantic.ValidationError):
        ServeDeploySchema.model_validate(serve_config)


def _cluster(doc: dict) -> dict:
    spec = doc["spec"]
    return spec.get("rayClusterSpec") or spec["rayClusterConfig"]


def _head(doc: dict) -> dict:
    return _cluster(doc)["headGroupSpec"]


def _worker(doc: dict) -> dict:
    return _cluster(doc)["workerGroupSpecs"][0]


def _gpu_limits(doc: dict) -> dict:
    return _worker(doc)["template"]["spec"]["containers"][0]["resources"]["limits"]


def _set_entrypoint(doc: dict, entrypoint: str) -> None:
    doc["spec"]["entrypoint"] = entrypoint


def _edit_stage(doc: dict, stage: str, old: str, new: str) -> None:
    """Replace `old` by `new` in one stage's command of the RayJob entrypoint."""
    parts = doc["spec"]["entrypoint"].split(";")
    hits = [i for i, part in enumerate(parts) if f"bmoe {stage} " in part]
    assert len(hits) == 1 and old in parts[hits[0]], f"{old!r} not in the {stage} stage"
    parts[hits[0]] = parts[hits[0]].replace(old, new)
    doc["spec"]["entrypoint"] = ";".join(parts)


def _drop_stage(doc: dict, stage: str) -> None:
    parts = doc["spec"]["entrypoint"].split(";")
    kept = [part for part in parts if f"bmoe {stage} " not in part]
    assert len(kept) == len(parts) - 1, f"no {stage} stage"
    entrypoint = ";".join(kept)
    doc["spec"]["entrypoint"] = entrypoint if entrypoint.endswith("'") else entrypoint + "'"


def _add_run_root_volume(template: dict) -> None:
    template["spec"].setdefault("volumes", []).append(
        {"name": "bmoe-runs", "persistentVolumeClaim": {"claimName": "bmoe-runs"}}
    )


def _drop_credentials(template: dict) -> None:
    template["spec"]["containers"][0].pop("envFrom")


RAYJOB_BREAKAGES = {
    "wrong apiVersion": (lambda d: d.update(apiVersion="ray.io/v1alpha1"), "apiVersion"),
    "wrong kind": (lambda d: d.update(kind="RayCluster"), "kind"),
    "no name": (lambda d: d["metadata"].pop("name"), "metadata.name"),
    "name too long": (lambda d: d["metadata"].update(name="b" * 48), "metadata.name"),
    "name not DNS-1035": (lambda d: d["metadata"].update(name="1-bmoe"), "metadata.name"),
    "no entrypoint": (lambda d: d["spec"].pop("entrypoint"), "entrypoint"),
    "unwrapped chain": (
        lambda d: _set_entrypoint(d, "bmoe cache --task superres && bmoe sweep --task superres"),
        "shell operators",
    ),
    "no sweep": (lambda d: _set_entrypoint(d, "bmoe report --task superres"), "bmoe sweep"),
    "demo profile": (
        lambda d: _set_entrypoint(d, "bmoe sweep --task superres --profile demo"),
        "sweep options",
    ),
    "cluster kept": (
        lambda d: d["spec"].update(shutdownAfterJobFinishes=False),
        "shutdownAfterJobFinishes",
    ),
    "no ttl": (lambda d: d["spec"].pop("ttlSecondsAfterFinished"), "ttlSecondsAfterFinished"),
    "zero deadline": (
        lambda d: d["spec"].update(activeDeadlineSeconds=0),
        "activeDeadlineSeconds",
    ),
    "no head params": (lambda d: _head(d).pop("rayStartParams"), "rayStartParams missing"),
    "numeric start param": (
        lambda d: _head(d)["rayStartParams"].update({"num-cpus": 0}),
        "must be strings",
    ),
    "no head image": (
        lambda d: _head(d)["template"]["spec"]["containers"][0].pop("image"),
        "container image",
    ),
    "no worker group name": (lambda d: _worker(d).pop("groupName"), "groupName"),
    "replicas above max": (
        lambda d: _worker(d).update(replicas=99),
        "minReplicas <= replicas <= maxReplicas",
    ),
    "no maxReplicas": (lambda d: _worker(d).pop("maxReplicas"), "replica counts"),
    "no gpu": (lambda d: _gpu_limits(d).pop("nvidia.com/gpu"), "nvidia.com/gpu"),
    "load balancer": (lambda d: _head(d).update(serviceType="LoadBalancer"), "exposed"),
    "no report": (lambda d: _drop_stage(d, "report"), "in that order"),
    "no prepare": (lambda d: _drop_stage(d, "prepare"), "in that order"),
    "local root": (
        lambda d: _edit_stage(d, "cache", "--root s3://my-bucket/bmoe-runs", "--root /mnt/bmoe-runs"),
        "bmoe cache: --root '/mnt/bmoe-runs' is not an object-store URI",
    ),
    "file:// root": (
        lambda d: _edit_stage(d, "report", "s3://my-bucket/bmoe-runs", "file:///mnt/bmoe-runs"),
        "bmoe report: --root",
    ),
    "no tracking uri": (
        lambda d: _edit_stage(d, "train-experts", "--tracking-uri http://mlflow:5000", ""),
        "bmoe train-experts: no --tracking-uri",
    ),
    "roots differ": (
        lambda d: _edit_stage(d, "sweep", "s3://my-bucket/bmoe-runs", "s3://my-bucket/other-runs"),
        "different run roots",
    ),
    "local data root": (
        lambda d: _edit_stage(d, "prepare", "s3://my-bucket/DIV2K", "/mnt/DIV2K"),
        "--data-root '/mnt/DIV2K'",
    ),
    "pvc for the run root": (
        lambda d: _add_run_root_volume(_worker(d)["template"]),
        "looks like a volume for the run root",
    ),
    "worker without credentials": (
        lambda d: _drop_credentials(_worker(d)["template"]),
        "gpu: no object-store credentials",
    ),
    "head without credentials": (
        lambda d: _drop_credentials(_head(d)["template"]),
        "headGroupSpec: no object-store credentials",
    ),
}


@pytest.mark.parametrize("breakage", sorted(RAYJOB_BREAKAGES))
def test_rayjob_checks_catch_a_broken_copy(breakage):
    broken = load(RAYJOB)
    mutate, message = RAYJOB_BREAKAGES[breakage]
    mutate(broken)
    with pytest.raises(AssertionError, match=re.escape(message)):
        check_rayjob(broken)


def _replace_in_serve_config(doc: dict, old: str, new: str) -> None:
    assert old in doc["spec"]["serveConfigV2"]
    doc["spec"]["serveConfigV2"] = doc["spec"]["serveConfigV2"].replace(old, new)


RAYSERVICE_BREAKAGES = {
    "wrong kind": (lambda d: d.update(kind="RayJob"), "kind"),
    "serve config as a mapping": (
        lambda d: d["spec"].update(serveConfigV2=yaml.safe_load(d["spec"]["serveConfigV2"])),
        "YAML string",
    ),
    "other import path": (
        lambda d: _replace_in_serve_config(d, "serving.app:build_app", "app:app"),
        "import_path",
    ),
    "other route": (
        lambda d: _replace_in_serve_config(d, "route_prefix: /", "route_prefix: /bmoe"),
        "route_prefix",
    ),
    "no gpu": (lambda d: _gpu_limits(d).pop("nvidia.com/gpu"), "nvidia.com/gpu"),
    "no worker groups": (
        lambda d: _cluster(d).update(workerGroupSpecs=[]),
        "workerGroupSpecs",
    ),
    "no head container": (
        lambda d: _head(d)["template"]["spec"].update(containers=[]),
        "containers is empty",
    ),
    "load balancer": (lambda d: _head(d).update(serviceType="LoadBalancer"), "exposed"),
    "local root": (
        lambda d: _replace_in_serve_config(d, "root: s3://my-bucket/bmoe-runs", "root: /mnt/bmoe-runs"),
        "serve root '/mnt/bmoe-runs'",
    ),
    "pvc for the run root": (
        lambda d: _add_run_root_volume(_head(d)["template"]),
        "looks like a volume for the run root",
    ),
    "worker without credentials": (
        lambda d: _drop_credentials(_worker(d)["template"]),
        "gpu: no object-store credentials",
    ),
}


@pytest.mark.parametrize("breakage", sorted(RAYSERVICE_BREAKAGES))
def test_rayservice_checks_catch_a_broken_copy(breakage):
    broken = load(RAYSERVICE)
    mutate, message = RAYSERVICE_BREAKAGES[breakage]
    mutate(broken)
    with pytest.raises(AssertionError, match=re.escape(message)):
        check_rayservice(broken)
