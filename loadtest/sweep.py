"""python -m histoserve.loadtest sweep: the highest request rate a deployment takes while p99 stays under an SLO.

    python -m histoserve.loadtest sweep --url localhost:8001 --model resnet50 --images DIR --slo-p99-ms 500

1. Before anything is timed: each image's expected top-1 (one file, shared by every step and worker).
Triton's statistics are an admin API: give the server's admin key (--admin-key-file, or
HISTOSERVE_ADMIN_KEY); without it the sweep stops before any load (exit 2).

2. Closed loop at --concurrency users: Locust, bracketed by a direct tritonclient loop (threads, no
   Locust) at the same concurrency before and after (averaged: these machines drift). Their ratio says
   whether Locust is the bottleneck (goal ≥ 0.9); the Locust figure is the peak closed-loop throughput.
3. Open-loop steps (Poisson arrivals by default) at --rates, or at fractions of that peak, each one
   Locust run that ends when its windows are stable (perf_analyzer's rule) or after --max-windows,
   with Triton's own statistics and nv_inference_* metrics read before and after. Stepping stops after
   two steps in a row that miss the SLO; then --refine bisections between the capacity so far and
   the first miss.
4. A step meets the SLO when its response p99 (from intended send times: corrected for coordinated
   omission) is within --slo-p99-ms, the server completed ≥ 95 % of what was sent, requests went out
   on time (≤ 1 % late), no answer was wrong or failed, and the generator was not the limit. Capacity
   = the highest such rate below the first rate that missed (a pass above a miss is noise near
   saturation, and is reported as such). The knee is the first step where the server stops keeping
   up (or requests go out late) or p99 more than doubles over the previous step.

Writes sweep.json and sweep.png (offered vs completed rate; p50/p99 vs completed rate) under --out and
prints a table. Exit codes: 0 a rate met the SLO; 3 none did; 4 the run is not valid (a step sent
nothing, or the generator could not keep the lowest rate); 2 nothing can be measured (server or model
missing, no readable image).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from histoserve.client.classifier import ClientError, TritonClassifier
from histoserve.formats.admin import ENVIRONMENT_VARIABLE, AdminKey, AdminKeyError
from histoserve.formats.options import (
    FRACTION,
    NON_NEGATIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    ListOf,
    OptionError,
    add_tls_arguments,
    existing_folder,
    tls_from,
)
from histoserve.loadtest.expectations import expected_predictions, request_images, write_expected
from histoserve.loadtest.judgement import GENERATOR_CPU, LATE
from histoserve.loadtest.triton_stats import StatisticsRefused, snapshot

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
FRACTIONS_OF_PEAK = (0.3, 0.5, 0.7, 0.8, 0.9, 1.0, 1.1, 1.25)
COMPLETED_SHARE = 0.95


@dataclass
class Step:
    offered: float
    users: int
    exit_code: int
    sent: float = 0.0  # req/s actually sent in the measured windows (Poisson: near, not at, the offered rate)
    completed: float = 0.0
    service_p50_ms: float | None = None
    service_p99_ms: float | None = None
    response_p50_ms: float | None = None
    response_p99_ms: float | None = None
    late_share: float = 0.0
    failures: int = 0
    mismatches: int = 0
    stable: bool = False
    windows: int = 0
    invalid: list[dict] = field(default_factory=list)  # judgement.Invalid as written to the summary: code, message
    triton: dict = field(default_factory=dict)
    meets_slo: bool = False
    knee: bool = False

    @property
    def invalid_codes(self) -> set[str]:
        return {reason["code"] for reason in self.invalid}

    @property
    def keeps_up(self) -> bool:
        """The server completed what was sent (≥ 95 %), and the requests went out on time."""
        return self.completed >= COMPLETED_SHARE * self.sent and LATE not in self.invalid_codes

    @property
    def generator_limited(self) -> bool:
        return GENERATOR_CPU in self.invalid_codes or self.completed == 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`python -m histoserve.loadtest sweep`'s options (loadtest/__main__.py)."""
    parser.add_argument("--url", default="localhost:8001", help="Triton gRPC address (default: %(default)s)")
    parser.add_argument("--model", required=True)
    parser.add_argument("--images", type=existing_folder, required=True, help="folder of images to send")
    parser.add_argument("--max-images", type=POSITIVE_INT, default=64, help="first N images of the folder (default: %(default)s)")
    parser.add_argument("--slo-p99-ms", type=POSITIVE, required=True, help="the latency SLO: p99 of response latency")
    parser.add_argument("--rates", type=ListOf(POSITIVE),
                        help="offered rates, req/s, comma-separated (default: fractions of the closed-loop peak)")
    parser.add_argument("--refine", type=NON_NEGATIVE_INT, default=2,
                        help="bisections between the last pass and first miss (default: %(default)s)")
    parser.add_argument("--distribution", choices=("poisson", "constant"), default="poisson")
    parser.add_argument("--concurrency", type=POSITIVE_INT, default=4,
                        help="closed-loop users for the peak and cross-check (default: %(default)s)")
    parser.add_argument("--users", type=POSITIVE_INT, default=16,
                        help="open-loop users at least (more when rate × 2 × SLO needs them; default: %(default)s)")
    parser.add_argument("--max-users", type=POSITIVE_INT, default=128, help="open-loop users at most (default: %(default)s)")
    parser.add_argument("--processes", type=NON_NEGATIVE_INT, default=0,
                        help="Locust worker processes on this machine (0: one process)")
    parser.add_argument("--batch-size", type=POSITIVE_INT, default=1)
    parser.add_argument("--decode-per-request", action="store_true", help="each request decodes and preprocesses its files")
    parser.add_argument("--window-s", type=POSITIVE, default=5.0, help="measurement window (default: %(default)s)")
    parser.add_argument("--stable-windows", type=POSITIVE_INT, default=3)
    parser.add_argument("--max-windows", type=POSITIVE_INT, default=8, help="windows per step at most (default: %(default)s)")
    parser.add_argument("--late-ms", type=POSITIVE,
                        help="a request sent later than this after its intended time is late; over 1 %% late makes a step "
                             "invalid (default: SLO ÷ 20, at least 10 ms: lateness that cannot move the verdict is not counted)")
    parser.add_argument("--trace-share", type=FRACTION, default=0.0,
                        help="trace this share of each step's requests (OpenTelemetry, exported as the OTEL_* variables "
                             "say; Triton traces the same requests). Not against the local Triton 2.51 at high rates: it "
                             "crashes under concurrent traced requests, fixed in 25.04 (docs/kubernetes/observability.md, \"Tracing\") "
                             "(default: %(default)s)")
    parser.add_argument("--metrics-url", help="Triton's Prometheus metrics (default: http://HOST:8002/metrics)")
    parser.add_argument("--out", type=Path, default=Path("reports/sweep"))
    add_tls_arguments(parser)
    parser.add_argument("--admin-key-file", type=Path,
                        help=f"the server's admin key, for its statistics (default: ${ENVIRONMENT_VARIABLE})")


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:  # every option checked before the first call to the server
        args.tls = tls_from(args)
        args.admin_key = AdminKey.resolve(args.admin_key_file)
    except (OptionError, AdminKeyError) as error:
        parser.error(str(error))
    if args.max_users < args.users:
        parser.error(f"--max-users {args.max_users} is below --users {args.users}")
    if args.late_ms is None:
        args.late_ms = max(10.0, args.slo_p99_ms / 20)
    if args.metrics_url is None:
        args.metrics_url = f"http://{args.url.rsplit(':', 1)[0]}:8002/metrics"
    args.out.mkdir(parents=True, exist_ok=True)
    return sweep(args)


