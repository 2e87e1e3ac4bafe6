"""Everything under infra/ parses, has its required fields and agrees with the project."""

from __future__ import annotations

import json
import os
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import ray
import yaml

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
IMAGE = f"mmvq:{VERSION}"


def _docs(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _all_k8s():
    return [(p.name, d) for p in sorted((INFRA / "k8s").glob("*.yaml")) for d in _docs(p)]


def _containers(pod_spec):
    return pod_spec.get("containers", []) + pod_spec.get("initContainers", [])


def _pod_specs(doc):
    """Every pod spec in a manifest, whatever the kind nests it in."""
    spec = doc.get("spec", {})
    if doc["kind"] == "RayJob":
        yield spec["submitterPodTemplate"]["spec"]
        spec = spec["rayClusterSpec"]
    if doc["kind"] in ("RayCluster", "RayJob"):
        yield spec["headGroupSpec"]["template"]["spec"]
        for group in spec["workerGroupSpecs"]:
            yield group["template"]["spec"]
    elif "template" in spec:
        yield spec["template"]["spec"]


def test_every_yaml_under_infra_parses():
    files = sorted(INFRA.rglob("*.yaml"))
    assert {p.relative_to(INFRA).as_posix() for p in files} >= {
        "cluster.yaml", "k8s/raycluster.yaml", "k8s/rayjob.yaml", "k8s/mlflow.yaml"}
    for path in files:
        assert _docs(path), path


def test_k8s_kinds_and_required_fields():
    kinds = {}
    for name, doc in _all_k8s():
        kinds.setdefault(doc["kind"], []).append(doc)
        if doc["kind"] == "Kustomization":
            continue
        assert {"apiVersion", "kind", "metadata"} <= set(doc), name
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "mmvq", (name, doc["kind"])
    assert {"RayCluster", "RayJob", "Deployment", "StatefulSet", "Service", "NetworkPolicy",
            "PersistentVolumeClaim"} <= set(kinds)
    for doc in kinds["RayCluster"] + kinds["RayJob"]:
        assert doc["apiVersion"] == "ray.io/v1"
    deployments = {d["metadata"]["name"] for d in kinds["Deployment"]}
    assert {"mlflow", "minio"} <= deployments
    assert [s["metadata"]["name"] for s in kinds["StatefulSet"]] == ["postgres"]


def _ray_cluster_specs():
    for _, doc in _all_k8s():
        if doc["kind"] == "RayCluster":
            yield doc["spec"]
        elif doc["kind"] == "RayJob":
            yield doc["spec"]["rayClusterSpec"]


def test_ray_clusters_match_the_project_and_have_gpu_workers():
    specs = list(_ray_cluster_specs())
    assert len(specs) == 2
    for spec in specs:
        assert spec["rayVersion"] == ray.__version__
        assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
        gpu = [g for g in spec["workerGroupSpecs"]
               if g["template"]["spec"]["containers"][0]["resources"]["limits"].get(
                   "nvidia.com/gpu")]
        assert gpu, "no GPU worker group"
        for pod in [spec["headGroupSpec"]["template"]["spec"]] + \
                [g["template"]["spec"] for g in spec["workerGroupSpecs"]]:
            env = {e["name"]: e for e in pod["containers"][0]["env"]}
            assert env["RAY_AUTH_MODE"]["value"] == "token"
            assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]
            assert env["MLFLOW_TRACKING_URI"]["value"].startswith("http://mlflow.")
            assert {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]} == {
                "/mnt/data"}


def test_every_image_is_pinned_and_ours_is_the_project_version():
    for name, doc in _all_k8s():
        for pod in _pod_specs(doc):
            for container in _containers(pod):
                image = container["image"]
                assert ":" in image and not image.endswith(":latest"), (name, image)
                if image.startswith("mmvq"):
                    assert image == IMAGE, (name, image)
    kustomization = _docs(INFRA / "k8s" / "kustomization.yaml")[0]
    assert kustomization["images"][0]["newTag"] == VERSION
    listed = {r for r in kustomization["resources"]}
    assert all((INFRA / "k8s" / r).is_file() for r in listed)
    cluster = yaml.safe_load((INFRA / "cluster.yaml").read_text())
    assert cluster["docker"]["image"] == IMAGE


def test_services_are_internal_and_mlflow_needs_auth():
    for name, doc in _all_k8s():
        if doc["kind"] == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", name
        assert doc["kind"] not in ("Ingress", "Route"), name
    [mlflow] = [d for _, d in _all_k8s()
                if d["kind"] == "Deployment" and d["metadata"]["name"] == "mlflow"]
    container = mlflow["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert "--app-name=basic-auth" in args
    assert "--backend-store-uri=$(DATABASE_URL)" in args
    assert any(a.startswith("--artifacts-destination=s3://") for a in args)
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_S3_ENDPOINT_URL"]["value"] == "http://minio:9000"
    for secret in ("DATABASE_URL", "AWS_SECRET_ACCESS_KEY", "MLFLOW_AUTH_ADMIN_PASSWORD"):
        assert "secretKeyRef" in env[secret]["valueFrom"], secret
    text = "\n".join(p.read_text() for p in (INFRA / "k8s").glob("*.yaml"))
    assert "kind: Secret" not in text  # referenced, never committed


def test_rayjob_entrypoint_is_a_valid_mmvq_run():
    from workflows.cli import _parser
    from workflows.plan import load_workflow

    [job] = [d for _, d in _all_k8s() if d["kind"] == "RayJob"]
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "workflows.cli"]
    args, extra = _parser().parse_known_args(argv[3:])
    assert args.command == "run" and not extra
    # The image copies the repository's workflows/ to /app/workflows (infra/docker/Dockerfile).
    workflow = REPO / Path(args.workflow).relative_to("/app")
    dockerfile = (INFRA / "docker" / "Dockerfile").read_text()
    assert "WORKDIR /app" in dockerfile and "COPY workflows workflows" in dockerfile
    loaded = load_workflow(workflow, [f"data_root={args.data_root}"])
    assert loaded.data_root.startswith("/mnt/data/")
    workers = sum(g["replicas"] for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"])
    train = loaded.stages["train"].config
    assert train["use_gpu"] and train["num_workers"] <= workers


def test_dockerfile_installs_the_pinned_project():
    text = (INFRA / "docker" / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", text, re.MULTILINE).group(1)
    assert base.startswith("nvidia/cuda:12.") and "runtime" in base
    assert "python3.11" in text and "pyproject.toml" in text and "pip install --no-deps ." in text
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "torch==2.11.0" in deps  # what the Dockerfile installs, read from pyproject.toml
    assert (INFRA / "docker" / "Dockerfile.dockerignore").read_text().count(".venv") == 1


def test_cluster_launcher_config_passes_rays_schema():
    import jsonschema
    import ray.autoscaler

    config = yaml.safe_load((INFRA / "cluster.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    assert config["head_node_type"] in config["available_node_types"]
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "-v /mnt/data:/mnt/data" in config["docker"]["run_options"]


@pytest.mark.parametrize("script", ["ray-head.sh", "mlflow-server.sh"])
def test_local_scripts_are_executable_and_explain_usage(script):
    import subprocess

    path = INFRA / "local" / script
    assert os.access(path, os.X_OK)
    result = subprocess.run([str(path)], check=False, capture_output=True, text=True)
    assert result.returncode == 2 and "usage:" in result.stdout
