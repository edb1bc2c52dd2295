"""Serving speed at the real size: ResNet50, 224², FP32 and INT8, in process and through real Triton.

    .venv/bin/python benchmarks/serving.py [--seconds 4] [--out reports/serving]
    .venv/bin/python benchmarks/serving.py --sweep      # the CPU config sweep (threads, instances, batcher)
    .venv/bin/python benchmarks/serving.py --provider tensorrt   # on a GPU machine, with onnxruntime-gpu
    .venv/bin/python benchmarks/serving.py --metrics-cost   # only step 7: what Triton's latency summaries cost
    .venv/bin/python benchmarks/serving.py --tracing-cost   # only step 8: what OpenTelemetry tracing costs

One run, one machine, so the ratios mean something (these machines are noisy):
1. builds the model it measures through the project's own code: a randomly initialised ResNet50
   checkpoint (speed does not depend on the weights) over synthetic 700×460 H&E-coloured PNGs, then
   `python -m histoserve.export` at fp32 and `--precision int8` (the accuracy gate is opened wide: random
   weights have no accuracy to keep; the gate is tested on a trained model in tests/export);
2. in-process ONNX Runtime, CPU provider, intra-op threads = the machine's cores, batch 1/4/8/16;
   OpenVINO on the same ONNX files when it is installed (`pip install -e '.[openvino]'`), at FP32 and
   at its default precision (bfloat16 on CPUs that have it);
3. the local real Triton (`python -m histoserve.serve`'s TritonServer, the configs/cpu.pbtxt that export wrote),
   batch-1 gRPC requests at concurrency 1/2/4/8/16: throughput, p50/p95/p99, and from Triton's
   statistics extension the queue and compute time per request and the average batch size;
4. `python -m histoserve.client classify --concurrency 4` on 256 PNGs (the test PNGs hard-linked): files/s over
   the whole command (process start included) and in its steady state, the client's CPU ms per file,
   and files/s ÷ the served capacity (best concurrency) of the same run;
5. the same, served rows and client, with Triton pinned to most cores and the client (or the load
   generator) to the rest (1 of 2 here), as when the client runs in another pod: does it keep the
   server busy? On shared cores the client's decoding takes CPU from the server, so that ratio is
   bounded by the client's CPU per file against the server's;
6. the encoded models (`export --encoded`): one PNG per request to `<name>-encoded` at concurrency
   1/2/4/8/16 on the same cores, and the client command's requests (4 in flight, 16 files each), with
   the queue and compute time of each step from Triton's statistics (the preprocessing model, the
   pixel model) and the ensemble's own share of the latency; the client's decode-and-resize time per
   file with the faster decoders and with Pillow alone;
7. what Triton's latency metrics cost: fp32 served at concurrency 4 and 8 by a server started with the
   production Deployment's `--metrics-config=histogram_latencies=true` and by one with
   `summary_latencies=true` (what every overlay ran before), alternating A B A B so that the machine's
   drift falls on both (2.51 exports no histogram for these models, so "histogram" here measures the
   counters alone; NVIDIA's server#8561 reports summaries costing a third of throughput on a GPU);
8. what tracing costs: fp32 served at concurrency 4 and 8 by a server without tracing, by one with the
   production flags (k8s/components/tracing: OpenTelemetry mode, 1 in 1000 requests without a trace
   context, the batch span processor's settings; spans posted to a local OTLP sink that discards them)
   whose callers send no context, and by the same server with a `traceparent` on every request (what
   every request through the gateway carries, sampled or not: Triton traces them all), alternating
   the three settings twice; and the same on a model that computes nothing (`tiny`: an ONNX Identity
   of 16 floats, written here), one caller, where Triton's own per-request work is all there is and a
   per-request cost of tracing shows, rather than vanishing beside ResNet50's 100 ms. One caller
   because the local 2.51 crashes within seconds when two or more callers send traced requests at
   that rate (a use-after-free in its trace release, server PR #8144, fixed in 25.04; the pinned
   release has the fix).

Prints a table and the ratios (served at its best concurrency ≥ 4 ÷ in process at its best batch,
measured before and after the served rows and averaged, since these machines drift; INT8 ÷ FP32), writes
serving.json and serving.png (throughput vs p99 per variant) under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import onnxruntime as ort  # noqa: E402
import tritonclient.grpc as grpcclient  # noqa: E402

from histoserve.export.publish import CpuTuning, cpu_variant  # noqa: E402
from histoserve.formats.contract import INPUT_NAME  # noqa: E402
from histoserve.formats.preprocessing import PreprocessSpec, find_images, preprocess_file  # noqa: E402
from histoserve.formats.repository_layout import config_to_text, read_config, write_text_if_changed  # noqa: E402
from histoserve.loadtest.triton_stats import STAGES, snapshot  # noqa: E402
from histoserve.serve.server import TritonServer  # noqa: E402
from histoserve.serve.triton_flags import free_ports  # noqa: E402

MODEL = "resnet50"
VARIANTS = {"fp32": MODEL, "int8": f"{MODEL}-int8"}
CONCURRENCY = (1, 2, 4, 8, 16)
CLIENT_CONCURRENCY, CLIENT_BATCH = 4, 16  # python -m histoserve.client classify's requests in flight and files per request here
BATCHES = (1, 4, 8, 16)
SWEEP = [  # (instances, intra-op threads per instance, max_queue_delay_us, preferred batch sizes), for 2 cores
    CpuTuning(instance_count=i, intra_op_threads=t, max_queue_delay_us=d, preferred_batch_sizes=p)
    for i, t, d, p in [(1, 2, 0, ()), (1, 2, 1000, ()), (1, 2, 2000, (4, 8)), (2, 1, 0, ()), (2, 1, 1000, ()), (1, 1, 0, ())]
]
SWEEP_CONCURRENCY = (4, 16)


@dataclass
class Row:
    variant: str
    path: str
    setting: str
    images_per_s: float
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    triton: dict = field(default_factory=dict)
    # what `setting` says, as fields: the rows are read by these, never by parsing the label
    batch: int | None = None
    concurrency: int | None = None
    precision: str | None = None   # OpenVINO's inference precision, "forced f32" or "default bf16"
    kind: str | None = None        # the client command: "whole command" or "steady"


def run(command: list, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in command], cwd=ROOT, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        sys.exit(f"{' '.join(str(c) for c in command)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return result


def build_model(work: Path, images: int, classes: int = 4) -> Path:
    """Synthetic 700×460 PNGs in train/val/test folders and a random ResNet50 checkpoint over them."""
    import torch

    from histoserve.train.checkpoint import CheckpointMeta, save_checkpoint
    from histoserve.train.model import IMAGENET_MEAN, IMAGENET_STD, build_classifier
    from histoserve.train.synthetic import tissue

    data = work / "data"
    for i in range(images):
        split = ("test", "val", "train", "train")[(i // classes) % 4]
        path = data / split / f"class_{i % classes}" / f"tile_{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        tissue(i, 700).crop((0, 120, 700, 580)).save(path)
    torch.manual_seed(0)
    model = build_classifier("resnet50", classes)
    meta = CheckpointMeta("resnet50", [f"class_{c}" for c in range(classes)], PreprocessSpec(256, 224), IMAGENET_MEAN,
                          IMAGENET_STD, 0.2, str(data), 0)
    save_checkpoint(work / "checkpoint.pt", model, meta)
    return work / "checkpoint.pt"


def export(checkpoint: Path, repository: Path, precisions: list[str]) -> None:
    common = ["-m", "histoserve.export", checkpoint, "--repository", repository, "--name", MODEL, "--parity-count", 8, "--encoded"]
    run([sys.executable, *common])
    wide_open = ["--calibration-count", 32, "--min-agreement", 0, "--max-accuracy-drop", 1]
    for precision in precisions:
        run([sys.executable, *common, "--precision", precision, *wide_open])


def gpu_rows(variant: str, onnx_file: Path, images: np.ndarray, seconds: float, provider: str, cache: Path) -> list[Row]:
    """In process on the GPU: CUDA, or TensorRT at the variant's precision (engine cached in `cache`)."""
    if provider == "cuda":
        providers = ["CUDAExecutionProvider"]
    else:
        options = {"trt_fp16_enable": variant == "fp16", "trt_int8_enable": variant == "int8",
                   "trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache)}
        providers = [("TensorrtExecutionProvider", options), "CUDAExecutionProvider"]
    session = ort.InferenceSession(str(onnx_file), providers=providers)
    rows = []
    for batch in BATCHES:
        feed = {INPUT_NAME: images[:batch]}
        session.run(None, feed)  # TensorRT builds an engine per new shape: not timed
        rate = timed(lambda feed=feed: session.run(None, feed), batch, seconds)
        rows.append(Row(variant, f"onnxruntime {provider}", f"batch {batch}", rate, batch=batch))
    return rows


def in_process(variant: str, onnx_file: Path, images: np.ndarray, seconds: float, threads: int,
               batches: tuple[int, ...] = BATCHES) -> list[Row]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
    rows = []
    for batch in batches:
        feed = {INPUT_NAME: images[:batch]}
        rate = timed(lambda feed=feed: session.run(None, feed), batch, seconds)
        rows.append(Row(variant, "onnxruntime in process", f"batch {batch}, {threads} threads", rate, batch=batch))
    return rows


def openvino_rows(variant: str, onnx_file: Path, images: np.ndarray, seconds: float, threads: int) -> list[Row]:
    """OpenVINO on the same ONNX, at FP32 and at its own default, which on CPUs with AVX512_BF16 (AMD
    Zen 4, Intel Sapphire Rapids) is bfloat16: a precision change it makes without asking."""
    try:
        import openvino
    except ImportError:
        return []
    core, rows = openvino.Core(), []
    for hint in ("f32", None):
        settings = {"INFERENCE_NUM_THREADS": threads, **({"INFERENCE_PRECISION_HINT": hint} if hint else {})}
        compiled = core.compile_model(str(onnx_file), "CPU", settings)
        precision = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        for batch in (1, 8):
            batch_images = images[:batch]
            rate = timed(lambda batch_images=batch_images, compiled=compiled: compiled(batch_images), batch, seconds)
            chosen = f"{'forced' if hint else 'default'} {precision}"
            rows.append(Row(variant, "openvino in process", f"batch {batch}, {threads} threads, {chosen}", rate, batch=batch,
                            precision=chosen))
    return rows


def timed(call, batch: int, seconds: float) -> float:
    call()  # warm-up
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        call()
        done += batch
    return done / (time.perf_counter() - started)


def closed_loop(server: TritonServer, model: str, request_of, concurrency: int, seconds: float,
                statistics_of: tuple[str, ...], headers_of=None) -> tuple[list[float], float, dict]:
    """`concurrency` callers, each its own gRPC channel, sending `request_of(caller index)` to `model`
    back to back (with the gRPC metadata `headers_of()`, when given, on each). Returns the latencies
    measured, the seconds measured and, for each model of `statistics_of`, what Triton's statistics
    gained over those seconds."""
    url = server.grpc_url
    latencies: list[float] = []
    lock, stop, measuring = threading.Lock(), threading.Event(), threading.Event()

    def caller(index: int) -> None:
        client = grpcclient.InferenceServerClient(url)
        mine = []
        request = request_of(index)
        try:
            while not stop.is_set():
                started = time.perf_counter()
                client.infer(model, [request], headers=headers_of() if headers_of else None)
                if measuring.is_set():
                    mine.append(time.perf_counter() - started)
        finally:
            client.close()
            with lock:
                latencies.extend(mine)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    time.sleep(min(1.0, seconds / 4))  # every caller connected and the batcher in its steady state
    before = {name: snapshot(url, name, admin_key=server.admin_key) for name in statistics_of}  # an admin API
    measuring.set()
    started = time.perf_counter()
    time.sleep(seconds)
    measuring.clear()
    elapsed = time.perf_counter() - started
    delta = {name: snapshot(url, name, admin_key=server.admin_key).since(before[name]) for name in statistics_of}
    stop.set()
    for thread in threads:
        thread.join()
    return latencies, elapsed, delta


def served(variant: str, server: TritonServer, model: str, images: np.ndarray, concurrency: int, seconds: float,
           headers_of=None) -> Row:
    """`concurrency` callers sending batch-1 pixel requests back to back."""
    def request_of(index: int) -> grpcclient.InferInput:
        request = grpcclient.InferInput(INPUT_NAME, [1, *images.shape[1:]], "UINT8")
        request.set_data_from_numpy(images[index % len(images)][None])
        return request

    latencies, elapsed, statistics = closed_loop(server, model, request_of, concurrency, seconds, (model,), headers_of)
    delta = statistics[model]
    triton = {
        "queue_ms_per_request": delta["queue_ms_per_request"],
        "compute_ms_per_request": sum(delta[f"{stage}_ms_per_request"] or 0.0 for stage in STAGES if stage != "queue"),
        "average_batch": delta["average_batch"],
    }
    p50, p95, p99 = (float(np.percentile(latencies, q) * 1000) for q in (50, 95, 99))
    return Row(variant, "triton gRPC", f"concurrency {concurrency}", len(latencies) / elapsed, p50, p95, p99, triton,
               concurrency=concurrency)


def encoded_served(variant: str, server: TritonServer, model: str, files: list[bytes], concurrency: int, seconds: float,
                   per_request: int = 1) -> Row:
    """`concurrency` callers sending `per_request` image files per request to the encoded model (1: a
    service classifying what arrives; the client's batch: a caller working through a folder, as the
    client command does), and from Triton's statistics each step's queue and compute time per
    request: the preprocessing model, then the pixel model. The ensemble's own share is the served p50
    beyond the two steps' own times."""
    preprocess, pixel = f"{model}-preprocess", model

    def request_of(index: int) -> grpcclient.InferInput:
        request = grpcclient.InferInput("image_file", [per_request, 1], "BYTES")
        request.set_data_from_numpy(np.array([[files[(index + i) % len(files)]] for i in range(per_request)], dtype=np.object_))
        return request

    latencies, elapsed, delta = closed_loop(server, f"{model}-encoded", request_of, concurrency, seconds, (preprocess, pixel))
    p50, p95, p99 = (float(np.percentile(latencies, q) * 1000) for q in (50, 95, 99))

    def step_ms(name: str) -> float:
        return sum(delta[name][f"{stage}_ms_per_request"] or 0.0 for stage in STAGES)

    triton = {
        "queue_ms_per_request": sum(delta[name]["queue_ms_per_request"] or 0.0 for name in delta),
        "compute_ms_per_request": sum(step_ms(name) - (delta[name]["queue_ms_per_request"] or 0.0) for name in delta),
        "average_batch": delta[pixel]["average_batch"],
        "preprocess_ms_per_request": step_ms(preprocess), "pixel_model_ms_per_request": step_ms(pixel),
        "ensemble_own_ms_at_p50": p50 - step_ms(preprocess) - step_ms(pixel),
    }
    what = "PNG per request" if per_request == 1 else f"{per_request} PNGs per request"
    return Row(variant, "triton gRPC, encoded", f"concurrency {concurrency}, {what}", len(latencies) * per_request / elapsed,
               p50, p95, p99, triton, concurrency=concurrency, batch=per_request)


def decode_ms(paths: list[Path], spec: PreprocessSpec, repeats: int = 3) -> dict[str, float]:
    """The client's decode-and-resize time per file on one thread (median of `repeats` passes over
    `paths`): with the faster decoders where they apply, and with Pillow alone."""
    from histoserve.formats import preprocessing

    def per_file() -> float:
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            for path in paths:
                preprocess_file(path, spec)
            times.append((time.perf_counter() - started) * 1000 / len(paths))
        return statistics.median(times)

    fast = per_file()
    original = preprocessing.fast_pixels
    preprocessing.fast_pixels = lambda image, data: None
    try:
        pillow = per_file()
    finally:
        preprocessing.fast_pixels = original
    return {"decode+resize ms/file, faster decoders": fast, "decode+resize ms/file, Pillow alone": pillow}


def client_folder(folder: Path, work: Path, files: int) -> Path:
    """`files` PNGs for the client to classify: the test PNGs hard-linked over and over, so that the
    command runs long enough for its start-up not to weigh on its rate."""
    sources = find_images(folder)
    target = work / "client_files"
    for i in range(files):
        path = target / f"copy_{i // len(sources):02d}" / sources[i % len(sources)].name
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            os.link(sources[i % len(sources)], path)
    return target


def client_command(variant: str, url: str, model: str, folder: Path, note: str = "") -> list[Row]:
    """`python -m histoserve.client classify --concurrency 4` on `folder`: files/s over the whole command (process
    start and reading the contract included) and in its steady state (from its first result line to
    its last, each line time-stamped as it arrives), and the CPU time the client process used per file."""
    files = len(find_images(folder))
    command = [sys.executable, "-m", "histoserve.client", "classify", str(folder), "--url", url, "--model", model,
               "--concurrency", str(CLIENT_CONCURRENCY), "--batch-size", str(CLIENT_BATCH)]
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stamps = [time.perf_counter() for _ in process.stdout]
    stderr = process.stderr.read()
    process.wait()
    elapsed = time.perf_counter() - started
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if process.returncode != 0 or len(stamps) != files:
        sys.exit(f"python -m histoserve.client classify exited {process.returncode} with {len(stamps)} results for {files} files:\n"
                 f"{stderr[-2000:]}")
    cpu_ms = sum(getattr(cpu_after, k) - getattr(cpu_before, k) for k in ("ru_utime", "ru_stime")) * 1000 / files
    first_burst = sum(stamp - stamps[0] < 0.005 for stamp in stamps)  # the first request's results arrive together
    steady = (files - first_burst) / (stamps[-1] - stamps[0])
    what = f"{files} PNGs{note}"
    return [Row(variant, "python -m histoserve.client classify", f"{what}, whole command", files / elapsed, kind="whole command"),
            Row(variant, "python -m histoserve.client classify", f"{what}, steady, {cpu_ms:.1f} CPU ms/file", steady, kind="steady")]


def pin(cores: list[int]) -> None:
    """Every thread of this process (and what it starts from now on) runs on `cores` only."""
    for thread in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(thread), cores)
        except ProcessLookupError:  # a thread that has just ended
            pass


