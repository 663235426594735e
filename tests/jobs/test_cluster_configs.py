"""Offline checks of the cluster configs in cluster/: would `ray up` / KubeRay accept them, and do
they keep the promises cluster/README.md makes (GPU workers from 0, spot option, spilling, the
project installed from the checkout, no public dashboard, no credentials)?

Nothing here starts Ray or talks to a cloud: a broken config should fail here, not after a user
has paid for a head node.
"""

import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

CLUSTER_DIR = Path(__file__).resolve().parents[2] / "cluster"
AUTOSCALER_CONFIGS = ("aws.yaml", "gcp.yaml")
KUBERAY_MANIFEST = "kuberay.yaml"
SPILL_DIR = "/mnt/ray-spill"
DASHBOARD_PORT = 8265


def load_yaml(name: str) -> dict[str, Any]:
    return yaml.safe_load((CLUSTER_DIR / name).read_text())


# --------------------------------------------------------------------------- autoscaler schema


def validate_autoscaler_config(config: dict[str, Any]) -> None:
    """Raise if `ray up` would reject `config` before contacting the cloud.

    Uses the same two offline steps `ray up` runs (ray.autoscaler._private.commands._bootstrap_config):
    merge the provider's defaults, then validate against ray/autoscaler/ray-schema.json plus Ray's
    cross-field checks. Those helpers are private, so if a Ray release moves them, fall back to
    the schema file that ships inside the installed ray package.
    """
    try:
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError:
        import ray.autoscaler

        schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
        jsonschema.validate(config, json.loads(schema_path.read_text()))
        return
    validate_config(prepare_config(copy.deepcopy(config)))


@pytest.mark.parametrize("name", AUTOSCALER_CONFIGS)
def test_autoscaler_config_passes_rays_validator(name: str) -> None:
    validate_autoscaler_config(load_yaml(name))


@pytest.mark.parametrize("name", AUTOSCALER_CONFIGS)
def test_autoscaler_validator_rejects_unknown_top_level_key(name: str) -> None:
    config = load_yaml(name)
    config["max_worker"] = 8  # a typo of max_workers
    with pytest.raises(jsonschema.ValidationError):
        validate_autoscaler_config(config)


@pytest.mark.parametrize("name", AUTOSCALER_CONFIGS)
def test_autoscaler_validator_rejects_wrong_type(name: str) -> None:
    config = load_yaml(name)
    config["max_workers"] = "eight"
    with pytest.raises(jsonschema.ValidationError):
        validate_autoscaler_config(config)


@pytest.mark.parametrize("name", AUTOSCALER_CONFIGS)
def test_autoscaler_validator_rejects_unknown_node_type_field(name: str) -> None:
    config = load_yaml(name)
    config["available_node_types"]["gpu_worker"]["min_worker"] = 0
    with pytest.raises(jsonschema.ValidationError):
        validate_autoscaler_config(config)


# --------------------------------------------------------------------------- autoscaler content


def gpu_node_types(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: node_type
        for name, node_type in config["available_node_types"].items()
        if node_type["resources"].get("GPU", 0) >= 1
    }


def is_discounted(provider: str, node_config: dict[str, Any]) -> bool:
    """Spot (AWS) or preemptible (GCP) capacity."""
    if provider == "aws":
        return node_config.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
    return node_config.get("scheduling", {}).get("preemptible") is True


@pytest.mark.parametrize("name", AUTOSCALER_CONFIGS)
def test_head_is_a_cpu_node_that_never_scales(name: str) -> None:
    config = load_yaml(name)
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert head.get("max_workers", 0) == 0


@pytest.mark.parametrize("name", AUTOSCALER_CONFIGS)
def test_gpu_workers_scale_from_zero_with_a_discounted_option(name: str) -> None:
    config = load_yaml(name)
    provider = config["provider"]["type"]
    gpu_types = gpu_node_types(config)
    assert gpu_types, "no node type offers a GPU"
    assert all(node_type["min_workers"] == 0 for node_type in gpu_types.values())
    on_demand = [t for t in gpu_types.values() if not is_discounted(provider, t["node_config"])]
    discounted = [t for t in gpu_types.values() if is_discounted(provider, t["node_config"])]
    assert any(t["max_workers"] > 0 for t in on_demand), "no on-demand GPU type can scale up"
    assert discounted, "no spot/preemptible GPU node type"
    assert all(t["max_workers"] <= config["max_workers"] for t in gpu_types.values())


