"""A long folder through `TritonClassifier.classify_files`: paths are read lazily, a bounded number of
batches ahead of the results, and the process's memory stays flat over 10,000 files."""

from pathlib import Path

from histoserve.client.classifier import TritonClassifier
from tests.conftest import MODEL

FILES = 10_000
CONCURRENCY, BATCH = 4, 16


def resident_mb() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * 4096 / 2**20


def test_ten_thousand_files_run_in_bounded_memory(server, test_files):
    taken = 0

    def paths():
        nonlocal taken
        for i in range(FILES):
            taken += 1
            yield test_files[i % len(test_files)]

    read_ahead, resident = [], {}
    with TritonClassifier(server.grpc_url, MODEL) as classifier:
        for done, result in enumerate(classifier.classify_files(paths(), 1, CONCURRENCY, BATCH), 1):
            assert result.ok, result.error
            read_ahead.append(taken - done)
            if done in (2_000, FILES):
                resident[done] = resident_mb()
    assert done == FILES
    # At most 2 × concurrency batches are held: reading the whole folder up front would fail here.
    assert max(read_ahead) <= 2 * CONCURRENCY * BATCH, max(read_ahead)
    growth = resident[FILES] - resident[2_000]
    assert growth < 16, f"resident memory grew {growth:.1f} MB from 2,000 to {FILES:,} files"