def client_on_own_cores(repository: Path, images: np.ndarray, folder: Path, seconds: float) -> list[Row]:
    """The server on most cores and the client (or the load generator) on the rest, as when the client
    is another pod: does the client keep the server busy? Both measured under the same split."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return []
    client_cores = cores[len(cores) - max(1, len(cores) // 4):]
    server_cores = cores[:len(cores) - len(client_cores)]
    note = f", cores: server {len(server_cores)}, client {len(client_cores)}"
    apply_tuning(repository, CpuTuning(intra_op_threads=len(server_cores)))
    rows = []
    try:
        pin(server_cores)  # Triton and its Python backend processes inherit this
        server = TritonServer(repository, free_ports())
        with server:
            pin(client_cores)
            for variant, name in VARIANTS.items():
                for concurrency in (4, 8):
                    print(f"{variant}{note}: served, concurrency {concurrency} ...", flush=True)
                    row = served(variant, server, name, images, concurrency, seconds)
                    row.path, row.setting = "triton gRPC, own cores", f"concurrency {concurrency}{note}"
                    rows.append(row)
                print(f"{variant}{note}: python -m histoserve.client classify ...", flush=True)
                for row in client_command(variant, server.grpc_url, name, folder, note):
                    row.path = "python -m histoserve.client classify, own cores"
                    rows.append(row)
    finally:
        pin(cores)
        apply_tuning(repository, CpuTuning())
    return rows


def apply_tuning(repository: Path, tuning: CpuTuning) -> None:
    for name in VARIANTS.values():
        config = read_config(repository / name / "config.pbtxt")
        write_text_if_changed(repository / name / "configs" / "cpu.pbtxt", config_to_text(cpu_variant(config, tuning)))


def describe(tuning: CpuTuning) -> str:
    preferred = ",".join(map(str, tuning.preferred_batch_sizes)) or "-"
    return (f"{tuning.instance_count} inst × {tuning.intra_op_threads or 'all'} threads, delay {tuning.max_queue_delay_us} µs, "
            f"preferred {preferred}")


def table(rows: list[Row]) -> str:
    wide = max(28, *(len(r.path) for r in rows))
    setting = max(40, *(len(r.setting) for r in rows))
    lines = [f"{'variant':7} {'path':{wide}} {'setting':{setting}} {'img/s':>7} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} "
             f"{'queue ms':>8} {'compute ms':>10} {'avg batch':>9}"]

    def number(value, width, digits=1):
        return f"{value:{width}.{digits}f}" if value is not None else " " * (width - 1) + "-"

    for r in rows:
        t = r.triton
        lines.append(f"{r.variant:7} {r.path:{wide}} {r.setting:{setting}} {r.images_per_s:7.1f} "
                     f"{number(r.p50_ms, 7)} {number(r.p95_ms, 7)} {number(r.p99_ms, 7)} "
                     f"{number(t.get('queue_ms_per_request'), 8)} {number(t.get('compute_ms_per_request'), 10)} "
                     f"{number(t.get('average_batch'), 9, 2)}")
    return "\n".join(lines)


METRICS_SETTINGS = {  # the latency metrics Triton keeps, as --metrics-config arguments
    "histogram (production)": ["--metrics-config=histogram_latencies=true"],
    "summaries": ["--metrics-config=summary_latencies=true"],
}


def metrics_cost_rows(repository: Path, images: np.ndarray, seconds: float, rounds: int = 2) -> list[Row]:
    """fp32 served at concurrency 4 and 8 with each METRICS_SETTINGS, a fresh server each, the settings
    alternating `rounds` times."""
    rows = []
    for round_ in range(rounds):
        for setting, arguments in METRICS_SETTINGS.items():
            with TritonServer(repository, free_ports(), extra_args=arguments) as server:
                for concurrency in (4, 8):
                    print(f"fp32: served with {setting}, concurrency {concurrency} (round {round_ + 1}) ...", flush=True)
                    row = served("fp32", server, MODEL, images, concurrency, seconds)
                    row.path, row.setting = f"triton gRPC, {setting}", f"concurrency {concurrency}, round {round_ + 1}"
                    rows.append(row)
    return rows


# The Deployment's trace flags (k8s/components/tracing), but the collector's address.
PRODUCTION_TRACING = ["--trace-config=mode=opentelemetry", "--trace-config=level=TIMESTAMPS", "--trace-config=rate=1000",
                      "--trace-config=opentelemetry,bsp_max_queue_size=16384",
                      "--trace-config=opentelemetry,bsp_max_export_batch_size=1024",
                      "--trace-config=opentelemetry,bsp_schedule_delay=2000"]
TRACING_SETTINGS = ("tracing off", "traced: production rate (1 in 1000)", "traced: every request")


class OtlpSink(BaseHTTPRequestHandler):
    """Takes OTLP/HTTP posts and drops them: a collector's cost is not Triton's."""

    def do_POST(self):  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


TINY = "tiny"


def write_tiny_model(repository: Path) -> None:
    """`tiny`: ONNX Identity of a float vector [16], dynamically batched: serving with no compute."""
    import onnx
    from onnx import TensorProto, helper
    from tritonclient.grpc import model_config_pb2 as mc

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], TINY,
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])])
    (repository / TINY / "1").mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), repository / TINY / "1" / "model.onnx")
    config = mc.ModelConfig(name=TINY, platform="onnxruntime_onnx", max_batch_size=16,
                            input=[mc.ModelInput(name="x", data_type=mc.TYPE_FP32, dims=[16])],
                            output=[mc.ModelOutput(name="y", data_type=mc.TYPE_FP32, dims=[16])],
                            dynamic_batching=mc.ModelDynamicBatching())
    write_text_if_changed(repository / TINY / "config.pbtxt", config_to_text(config))


def tiny_served(server: TritonServer, concurrency: int, seconds: float, headers_of=None) -> Row:
    def request_of(index: int) -> grpcclient.InferInput:
        request = grpcclient.InferInput("x", [1, 16], "FP32")
        request.set_data_from_numpy(np.full((1, 16), index, np.float32))
        return request

    latencies, elapsed, _ = closed_loop(server, TINY, request_of, concurrency, seconds, (TINY,), headers_of)
    p50, p95, p99 = (float(np.percentile(latencies, q) * 1000) for q in (50, 95, 99))
    return Row(TINY, "triton gRPC", f"concurrency {concurrency}", len(latencies) / elapsed, p50, p95, p99,
               concurrency=concurrency)


def tracing_cost_rows(repository: Path, images: np.ndarray, seconds: float, rounds: int = 2) -> list[Row]:
    """fp32 served at concurrency 4 and 8, and `tiny` by one caller, in each TRACING_SETTINGS, a fresh
    server each, alternating."""
    write_tiny_model(repository)
    sink = ThreadingHTTPServer(("127.0.0.1", 0), OtlpSink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    url = f"--trace-config=opentelemetry,url=http://127.0.0.1:{sink.server_address[1]}/v1/traces"
    counter = iter(range(1, 2**62))

    def traceparent() -> dict[str, str]:  # a new trace per request, as callers' spans give
        return {"traceparent": f"00-{next(counter):032x}-{next(counter):016x}-01"}

    rows = []
    try:
        for round_ in range(rounds):
            for setting in TRACING_SETTINGS:
                arguments = [] if setting == "tracing off" else [*PRODUCTION_TRACING, url]
                headers_of = traceparent if setting == "traced: every request" else None
                with TritonServer(repository, free_ports(), extra_args=arguments) as server:
                    for concurrency in (4, 8):
                        print(f"fp32: served, {setting}, concurrency {concurrency} (round {round_ + 1}) ...", flush=True)
                        row = served("fp32", server, MODEL, images, concurrency, seconds, headers_of)
                        row.path, row.setting = f"triton gRPC, {setting}", f"concurrency {concurrency}, round {round_ + 1}"
                        rows.append(row)
                    print(f"tiny: served, {setting}, concurrency 1 (round {round_ + 1}) ...", flush=True)
                    row = tiny_served(server, 1, seconds, headers_of)
                    row.path, row.setting = f"triton gRPC, {setting}", f"concurrency 1, round {round_ + 1}"
                    rows.append(row)
    finally:
        sink.shutdown()
    return rows


def tracing_cost(rows: list[Row]) -> dict[str, float]:
    def mean(variant: str, setting: str, field_name: str) -> float:
        values = [getattr(r, field_name) for r in rows if r.variant == variant and r.path == f"triton gRPC, {setting}"]
        return statistics.fmean(values) if values else float("nan")

    off = TRACING_SETTINGS[0]
    return {f"{variant} served, {setting} ÷ tracing off, {what}": mean(variant, setting, name) / mean(variant, off, name)
            for variant in ("fp32", TINY) for setting in TRACING_SETTINGS[1:]
            for what, name in (("throughput", "images_per_s"), ("p99", "p99_ms"))}


def metrics_cost(rows: list[Row]) -> dict[str, float]:
    def mean(setting: str) -> float:
        rates = [r.images_per_s for r in rows if r.path == f"triton gRPC, {setting}"]
        return statistics.fmean(rates) if rates else float("nan")

    return {"fp32 served with summaries ÷ with the production histogram setting": mean("summaries") / mean("histogram (production)")}


def ratios(rows: list[Row]) -> dict[str, float]:
    def best(variant: str, path: str, min_concurrency: int = 0) -> float:
        rates = [r.images_per_s for r in rows if r.variant == variant and r.path == path
                 and (not min_concurrency or (r.concurrency or 0) >= min_concurrency)]
        return max(rates, default=float("nan"))

    def in_process_mean(variant: str) -> float:
        """The best batch in process, averaged over its two measurements (before and after serving)."""
        again = [r.images_per_s for r in rows if r.variant == variant and r.path == "onnxruntime in process, again"]
        return (best(variant, "onnxruntime in process") + again[0]) / 2 if again else best(variant, "onnxruntime in process")

    result = {}
    for variant in VARIANTS:
        result[f"{variant} served (concurrency ≥ 4) ÷ in-process"] = best(variant, "triton gRPC", 4) / in_process_mean(variant)
    result["int8 ÷ fp32, in process"] = in_process_mean("int8") / in_process_mean("fp32")
    result["int8 ÷ fp32, served"] = best("int8", "triton gRPC", 1) / best("fp32", "triton gRPC", 1)
    def client(variant: str, kind: str, path: str = "python -m histoserve.client classify") -> float:
        return max((r.images_per_s for r in rows if r.variant == variant and r.path == path and r.kind == kind),
                   default=float("nan"))

    result["int8 ÷ fp32, client command (steady)"] = client("int8", "steady") / client("fp32", "steady")
    for variant in VARIANTS:
        if any(r.path == "triton gRPC, encoded" for r in rows):
            result[f"{variant} encoded (best concurrency) ÷ client + pixel model (steady), same cores"] = (
                best(variant, "triton gRPC, encoded", 1) / client(variant, "steady"))

    for variant in VARIANTS:
        for kind in ("whole command", "steady"):
            result[f"{variant} client ({kind}) ÷ served (best concurrency), shared cores"] = (
                client(variant, kind) / best(variant, "triton gRPC", 1))
        if any(r.path == "triton gRPC, own cores" for r in rows):
            result[f"{variant} client (steady) ÷ served (best concurrency), client on its own core"] = (
                client(variant, "steady", "python -m histoserve.client classify, own cores") / best(variant, "triton gRPC, own cores"))
    if any(r.path.startswith("triton gRPC, summaries") for r in rows):
        result.update(metrics_cost(rows))
        result.update(tracing_cost(rows))
    if any(r.path == "openvino in process" for r in rows):
        for variant in VARIANTS:
            for precision in sorted({r.precision for r in rows if r.path == "openvino in process"}):
                rates = [r.images_per_s for r in rows if r.variant == variant and r.path == "openvino in process"
                         and r.precision == precision]
                if rates:
                    result[f"openvino {variant} ({precision}) ÷ onnxruntime {variant}, in process"] = (
                        max(rates) / best(variant, "onnxruntime in process"))
    return result


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for variant in VARIANTS:
        points = [r for r in rows if r.variant == variant and r.path == "triton gRPC"]
        line = axes.plot([r.p99_ms for r in points], [r.images_per_s for r in points], marker="o", label=f"{variant} served")[0]
        for r in points:
            axes.annotate(str(r.concurrency), (r.p99_ms, r.images_per_s), textcoords="offset points", xytext=(4, 4), fontsize=8)
        local = max((r.images_per_s for r in rows if r.variant == variant and r.path == "onnxruntime in process"), default=None)
        if local:
            axes.axhline(local, linestyle="--", linewidth=1, color=line.get_color(), label=f"{variant} in process (best batch)")
    axes.set_xlabel("p99 latency (ms), batch-1 requests; labels: concurrency")
    axes.set_xscale("log")
    axes.set_ylabel("images / s")
    axes.set_title("ResNet50 224², served by Triton (CPU config) vs in process")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=4.0, help="measurement time per row (default: %(default)s)")
    parser.add_argument("--images", type=int, default=128, help="synthetic 700×460 PNGs written (default: %(default)s)")
    parser.add_argument("--client-files", type=int, default=256,
                        help="PNGs the client command classifies (the test PNGs, hard-linked; default: %(default)s)")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "serving")
    parser.add_argument("--sweep", action="store_true", help="sweep the CPU config instead (concurrency 4 and 16)")
    parser.add_argument("--keep", type=Path, help="build in this folder and keep it (default: a temporary one)")
    parser.add_argument("--metrics-cost", action="store_true",
                        help="only what Triton's latency summaries cost against the production histogram setting")
    parser.add_argument("--tracing-cost", action="store_true",
                        help="only what OpenTelemetry tracing costs: off, at the production rate, on every request")
    parser.add_argument("--provider", choices=("cpu", "cuda", "tensorrt"), default="cpu",
                        help="cuda/tensorrt: fp32, fp16 and int8 in process on the GPU with onnxruntime-gpu "
                             "(the local Triton is CPU-only, so no served rows)")
    return parser


def main() -> int:
    args = build_parser().parse_args()
    started = time.monotonic()
    cores = os.cpu_count() or 1
    wanted = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}.get(args.provider)
    if wanted and wanted not in ort.get_available_providers():
        sys.exit(f"--provider {args.provider}: this onnxruntime has no {wanted} (pip install onnxruntime-gpu, on a machine with a GPU)")
    work = args.keep or Path(tempfile.mkdtemp(prefix="histoserve-serving-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        print(f"building ResNet50 224² (random weights) and exporting fp32 + int8 in {work} ...", flush=True)
        checkpoint = build_model(work, args.images)
        repository = work / "model_repository"
        export(checkpoint, repository, ["int8"] if args.provider == "cpu" else ["fp16", "int8"])
        folder = work / "data"
        images = np.stack([preprocess_file(p, PreprocessSpec(256, 224)) for p in find_images(folder / "test")[:16]])
        images = np.concatenate([images] * (16 // len(images) + 1))[:16]
        decoding = decode_ms(find_images(folder / "test")[:16], PreprocessSpec(256, 224))
        if args.sweep:
            rows = sweep(repository, images, args.seconds)
        elif args.metrics_cost:
            rows = metrics_cost_rows(repository, images, args.seconds)
        elif args.tracing_cost:
            rows = tracing_cost_rows(repository, images, args.seconds)
        elif args.provider != "cpu":
            rows = []
            for variant in ("fp32", "fp16", "int8"):
                onnx_file = repository / (MODEL if variant == "fp32" else f"{MODEL}-{variant}") / "1" / "model.onnx"
                print(f"{variant}: in process on {args.provider} ...", flush=True)
                rows += gpu_rows(variant, onnx_file, images, args.seconds, args.provider, work / "tensorrt")
        else:
            client_files = client_folder(folder / "test", work, args.client_files)
            pngs = [p.read_bytes() for p in find_images(folder / "test")[:16]]
            rows = cpu_rows(repository, images, client_files, pngs, args.seconds, cores)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    report(args, rows, decoding, cores)
    print(f"({(time.monotonic() - started) / 60:.1f} min)")
    return 0


def cpu_rows(repository: Path, images: np.ndarray, client_files: Path, pngs: list[bytes], seconds: float, cores: int) -> list[Row]:
    """Steps 2 to 7 of the docstring, then the in-process best batch measured again (the machine drifts)."""
    rows: list[Row] = []
    for variant, name in VARIANTS.items():
        onnx_file = repository / name / "1" / "model.onnx"
        print(f"{variant}: in process ...", flush=True)
        rows += in_process(variant, onnx_file, images, seconds, cores)
        rows += openvino_rows(variant, onnx_file, images, seconds, cores)
    with TritonServer(repository, free_ports()) as server:
        for variant, name in VARIANTS.items():
            for concurrency in CONCURRENCY:
                print(f"{variant}: served, concurrency {concurrency} ...", flush=True)
                rows.append(served(variant, server, name, images, concurrency, seconds))
            print(f"{variant}: python -m histoserve.client classify ...", flush=True)
            rows += client_command(variant, server.grpc_url, name, client_files)
            for concurrency in CONCURRENCY:
                print(f"{variant}: encoded model, concurrency {concurrency} ...", flush=True)
                rows.append(encoded_served(variant, server, name, pngs, concurrency, seconds))
            print(f"{variant}: encoded model, the client's batches ...", flush=True)
            rows.append(encoded_served(variant, server, name, pngs, CLIENT_CONCURRENCY, seconds, CLIENT_BATCH))
    rows += client_on_own_cores(repository, images, client_files, seconds)
    rows += metrics_cost_rows(repository, images, seconds)
    rows += tracing_cost_rows(repository, images, seconds)
    for variant, name in VARIANTS.items():
        batch = max((r for r in rows if r.variant == variant and r.path == "onnxruntime in process"), key=lambda r: r.images_per_s).batch
        print(f"{variant}: in process again, batch {batch} ...", flush=True)
        again = in_process(variant, repository / name / "1" / "model.onnx", images, seconds, cores, (batch,))[0]
        again.path = "onnxruntime in process, again"
        rows.append(again)
    return rows


def report(args: argparse.Namespace, rows: list[Row], decoding: dict[str, float], cores: int) -> None:
    """The table on stdout; the JSON (and for the full CPU run the ratios and the plot) under --out."""
    print("\n" + table(rows))
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": cores, "onnxruntime": ort.__version__,
                    "python": platform.python_version()},
        "model": "resnet50, 224², uint8 NCHW input, random weights",
        "seconds_per_row": args.seconds,
        "rows": [asdict(r) for r in rows],
    }
    if args.metrics_cost or args.tracing_cost:
        name = "metrics-cost.json" if args.metrics_cost else "tracing-cost.json"
        summary["ratios"] = metrics_cost(rows) if args.metrics_cost else tracing_cost(rows)
        (args.out / name).write_text(json.dumps(summary, indent=2))
        for ratio, value in summary["ratios"].items():
            print(f"\n{ratio}: {value:.3f}")
        print(f"wrote {args.out / name}")
        return
    if args.sweep or args.provider != "cpu":
        name = "sweep.json" if args.sweep else f"serving-{args.provider}.json"
        (args.out / name).write_text(json.dumps(summary, indent=2))
        print(f"\nwrote {args.out / name}")
        return
    summary["ratios"] = ratios(rows)
    for variant in VARIANTS:  # what moving the decode into the server adds to a lone request
        one = {r.path: r for r in rows if r.variant == variant and r.concurrency == 1
               and r.path in ("triton gRPC", "triton gRPC, encoded")}
        if len(one) == 2:
            summary["ratios"][f"{variant} encoded p50 overhead at concurrency 1, ms (vs client preprocessing + pixel p50)"] = (
                one["triton gRPC, encoded"].p50_ms - one["triton gRPC"].p50_ms - decoding["decode+resize ms/file, faster decoders"])
    summary["client_preprocessing"] = decoding
    (args.out / "serving.json").write_text(json.dumps(summary, indent=2))
    plot(rows, args.out / "serving.png")
    print("\nratios (one run)")
    for name, value in summary["ratios"].items():
        print(f"  {name:62} {value:5.2f}")
    print("\nthe client's preprocessing, one thread, 700×460 PNG → 224²")
    for name, value in decoding.items():
        print(f"  {name:62} {value:5.2f}")
    for r in (r for r in rows if r.path == "triton gRPC, encoded" and r.concurrency == 1):
        t = r.triton
        print(f"  {r.variant} encoded, concurrency 1: p50 {r.p50_ms:.1f} ms = preprocess {t['preprocess_ms_per_request']:.1f} + "
              f"pixel model {t['pixel_model_ms_per_request']:.1f} + ensemble and gRPC {t['ensemble_own_ms_at_p50']:.1f} ms")
    print(f"\nwrote {args.out / 'serving.json'} and {args.out / 'serving.png'}")


def sweep(repository: Path, images: np.ndarray, seconds: float) -> list[Row]:
    """Each CPU config on a fresh server, both variants: what configs/cpu.pbtxt should say (Model
    Analyzer's job, done with this benchmark)."""
    rows = []
    for variant, name in VARIANTS.items():
        rows += in_process(variant, repository / name / "1" / "model.onnx", images, seconds, os.cpu_count() or 1)
    for tuning in SWEEP:
        apply_tuning(repository, tuning)
        with TritonServer(repository, free_ports()) as server:
            for variant, name in VARIANTS.items():
                for concurrency in SWEEP_CONCURRENCY:
                    print(f"{describe(tuning)}: {variant}, concurrency {concurrency} ...", flush=True)
                    row = served(variant, server, name, images, concurrency, seconds)
                    row.path, row.setting = describe(tuning), f"concurrency {concurrency}"
                    rows.append(row)
    apply_tuning(repository, CpuTuning())
    print(f"\nmean img/s over concurrency {'/'.join(map(str, SWEEP_CONCURRENCY))} ÷ best in process (and max p99 ms)")
    for variant in VARIANTS:
        local = max(r.images_per_s for r in rows if r.variant == variant and r.path == "onnxruntime in process")
        for tuning in SWEEP:
            mine = [r for r in rows if r.variant == variant and r.path == describe(tuning)]
            mean = statistics.fmean(r.images_per_s for r in mine)
            print(f"  {variant} {describe(tuning):48} {mean:6.1f}  {mean / local:5.2f}  {max(r.p99_ms for r in mine):6.0f}")
    return rows


if __name__ == "__main__":
    sys.exit(main())