@pytest.mark.parametrize("name", AUTOSCALER_CONFIGS)
def test_checkout_is_mounted_and_installed_with_the_readme_command(name: str) -> None:
    config = load_yaml(name)
    assert config["file_mounts"] == {"~/mdds": "."}
    extra = {"aws.yaml": "s3", "gcp.yaml": "gcs"}[name]  # the fsspec driver for the cloud's bucket URLs
    assert f'cd ~/mdds && pip install -e ".[{extra}]"' in config["setup_commands"]


@pytest.mark.parametrize("name", AUTOSCALER_CONFIGS)
def test_every_node_spills_to_a_mounted_local_directory(name: str) -> None:
    config = load_yaml(name)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert f"--object-spilling-directory={SPILL_DIR}" in " ".join(config[key]), key
    assert f"--volume {SPILL_DIR}:{SPILL_DIR}" in config["docker"]["run_options"]
    node_specific = [t["initialization_commands"] for t in config["available_node_types"].values()
                     if "initialization_commands" in t]
    for commands in [config["initialization_commands"], *node_specific]:
        assert any(f"mkdir -p {SPILL_DIR}" in command for command in commands)


def public_dashboard_openings(config: dict[str, Any]) -> list[str]:
    """Ways `config` would expose the dashboard port beyond the head's loopback interface."""
    findings = []
    start_commands = " ".join(config.get("head_start_ray_commands", []))
    if re.search(r"--dashboard-host[= ]+0\.0\.0\.0", start_commands):
        findings.append("dashboard bound to 0.0.0.0")
    docker = config.get("docker", {})
    for option in docker.get("run_options", []) + docker.get("head_run_options", []):
        if re.search(rf"(-p|--publish)[= ]\S*{DASHBOARD_PORT}", option):
            findings.append(f"docker publishes {DASHBOARD_PORT}: {option}")
    for rule in config["provider"].get("security_group", {}).get("IpPermissions", []):
        covers_port = rule.get("FromPort", 0) <= DASHBOARD_PORT <= rule.get("ToPort", 65535)
        cidrs = [r.get("CidrIp") for r in rule.get("IpRanges", [])]
        cidrs += [r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])]
        if covers_port and ({"0.0.0.0/0", "::/0"} & set(cidrs)):
            findings.append(f"security group opens {DASHBOARD_PORT} to the internet")
    return findings


@pytest.mark.parametrize("name", AUTOSCALER_CONFIGS)
def test_dashboard_is_not_opened_publicly(name: str) -> None:
    assert public_dashboard_openings(load_yaml(name)) == []


