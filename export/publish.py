"""Writing the Triton model repository (its layout: formats/repository_layout.py) with Triton's own
protobuf types: the production config, its CPU variant, and each new version.

A new version is assembled in a hidden, non-numeric folder (Triton ignores those) and renamed into
place, so a polling Triton never loads half a model.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from histoserve.formats.contract import CONTRACT_VERSION, INPUT_NAME, LABELS_FILE, OUTPUT_NAME, ContractError, ModelContract
from histoserve.formats.preprocessing import PreprocessSpec
from histoserve.formats.repository_layout import (
    MODEL_FILE,
    NAME_PATTERN,
    RepositoryError,
    config_to_text,
    contract_of,
    is_model_name,
    read_config,
    versions,
    write_text_if_changed,
)
from histoserve.formats.signing import sign_version
from histoserve.formats.version import (
    IDENTITY_FILE,
    VERSION_CONFIG,
    VERSION_CPU_CONFIG,
    VERSION_LABELS,
    identity_json,
    sha256_of,
    version_folder,
    write_checksums,
)


@dataclass(frozen=True)
class BatchingConfig:
    """The production (GPU) instance and batcher settings."""

    max_batch_size: int = 16
    max_queue_delay_us: int = 500
    instance_count: int = 1
    preferred_batch_sizes: tuple[int, ...] = ()


@dataclass(frozen=True)
class CpuTuning:
    """What configs/cpu.pbtxt runs with, in the onnxruntime backend's own terms (its model config
    `parameters` intra_op_thread_count / inter_op_thread_count, the instance count and the batcher).
    `python -m histoserve.serve` applies the same values to its local ONNX Runtime sessions. The defaults are
    what `benchmarks/serving.py --sweep` measured best on a 2-vCPU node (docs/figures.md, "Serving speed").
    Set intra_op_threads to the pod's CPU limit: ONNX Runtime's default (0) is the node's core count,
    which oversubscribes a pod that may use a few of them."""

    instance_count: int = 1
    intra_op_threads: int = 2
    inter_op_threads: int = 1
    max_queue_delay_us: int = 0
    preferred_batch_sizes: tuple[int, ...] = ()


@dataclass(frozen=True)
class TensorRTConfig:
    """ONNX Runtime's TensorRT execution provider, as Triton's onnxruntime backend configures it
    (`optimization { execution_accelerators { gpu_execution_accelerator { name: "tensorrt" ... } } }`).
    The optimisation profile spans batch 1 to max_batch_size, so one engine serves every batch; the
    engine cache keeps the build (minutes for ResNet50) out of the next start on the same node, and
    the config's warmup builds it before the model reports ready."""

    precision: str = "FP16"  # FP32 | FP16 | INT8 (INT8 for the QDQ model: TensorRT reads its scales)
    workspace_bytes: int = 1 << 30
    cache_path: str = "/tmp/tensorrt-engines"

    def parameters(self, spec: PreprocessSpec, max_batch_size: int) -> dict[str, str]:
        if self.precision not in ("FP32", "FP16", "INT8"):
            raise RepositoryError(f"TensorRT precision {self.precision!r} is not FP32, FP16 or INT8")
        shape = f"3x{spec.crop_size}x{spec.crop_size}"
        return {
            "precision_mode": self.precision,
            "max_workspace_size_bytes": str(self.workspace_bytes),
            "trt_engine_cache_enable": "1",
            "trt_engine_cache_path": self.cache_path,
            "trt_timing_cache_enable": "1",
            "trt_timing_cache_path": self.cache_path,
            "trt_profile_min_shapes": f"{INPUT_NAME}:1x{shape}",
            "trt_profile_opt_shapes": f"{INPUT_NAME}:{max_batch_size}x{shape}",
            "trt_profile_max_shapes": f"{INPUT_NAME}:{max_batch_size}x{shape}",
        }


