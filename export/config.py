"""Export options as one typed value: `ExportConfig`, what `python -m histoserve.export` runs with
(export/pipeline.py), as train's FitConfig is what `python -m histoserve.train fit` runs with.

It is built from the parsed command line (`ExportConfig.from_args`) or in code, and checked when built:
each value against the same range or choices the command line takes, then the options that only make
sense together (an OptionError naming the option, before any work). The GPU batcher, the CPU config,
the INT8 calibration and the accuracy gate are kept as the dataclasses that use them (BatchingConfig,
CpuTuning, QuantizationConfig, AccuracyGate); `OPTIONS` says where each command-line option lives,
so `options()` gives back the command line's values, in its order, for the provenance.
"""

from __future__ import annotations

import argparse
import functools
from dataclasses import dataclass
from pathlib import Path

from histoserve.export.encoded import EncodedOptions
from histoserve.export.model_card import DEFAULT_INTENDED_USE
from histoserve.export.precision import CALIBRATION_METHODS, PRECISIONS, AccuracyGate, QuantizationConfig
from histoserve.export.publish import BatchingConfig, CpuTuning, TensorRTConfig
from histoserve.formats.options import FRACTION, NON_NEGATIVE_INT, POSITIVE, POSITIVE_INT, OptionError, Range

SPLITS = ("train", "val", "test")
TENSORRT_PRECISIONS = ("fp32", "fp16", "int8")

# Each command-line option (argparse's dest, in the parser's order) → where ExportConfig keeps it.
OPTIONS: dict[str, tuple[str, ...]] = {
    "checkpoint": ("checkpoint",),
    "repository": ("repository",),
    "name": ("name",),
    "version": ("version",),
    "max_batch_size": ("batching", "max_batch_size"),
    "max_queue_delay_us": ("batching", "max_queue_delay_us"),
    "instance_count": ("batching", "instance_count"),
    "preferred_batch_sizes": ("batching", "preferred_batch_sizes"),
    "precision": ("precision",),
    "calibration_count": ("quantization", "calibration_count"),
    "calibration_method": ("quantization", "method"),
    "int8_reduce_range": ("quantization", "reduce_range"),
    "gate_split": ("gate_split",),
    "baseline_split": ("baseline_split",),
    "min_agreement": ("gate", "min_agreement"),
    "max_accuracy_drop": ("gate", "max_accuracy_drop"),
    "tensorrt": ("tensorrt",),
    "tensorrt_workspace_bytes": ("tensorrt_workspace_bytes",),
    "tensorrt_cache_path": ("tensorrt_cache_path",),
    "cpu_instances": ("cpu", "instance_count"),
    "cpu_threads": ("cpu", "intra_op_threads"),
    "cpu_max_queue_delay_us": ("cpu", "max_queue_delay_us"),
    "cpu_preferred_batch_sizes": ("cpu", "preferred_batch_sizes"),
    "loaded_versions": ("loaded_versions",),
    "parity_images": ("parity_images",),
    "parity_count": ("parity_count",),
    "atol": ("atol",),
    "opset": ("opset",),
    "encoded": ("encoded",),
    "preprocess_instances": ("preprocess_instances",),
    "max_file_mb": ("max_file_mb",),
    "max_image_megapixels": ("max_image_megapixels",),
    "signing_key": ("signing_key",),
    "intended_use": ("intended_use",),
    "result_file": ("result_file",),
}
SUB_CONFIGS = {"batching": BatchingConfig, "quantization": QuantizationConfig, "gate": AccuracyGate, "cpu": CpuTuning}

# The values each option takes: the command line's own types and choices (the parser checks them as
# it reads them; these check a config built in code with the same messages).
CHOICES = {"precision": PRECISIONS, "calibration_method": CALIBRATION_METHODS, "gate_split": SPLITS, "baseline_split": SPLITS,
           "tensorrt": TENSORRT_PRECISIONS}
KINDS: dict[str, Range] = {
    "version": POSITIVE_INT, "max_batch_size": POSITIVE_INT, "max_queue_delay_us": NON_NEGATIVE_INT, "instance_count": POSITIVE_INT,
    "preferred_batch_sizes": POSITIVE_INT, "calibration_count": POSITIVE_INT, "min_agreement": FRACTION,
    "max_accuracy_drop": FRACTION, "tensorrt_workspace_bytes": POSITIVE_INT, "cpu_instances": POSITIVE_INT,
    "cpu_threads": POSITIVE_INT, "cpu_max_queue_delay_us": NON_NEGATIVE_INT, "cpu_preferred_batch_sizes": POSITIVE_INT,
    "loaded_versions": POSITIVE_INT, "parity_count": POSITIVE_INT, "atol": POSITIVE, "opset": POSITIVE_INT,
    "preprocess_instances": POSITIVE_INT, "max_file_mb": POSITIVE, "max_image_megapixels": POSITIVE,
}
OPTIONAL = ("version", "tensorrt", "parity_images", "signing_key", "result_file")  # None: not given