def test_public_dashboard_check_catches_each_opening() -> None:
    base = load_yaml("aws.yaml")
    bound = copy.deepcopy(base)
    bound["head_start_ray_commands"][-1] += " --dashboard-host=0.0.0.0"
    published = copy.deepcopy(base)
    published["docker"]["run_options"].append(f"-p {DASHBOARD_PORT}:{DASHBOARD_PORT}")
    firewalled = copy.deepcopy(base)
    firewalled["provider"]["security_group"] = {"GroupName": "g", "IpPermissions": [
        {"FromPort": 8000, "ToPort": 9000, "IpProtocol": "TCP", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]}
    for exposed in (bound, published, firewalled):
        assert len(public_dashboard_openings(exposed)) == 1


# --------------------------------------------------------------------------- KubeRay


def _get(document: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(document, dict) or key not in document:
            return None
        document = document[key]
    return document


def _pod_template_problems(where: str, template: Any) -> list[str]:
    containers = _get(template, "spec", "containers")
    if not isinstance(containers, list) or not containers:
        return [f"{where}.template.spec.containers must be a non-empty list"]
    problems = []
    for index, container in enumerate(containers):
        for field in ("name", "image"):
            if not isinstance(_get(container, field), str) or not container[field]:
                problems.append(f"{where}.template.spec.containers[{index}].{field} must be a string")
    return problems


def _ray_start_params_problems(where: str, params: Any) -> list[str]:
    if not isinstance(params, dict):
        return [f"{where}.rayStartParams must be a mapping"]
    # KubeRay's CRD types them map[string]string: an unquoted number is rejected by the API server.
    return [f"{where}.rayStartParams.{key} must be a string"
            for key, value in params.items() if not isinstance(value, str)]


def _requests_gpu(template: Any) -> bool:
    containers = _get(template, "spec", "containers") or []
    return any(_get(c, "resources", "limits", "nvidia.com/gpu") for c in containers)


def _ray_cluster_problems(cluster: dict[str, Any]) -> list[str]:
    head = _get(cluster, "spec", "headGroupSpec")
    if not isinstance(head, dict):
        return ["RayCluster spec.headGroupSpec missing"]
    problems = _ray_start_params_problems("headGroupSpec", head.get("rayStartParams"))
    problems += _pod_template_problems("headGroupSpec", head.get("template"))
    if head.get("serviceType", "ClusterIP") != "ClusterIP":
        problems.append(f"head service type {head['serviceType']} exposes the dashboard")
    groups = _get(cluster, "spec", "workerGroupSpecs")
    if not isinstance(groups, list) or not groups:
        return problems + ["RayCluster spec.workerGroupSpecs must be a non-empty list"]
    for index, group in enumerate(groups):
        where = f"workerGroupSpecs[{index}]"
        if not isinstance(_get(group, "groupName"), str):
            problems.append(f"{where}.groupName must be a string")
        for field in ("replicas", "minReplicas", "maxReplicas"):
            if type(_get(group, field)) is not int:
                problems.append(f"{where}.{field} must be an integer")
        problems += _ray_start_params_problems(where, _get(group, "rayStartParams"))
        problems += _pod_template_problems(where, _get(group, "template"))
    if not any(_get(g, "minReplicas") == 0 and _requests_gpu(_get(g, "template")) for g in groups):
        problems.append("no worker group requests nvidia.com/gpu with minReplicas 0")
    return problems


def _ray_job_problems(job: dict[str, Any], cluster_name: Any) -> list[str]:
    problems = []
    entrypoint = _get(job, "spec", "entrypoint")
    if not isinstance(entrypoint, str) or not entrypoint.startswith("python jobs/certify_imagenet.py"):
        problems.append("RayJob spec.entrypoint must run python jobs/certify_imagenet.py")
    elif not re.search(r"--out [a-z0-9]+://\S+", entrypoint):
        problems.append("RayJob --out must be a URL on shared storage")
    cluster_spec = _get(job, "spec", "rayClusterSpec")
    selector = _get(job, "spec", "clusterSelector")
    if cluster_spec is None and selector is None:
        problems.append("RayJob needs spec.rayClusterSpec or spec.clusterSelector")
    if cluster_spec is not None:
        problems += _ray_cluster_problems({"spec": cluster_spec})
    if selector is not None and _get(selector, "ray.io/cluster") != cluster_name:
        problems.append("RayJob clusterSelector does not select the RayCluster in this file")
    return problems


def kuberay_problems(documents: list[Any]) -> list[str]:
    """Everything missing or mistyped in the KubeRay manifest, as readable lines."""
    by_kind = {_get(d, "kind"): d for d in documents if _get(d, "apiVersion") == "ray.io/v1"}
    problems = ["an Ingress exposes the cluster" for d in documents if _get(d, "kind") == "Ingress"]
    problems += [f"Service of type {_get(d, 'spec', 'type')} exposes a port publicly"
                 for d in documents if _get(d, "kind") == "Service"
                 and _get(d, "spec", "type") in ("LoadBalancer", "NodePort")]
    for kind in ("RayCluster", "RayJob"):
        if kind not in by_kind:
            problems.append(f"no {kind} with apiVersion ray.io/v1")
    if "RayCluster" in by_kind:
        problems += _ray_cluster_problems(by_kind["RayCluster"])
    if "RayJob" in by_kind:
        cluster_name = _get(by_kind.get("RayCluster"), "metadata", "name")
        problems += _ray_job_problems(by_kind["RayJob"], cluster_name)
    return problems


def load_kuberay() -> list[Any]:
    return list(yaml.safe_load_all((CLUSTER_DIR / KUBERAY_MANIFEST).read_text()))


def test_kuberay_manifest_has_the_required_fields() -> None:
    assert kuberay_problems(load_kuberay()) == []


def _cluster(docs: list[Any]) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == "RayCluster")


def _job(docs: list[Any]) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == "RayJob")


def _head(docs: list[Any]) -> dict[str, Any]:
    return _cluster(docs)["spec"]["headGroupSpec"]


def _gpu_group(docs: list[Any]) -> dict[str, Any]:
    return _cluster(docs)["spec"]["workerGroupSpecs"][0]


