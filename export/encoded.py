"""The encoded twin of a published version: a model that takes image files and answers as the pixel
model does, so a service in any language sends the file as it is and gets exactly what the Python
client gets.

    <name>-preprocess   python backend on CPU instances (export/preprocess_model.py): TYPE_STRING [1]
                        image files → UINT8 [3, crop, crop], with the package's one preprocessing
    <name>-encoded      ensemble: image_file → <name>-preprocess → <name> → probabilities (with the
                        labels, so the classification extension works on it too)

Both carry the pixel model's version number, and the ensemble's steps name that version: version N of
`<name>-encoded` is exactly version N of `<name>` behind the server's preprocessing. `TYPE_STRING [1]`
(one file per batch element) rather than a ragged UINT8 [-1]: every gRPC client fills BYTES tensors
(`bytes_contents`, or the raw form with a 4-byte little-endian length before each element), the
dynamic batcher batches requests of any file sizes without ragged-batching configuration, and a
batch of N files is an N×1 tensor as for any other batched input.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from histoserve.export.publish import latency_histogram, publish_version_folder
from histoserve.formats.contract import LABELS_FILE
from histoserve.formats.repository_layout import RepositoryError, config_to_text, contract_of, encoded_twins, write_text_if_changed
from histoserve.formats.version import VERSION_CONFIG, VERSION_LABELS, version_folder

PREPROCESS_MODEL_FILE = Path(__file__).with_name("preprocess_model.py")
FILE_INPUT, PIXELS = "image_file", "image"
FILE_TENSOR = mc.ModelInput(name=FILE_INPUT, data_type=mc.TYPE_STRING, dims=[1])  # one file per batch element
# A model's versions share its config.pbtxt, so an ensemble's steps (pinned to its version) hold for
# its newest version only: serve that one. A pod serving one pinned version has no other anyway.
NEWEST_ONLY = mc.ModelVersionPolicy(latest=mc.ModelVersionPolicy.Latest(num_versions=1))


@dataclass(frozen=True)
class EncodedOptions:
    instances: int = 2                     # preprocessing instances (CPU): each decodes one batch at a time
    max_file_bytes: int = 64 * 2**20
    max_image_pixels: int = 50_000_000     # tile whole-slide images first; Pillow's own bomb limit is 89 MP

    def __post_init__(self):
        if self.instances < 1 or self.max_file_bytes < 1 or self.max_image_pixels < 1:
            raise RepositoryError("the encoded model's instances and limits must be positive")


def preprocess_config(pixel: mc.ModelConfig, options: EncodedOptions) -> mc.ModelConfig:
    contract = contract_of(pixel)
    name, _ = encoded_twins(pixel.name)
    config = mc.ModelConfig(
        name=name, backend="python", max_batch_size=pixel.max_batch_size,
        input=[FILE_TENSOR],
        output=[mc.ModelOutput(name=PIXELS, data_type=mc.TYPE_UINT8, dims=[3, contract.preprocess.crop_size,
                                                                          contract.preprocess.crop_size])],
        instance_group=[mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.KIND_CPU, count=options.instances)],
        # No waiting for a batch: files are decoded one by one whatever the batch, so a delay would
        # only add latency; files that arrive while every instance is busy still share an execution.
        dynamic_batching=mc.ModelDynamicBatching(max_queue_delay_microseconds=0),
        version_policy=NEWEST_ONLY,
    )
    for key, value in {**contract.parameters(), "max_file_bytes": str(options.max_file_bytes),
                       "max_image_pixels": str(options.max_image_pixels)}.items():
        config.parameters[key].string_value = value
    config.model_metrics.CopyFrom(latency_histogram())
    return config


def encoded_config(pixel: mc.ModelConfig, version: int) -> mc.ModelConfig:
    contract = contract_of(pixel)
    preprocess, name = encoded_twins(pixel.name)
    config = mc.ModelConfig(
        name=name, platform="ensemble", max_batch_size=pixel.max_batch_size,
        input=[FILE_TENSOR],
        output=[mc.ModelOutput(name=contract.output_name, data_type=mc.TYPE_FP32, dims=[contract.num_classes],
                               label_filename=LABELS_FILE)],
        version_policy=NEWEST_ONLY,
    )
    config.ensemble_scheduling.step.append(mc.ModelEnsembling.Step(
        model_name=preprocess, model_version=version, input_map={FILE_INPUT: FILE_INPUT}, output_map={PIXELS: "pixels"}))
    config.ensemble_scheduling.step.append(mc.ModelEnsembling.Step(
        model_name=pixel.name, model_version=version, input_map={contract.input_name: "pixels"},
        output_map={contract.output_name: contract.output_name}))
    config.parameters["pixel_model"].string_value = pixel.name
    config.model_metrics.CopyFrom(latency_histogram())  # what callers of the encoded model wait, same buckets
    return config


def check_twins_publishable(repository: Path, name: str, version: int) -> None:
    for twin in encoded_twins(name):
        if version_folder(repository, twin, version).exists():
            raise RepositoryError(f"{version_folder(repository, twin, version)} already exists: versions are immutable")


def publish_encoded(repository: Path, pixel: mc.ModelConfig, labels: list[str], version: int,
                    options: EncodedOptions = EncodedOptions(), signing_key: Path | None = None) -> tuple[Path, Path]:
    """Publish `<name>-preprocess` and then `<name>-encoded` at `version` (the pixel model's, already
    published): each version folder in one rename, with its config and SHA256SUMS, signed like the
    pixel model's with `signing_key`."""
    check_twins_publishable(repository, pixel.name, version)
    labels_text = "".join(f"{label}\n" for label in labels)
    folders = []
    for config, files in ((preprocess_config(pixel, options), {"model.py": PREPROCESS_MODEL_FILE}),
                          (encoded_config(pixel, version), {VERSION_LABELS: labels_text})):
        model_dir = Path(repository) / config.name
        model_dir.mkdir(parents=True, exist_ok=True)
        text = config_to_text(config)
        write_text_if_changed(model_dir / "config.pbtxt", text)
        if VERSION_LABELS in files:
            write_text_if_changed(model_dir / LABELS_FILE, labels_text)
        folders.append(publish_version_folder(model_dir, version, {**files, VERSION_CONFIG: text}, signing_key=signing_key))
    return folders[0], folders[1]

