"""`python -m histoserve.client classify` while its server goes away: restarted on the same ports within the
deadline, every file still gets its prediction; gone for good, every remaining file gets an error
naming the deadline. No file is ever missing from the output, and the output keeps input order."""

import json
import os
import signal
import subprocess
import sys
import time

from histoserve.formats.preprocessing import find_images
from histoserve.serve.triton_flags import free_ports
from tests.conftest import MODEL, ROOT, started_triton, triton_requests, wait_for_requests


def start_classify(url: str, folders, *extra) -> subprocess.Popen:
    folders = folders if isinstance(folders, list) else [folders]
    command = [sys.executable, "-m", "histoserve.client", "classify", *map(str, folders), "--url", url, "--model", MODEL, "--json",
               "--top-k", "1", *map(str, extra)]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def rest_of(process: subprocess.Popen, timeout: float = 300) -> tuple[list[str], str]:
    """The remaining stdout lines (through the same reader that gave the first one: lines it buffered
    would be lost to communicate()) and stderr, once the process has exited."""
    lines = process.stdout.read().splitlines()
    stderr = process.stderr.read()
    process.wait(timeout)
    return lines, stderr


def test_a_server_restarted_mid_folder_loses_no_file(repository, digits_root, triton_factory):
    folder = digits_root / "test"
    expected = [str(p) for p in find_images(folder)]
    ports = free_ports()
    first = triton_factory(repository, ports=ports)
    try:
        warmed_up = triton_requests(first)  # Triton counts its own warm-up requests too
        process = start_classify(first.grpc_url, folder, "--batch-size", 1, "--concurrency", 2, "--deadline-s", 120)
        first_line = process.stdout.readline()
        assert first_line, process.stderr.read()
        wait_for_requests(first, 20, since=warmed_up)  # stopped well into the folder, not before or after it
    finally:
        first.stop()
    assert process.poll() is None, "the client finished before the server stopped: nothing was tested"
    time.sleep(1)  # down for a while: calls wait for a server, or are retried
    with started_triton(repository, ports=ports):
        rest, stderr = rest_of(process)
    results = [json.loads(line) for line in [first_line, *rest]]
    assert [r["path"] for r in results] == expected
    assert [r for r in results if r["error"]] == [], stderr
    assert process.returncode == 0, stderr


def test_a_server_that_never_answers_again_fails_every_remaining_file_after_its_deadline(repository, digits_root):
    """Frozen (SIGSTOP) right after the first result, as a node that dies without closing its
    connections: requests in flight and queued each end at their deadline, with an error naming it.
    Two folders (34 batches): with one (17), a client running a little ahead of this test's reading
    could finish before the freeze (seen once); each batch takes milliseconds."""
    folders = [digits_root / "test", digits_root / "val"]
    expected = [str(p) for folder in folders for p in find_images(folder)]
    with started_triton(repository) as server:
        process = start_classify(server.grpc_url, folders, "--batch-size", 16, "--concurrency", 4, "--deadline-s", 2)
        first_line = process.stdout.readline()
        assert first_line, process.stderr.read()
        os.killpg(server.process.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            rest, stderr = rest_of(process)
            waited = time.monotonic() - started
        finally:
            os.killpg(server.process.pid, signal.SIGCONT)
    results = [json.loads(line) for line in [first_line, *rest]]
    assert [r["path"] for r in results] == expected  # none missing, none twice, in order
    failed = [r for r in results if r["error"]]
    assert failed, "the server was frozen after the first result: the files after it cannot all have succeeded"
    # Batches are taken by whichever of the 4 threads is free, up to 2 × 4 ahead of the results: a batch
    # whose thread was still reading its files at the freeze can be overtaken by the 7 after it, whose
    # answers came back before it (seen under a loaded machine). Beyond those, nothing can succeed.
    overtaking = (2 * 4 - 1) * 16
    assert all(r["error"] for r in results[results.index(failed[0]) + 16 + overtaking:]), "files well after the freeze succeeded"
    assert all("2 s deadline" in r["error"] for r in failed), failed[0]["error"]
    assert process.returncode == 1
    assert f"{len(failed)} of {len(expected)} file(s) failed" in stderr and "Traceback" not in stderr
    batches = -(-len(failed) // 16)
    assert waited < 2 * (batches / 4 + 2) + 10, f"{waited:.0f} s for {batches} batches of 2 s, 4 at a time"
