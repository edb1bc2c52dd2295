"""python -m histoserve.train {demo-data,prepare,fit,evaluate,augment-preview} ... — docs/guides/training.md gives the exact commands."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from histoserve.formats.options import POSITIVE_INT


def add_dataclass_options(parser: argparse.ArgumentParser, defaults, skip=()) -> None:
    """One --option per dataclass field: the config class is the single list of options, with their
    help texts and choices."""
    for f in fields(defaults):
        if f.name in skip:
            continue
        flag, default = "--" + f.name.replace("_", "-"), getattr(defaults, f.name)
        text = f.metadata.get("help", "")
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text)
        else:
            kind = f.metadata.get("kind") or {int: int, float: float}.get(type(default), str)
            parser.add_argument(flag, type=kind, default=default, choices=f.metadata.get("choices"),
                                help=f"{text} (default: %(default)s)" if text else "default: %(default)s")


def options_of(args: argparse.Namespace, config_class, skip=()) -> dict:
    return {f.name: getattr(args, f.name) for f in fields(config_class) if f.name not in skip}


def build_parser() -> argparse.ArgumentParser:
    from histoserve.train.config import FitConfig
    from histoserve.train.prepare import PrepareConfig

    parser = argparse.ArgumentParser(prog="python -m histoserve.train", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo-data", help="write scikit-learn's digits as an ImageFolder tree")
    demo.add_argument("out", type=Path)
    demo.add_argument("--seed", type=int, default=0)

    prepare_parser = commands.add_parser("prepare", help="scan SRC into OUT/manifest.csv, a patient-level split and a data report")
    prepare_parser.add_argument("src", help="folder of images (class = first folder level unless --label-regex)")
    prepare_parser.add_argument("out", help="folder for manifest.csv, prepare.json, report.md and its PNGs")
    add_dataclass_options(prepare_parser, PrepareConfig(src="", out=""), skip=("src", "out"))

    fit_parser = commands.add_parser("fit", help="train a classifier and write checkpoint.pt + test report")
    fit_parser.add_argument("--data", required=True, help="manifest.csv from `prepare`, or an ImageFolder root (split or not)")
    add_dataclass_options(fit_parser, FitConfig(data=""), skip=("data",))

    preview = commands.add_parser("augment-preview", help="render an augmentation preset on real images as a PNG grid")
    preview.add_argument("images", nargs="+", type=Path, help="image files or folders (the first 4 images are used)")
    preview.add_argument("--preset", default="histology")
    preview.add_argument("--out", type=Path, default=Path("augment_preview.png"))
    preview.add_argument("--resize-size", type=POSITIVE_INT, default=256)
    preview.add_argument("--crop-size", type=POSITIVE_INT, default=224)
    preview.add_argument("--samples", type=POSITIVE_INT, default=6)

    evaluate_parser = commands.add_parser("evaluate", help="report metrics of a checkpoint on one split")
    evaluate_parser.add_argument("checkpoint", type=Path)
    evaluate_parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    evaluate_parser.add_argument("--data", type=Path, help="default: the data root recorded in the checkpoint")
    evaluate_parser.add_argument("--out", type=Path, help="default: the checkpoint's folder")
    for name, run in (("demo-data", demo_data), ("prepare", prepare), ("augment-preview", augment_preview), ("fit", fit),
                      ("evaluate", evaluate)):
        commands.choices[name].set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (FileNotFoundError, ValueError) as error:  # PrepareError and WeightsUnavailableError are ValueErrors
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def demo_data(args: argparse.Namespace) -> None:
    from histoserve.train.data import write_digits_demo

    data = write_digits_demo(args.out, seed=args.seed)
    for name, per_class in data.counts().items():
        print(f"{args.out / name}: {sum(per_class)} images, per class {per_class}")


def prepare(args: argparse.Namespace) -> None:
    from histoserve.train.prepare import PrepareConfig
    from histoserve.train.prepare import prepare as run_prepare

    run_prepare(PrepareConfig(src=args.src, out=args.out, **options_of(args, PrepareConfig, skip=("src", "out"))))


def augment_preview(args: argparse.Namespace) -> None:
    from histoserve.formats.preprocessing import PreprocessSpec, find_images
    from histoserve.train.augment import render_preview

    paths = [p for arg in args.images for p in (find_images(arg) if arg.is_dir() else [arg])]
    if not paths:
        raise ValueError("augment-preview: no images found")
    render_preview(paths[:4], args.preset, PreprocessSpec(args.resize_size, args.crop_size), args.out, args.samples)
    print(f"wrote {args.out}")


def fit(args: argparse.Namespace) -> None:
    from histoserve.train.config import FitConfig
    from histoserve.train.fit import fit as run_fit

    run_fit(FitConfig(data=args.data, **options_of(args, FitConfig, skip=("data",))))


def evaluate(args: argparse.Namespace) -> None:
    from histoserve.train.checkpoint import load_checkpoint, training_splits
    from histoserve.train.evaluate import predict, write_report

    model, meta = load_checkpoint(args.checkpoint)
    data = training_splits(meta, args.data)
    if data.class_names != meta.class_names:
        raise ValueError(f"classes in the data {data.class_names} differ from the checkpoint's {meta.class_names}")
    predictions = predict(model, data.splits[args.split], meta.preprocess)
    predictions.temperature = meta.temperature
    write_report(predictions, meta.class_names, args.out or args.checkpoint.parent, args.split)





if __name__ == "__main__":
    sys.exit(main())
