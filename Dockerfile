# The project's images. Triton itself runs from NVIDIA's image, not these. After pushing one, pin its
# digest in k8s/components/images, sign it and attach its SBOM (make sbom writes sbom/<target>.cdx.json
# for each target below): the cluster's admission policy admits it only then (docs/kubernetes/security.md, "Images").
#
#   docker build --target serve-tools -t registry.example.com/histoserve-serve:0.1.0 .
#     thin: numpy, Pillow, tritonclient, model-signing and this repository, no torch. Every Triton pod's
#     model-stage init container (verifies the version's signature) and golden-gate container
#     (python -m histoserve.serve stage / golden-gate).
#   docker build --build-arg SOURCE_COMMIT=$(git rev-parse HEAD) -t registry.example.com/histoserve:0.1.0 .
#     full: the jobs (k8s/jobs/publish, loadtest, training, slides) and the drift monitor.
#   docker build --target triton -t registry.example.com/histoserve/tritonserver:26.10-histoserve .
#     NVIDIA's Triton with the thin package in the python backend's interpreter: needed to serve an
#     encoded model (`python -m histoserve.export --encoded`: its preprocessing step imports histoserve). Set it
#     in k8s/base/kustomization.yaml (images: tritonserver) when you publish encoded twins.
FROM python:3.11.7-slim-bookworm AS wheel
ENV PIP_NO_CACHE_DIR=1
WORKDIR /src
# The build context (less .dockerignore) goes into this stage only: what reaches an image is the wheel
# built from it, which holds exactly the packages pyproject.toml lists (its list is the only one), so
# nothing else of a checkout (a signing key, trusted keys, runs) can be shipped by mistake.
COPY . .
RUN pip wheel --no-deps --quiet -w /wheels . && cp constraints.txt /wheels/

FROM python:3.11.7-slim-bookworm AS base
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN useradd --uid 1000 --create-home histoserve
WORKDIR /app
COPY --from=wheel /wheels /wheels

FROM base AS serve-tools
RUN pip install -c /wheels/constraints.txt "$(ls /wheels/histoserve-*.whl)[signing]"
USER 1000

FROM nvcr.io/nvidia/tritonserver:26.10-py3 AS triton
# The image's own python3 runs the python backend's stub; Ubuntu marks its site-packages as
# system-managed, hence --break-system-packages (this image has no other Python users).
COPY --from=wheel /wheels /opt/histoserve
RUN python3 -m pip install --no-cache-dir --break-system-packages -c /opt/histoserve/constraints.txt "$(ls /opt/histoserve/histoserve-*.whl)" \
    && rm -rf /opt/histoserve

# The default target (last): the full image.
FROM base AS full
RUN pip install -c /wheels/constraints.txt "$(ls /wheels/histoserve-*.whl)[train,export,loadtest,monitor,slide]"
# The commit every version's provenance names (export/provenance.py); without it the publish Job's
# export refuses to publish: build with --build-arg SOURCE_COMMIT=$(git rev-parse HEAD).
ARG SOURCE_COMMIT=""
ENV HISTOSERVE_SOURCE_COMMIT=${SOURCE_COMMIT}
USER 1000
