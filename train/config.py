"""Training options as one dataclass: `python -m histoserve.train fit --help` is generated from it, and the
resolved values are stored in every checkpoint and in the run folder. Kept free of torch so the CLI
starts fast."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from histoserve.formats.options import NON_NEGATIVE, NON_NEGATIVE_INT, OPEN_FRACTION, POSITIVE, POSITIVE_INT, Range
from histoserve.formats.preprocessing import INTERPOLATIONS

ARCHITECTURES = ("resnet18", "resnet34", "resnet50", "resnet101")
OPTIMIZERS = ("adamw", "sgd")
BALANCE_MODES = ("none", "sampler", "loss")
AMP_MODES = ("none", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
AUGMENT_PRESETS = ("none", "light", "seed", "histology")  # implemented in train/augment.py (PRESETS)


@dataclass(frozen=True)
class SplitRatios:
    """Validation and test shares of the data (of the patients, when the data has patients)."""

    val: float = 0.15
    test: float = 0.15

    def __post_init__(self) -> None:
        if not (0 < self.val < 1 and 0 < self.test < 1 and self.val + self.test < 1):
            raise ValueError(f"split ratios must be in (0, 1) and sum below 1, got {self}")


def option(default, help: str, choices: tuple | None = None, kind: Range | None = None):
    """A field with its --help text and, where only some values make sense, the choices or the range
    (formats/options.py: the same type checks the command line and values given in code)."""
    return field(default=default, metadata={"help": help, "choices": choices, "kind": kind})


def check_choices(config) -> None:
    """Refuse a value outside a field's choices or range, naming the option (before any work)."""
    for f in fields(config):
        choices, kind, value = f.metadata.get("choices"), f.metadata.get("kind"), getattr(config, f.name)
        flag = f"--{f.name.replace('_', '-')}"
        if choices and value not in choices:
            raise ValueError(f"{flag} {value!r} is not one of: {', '.join(map(str, choices))}")
        if kind is not None:
            kind.check(value, flag)


@dataclass
class FitConfig:
    data: str = option("", "manifest.csv from `prepare`, or an ImageFolder root (split or not)")
    out: str = option("runs/latest", "run folder: checkpoints, config, metrics, logs, plots")
    # model and weights
    arch: str = option("resnet50", "torchvision ResNet", ARCHITECTURES)
    weights: str = option("none", "none, a torchvision weights name (IMAGENET1K_V2, DEFAULT) or a .pth file")
    weights_cache: str | None = option(None, "folder for downloaded weights (default $TORCH_HOME/hub/checkpoints)")
    dropout: float = option(0.2, "dropout before the linear head", kind=OPEN_FRACTION)
    freeze_epochs: int = option(0, "train only the head for this many epochs, then unfreeze the backbone", kind=NON_NEGATIVE_INT)
    backbone_lr_scale: float = option(1.0, "backbone learning rate = lr × this (e.g. 0.1 when fine-tuning)", kind=NON_NEGATIVE)
    # optimisation
    epochs: int = option(10, "epochs", kind=POSITIVE_INT)
    batch_size: int = option(64, "global batch size (split over torchrun processes)", kind=POSITIVE_INT)
    optimizer: str = option("adamw", "adamw or sgd (momentum, Nesterov)", OPTIMIZERS)
    lr: float = option(2e-3, "peak learning rate, after linear warmup, then cosine to zero", kind=POSITIVE)
    momentum: float = option(0.9, "SGD momentum", kind=OPEN_FRACTION)
    weight_decay: float = option(0.05, "L2 / decoupled weight decay; never on norm layers and biases", kind=NON_NEGATIVE)
    warmup_epochs: float = option(1.0, "linear warmup length", kind=NON_NEGATIVE)
    label_smoothing: float = option(0.0, "label smoothing of the cross-entropy", kind=OPEN_FRACTION)
    clip_grad_norm: float = option(0.0, "clip the gradient norm to this (0: off)", kind=NON_NEGATIVE)
    ema_decay: float = option(0.0, "EMA of weights per step (e.g. 0.999; 0: off); evaluated and exported when on",
                             kind=OPEN_FRACTION)
    balance: str = option("none", "class imbalance: none, sampler (weighted sampler) or loss (class weights)", BALANCE_MODES)
    early_stopping_patience: int = option(0, "stop after this many epochs without a better val metric (0: off)",
                                          kind=NON_NEGATIVE_INT)
    # speed
    amp: str = option("none", "mixed precision: none, bf16 (CPU or CUDA) or fp16 (CUDA, with a grad scaler)", AMP_MODES)
    channels_last: bool = option(False, "channels_last memory format")
    compile: bool = option(False, "torch.compile the model")
    workers: int = option(0, "DataLoader worker processes", kind=NON_NEGATIVE_INT)
    threads: int = option(0, "torch CPU threads per process (0: cores / local processes)", kind=NON_NEGATIVE_INT)
    device: str = option("auto", "auto (CUDA when visible), cpu or cuda", DEVICES)
    # data
    resize_size: int = option(256, "resize the shorter side to this (the serving contract)", kind=POSITIVE_INT)
    crop_size: int = option(224, "center crop / model input size, at most --resize-size (the serving contract)",
                             kind=POSITIVE_INT)
    interpolation: str = option("bilinear", "resize interpolation (the serving contract)", tuple(sorted(INTERPOLATIONS)))
    augment: str = option("light", "augmentation preset: none, light, seed, histology", AUGMENT_PRESETS)
    fold: int = option(-1, "K-fold manifests: the validation fold (-1: the manifest's own split)", kind=Range(int, -1))
    val_ratio: float = option(SplitRatios.val, "validation share when an unsplit ImageFolder is split here",
                              kind=Range(float, 0, 1, low_open=True, high_open=True))
    test_ratio: float = option(SplitRatios.test, "test share when an unsplit ImageFolder is split here",
                               kind=Range(float, 0, 1, low_open=True, high_open=True))
    # reproducibility
    seed: int = option(0, "seed for weights, data order and augmentation")
    deterministic: bool = option(False, "torch.use_deterministic_algorithms (slower)")
    resume: str = option("", "continue from a run's last.pt (model, optimizer, schedule, EMA, RNG, epoch)")
    calibrate: bool = option(True, "fit a softmax temperature on the validation split; export applies it")

    def __post_init__(self) -> None:
        check_choices(self)
        if self.crop_size > self.resize_size:
            raise ValueError(f"--crop-size {self.crop_size} is larger than --resize-size {self.resize_size}: the crop is "
                             "taken from the resized image")
        if self.val_ratio + self.test_ratio >= 1:
            raise ValueError(f"--val-ratio {self.val_ratio} + --test-ratio {self.test_ratio} leave nothing to train on")
        if self.amp == "fp16" and self.device == "cpu":
            raise ValueError("--amp fp16 needs CUDA; use --amp bf16 on the CPU")