def sweep(args: argparse.Namespace) -> int:
    try:
        expected = expectations(args)
        snapshot(args.url, args.model, tls=args.tls, admin_key=args.admin_key)  # refused: stop before any load
    except (ClientError, ValueError, StatisticsRefused) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"closed loop, {args.concurrency} users: a direct loop, Locust, the direct loop again ...", flush=True)
    seconds = args.window_s * args.stable_windows
    direct_before = direct_throughput(args, seconds)
    closed = run_step(args, expected, rate=0.0, users=args.concurrency)
    if closed.exit_code == 2:
        return 2
    direct = (direct_before + direct_throughput(args, seconds)) / 2  # the machine drifts: bracket Locust
    peak = closed.completed
    if not peak:
        print("error: INVALID: the closed-loop run completed no request", file=sys.stderr)
        return 4
    rates = args.rates or [round(f * peak, 2) for f in FRACTIONS_OF_PEAK]
    steps: list[Step] = []
    misses = 0
    for rate in rates:
        steps.append(measure(args, expected, rate))
        misses = 0 if steps[-1].meets_slo else misses + 1
        if misses == 2:
            break
    for _ in range(args.refine):
        passing, failing = capacity(steps), first_miss(steps)
        if not passing or failing == math.inf:
            break
        steps.append(measure(args, expected, round((passing + failing) / 2, 2)))
    steps.sort(key=lambda s: s.offered)
    mark_knee(steps)
    return report(args, steps, closed, direct)


