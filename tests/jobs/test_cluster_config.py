"""cluster.yaml, the KubeRay RayJob manifest and the job configs, validated offline.

- cluster.yaml: Ray's own launcher schema (ray/autoscaler/ray-schema.json through `validate_config`).
- deploy/rayjob.yaml: the RayJob fields against a JSON schema transcribed from KubeRay's CRD
  (ray-operator/config/crd/bases/ray.io_rayjobs.yaml, ray.io/v1; only the fields we use and their types/enums),
  and every pod template against Kubernetes' own schema (kubernetes-validate, strict) as a v1 PodTemplate.
- configs/**.yaml: load into their config dataclasses; GPU configs name real model ids whose bf16 weights fit the
  GPU of the node type they target. Model facts (parameters, context) are written below from the model cards,
  since no hub is reachable here.
"""

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]

# From the Qwen2.5-Math model cards: parameters (billions) and max context (tokens).
MODELS = {"Qwen/Qwen2.5-Math-1.5B-Instruct": (1.54, 4096), "Qwen/Qwen2.5-Math-7B-Instruct": (7.62, 4096)}
GPU_GIB = {"L4": 24, "A100": 80}

RAYJOB_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayJob"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["entrypoint"],
            "additionalProperties": False,
            "properties": {
                "entrypoint": {"type": "string"},
                "runtimeEnvYAML": {"type": "string"},
                "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
                "shutdownAfterJobFinishes": {"type": "boolean"},
                "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
                "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
                "backoffLimit": {"type": "integer", "minimum": 0},
                "suspend": {"type": "boolean"},
                "clusterSelector": {"type": "object", "additionalProperties": {"type": "string"}},
                "rayClusterSpec": {
                    "type": "object",
                    "required": ["headGroupSpec"],
                    "additionalProperties": False,
                    "properties": {
                        "rayVersion": {"type": "string"},
                        "enableInTreeAutoscaling": {"type": "boolean"},
                        "autoscalerOptions": {"type": "object", "properties": {
                            "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
                            "idleTimeoutSeconds": {"type": "integer"}}},
                        "headGroupSpec": {"type": "object", "required": ["template"], "properties": {
                            "rayStartParams": {"type": "object", "additionalProperties": {"type": "string"}},
                            "template": {"type": "object"}}},
                        "workerGroupSpecs": {"type": "array", "items": {
                            "type": "object", "required": ["groupName", "template"],
                            "properties": {
                                "groupName": {"type": "string"},
                                "replicas": {"type": "integer", "minimum": 0},
                                "minReplicas": {"type": "integer", "minimum": 0},
                                "maxReplicas": {"type": "integer", "minimum": 0},
                                "rayStartParams": {"type": "object", "additionalProperties": {"type": "string"}},
                                "template": {"type": "object"}}}},
                    },
                },
            },
        },
    },
}


def test_cluster_yaml_validates_against_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((REPO / "cluster.yaml").read_text())
    validate_config(prepare_config(raw))
    types = raw["available_node_types"]
    assert raw["head_node_type"] == "head" and types["head"]["resources"].get("GPU", 0) == 0
    gpu_types = [t for t in types.values() if t["resources"].get("GPU")]
    assert gpu_types and all(t["min_workers"] == 0 and t["max_workers"] >= 1 for t in gpu_types)


def test_cluster_yaml_schema_rejects_a_broken_node_type():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((REPO / "cluster.yaml").read_text())
    raw["available_node_types"]["gpu_l4"].pop("resources")
    with pytest.raises(Exception, match="resources"):
        validate_config(prepare_config(raw))


def _pod_templates(job: dict) -> list[dict]:
    spec = job["spec"]["rayClusterSpec"]
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec.get("workerGroupSpecs", [])]


def test_rayjob_manifest_validates():
    import jsonschema
    import kubernetes_validate

    job = yaml.safe_load((REPO / "deploy" / "rayjob.yaml").read_text())
    jsonschema.validate(job, RAYJOB_SCHEMA)
    for i, template in enumerate(_pod_templates(job)):
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"t{i}"},
                        "template": template}
        kubernetes_validate.validate(pod_template, "1.30.0", strict=True)
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpu = [g for g in workers if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert gpu and all(g["minReplicas"] == 0 for g in gpu)
    assert "jobs." in job["spec"]["entrypoint"]


def test_rayjob_validation_catches_mistakes():
    import jsonschema
    import kubernetes_validate

    job = yaml.safe_load((REPO / "deploy" / "rayjob.yaml").read_text())
    job["spec"]["submissionMode"] = "BatchMode"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(job, RAYJOB_SCHEMA)
    bad = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"},
           "template": {"spec": {"containers": [{"name": "c", "image": "i", "resourcez": {}}]}}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, "1.30.0", strict=True)


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*/generate*.yaml")), ids=lambda p: p.name)
def test_generation_configs_load(path):
    from pipelines.config import load_config
    from pipelines.generate import GenerationConfig

    cfg = load_config(GenerationConfig, path)
    if "gpu" in path.parts:
        assert cfg.engine.num_gpus >= 1
        assert cfg.engine.model in MODELS, f"{cfg.engine.model} is not a known model id"
        params_b, context = MODELS[cfg.engine.model]
        assert cfg.engine.max_model_len <= context
        cluster = yaml.safe_load((REPO / "cluster.yaml").read_text())
        gpus = [t for t in cluster["available_node_types"].values() if t["resources"].get("GPU")]
        # the smallest GPU node type must hold the bf16 weights within the engine's memory share, with room left
        smallest = min(GPU_GIB[k.split(":")[1]] for t in gpus for k in t["resources"] if k.startswith("accelerator_type:"))
        weights_gib = params_b * 1e9 * 2 / 2**30
        assert weights_gib < smallest * cfg.engine.gpu_memory_utilization - 1.0
    else:
        assert cfg.engine.num_gpus == 0