# Triton's request-latency histogram (nv_inference_first_response_histogram_ms, exported with
# `--metrics-config=histogram_latencies=true` by Triton 26.01 and newer for every model): Triton's
# default buckets (100, 500, 2000, 5000 ms) cannot tell a 7 ms p99 from a 90 ms one. These resolve
# what the alerts and the canary analysis compare: a few ms for a GPU model, the 500 ms SLO
# threshold exactly (a bucket bound, so "requests under 500 ms" is a bucket, not an interpolation),
# and seconds for a sick pod. Triton truncates each observation to whole ms.
LATENCY_HISTOGRAM_FAMILY = "nv_inference_first_response_histogram_ms"
LATENCY_BUCKETS_MS = (1, 2, 5, 10, 20, 35, 50, 75, 100, 150, 200, 250, 300, 400, 500, 750, 1000, 2500, 5000, 10000)


def latency_histogram(buckets_ms: tuple[float, ...] = LATENCY_BUCKETS_MS) -> mc.ModelMetrics:
    """config.pbtxt `model_metrics` giving the latency histogram these buckets (Triton 24.11+ reads
    the field; 2.51, the local server, does not: serve/cpu_repository.py leaves it out)."""
    if not buckets_ms or list(buckets_ms) != sorted(set(buckets_ms)) or buckets_ms[0] <= 0:
        raise RepositoryError(f"latency buckets {list(buckets_ms)} must be positive and increasing")
    control = mc.ModelMetrics.MetricControl(
        metric_identifier=mc.ModelMetrics.MetricControl.MetricIdentifier(family=LATENCY_HISTOGRAM_FAMILY),
        histogram_options=mc.ModelMetrics.MetricControl.HistogramOptions(buckets=list(buckets_ms)))
    return mc.ModelMetrics(metric_control=[control])


def build_config(
    name: str, num_classes: int, spec: PreprocessSpec, batching: BatchingConfig = BatchingConfig(),
    loaded_versions: int = 2, precision: str = "fp32", tensorrt: TensorRTConfig | None = None,
) -> mc.ModelConfig:
    """The production config: ONNX Runtime on GPU with dynamic batching and the serving contract.

    `precision` is recorded as a parameter (the contract does not change with it); `tensorrt` adds
    TensorRT as the GPU execution accelerator.

    `loaded_versions` newest versions stay loaded (Triton's version_policy latest N). With 2, the
    previous version keeps serving while a new one loads and after it takes over, so no request
    lands on a version being unloaded (with 1, a few requests during each rollout fail with
    "version n is not at ready state", measured with tests/serve/test_rollout.py's setup), and
    deleting the newest version folder rolls back to a version that is already warm. The cost is
    the memory of one more model.
    """
    if loaded_versions < 1:
        raise RepositoryError("loaded_versions must be at least 1")
    if not is_model_name(name):
        raise RepositoryError(f"model name {name!r} must match {NAME_PATTERN.pattern}")
    if batching.max_batch_size < 1:
        raise RepositoryError("max_batch_size must be at least 1 (the batch axis is dynamic)")
    dims = [3, spec.crop_size, spec.crop_size]
    config = mc.ModelConfig(
        name=name,
        backend="onnxruntime",
        max_batch_size=batching.max_batch_size,
        input=[mc.ModelInput(name=INPUT_NAME, data_type=mc.TYPE_UINT8, format=mc.ModelInput.FORMAT_NCHW, dims=dims)],
        output=[mc.ModelOutput(name=OUTPUT_NAME, data_type=mc.TYPE_FP32, dims=[num_classes], label_filename=LABELS_FILE)],
        instance_group=[mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.KIND_GPU, count=batching.instance_count)],
        dynamic_batching=mc.ModelDynamicBatching(
            max_queue_delay_microseconds=batching.max_queue_delay_us,
            preferred_batch_size=_preferred_sizes(batching.preferred_batch_sizes, batching.max_batch_size),
        ),
        version_policy=mc.ModelVersionPolicy(latest=mc.ModelVersionPolicy.Latest(num_versions=loaded_versions)),
    )
    sizes = sorted({1, batching.max_batch_size})
    for batch_size in sizes:  # warm up before readiness, so the first real request is not the slow one
        config.model_warmup.append(
            mc.ModelWarmup(
                name=f"zeros_batch_{batch_size}",
                batch_size=batch_size,
                inputs={INPUT_NAME: mc.ModelWarmup.Input(data_type=mc.TYPE_UINT8, dims=dims, zero_data=True)},
            )
        )
    contract = ModelContract(name, INPUT_NAME, OUTPUT_NAME, num_classes, batching.max_batch_size, spec, CONTRACT_VERSION)
    for key, value in contract.parameters().items():
        config.parameters[key].string_value = value
    config.parameters["precision"].string_value = precision
    config.model_metrics.CopyFrom(latency_histogram())
    if tensorrt is not None:
        config.optimization.execution_accelerators.gpu_execution_accelerator.append(
            mc.ModelOptimizationPolicy.ExecutionAccelerators.Accelerator(
                name="tensorrt", parameters=tensorrt.parameters(spec, batching.max_batch_size)
            )
        )
    check_contract(config)
    return config


