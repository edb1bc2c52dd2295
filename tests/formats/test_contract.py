"""The serving contract: what export writes is what the client reads back, and a config that breaks
it is refused with the field named."""

import copy

import pytest
from google.protobuf import json_format

from histoserve.export.publish import BatchingConfig, build_config
from histoserve.formats.contract import ContractError, ModelContract
from histoserve.formats.preprocessing import PreprocessSpec
from histoserve.formats.repository_layout import contract_of


def exported(spec=PreprocessSpec(256, 224, "bicubic"), classes=8, max_batch_size=32):
    return build_config("breakhis", classes, spec, BatchingConfig(max_batch_size=max_batch_size))


def test_what_export_writes_reads_back_as_the_same_contract():
    contract = contract_of(exported())
    assert contract == ModelContract("breakhis", "image", "probabilities", 8, 32, PreprocessSpec(256, 224, "bicubic"), "1")
    assert contract.parameters() == {"resize_size": "256", "crop_size": "224", "interpolation": "bicubic",
                                     "color_mode": "RGB", "contract_version": "1"}


def as_json(config):
    return json_format.MessageToDict(config, preserving_proto_field_name=True)


def two_outputs(c):
    c["output"].append(copy.deepcopy(c["output"][0]) | {"name": "logits"})


def fp16_output(c):
    c["output"][0]["data_type"] = "TYPE_FP16"


def float_input(c):
    c["input"][0]["data_type"] = "TYPE_FP32"


def dims_not_the_crop(c):
    c["input"][0]["dims"] = ["3", "256", "256"]


def no_geometry(c):
    del c["parameters"]["crop_size"]


def next_contract_version(c):  # a model exported by a later release, read by this client
    c["parameters"]["contract_version"] = {"string_value": "2"}


def no_contract_version(c):
    del c["parameters"]["contract_version"]


@pytest.mark.parametrize("breakage, field", [
    (two_outputs, "exactly one input and one output"), (fp16_output, "output.data_type TYPE_FP16"),
    (float_input, "input.data_type TYPE_FP32"), (dims_not_the_crop, "input.dims [3, 256, 256]"),
    (no_geometry, "parameters: model config parameters lack ['crop_size']"),
    (next_contract_version, "parameters.contract_version is '2'; this client speaks contract version '1'"),
    (no_contract_version, "parameters.contract_version is None"),
], ids=lambda v: getattr(v, "__name__", ""))
def test_a_config_that_breaks_the_contract_is_refused_naming_the_field(breakage, field):
    config = as_json(exported())
    ModelContract.from_config(config)
    breakage(config)
    with pytest.raises(ContractError, match="breakhis") as raised:
        ModelContract.from_config(config)
    assert field in str(raised.value)
