"""A run killed with SIGKILL after a checkpoint and resumed ends exactly like an uninterrupted run."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import torch

from tests.conftest import ROOT

ARGS = ["--arch", "resnet18", "--epochs", "4", "--resize-size", "36", "--crop-size", "32", "--batch-size", "32",
        "--augment", "light", "--ema-decay", "0.9", "--label-smoothing", "0.1", "--clip-grad-norm", "5"]
TOLERANCE = 1e-6  # absolute, on losses and accuracies (measured: identical)


def command(data, out, *extra):
    return [sys.executable, "-m", "histoserve.train", "fit", "--data", str(data), "--out", str(out), *ARGS, *extra]


def rows(out):
    with open(out / "metrics.csv") as handle:
        return {int(r["epoch"]): r for r in csv.DictReader(handle)}


def test_killed_and_resumed_run_ends_like_an_uninterrupted_one(small_digits, tmp_path):
    subprocess.run(command(small_digits, tmp_path / "straight"), cwd=ROOT, check=True, capture_output=True, timeout=600)

    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen(command(small_digits, interrupted), cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        last = interrupted / "last.pt"
        if last.exists() and torch.load(last, weights_only=False)["epoch"] >= 2:
            break
        time.sleep(0.1)
    assert process.poll() is None, "the run ended before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = torch.load(interrupted / "last.pt", weights_only=False)["epoch"]
    assert killed_at < 4

    result = subprocess.run(command(small_digits, interrupted, "--resume", str(interrupted / "last.pt")),
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {interrupted / 'last.pt'} after epoch {killed_at}" in (interrupted / "train.log").read_text()

    straight, resumed = rows(tmp_path / "straight"), rows(interrupted)
    assert sorted(resumed) == [1, 2, 3, 4]
    for epoch in range(1, 5):
        for field in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
            assert abs(float(resumed[epoch][field]) - float(straight[epoch][field])) <= TOLERANCE, (epoch, field)
    final = [json.loads((run / "test_metrics.json").read_text()) for run in (tmp_path / "straight", interrupted)]
    assert final[0]["accuracy"] == final[1]["accuracy"] and abs(final[0]["ece"] - final[1]["ece"]) <= TOLERANCE


def test_resume_refuses_other_options_or_another_process_count(small_digits, tmp_path):
    from histoserve.train.config import FitConfig
    from histoserve.train.fit import resume_problems

    run = tmp_path / "run"
    subprocess.run(command(small_digits, run, "--epochs", "1"), cwd=ROOT, check=True, capture_output=True, timeout=600)
    saved_config = (run / "config.json").read_text()
    result = subprocess.run(command(small_digits, run, "--epochs", "3", "--lr", "0.01", "--resume", str(run / "last.pt")),
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2
    assert "not the same run (--lr was 0.002, now 0.01)" in result.stderr
    assert (run / "config.json").read_text() == saved_config  # refused before anything was written

    saved = torch.load(run / "last.pt", weights_only=False)
    config = FitConfig(**{**saved["config"], "epochs": 3, "resume": str(run / "last.pt")})
    assert resume_problems(saved, config, world_size=1) == []  # a longer run is the same run
    [problem] = resume_problems(saved, config, world_size=2)
    assert "ran on 1 process(es), now 2" in problem