def _preferred_sizes(sizes: tuple[int, ...], max_batch_size: int) -> list[int]:
    if any(size < 1 or size > max_batch_size for size in sizes):
        raise RepositoryError(f"preferred batch sizes {list(sizes)} must lie within 1..max_batch_size {max_batch_size}")
    return sorted(set(sizes))


def check_contract(config: mc.ModelConfig) -> None:
    try:
        contract_of(config)
    except ContractError as error:
        raise RepositoryError(f"the config export would write breaks the serving contract: {error}") from error


def cpu_variant(config: mc.ModelConfig, tuning: CpuTuning = CpuTuning()) -> mc.ModelConfig:
    """The same model on CPU nodes: Triton picks it with `--model-config-name=cpu` (k8s cpu overlay).
    GPU accelerators are dropped; threads, instances and the batcher come from `tuning`."""
    variant = mc.ModelConfig()
    variant.CopyFrom(config)
    del variant.instance_group[:]
    variant.instance_group.append(mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.KIND_CPU, count=tuning.instance_count))
    variant.optimization.execution_accelerators.ClearField("gpu_execution_accelerator")
    if not variant.optimization.execution_accelerators.ListFields():
        variant.optimization.ClearField("execution_accelerators")
    if not variant.optimization.ListFields():
        variant.ClearField("optimization")
    variant.dynamic_batching.max_queue_delay_microseconds = tuning.max_queue_delay_us
    variant.dynamic_batching.preferred_batch_size[:] = _preferred_sizes(tuning.preferred_batch_sizes, variant.max_batch_size)
    variant.parameters["intra_op_thread_count"].string_value = str(tuning.intra_op_threads)
    variant.parameters["inter_op_thread_count"].string_value = str(tuning.inter_op_threads)
    variant.parameters["execution_mode"].string_value = "0"  # sequential: a ResNet has no branches to run in parallel
    return variant


def publish(
    repository: Path, config: mc.ModelConfig, labels: list[str], onnx_file: Path, version: int | None = None,
    cpu_tuning: CpuTuning = CpuTuning(), version_files: dict[str, Callable[[int], str | bytes]] | None = None,
    describe: Callable[[int, dict[str, str]], dict[str, str]] | None = None, signing_key: Path | None = None,
) -> Path:
    """Write config.pbtxt, labels.txt and the version folder; returns the version folder.

    The version folder is self-contained (formats/version.py): model.onnx, the config, its CPU
    variant and the labels as published with it, the `version_files` {name: render(version) → text
    or bytes} (drift baseline, golden answers), the files `describe(version, {file: sha256})` renders
    about them (provenance, model card), SHA256SUMS over all of them and, with `signing_key`, the
    signature over everything (formats/signing.py). It is assembled in
    a hidden folder and appears by one rename: complete or absent. The model-level config.pbtxt,
    configs/cpu.pbtxt and labels.txt are what a Triton in poll mode reads over the whole store; a pod
    that serves one version builds its own from that version's copies (python -m histoserve.serve stage).

    A model that already exists keeps its contract: a new version with other labels, input
    geometry or preprocessing is refused instead of silently breaking the versions being served.
    """
    version = check_publishable(repository, config, labels, version, cpu_tuning)  # again: the repository may have moved on
    model_dir = Path(repository) / config.name
    model_dir.mkdir(parents=True, exist_ok=True)
    labels_text = "".join(f"{label}\n" for label in labels)
    config_text, cpu_text = config_to_text(config), config_to_text(cpu_variant(config, cpu_tuning))

    write_text_if_changed(model_dir / LABELS_FILE, labels_text)
    write_text_if_changed(model_dir / "config.pbtxt", config_text)
    (model_dir / "configs").mkdir(exist_ok=True)
    write_text_if_changed(model_dir / "configs" / "cpu.pbtxt", cpu_text)
    snapshots = {VERSION_CONFIG: config_text, VERSION_CPU_CONFIG: cpu_text, VERSION_LABELS: labels_text}
    return publish_version_folder(model_dir, version, {MODEL_FILE: Path(onnx_file), **snapshots,
                                                       **{n: render(version) for n, render in (version_files or {}).items()}},
                                  describe=(lambda digests: describe(version, digests)) if describe else None, signing_key=signing_key)