MUTATIONS = {
    "head rayStartParams removed": lambda d: _head(d).pop("rayStartParams"),
    "head image removed": lambda d: _head(d)["template"]["spec"]["containers"][0].pop("image"),
    "head service made public": lambda d: _head(d).__setitem__("serviceType", "LoadBalancer"),
    "worker groups removed": lambda d: _cluster(d)["spec"].pop("workerGroupSpecs"),
    "groupName removed": lambda d: _gpu_group(d).pop("groupName"),
    "minReplicas not zero": lambda d: _gpu_group(d).__setitem__("minReplicas", 1),
    "maxReplicas as a string": lambda d: _gpu_group(d).__setitem__("maxReplicas", "8"),
    "worker rayStartParams value not a string":
        lambda d: _gpu_group(d)["rayStartParams"].__setitem__("num-gpus", 1),
    "GPU limit removed":
        lambda d: _gpu_group(d)["template"]["spec"]["containers"][0]["resources"]["limits"]
        .pop("nvidia.com/gpu"),
    "worker container name removed":
        lambda d: _gpu_group(d)["template"]["spec"]["containers"][0].pop("name"),
    "entrypoint removed": lambda d: _job(d)["spec"].pop("entrypoint"),
    "--out on a local path": lambda d: _job(d)["spec"].__setitem__(
        "entrypoint", _job(d)["spec"]["entrypoint"].replace("--out s3://", "--out /tmp/")),
    "cluster selector removed": lambda d: _job(d)["spec"].pop("clusterSelector"),
    "cluster selector names another cluster":
        lambda d: _job(d)["spec"]["clusterSelector"].__setitem__("ray.io/cluster", "other"),
    "RayCluster missing": lambda d: d.remove(_cluster(d)),
    "public Service added": lambda d: d.append(
        {"apiVersion": "v1", "kind": "Service", "spec": {"type": "LoadBalancer"}}),
    "Ingress added": lambda d: d.append({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress"}),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_kuberay_checker_rejects_a_broken_manifest(mutation: str) -> None:
    documents = load_kuberay()
    MUTATIONS[mutation](documents)
    assert kuberay_problems(documents) != []


# --------------------------------------------------------------------------- every cluster file

CREDENTIAL_PATTERNS = {
    "AWS key name": r"aws_access_key_id|aws_secret_access_key|aws_session_token",
    "AWS access key id": r"\b(AKIA|ASIA)[0-9A-Z]{16}\b",
    "secret": r"secret",
    "private key": r"BEGIN [A-Z ]*PRIVATE KEY",
    "GCP service account key": r"private_key_id",
    "12-digit account id": r"(?<![0-9])[0-9]{12}(?![0-9])",
    "machine-specific path": r"/Users/|/home/(?!ray/)|[A-Za-z]:\\\\",
}


def credential_findings(text: str) -> list[str]:
    return [label for label, pattern in CREDENTIAL_PATTERNS.items()
            if re.search(pattern, text, flags=re.IGNORECASE)]


CLUSTER_FILES = sorted(p.name for p in CLUSTER_DIR.iterdir() if p.is_file())


def test_all_cluster_files_are_checked() -> None:
    assert set(CLUSTER_FILES) >= {*AUTOSCALER_CONFIGS, KUBERAY_MANIFEST, "README.md"}


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_no_credentials_or_machine_paths(name: str) -> None:
    assert credential_findings((CLUSTER_DIR / name).read_text()) == []


@pytest.mark.parametrize("sample, label", [
    ("aws_access_key_id = x", "AWS key name"),
    ("key: AKIAABCDEFGHIJKLMNOP", "AWS access key id"),
    ("password: my-Secret", "secret"),
    ("-----BEGIN RSA PRIVATE KEY-----", "private key"),
    ('"private_key_id": "abc"', "GCP service account key"),
    ("arn:aws:iam::123456789012:role/x", "12-digit account id"),
    ("~/mdds: /Users/alice/mdds", "machine-specific path"),
])
def test_credential_check_catches_each_kind(sample: str, label: str) -> None:
    assert credential_findings(sample) == [label]


def test_every_placeholder_is_documented_in_the_readme() -> None:
    readme = (CLUSTER_DIR / "README.md").read_text()
    placeholders = set()
    for name in (*AUTOSCALER_CONFIGS, KUBERAY_MANIFEST):
        placeholders |= set(re.findall(r"REPLACE_ME_[A-Z_]+", (CLUSTER_DIR / name).read_text()))
    assert placeholders, "placeholders are how users fill in account details"
    assert sorted(p for p in placeholders if f"`{p}`" not in readme) == []


def test_one_ray_version_everywhere() -> None:
    """Client, head and workers must run the same Ray; every pin in cluster/ must agree."""
    versions = set()
    for name in CLUSTER_FILES:
        text = (CLUSTER_DIR / name).read_text()
        versions |= set(re.findall(r"rayproject/ray:(\d+\.\d+\.\d+)", text))
        versions |= set(re.findall(r'rayVersion: "(\d+\.\d+\.\d+)"', text))
        versions |= set(re.findall(r"ray\[default\]==(\d+\.\d+\.\d+)", text))
    assert len(versions) == 1, versions
