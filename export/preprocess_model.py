"""The encoded model's first step: a Triton python-backend model that turns image files into the pixel
model's input with the package's one preprocessing (histoserve.formats.preprocessing, imported, not
copied): what the Python client does before it calls the pixel model, done in the server.

`python -m histoserve.export --encoded` copies this file into `<name>-preprocess/<version>/model.py`; the Triton
that serves it needs the histoserve package (its thin install: numpy, Pillow, pyspng, simplejpeg) in
the python backend's interpreter (docs/kubernetes/security.md, "The production image").

Input `image_file`: TYPE_STRING [1], one file's bytes per batch element. Output `image`: UINT8
[3, crop, crop]. A file that cannot be used (corrupt, truncated, not an image, over the size or pixel
limit of the config's `max_file_bytes` / `max_image_pixels`) fails its own request with
INVALID_ARGUMENT naming the batch element and the reason; the other requests of the batch are answered.
"""

from __future__ import annotations

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from histoserve.formats.preprocessing import ImageLoadError, PreprocessSpec, preprocess_bytes


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        self.spec = PreprocessSpec.from_parameters(parameters)
        self.max_file_bytes = int(parameters["max_file_bytes"])
        self.max_image_pixels = int(parameters["max_image_pixels"])
        self.input_name, self.output_name = config["input"][0]["name"], config["output"][0]["name"]

    def pixels(self, data: bytes, index: int) -> np.ndarray:
        name = f"{self.input_name}[{index}]"
        if len(data) > self.max_file_bytes:
            raise ImageLoadError(name, f"{len(data)} bytes, over the limit of {self.max_file_bytes}")
        return preprocess_bytes(data, self.spec, name, max_pixels=self.max_image_pixels)

    def execute(self, requests):
        responses = []
        for request in requests:
            files = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy().reshape(-1)
            try:
                batch = np.stack([self.pixels(bytes(data), index) for index, data in enumerate(files)])
            except ImageLoadError as error:
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(str(error), pb_utils.TritonError.INVALID_ARG)))
                continue
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(self.output_name, batch)]))
        return responses
