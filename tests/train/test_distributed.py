"""torchrun: 2 processes on the gloo backend train as 1 process with the same global batch."""

import csv
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

TOLERANCE = 1e-5  # relative, per step
TORCHRUN = Path(sys.executable).parent / "torchrun"


def train(processes: int, data: Path, out: Path) -> dict[tuple[int, int], float]:
    command = [str(TORCHRUN), "--standalone", f"--nproc_per_node={processes}", "-m", "histoserve.train", "fit",
               "--data", str(data), "--out", str(out), "--arch", "resnet18", "--epochs", "2", "--freeze-epochs", "1",
               "--resize-size", "36", "--crop-size", "32", "--batch-size", "32", "--augment", "none", "--dropout", "0",
               "--optimizer", "sgd", "--lr", "0.01", "--warmup-epochs", "0", "--no-calibrate"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    with open(out / "steps.csv") as handle:
        return {(int(epoch), int(step)): float(loss) for epoch, step, loss in csv.reader(handle)}


def test_two_processes_follow_the_one_process_loss_curve(small_digits, tmp_path):
    """Stated tolerance: every step of the frozen-backbone epoch and the first step of the full network
    agree to 1e-5 relative (measured: ≤ 3e-7). Later steps of the full network drift apart exactly as a
    single process does when only its thread count changes: rounding differences are amplified by
    training on these tiny, mostly-black images, so they are not compared. How soon depends on the CPU's
    kernels: with AVX-512 the second full-network step still agreed to 3e-7, on an AVX2-only EPYC it was
    already 1.8e-3 apart."""
    one = train(1, small_digits, tmp_path / "one")
    two = train(2, small_digits, tmp_path / "two")
    assert one.keys() == two.keys() and len(one) == 14  # 7 steps of 32 images per epoch
    compared = [key for key in one if key[0] == 1 or key[1] == 0]
    for key in compared:
        assert abs(two[key] - one[key]) <= TOLERANCE * abs(one[key]), (key, one[key], two[key])
    assert len({round(one[key], 3) for key in compared}) > 5  # the loss really moved
    assert (tmp_path / "two" / "checkpoint.pt").exists() and not list((tmp_path / "two").glob("*rank1*"))
