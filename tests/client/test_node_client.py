"""A Node.js service calling the encoded model (client/node: Triton's own protos and @grpc/grpc-js,
nothing of ours on its side) gets exactly the Python client's answers, file for file."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from tests.conftest import MODEL, ROOT, run_cli
from tests.odd_images import write_odd_images

NODE_CLIENT = ROOT / "client" / "node"


@pytest.fixture(scope="module")
def node() -> str:
    executable = shutil.which("node")
    assert executable, "Node.js is not installed"
    assert (NODE_CLIENT / "node_modules" / "@grpc" / "grpc-js").is_dir(), \
        "client/node has no node_modules: `make test` runs `npm ci --prefix client/node`"
    return executable


@pytest.fixture(scope="module")
def server(encoded_repository):
    """Triton with the digits model and its encoded twin."""
    from histoserve.serve.server import TritonServer, free_ports

    with TritonServer(encoded_repository, free_ports()) as running:
        yield running


def node_classify(node, url, model, files, top_k=3) -> subprocess.CompletedProcess:
    return subprocess.run([node, str(NODE_CLIENT / "classify.js"), "--url", url, "--model", model, "--top-k", str(top_k),
                           *map(str, files)], capture_output=True, text=True, timeout=300)


def lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


def test_the_node_client_gets_the_python_client_s_answers_for_every_file(node, server, test_files, tmp_path):
    files = [*test_files, *write_odd_images(tmp_path / "odd").values()]
    from_node = node_classify(node, server.grpc_url, f"{MODEL}-encoded", files)
    from_python = run_cli("-m", "client", "classify", *files, "--url", server.grpc_url, "--model", MODEL, "--top-k", 3, "--json")
    assert from_node.returncode == 0, from_node.stderr
    assert [row["path"] for row in lines(from_node.stdout)] == [str(f) for f in files]  # in input order
    assert lines(from_node.stdout) == lines(from_python.stdout)  # labels, indices and scores, exactly


def test_a_bad_file_gets_its_error_line_and_the_others_their_answers(node, server, test_files, tmp_path):
    broken = tmp_path / "scan.png"
    broken.write_bytes(test_files[0].read_bytes()[:40])
    files = [test_files[0], broken, tmp_path / "missing.png", test_files[1]]
    result = node_classify(node, server.grpc_url, f"{MODEL}-encoded", files, top_k=1)
    rows = lines(result.stdout)
    assert result.returncode == 1
    assert [bool(row["predictions"]) for row in rows] == [True, False, False, True]
    assert "image_file[0]" in rows[1]["error"] and str(broken) in rows[1]["error"]
    assert "cannot read (ENOENT)" in rows[2]["error"]


def test_the_node_client_refuses_the_pixel_model_and_a_missing_one(node, server, test_files):
    pixel = node_classify(node, server.grpc_url, MODEL, test_files[:1])
    assert pixel.returncode == 2 and "does not take image files" in pixel.stderr
    missing = node_classify(node, server.grpc_url, "no-such-model-encoded", test_files[:1])
    assert missing.returncode == 2 and "cannot use no-such-model-encoded" in missing.stderr