def expectations(args) -> Path:
    """Each image's accepted top-1 indices, asked of the server once before any step."""
    with TritonClassifier(args.url, args.model, tls=args.tls) as classifier:
        paths, images = request_images(args.images, classifier.spec, args.max_images)
        target = args.out / "expected.json"
        write_expected(target, paths, expected_predictions(classifier, images))
    return target


def measure(args, expected: Path, rate: float) -> Step:
    users = min(args.max_users, max(args.users, math.ceil(2 * rate * args.slo_p99_ms / 1000)))
    print(f"open loop, {rate:g} req/s offered, {users} users ...", flush=True)
    step = run_step(args, expected, rate, users)
    step.meets_slo = (step.response_p99_ms is not None and step.response_p99_ms <= args.slo_p99_ms
                      and step.keeps_up and step.failures == 0 and not step.invalid)
    print(f"  completed {step.completed:.1f}/s, response p99 {step.response_p99_ms or float('nan'):.1f} ms, "
          f"service p99 {step.service_p99_ms or float('nan'):.1f} ms, late {step.late_share:.1%}: "
          f"{'meets' if step.meets_slo else 'misses'} the SLO", flush=True)
    return step


def run_step(args, expected: Path, rate: float, users: int) -> Step:
    """One Locust run (headless, ended by stable windows or --max-windows), Triton read around it."""
    summary_file = args.out / f"step-{'closed' if not rate else f'{rate:g}'}.json"
    summary_file.unlink(missing_ok=True)
    command = [str(Path(sys.executable).parent / "locust"), "-f", str(LOCUSTFILE), "--headless", "--only-summary",
               "--users", str(users), "--spawn-rate", str(users), "--triton-url", args.url, "--model", args.model,
               "--images", args.images, "--max-images", str(args.max_images), "--expected", str(expected),
               "--batch-size", str(args.batch_size), "--arrival-rate", str(rate), "--arrival-distribution", args.distribution,
               "--window-s", str(args.window_s), "--stable-windows", str(args.stable_windows), "--stop-when-stable",
               "--run-time", f"{int((args.max_windows + 2) * args.window_s) + 5}s", "--summary-json", str(summary_file),
               "--late-ms", str(args.late_ms), "--fail-ratio", "1", "--trace-share", str(args.trace_share)]
    if args.decode_per_request:
        command.append("--decode-per-request")
    if args.processes:
        command += ["--processes", str(args.processes), "--expect-workers", str(args.processes)]
    if args.tls:
        command.append("--ssl")
        for option, path in zip(("--ssl-root-certificates", "--ssl-private-key", "--ssl-certificate-chain"),
                                (args.tls.root_certificates, args.tls.private_key, args.tls.certificate_chain), strict=True):
            command += [option, path] if path else []
    before = snapshot(args.url, args.model, args.metrics_url, tls=args.tls, admin_key=args.admin_key)
    result = subprocess.run(command, capture_output=True, text=True)
    after = snapshot(args.url, args.model, args.metrics_url, tls=args.tls, admin_key=args.admin_key)
    step = Step(rate, users, result.returncode, triton=after.since(before))
    if result.returncode == 2 or not summary_file.exists():
        print(f"error: the Locust run exited {result.returncode}:\n{(result.stdout + result.stderr)[-2000:]}", file=sys.stderr)
        step.exit_code = 2
        return step
    summary = json.loads(summary_file.read_text())
    measured = summary.get("measured") or {}
    step.completed, step.sent = measured.get("completed_per_s", 0.0), measured.get("sent_per_s", 0.0)
    for name in ("service_p50_ms", "service_p99_ms", "response_p50_ms", "response_p99_ms"):
        setattr(step, name, measured.get(name))
    step.late_share = measured.get("late_share", 0.0)
    step.failures, step.mismatches = measured.get("failures", 0), measured.get("mismatches", 0)
    step.stable, step.windows, step.invalid = summary["stable"], len(summary["windows"]), summary["invalid"]
    return step