def flag(option: str) -> str:
    """The command line's name of an option: --max-batch-size for max_batch_size."""
    return "--" + option.replace("_", "-")


@dataclass(frozen=True)
class ExportConfig:
    """Everything one export run needs. Field order follows the command line's."""

    checkpoint: Path                      # checkpoint.pt written by `python -m histoserve.train fit`
    name: str                             # Triton model name (a variant is published as NAME-int8 / NAME-fp16)
    repository: Path = Path("model_repository")
    version: int | None = None            # None: the next free version number
    batching: BatchingConfig = BatchingConfig()  # the GPU config's batcher and instances
    precision: str = "fp32"
    quantization: QuantizationConfig = QuantizationConfig()  # int8: calibration (its count: at most)
    gate_split: str = "test"              # held-out split the accuracy gate runs on
    baseline_split: str = "test"          # held-out split of the drift baseline, the golden answers and the card
    gate: AccuracyGate = AccuracyGate()   # how close a variant must stay to fp32
    tensorrt: str | None = None           # GPU config: TensorRT at this precision (fp32, fp16, int8); None: none
    tensorrt_workspace_bytes: int = TensorRTConfig.workspace_bytes
    tensorrt_cache_path: str = TensorRTConfig.cache_path
    cpu: CpuTuning = CpuTuning()          # configs/cpu.pbtxt
    loaded_versions: int = 2              # newest versions Triton keeps loaded
    parity_images: Path | None = None     # ImageFolder for the parity gate; None: the checkpoint's test split
    parity_count: int = 32
    atol: float = 1e-4                    # max |Δprob| the parity gate allows
    opset: int = 18
    encoded: bool = False                 # also publish NAME-encoded and NAME-preprocess
    preprocess_instances: int = EncodedOptions.instances
    max_file_mb: float = EncodedOptions.max_file_bytes / 2**20
    max_image_megapixels: float = EncodedOptions.max_image_pixels / 1e6
    signing_key: Path | None = None       # EC private key (PEM) signing each version folder
    intended_use: str = DEFAULT_INTENDED_USE
    result_file: Path | None = None       # NAME=, VERSION=, FOLDER= lines after publishing

    def __post_init__(self) -> None:
        for option, value in self.options().items():
            check_value(option, value)
        if self.tensorrt == "int8" and self.precision != "int8":
            raise OptionError("--tensorrt int8 runs the quantized model: add --precision int8")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ExportConfig:
        """The config of a parsed `python -m histoserve.export` command line; OptionError (a ValueError)
        names the option when the options do not go together."""
        top: dict = {}
        nested: dict[str, dict] = {group: {} for group in SUB_CONFIGS}
        for option, path in OPTIONS.items():
            value = getattr(args, option)
            value = tuple(value) if isinstance(value, list) else value
            if len(path) == 1:
                top[path[0]] = value
            else:
                nested[path[0]][path[1]] = value
        return cls(**top, **{group: SUB_CONFIGS[group](**values) for group, values in nested.items()})

    def options(self) -> dict:
        """Each command-line option's value, as argparse names and gives it, in the parser's order."""
        values = {option: functools.reduce(getattr, path, self) for option, path in OPTIONS.items()}
        return {option: list(value) if isinstance(value, tuple) else value for option, value in values.items()}

    @property
    def model_name(self) -> str:
        """The published model's name: NAME, or NAME-fp16 / NAME-int8 for a variant."""
        return self.name if self.precision == "fp32" else f"{self.name}-{self.precision}"

    @property
    def tensorrt_config(self) -> TensorRTConfig | None:
        """The GPU config's TensorRT accelerator, or None without --tensorrt."""
        if not self.tensorrt:
            return None
        return TensorRTConfig(self.tensorrt.upper(), self.tensorrt_workspace_bytes, self.tensorrt_cache_path)

    def encoded_options(self) -> EncodedOptions:
        """The preprocessing model's instances and limits, in bytes and pixels (RepositoryError when a
        limit rounds to nothing)."""
        return EncodedOptions(self.preprocess_instances, int(self.max_file_mb * 2**20), int(self.max_image_megapixels * 1e6))


def check_value(option: str, value) -> None:
    """Refuse a value outside the option's choices or range, naming the option (OptionError)."""
    if value is None and option in OPTIONAL:
        return
    choices, kind = CHOICES.get(option), KINDS.get(option)
    if choices and value not in choices:
        raise OptionError(f"{flag(option)} {value!r} is not one of: {', '.join(map(str, choices))}")
    for item in value if isinstance(value, list) else [value]:
        if kind is not None:
            kind.check(item, flag(option))
