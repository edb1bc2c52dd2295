"""`python -m histoserve.export` refuses what it can before any work: bad option values when the command line
is read, and a version number, model name or contract the repository cannot take before the ONNX
export, the calibration or the drift baseline run. Nothing is written either way."""

import pytest

from tests.conftest import MODEL, run_cli


@pytest.mark.parametrize("options, message", [
    (["--min-agreement", "1.5"], "argument --min-agreement: must be in [0, 1], got 1.5"),
    (["--max-accuracy-drop", "-0.1"], "argument --max-accuracy-drop: must be in [0, 1], got -0.1"),
    (["--atol", "-1"], "argument --atol: must be above 0, got -1"),
    (["--max-batch-size", "0"], "argument --max-batch-size: must be at least 1, got 0"),
    (["--cpu-threads", "0"], "argument --cpu-threads: must be at least 1, got 0"),
    (["--calibration-count", "0", "--precision", "int8"], "argument --calibration-count: must be at least 1, got 0"),
    (["--gate-split", "holdout"], "argument --gate-split: invalid choice: 'holdout'"),
    (["--encoded", "--max-file-mb", "0"], "argument --max-file-mb: must be above 0, got 0"),
    (["--encoded", "--preprocess-instances", "0"], "argument --preprocess-instances: must be at least 1, got 0"),
], ids=["agreement", "accuracy-drop", "atol", "batch", "threads", "calibration", "split", "file-limit", "preprocess"])
def test_bad_values_are_refused_when_the_command_line_is_read(trained_run, tmp_path, options, message):
    result = run_cli("-m", "histoserve.export", trained_run / "checkpoint.pt", "--repository", tmp_path / "repo", "--name", MODEL,
                     *options, check=False, timeout=120)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not (tmp_path / "repo").exists()


def test_a_missing_checkpoint_is_named(tmp_path):
    result = run_cli("-m", "histoserve.export", tmp_path / "nothing.pt", "--name", MODEL, check=False, timeout=60)
    assert result.returncode == 2 and f"no such file: {tmp_path / 'nothing.pt'}" in result.stderr


@pytest.mark.parametrize("case", ["existing version", "preferred sizes over the batch", "other labels", "encoded twin taken"])
def test_what_the_repository_cannot_take_is_refused_before_the_export(trained_run, repository, encoded_repository, tmp_path,
                                                                     case):
    import shutil

    repo = tmp_path / "repo"
    shutil.copytree(repository / MODEL, repo / MODEL)
    options = {"existing version": ["--version", "1"],
               "preferred sizes over the batch": ["--cpu-preferred-batch-sizes", "32"],
               "other labels": [],
               "encoded twin taken": ["--encoded"]}[case]
    if case == "other labels":
        (repo / MODEL / "labels.txt").write_text("".join(f"class-{i}\n" for i in range(10)))
    if case == "encoded twin taken":  # the next version is 2, and a stray MODEL-encoded/2 is there already
        shutil.copytree(encoded_repository / f"{MODEL}-encoded" / "1", repo / f"{MODEL}-encoded" / "2")
    before = sorted(p.relative_to(repo) for p in repo.rglob("*"))
    result = run_cli("-m", "histoserve.export", trained_run / "checkpoint.pt", "--repository", repo, "--name", MODEL, *options,
                     check=False, timeout=180)
    assert result.returncode == 1, result.stdout + result.stderr
    assert {"existing version": "already exists: versions are immutable",
            "preferred sizes over the batch": "preferred batch sizes [32] must lie within 1..max_batch_size 16",
            "other labels": "already serves another contract",
            "encoded twin taken": f"{repo / (MODEL + '-encoded') / '2'} already exists: versions are immutable"}[case] in result.stderr
    assert "exporting" not in result.stdout  # refused before the ONNX export, not after it
    assert sorted(p.relative_to(repo) for p in repo.rglob("*")) == before