def publish_version_folder(model_dir: Path, version: int, files: dict[str, str | bytes | Path],
                           describe: Callable[[dict[str, str]], dict[str, str]] | None = None,
                           signing_key: Path | None = None) -> Path:
    """`model_dir/<version>/` holding `files` (name → text, bytes, or a file to copy), what
    `describe({name: sha256 of those})` adds, SHA256SUMS over them and, with `signing_key`, model.sig
    over all; read-only, assembled in a hidden folder (Triton ignores those) and renamed into place:
    complete or absent."""
    target = version_folder(Path(model_dir).parent, Path(model_dir).name, version)
    staging = Path(tempfile.mkdtemp(dir=model_dir, prefix=f".staging-{version}-"))
    files = {**files, IDENTITY_FILE: identity_json(Path(model_dir).name, version)}
    try:
        for name, content in files.items():
            if isinstance(content, Path):
                shutil.copyfile(content, staging / name)
            elif isinstance(content, bytes):
                (staging / name).write_bytes(content)
            else:
                (staging / name).write_text(content)
        if describe:
            for name, content in describe({name: sha256_of(staging / name) for name in files}).items():
                (staging / name).write_text(content)
        write_checksums(staging)
        if signing_key:
            sign_version(staging, signing_key)
        for path in staging.iterdir():
            os.chmod(path, 0o444)  # a version is immutable: its files are read-only from the start
        os.chmod(staging, 0o755)
        os.rename(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def check_publishable(repository: Path, config: mc.ModelConfig, labels: list[str], version: int | None = None,
                      cpu_tuning: CpuTuning = CpuTuning()) -> int:
    """What `publish` would refuse, checked before any work: the version number (returned, the next
    free one by default) must be new, a model already there must keep its contract, the CPU variant
    must build, and the repository must be writable. Raises RepositoryError naming the problem."""
    if not is_model_name(config.name):
        raise RepositoryError(f"model name {config.name!r} must match {NAME_PATTERN.pattern}")
    cpu_variant(config, cpu_tuning)
    repository = Path(repository)
    existing = next((p for p in (repository / config.name, repository, *repository.parents) if p.exists()), None)
    if existing is not None and not (existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)):
        raise RepositoryError(f"cannot write the model repository {repository}: {existing} is not a writable folder")
    model_dir = repository / config.name
    if (model_dir / "config.pbtxt").exists():
        _check_same_contract(model_dir, read_config(model_dir / "config.pbtxt"), config, labels)
    version = version or (max(versions(model_dir), default=0) + 1)
    if (folder := version_folder(repository, config.name, version)).exists():
        raise RepositoryError(f"{folder} already exists: versions are immutable, pick another --version")
    return version


def _check_same_contract(model_dir: Path, old: mc.ModelConfig, new: mc.ModelConfig, labels: list[str]) -> None:
    old_labels = (model_dir / LABELS_FILE).read_text().splitlines() if (model_dir / LABELS_FILE).exists() else []
    differences = []
    if old_labels != labels:
        differences.append(f"labels {old_labels} → {labels}")
    old_contract, new_contract = contract_of(old), contract_of(new)
    for field in ("input_name", "output_name", "num_classes", "preprocess", "version"):
        if getattr(old_contract, field) != getattr(new_contract, field):
            differences.append(f"{field} {getattr(old_contract, field)} → {getattr(new_contract, field)}")
    if differences:
        raise RepositoryError(
            f"{model_dir} already serves another contract ({'; '.join(differences)}). "
            f"Export under a new --name, or move the old model folder away yourself."
        )