def direct_throughput(args, seconds: float) -> float:
    """Requests/s of `--concurrency` threads, each with its own TritonClassifier, sending
    preprocessed batches back to back: what the server gives without Locust in the way."""
    with TritonClassifier(args.url, args.model, tls=args.tls) as probe:
        images = request_images(args.images, probe.spec, args.max_images)[1]
    size = max(1, min(args.batch_size, probe.max_batch_size))
    counts = [0] * args.concurrency
    stop, measuring = threading.Event(), threading.Event()

    def caller(index: int) -> None:
        with TritonClassifier(args.url, args.model, tls=args.tls) as classifier:
            rng = np.random.default_rng(index)
            while not stop.is_set():
                classifier.infer(images[rng.choice(len(images), size)], top_k=1)
                counts[index] += measuring.is_set()

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(args.concurrency)]
    for thread in threads:
        thread.start()
    time.sleep(min(2.0, seconds / 3))
    measuring.set()
    started = time.perf_counter()
    time.sleep(seconds)
    elapsed = time.perf_counter() - started
    done = sum(counts)
    stop.set()
    for thread in threads:
        thread.join()
    return done / elapsed


def first_miss(steps: list[Step]) -> float:
    return min((s.offered for s in steps if not s.meets_slo), default=math.inf)


def capacity(steps: list[Step]) -> float:
    """The highest offered rate that met the SLO below every rate that missed it: a step that passes
    above a miss is noise near saturation, not capacity."""
    return max((s.offered for s in steps if s.meets_slo and s.offered < first_miss(steps)), default=0.0)


def mark_knee(steps: list[Step]) -> None:
    for previous, step in zip([None, *steps], steps, strict=False):
        short = not step.keeps_up
        jumped = (previous is not None and previous.response_p99_ms and step.response_p99_ms
                  and step.response_p99_ms > 2 * previous.response_p99_ms)
        if short or jumped:
            step.knee = True
            return


