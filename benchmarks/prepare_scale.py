"""Benchmark `python -m histoserve.train prepare` at growing file counts: files/s and peak memory.

    .venv/bin/python benchmarks/prepare_scale.py [--counts 2500 5000 10000] [--size 96]

Generates tissue-like PNGs once (the largest count; smaller runs use a prefix of the same files),
then runs the real command for each count in a subprocess and samples the RSS of its whole process
tree (main process + decode workers) every 50 ms. Memory must not grow with the number of files:
pixels never leave the workers, and rows are a few hundred bytes each.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from histoserve.train.synthetic import tissue  # noqa: E402


def tree_rss(process: psutil.Process) -> int:
    total = 0
    for p in [process, *process.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run(src: Path, out: Path) -> tuple[float, int]:
    command = [sys.executable, "-m", "histoserve.train", "prepare", str(src), str(out), "--group-regex", r"^(?P<group>p\d+)_"]
    started = time.perf_counter()
    process = psutil.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = 0
    while process.poll() is None:
        peak = max(peak, tree_rss(process))
        time.sleep(0.05)
    if process.returncode != 0:
        sys.exit(f"prepare failed with exit code {process.returncode}")
    return time.perf_counter() - started, peak


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[2500, 5000, 10000])
    parser.add_argument("--size", type=int, default=96, help="image side in pixels")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="histoserve-bench-"))
    try:
        pool = workdir / "pool"
        names = []
        for i in tqdm(range(max(args.counts)), desc="generating images", unit="img", disable=None):
            label = "tumour" if i % 3 == 0 else "normal"
            name = f"{label}/p{i // 10}_{i}.png"
            (pool / label).mkdir(parents=True, exist_ok=True)
            tissue(i, size=args.size).save(pool / name)
            names.append(name)
        print(f"\nprepare on {args.size}×{args.size} PNGs, 10 per patient, {psutil.cpu_count()} cores; one run each\n")
        print(f"{'files':>7} {'seconds':>8} {'files/s':>8} {'peak RSS (MB)':>14} {'RSS per 1k files':>17}")
        for count in args.counts:
            src = workdir / f"src{count}"
            for name in names[:count]:
                (src / name).parent.mkdir(parents=True, exist_ok=True)
                (src / name).symlink_to(pool / name)
            seconds, peak = run(src, workdir / f"out{count}")
            print(f"{count:>7} {seconds:>8.1f} {count / seconds:>8.0f} {peak / 2**20:>14.0f} {peak / 2**20 / (count / 1000):>17.1f}")
            shutil.rmtree(src)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
