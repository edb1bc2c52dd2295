"""Triton python-backend model that runs the exported model.onnx with ONNX Runtime on the CPU.

`python -m histoserve.serve` copies this file as `<model>/<version>/model.py` beside a link to the very
model.onnx that export published, because the pip-installable Triton has no onnxruntime backend.
The session is set up from the same config `parameters` the onnxruntime backend reads
(intra_op_thread_count, inter_op_thread_count, execution_mode), so the CPU config that a CPU node
runs is the one measured here. Triton's dynamic batcher hands `execute` several requests at once:
they run as one ORT batch.
"""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


def session_options(parameters: dict) -> ort.SessionOptions:
    def value(key: str, default: int) -> int:
        return int(parameters.get(key, {}).get("string_value", default) or default)

    options = ort.SessionOptions()
    options.intra_op_num_threads = value("intra_op_thread_count", 0)
    options.inter_op_num_threads = value("inter_op_thread_count", 0)
    parallel = value("execution_mode", 0) == 1
    options.execution_mode = ort.ExecutionMode.ORT_PARALLEL if parallel else ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        options = session_options(config.get("parameters", {}))
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def execute(self, requests):
        batches = [pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy() for r in requests]
        images = batches[0] if len(batches) == 1 else np.concatenate(batches)  # one request: no copy
        outputs = self.session.run([self.output_name], {self.input_name: images})[0]
        responses, start = [], 0
        for batch in batches:
            result = outputs[start : start + len(batch)]
            start += len(batch)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(self.output_name, result)]))
        return responses
