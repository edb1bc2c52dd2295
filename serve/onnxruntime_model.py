"""Triton python-backend model that runs the exported model.onnx with ONNX Runtime on the CPU.

`python -m serve` copies this file as `<model>/<version>/model.py` beside a link to the very
model.onnx that export published, because the pip-installable Triton has no onnxruntime backend.
Triton's dynamic batcher hands `execute` several requests at once: they run as one ORT batch.
"""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])

    def execute(self, requests):
        batches = [pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy() for r in requests]
        outputs = self.session.run([self.output_name], {self.input_name: np.concatenate(batches)})[0]
        responses, start = [], 0
        for batch in batches:
            result = outputs[start : start + len(batch)]
            start += len(batch)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(self.output_name, result)]))
        return responses