def report(args, steps: list[Step], closed: Step, direct: float) -> int:
    passing = [s for s in steps if s.meets_slo]
    found = capacity(steps)
    above = [s.offered for s in passing if s.offered > first_miss(steps)]
    cross = {
        "locust_closed_loop_per_s": closed.completed,
        "direct_closed_loop_per_s": direct,
        "locust_vs_direct_at_concurrency": closed.completed / direct if direct else None,
        "capacity_at_slo_per_s": found,
        "capacity_vs_peak_closed_loop": found / closed.completed if closed.completed else None,
    }
    print(f"\n{'offered/s':>9} {'completed/s':>11} {'resp p50':>8} {'resp p99':>8} {'serv p50':>8} {'serv p99':>8} "
          f"{'late':>6} {'fail':>4} {'queue ms':>8} {'infer ms':>8} {'batch':>5} {'stable':>6}  verdict")
    for s in steps:
        t = s.triton
        verdict = ("meets SLO" if s.meets_slo else "misses SLO") + (" ← knee" if s.knee else "") + (" (invalid)" if s.invalid else "")
        print(f"{s.offered:9.2f} {s.completed:11.2f} {fmt(s.response_p50_ms)} {fmt(s.response_p99_ms)} {fmt(s.service_p50_ms)} "
              f"{fmt(s.service_p99_ms)} {s.late_share:6.1%} {s.failures:4d} {fmt(t.get('queue_ms_per_request'))} "
              f"{fmt(t.get('compute_infer_ms_per_request'))} {fmt(t.get('average_batch'), 5, 2)} "
              f"{'yes' if s.stable else 'no':>6}  {verdict}")
    print(f"\ncapacity at p99 ≤ {args.slo_p99_ms:g} ms: {found:g} req/s"
          f" (batch {args.batch_size}, {args.distribution} arrivals)" if found else
          f"\nno offered rate met p99 ≤ {args.slo_p99_ms:g} ms")
    if above:
        print(f"noisy: {', '.join(f'{r:g}' for r in above)} req/s met the SLO above a miss at {first_miss(steps):g} req/s; "
              f"the capacity is the rate below the miss (repeat the steps near it, or use longer windows)")
    print(f"cross-check: Locust ÷ direct, closed loop at concurrency {args.concurrency}: "
          f"{closed.completed:.1f} ÷ {direct:.1f} = {cross['locust_vs_direct_at_concurrency'] or float('nan'):.2f} (goal ≥ 0.9)")
    print(f"cross-check: capacity at the SLO ÷ peak closed-loop throughput: {cross['capacity_vs_peak_closed_loop'] or 0:.2f}")
    result = {"slo_p99_ms": args.slo_p99_ms, "model": args.model, "url": args.url, "batch_size": args.batch_size,
              "distribution": args.distribution, "capacity_per_s": found, "passed_above_a_miss": above, "cross_checks": cross,
              "closed_loop": asdict(closed), "steps": [asdict(s) for s in steps]}
    (args.out / "sweep.json").write_text(json.dumps(result, indent=2))
    plot(steps, args.slo_p99_ms, args.out / "sweep.png")
    print(f"wrote {args.out / 'sweep.json'} and {args.out / 'sweep.png'}")
    lowest = steps[0] if steps else None
    if lowest is None or lowest.completed == 0 or lowest.generator_limited:
        print("INVALID: the lowest step sent nothing or the generator limited it", file=sys.stderr)
        return 4
    return 0 if found else 3


def fmt(value: float | None, width: int = 8, digits: int = 1) -> str:
    return f"{value:{width}.{digits}f}" if value is not None else " " * (width - 1) + "-"


def plot(steps: list[Step], slo_ms: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (rates, latency) = plt.subplots(1, 2, figsize=(11, 4.5))
    offered = [s.offered for s in steps]
    rates.plot(offered, [s.completed for s in steps], marker="o", label="completed")
    rates.plot(offered, offered, linestyle="--", color="grey", label="offered = completed")
    rates.set_xlabel("offered (req/s)")
    rates.set_ylabel("completed (req/s)")
    measured = [s for s in steps if s.response_p99_ms is not None]
    completed = [s.completed for s in measured]
    for name, style in (("response_p99_ms", "-o"), ("response_p50_ms", "-s"), ("service_p99_ms", ":o"), ("service_p50_ms", ":s")):
        latency.plot(completed, [getattr(s, name) for s in measured], style, label=name.replace("_ms", "").replace("_", " "))
    latency.axhline(slo_ms, color="red", linewidth=1, label=f"SLO p99 {slo_ms:g} ms")
    for s in steps:
        if s.knee:
            rates.axvline(s.offered, color="orange", linewidth=1, label="knee")
            latency.axvline(s.completed, color="orange", linewidth=1, label="knee")
    latency.set_xlabel("completed (req/s)")
    latency.set_ylabel("latency (ms)")
    latency.set_yscale("log")
    for axes in (rates, latency):
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    figure.suptitle("Open-loop sweep: response latency is from intended send times")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
