"""python -m train {demo-data,fit,evaluate} ... — see README.md for the exact commands."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from train.model import ARCHITECTURES, WeightsUnavailableError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo-data", help="write scikit-learn's digits as an ImageFolder tree")
    demo.add_argument("out", type=Path)
    demo.add_argument("--seed", type=int, default=0)

    from train.fit import FitConfig

    fit_parser = commands.add_parser("fit", help="train a classifier and write checkpoint.pt + test report")
    defaults = FitConfig(data="")
    for f in fields(FitConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "data":
            fit_parser.add_argument(flag, required=True, help="ImageFolder root (split or not)")
        elif f.name == "arch":
            fit_parser.add_argument(flag, default=defaults.arch, choices=ARCHITECTURES)
        else:
            kind = {int: int, float: float}.get(type(getattr(defaults, f.name)), str)
            fit_parser.add_argument(flag, type=kind, default=getattr(defaults, f.name), help=f"default: %(default)s")

    evaluate = commands.add_parser("evaluate", help="report metrics of a checkpoint on one split")
    evaluate.add_argument("checkpoint", type=Path)
    evaluate.add_argument("--split", default="test", choices=("train", "val", "test"))
    evaluate.add_argument("--data", type=Path, help="default: the data root recorded in the checkpoint")
    evaluate.add_argument("--out", type=Path, help="default: the checkpoint's folder")

    args = parser.parse_args(argv)
    try:
        if args.command == "demo-data":
            from train.data import write_digits_demo

            data = write_digits_demo(args.out, seed=args.seed)
            for name, per_class in data.counts().items():
                print(f"{args.out / name}: {sum(per_class)} images, per class {per_class}")
        elif args.command == "fit":
            from train.fit import fit

            fit(FitConfig(**{f.name: getattr(args, f.name) for f in fields(FitConfig)}))
        else:
            from train.checkpoint import load_checkpoint
            from train.data import SplitRatios, load_splits
            from train.evaluate import predict, write_report

            model, meta = load_checkpoint(args.checkpoint)
            ratios = SplitRatios(meta.config.get("val_ratio", 0.15), meta.config.get("test_ratio", 0.15))
            data = load_splits(args.data or Path(meta.data_root), ratios, meta.split_seed)
            if data.class_names != meta.class_names:
                raise ValueError(f"classes in the data {data.class_names} differ from the checkpoint's {meta.class_names}")
            predictions = predict(model, data.splits[args.split], meta.preprocess)
            write_report(predictions, meta.class_names, args.out or args.checkpoint.parent, args.split)
    except (WeightsUnavailableError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
