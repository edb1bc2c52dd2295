# The project image for the in-cluster jobs (k8s/jobs/loadtest, k8s/jobs/training) and the drift
# monitor (k8s/components/drift-monitor): the pinned Python environment and this repository.
# Triton itself runs from NVIDIA's image, not this one.
#   docker build -t registry.example.com/histoserve:0.1.0 .
FROM python:3.11.7-slim-bookworm
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN useradd --uid 1000 --create-home histoserve
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY client client
COPY train train
COPY export export
COPY serve serve
COPY loadtest loadtest
COPY monitor monitor
RUN pip install -c constraints.txt '.[train,export,loadtest,monitor]'
USER 1000
