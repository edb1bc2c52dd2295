"""Training throughput on this machine: fp32 vs bf16 autocast vs channels_last vs both.

    .venv/bin/python benchmarks/train_speed.py [--arch resnet50] [--size 112] [--batch 32] [--steps 8]

Each variant runs the real training step of train/fit.py (forward, loss, backward, AdamW step) on
random uint8 images, after warm-up steps, in one process, one after the other; ratios are to fp32 in
the same run (these machines are noisy: compare ratios, not absolute numbers across runs).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from histoserve.train.fit import make_optimizer, train_one_epoch  # noqa: E402
from histoserve.train.model import build_classifier  # noqa: E402

VARIANTS = [("fp32", "none", False), ("bf16 autocast", "bf16", False), ("channels_last", "none", True),
            ("bf16 + channels_last", "bf16", True)]


def images_per_second(arch: str, size: int, batch: int, steps: int, warmup: int, amp: str, channels_last: bool) -> float:
    torch.manual_seed(0)
    model = build_classifier(arch, 10)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    labels = torch.randint(0, 10, (batch,))
    optimizer, schedule = make_optimizer(model, 1e-3, 0.05, steps + warmup, 1)
    loss_fn = torch.nn.CrossEntropyLoss()
    run = dict(amp=amp, channels_last=channels_last, show_progress=False)
    train_one_epoch(model, [(images, labels)] * warmup, optimizer, schedule, loss_fn, "warm-up", **run)
    started = time.perf_counter()
    train_one_epoch(model, [(images, labels)] * steps, optimizer, schedule, loss_fn, "timed", **run)
    return steps * batch / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"{args.arch} training, {args.size}×{args.size}, batch {args.batch}, {args.steps} timed steps, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    results = []
    for name, amp, channels_last in VARIANTS:
        results.append((name, images_per_second(args.arch, args.size, args.batch, args.steps, args.warmup, amp, channels_last)))
        print(f"  measured {name}", flush=True)
    base = results[0][1]
    print(f"\n{'variant':<22} {'img/s':>8} {'× fp32':>8}")
    for name, rate in results:
        print(f"{name:<22} {rate:>8.1f} {rate / base:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
