"""checkov over the rendered kustomizations, offline, with the justified skips in k8s/.checkov.yaml."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.k8s.manifests import JOBS, K8S, OVERLAYS, ROOT

CHECKOV = ROOT / ".venv-checkov" / "bin" / "checkov"


def checkov(directory: Path) -> subprocess.CompletedProcess:
    assert CHECKOV.exists(), "checkov is not installed: `make test` builds .venv-checkov"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # its kubectl
    return subprocess.run(
        [str(CHECKOV), "--framework", "kustomize", "--skip-download", "--compact", "--quiet",
         "--config-file", str(K8S / ".checkov.yaml"), "-d", str(directory)],
        capture_output=True, text=True, env=env, timeout=300,
    )


@pytest.mark.parametrize("kustomization", OVERLAYS + JOBS)  # k8s/platform has no workload: checkov has nothing to check there
def test_checkov_passes(kustomization):
    result = checkov(K8S / kustomization)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "Passed checks:" in result.stdout


def test_checkov_fails_a_privileged_triton(tmp_path):
    """The gate can fail: the same overlay with a privileged container does not pass."""
    overlay = tmp_path / "k8s"
    shutil.copytree(K8S, overlay)
    (overlay / "overlays" / "gpu" / "kustomization.yaml").write_text(
        (overlay / "overlays" / "gpu" / "kustomization.yaml").read_text()
        + "  - target:\n      kind: Deployment\n    patch: |-\n"
          "      - op: replace\n        path: /spec/template/spec/containers/0/securityContext/privileged\n        value: true\n"
    )
    result = checkov(overlay / "overlays" / "gpu")
    assert result.returncode != 0
    assert "CKV_K8S_16" in result.stdout  # "Container should not be privileged"
