import subprocess
import sys

from tests.conftest import ROOT


def test_importing_the_client_never_imports_torch():
    code = (
        "import sys, histoserve.formats.preprocessing, histoserve.client.classifier, histoserve.client.aio, histoserve.client.__main__\n"
        "heavy = sorted(m for m in ('torch', 'torchvision', 'onnxruntime', 'sklearn') if m in sys.modules)\n"
        "print(heavy)\n"
        "sys.exit(1 if heavy else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, f"client imported {result.stdout.strip()} {result.stderr}"
