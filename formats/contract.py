"""The serving contract, defined once. Export writes it into config.pbtxt; the client, the load test and
`python -m histoserve.serve` read it back from the server, so no stage can drift from the model it calls.

- input `image`: TYPE_UINT8, dims [3, crop, crop], FORMAT_NCHW, RGB, dynamic batch axis (max_batch_size)
- output `probabilities`: TYPE_FP32, dims [num_classes], softmax, label_filename labels.txt (Triton's
  classification extension then returns "score:index:label")
- mean/std normalization is inside the model; the client sends raw uint8 pixels
- geometry (resize shorter side, center crop, interpolation) in config.pbtxt `parameters`, with the
  contract's version

Exactly one input and one output keeps stock Triton tools working. The encoded twin of a model
(`python -m histoserve.export --encoded`, NAME-encoded) takes image files instead: input `image_file`,
TYPE_STRING [1], one file's bytes per batch element, the same output; `EncodedContract` reads it. Only numpy/Pillow/tritonclient
underneath: importing this never imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from histoserve.formats.preprocessing import PreprocessSpec

INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"
INPUT_DATATYPE = "TYPE_UINT8"
OUTPUT_DATATYPE = "TYPE_FP32"
LABELS_FILE = "labels.txt"
CONTRACT_VERSION = "1"


class ContractError(ValueError):
    """A model config that does not follow the serving contract; the message names the field."""


@dataclass(frozen=True)
class ModelContract:
    """What a caller needs to know about a served model, read from its config once."""

    name: str
    input_name: str
    output_name: str
    num_classes: int
    max_batch_size: int
    preprocess: PreprocessSpec
    version: str = CONTRACT_VERSION

    @classmethod
    def from_config(cls, config: dict) -> ModelContract:
        """From a model config as JSON: what `get_model_config(..., as_json=True)["config"]` returns, or
        `google.protobuf.json_format.MessageToDict(config, preserving_proto_field_name=True)`."""
        name = config.get("name", "")
        inputs, outputs = config.get("input", []), config.get("output", [])
        if len(inputs) != 1 or len(outputs) != 1:
            raise ContractError(f"model {name!r}: must have exactly one input and one output, "
                                f"has {len(inputs)} and {len(outputs)}")
        tensor_in, tensor_out = inputs[0], outputs[0]
        if tensor_in.get("data_type") != INPUT_DATATYPE or tensor_out.get("data_type") != OUTPUT_DATATYPE:
            raise ContractError(f"model {name!r}: input.data_type {tensor_in.get('data_type')} and output.data_type "
                                f"{tensor_out.get('data_type')}, expected {INPUT_DATATYPE} and {OUTPUT_DATATYPE}")
        parameters = string_parameters(config)
        try:
            preprocess = PreprocessSpec.from_parameters(parameters)
        except ValueError as error:
            raise ContractError(f"model {name!r}: parameters: {error}") from error
        if parameters.get("contract_version") != CONTRACT_VERSION:
            raise ContractError(f"model {name!r}: parameters.contract_version is {parameters.get('contract_version')!r}; this "
                                f"client speaks contract version {CONTRACT_VERSION!r}: use a client of the same release")
        dims = [int(d) for d in tensor_in.get("dims", [])]
        if dims != [3, preprocess.crop_size, preprocess.crop_size]:
            raise ContractError(f"model {name!r}: input.dims {dims}, expected [3, {preprocess.crop_size}, "
                                f"{preprocess.crop_size}] for crop_size {preprocess.crop_size}")
        return cls(
            name=name,
            input_name=tensor_in["name"],
            output_name=tensor_out["name"],
            num_classes=int(tensor_out["dims"][-1]),
            max_batch_size=max(1, int(config.get("max_batch_size", 0))),
            preprocess=preprocess,
            version=parameters["contract_version"],
        )

    def parameters(self) -> dict[str, str]:
        """The config.pbtxt `parameters` that carry the contract."""
        return {**self.preprocess.to_parameters(), "contract_version": self.version}


ENCODED_INPUT_DATATYPE = "TYPE_STRING"


def string_parameters(config: dict) -> dict[str, str]:
    """A config's `parameters` as name → string value."""
    return {key: value.get("string_value", "") for key, value in config.get("parameters", {}).items()}


@dataclass(frozen=True)
class EncodedContract:
    """What a caller needs to know about an encoded model (the server decodes and preprocesses the
    files it is sent), read from its config once. `preprocess` is None: nothing is done here."""

    name: str
    input_name: str
    output_name: str
    num_classes: int
    max_batch_size: int
    pixel_model: str
    preprocess: None = None

    @classmethod
    def from_config(cls, config: dict) -> EncodedContract:
        name = config.get("name", "")
        inputs, outputs = config.get("input", []), config.get("output", [])
        parameters = string_parameters(config)
        if (len(inputs) != 1 or len(outputs) != 1 or inputs[0].get("data_type") != ENCODED_INPUT_DATATYPE
                or [int(d) for d in inputs[0].get("dims", [])] != [1] or outputs[0].get("data_type") != OUTPUT_DATATYPE
                or not parameters.get("pixel_model")):
            raise ContractError(f"model {name!r}: not an encoded model (one {ENCODED_INPUT_DATATYPE} [1] input, one "
                                f"{OUTPUT_DATATYPE} output, parameters.pixel_model)")
        return cls(name=name, input_name=inputs[0]["name"], output_name=outputs[0]["name"],
                   num_classes=int(outputs[0]["dims"][-1]), max_batch_size=max(1, int(config.get("max_batch_size", 0))),
                   pixel_model=parameters["pixel_model"])


def contract_for(config: dict) -> ModelContract | EncodedContract:
    """The contract of a pixel model, or of an encoded one: an encoded model's config is recognised by
    its file input; anything else must follow the pixel contract (whose errors name the field)."""
    inputs = config.get("input", [])
    if len(inputs) == 1 and inputs[0].get("data_type") == ENCODED_INPUT_DATATYPE:
        return EncodedContract.from_config(config)
    return ModelContract.from_config(config)
