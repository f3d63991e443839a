"""cluster.yaml against Ray's own autoscaler schema; the KubeRay RayJob against the README.

The schema is the JSON schema file shipped inside the installed `ray` package
(`ray/autoscaler/ray-schema.json`), applied with jsonschema (a Ray dependency) to the
file as written, before Ray's own defaults fill anything in.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from ldm_jobs.jobs.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent
# Where examples/Dockerfile puts the project inside the image.
IMAGE_PROJECT = "/home/ray/ldm-jobs"


def _schema() -> dict:
    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


def _cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def _rayjob() -> dict:
    return yaml.safe_load((ROOT / "examples" / "kuberay-rayjob.yaml").read_text())


def test_cluster_yaml_passes_the_schema_shipped_with_ray() -> None:
    jsonschema.validate(_cluster(), _schema())


@pytest.mark.parametrize("damage", ["misspelt key", "bad provider", "node type without config"])
def test_the_schema_check_rejects_a_broken_cluster_yaml(damage: str) -> None:
    """The check above can fail: the same schema refuses mistakes people make."""
    config = copy.deepcopy(_cluster())
    if damage == "misspelt key":
        config["max_worker"] = config.pop("max_workers")
    elif damage == "bad provider":
        del config["provider"]
    else:
        del config["available_node_types"]["worker.gpu"]["node_config"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, _schema())


def test_cluster_yaml_runs_the_ray_version_installed_here() -> None:
    image = _cluster()["docker"]["image"]
    assert image.split(":")[1].startswith(f"{ray.__version__}-"), image


# --- KubeRay ---------------------------------------------------------------------------


def _containers(rayjob: dict) -> list[dict]:
    cluster = rayjob["spec"]["rayClusterSpec"]
    templates = [cluster["headGroupSpec"]["template"]]
    templates += [group["template"] for group in cluster["workerGroupSpecs"]]
    return [c for template in templates for c in template["spec"]["containers"]]


def _readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def test_rayjob_is_a_kuberay_rayjob_running_ldm_jobs() -> None:
    rayjob = _rayjob()
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    assert rayjob["metadata"]["name"]
    spec = rayjob["spec"]
    assert spec["rayClusterSpec"]["rayVersion"] == ray.__version__
    command = shlex.split(spec["entrypoint"])
    assert command[:2] == ["ldm-jobs", "run"]
    # The console script the image installs (tomllib is not in Python 3.10).
    assert re.search(r"^ldm-jobs = \"ldm_jobs\.jobs\.cli:main\"$",
                     (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    # The spec it runs is in the image, where examples/Dockerfile copies the project.
    assert command[2].startswith(f"{IMAGE_PROJECT}/")
    job = load_spec(str(ROOT / command[2][len(IMAGE_PROJECT) + 1:]))
    assert job.output.path.startswith("s3://")  # pods keep nothing local


def test_rayjob_resources_fit_the_job_it_runs() -> None:
    rayjob = _rayjob()
    job = load_spec(str(ROOT / shlex.split(rayjob["spec"]["entrypoint"])[2]
                        .removeprefix(f"{IMAGE_PROJECT}/")))
    cluster = rayjob["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # no actor on the head
    assert "nvidia.com/gpu" not in json.dumps(head)
    gpu_groups = [g for g in cluster["workerGroupSpecs"]
                  if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]
                  ["limits"]]
    assert gpu_groups, "no GPU worker group"
    for group in gpu_groups:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        gpus = float(limits["nvidia.com/gpu"])
        actors_per_pod = gpus // job.compute.gpus_per_actor
        assert actors_per_pod >= 1
        assert group["maxReplicas"] * actors_per_pod >= job.compute.actors
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def test_rayjob_image_entrypoint_and_resources_match_the_readme() -> None:
    section = _readme_section("On Kubernetes (KubeRay)")
    rayjob = _rayjob()
    built = re.search(r"docker build -f (\S+) -t (\S+) \.", section)
    assert built, "the README says how to build the image"
    dockerfile, image = built.groups()
    assert {c["image"] for c in _containers(rayjob)} == {image}
    # The image is Ray's, at the version cluster.yaml runs.
    base = re.search(r"^FROM (\S+)$", (ROOT / dockerfile).read_text(), re.MULTILINE).group(1)
    assert base == _cluster()["docker"]["image"]
    assert f"`{rayjob['spec']['entrypoint']}`" in section
    assert "kubectl apply -f examples/kuberay-rayjob.yaml" in section
    assert f"kubectl get rayjob {rayjob['metadata']['name']}" in section
    group = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert f"up to {group['maxReplicas']} workers" in section
    assert f"`nvidia.com/gpu: {limits['nvidia.com/gpu']}`" in section
