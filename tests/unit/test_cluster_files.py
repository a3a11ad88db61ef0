"""Every file in cluster/ against its schema: the cluster-launcher YAMLs against the installed
Ray's ray-schema.json, the KubeRay manifests against the CRDs in ../shared/schemas/kuberay/,
the runtime_env against Ray's RuntimeEnv; and the security settings the README promises."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
KUBERAY_SCHEMAS = ROOT.parent / "shared" / "schemas" / "kuberay"
LAUNCHER = ["aws.yaml", "gcp.yaml"]
MANIFESTS = {
    "kuberay/raycluster.yaml": "rayclusters",
    "kuberay/rayjob.yaml": "rayjobs",
    "kuberay/rayservice.yaml": "rayservices",
}


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def test_every_file_in_cluster_is_checked_here():
    files = {str(p.relative_to(CLUSTER)) for p in CLUSTER.rglob("*") if p.is_file()}
    assert files == {*LAUNCHER, *MANIFESTS, "runtime_env.yaml", "Dockerfile"}


# ------------------------------------------------------------------------ cluster launcher
def launcher_schema() -> dict:
    import ray.autoscaler

    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    return json.loads(path.read_text())


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_yaml_passes_rays_schema(name):
    config = load(name)
    schema = launcher_schema()
    jsonschema.validators.validator_for(schema)(schema).validate(config)
    # the schema itself catches what it should: an unknown key is refused
    with pytest.raises(jsonschema.ValidationError, match="head_nodes_type"):
        jsonschema.validate({**config, "head_nodes_type": "head"}, schema)


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_yaml_groups_security_and_storage(name):
    config = load(name)
    types = config["available_node_types"]
    assert config["head_node_type"] == "head" and types["head"]["resources"].get("GPU", 0) == 0
    gpu = types["gpu_worker"]
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1 and gpu["resources"]["GPU"] == 8
    assert types["cpu_worker"]["min_workers"] == 0 and "GPU" not in types["cpu_worker"]["resources"]
    assert config["max_workers"] >= gpu["max_workers"] + types["cpu_worker"]["max_workers"]
    assert config["docker"]["image"].startswith("rayproject/ray:")
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start
    for start in (head_start, " ".join(config["worker_start_ray_commands"])):
        assert "RAY_AUTH_MODE=token" in start and "RAY_AUTH_TOKEN_PATH=/run/secrets/" in start
        assert "DISTILL_STORAGE_ROOT=/mnt/shared" in start
    # what every node sees: the shared file system and the secrets, mounted into the container
    assert "-v /mnt/shared:/mnt/shared" in config["docker"]["run_options"]
    assert any("/mnt/shared" in c and "mount" in c for c in config["initialization_commands"])
    assert {".venv", "runs"} <= set(config["rsync_exclude"])


# --------------------------------------------------------------------------------- KubeRay
def crd_schema(plural: str) -> dict:
    """The CRD's served storage version's openAPIV3Schema, strict: an object with declared
    properties takes no others (Kubernetes would drop a misspelt field silently)."""
    # libyaml's loader: the three CRDs are 3 MB of YAML (a minute in pure Python on 2 cores)
    text = (KUBERAY_SCHEMAS / f"ray.io_{plural}.yaml").read_text()
    crd = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (version,) = [v for v in crd["spec"]["versions"] if v["storage"]]
    assert version["name"] == "v1"

    def strict(node):
        if isinstance(node, dict):
            if (
                node.get("type") == "object"
                and "properties" in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
                and "additionalProperties" not in node
            ):
                node["additionalProperties"] = False
            for value in node.values():
                strict(value)
        elif isinstance(node, list):
            for value in node:
                strict(value)
        return node

    return strict(version["schema"]["openAPIV3Schema"])


@pytest.fixture(scope="module")
def kuberay_schemas():
    if not KUBERAY_SCHEMAS.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {KUBERAY_SCHEMAS}")
    return {plural: crd_schema(plural) for plural in MANIFESTS.values()}


@pytest.mark.parametrize("name", MANIFESTS)
def test_kuberay_manifest_passes_its_crd(name, kuberay_schemas):
    manifest = load(name)
    schema = kuberay_schemas[MANIFESTS[name]]
    assert manifest["apiVersion"] == "ray.io/v1"
    jsonschema.Draft7Validator(schema).validate(manifest)
    # the strict schema refuses a misspelt field
    broken = json.loads(json.dumps(manifest))
    broken["spec"]["entrypoitn"] = "x"
    with pytest.raises(jsonschema.ValidationError, match="entrypoitn"):
        jsonschema.Draft7Validator(schema).validate(broken)


def check_cluster_spec(spec: dict) -> None:
    """Token auth, a ClusterIP head, an autoscaling GPU group from 0, the shared volume and
    the teacher's key from a Secret on every container."""
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"] == {"mode": "token", "secretName": "distill-ray-token"}
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    gpu = groups["gpu"]
    assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= 1
    (container,) = gpu["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in groups.values()]
    for pod in pods:
        for c in pod["spec"]["containers"]:
            env = {e["name"]: e for e in c["env"]}
            assert env["DISTILL_STORAGE_ROOT"]["value"] == "/mnt/shared"
            assert "secretKeyRef" in env["OPENAI_API_KEY"]["valueFrom"]
            assert {"name": "shared", "mountPath": "/mnt/shared"} in c["volumeMounts"]


def test_raycluster_and_rayservice_clusters():
    check_cluster_spec(load("kuberay/raycluster.yaml")["spec"])
    check_cluster_spec(load("kuberay/rayservice.yaml")["spec"]["rayClusterConfig"])


def test_rayjob_runs_the_loop_on_the_raycluster():
    spec = load("kuberay/rayjob.yaml")["spec"]
    assert spec["clusterSelector"] == {
        "ray.io/cluster": load("kuberay/raycluster.yaml")["metadata"]["name"]
    }
    assert spec["entrypoint"].startswith("python -m jobs.distill configs/")
    assert yaml.safe_load(spec["runtimeEnvYAML"])["working_dir"] == "/home/ray/distill"
    (submitter,) = spec["submitterPodTemplate"]["spec"]["containers"]
    env = {e["name"]: e for e in submitter["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "distill-ray-token"


def test_rayservice_serve_config_is_what_serve_build_writes_for_its_args():
    """serveConfigV2 is exactly serving.stage.serve_config (what `distill serve build` writes)
    of the arguments it holds, and those arguments pass the app's own validation."""
    from ray_pipeline.serving.args import AppArgs
    from ray_pipeline.serving.stage import serve_config

    embedded = yaml.safe_load(load("kuberay/rayservice.yaml")["spec"]["serveConfigV2"])
    (app,) = embedded["applications"]
    args = AppArgs.model_validate(app["args"])
    assert serve_config(app["args"]) == embedded
    assert args.serve.host == "0.0.0.0"  # the pod's address, behind the serve Service
    assert args.serve.student.num_gpus == 1.0 and args.serve.api_key_env == "DISTILL_API_KEY"
    assert args.teacher_api_key_env == "OPENAI_API_KEY"  # the key itself stays in a Secret


# ------------------------------------------------------------------------------ runtime_env
def test_runtime_env_example_is_a_valid_runtime_env_without_secrets():
    from ray.runtime_env import RuntimeEnv

    from ray_pipeline.submit import load_runtime_env, runtime_env

    data = load_runtime_env(CLUSTER / "runtime_env.yaml")
    assert data["env_vars"]["DISTILL_STORAGE_ROOT"] == "/mnt/shared"
    env = runtime_env(ROOT, data)  # what `distill submit --runtime-env` sends
    RuntimeEnv(**env)
    assert env["working_dir"] == str(ROOT) and "runs/" in env["excludes"]


def test_no_file_in_cluster_holds_a_secret():
    for path in CLUSTER.rglob("*"):
        if path.is_file():
            text = path.read_text()
            assert "sk-" not in text and "BEGIN PRIVATE KEY" not in text, path
