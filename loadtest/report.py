"""python -m histoserve.loadtest report PREFIX — summarize a headless Locust run written with --csv PREFIX.

Prints requests, failures, throughput and latency percentiles (from PREFIX_summary.json), and plots throughput and p50/p99
latency over time into PREFIX_latency.png.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import dataclass, fields
from pathlib import Path


@dataclass(frozen=True)
class LoadSummary:
    requests: int
    failures: int
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    average_ms: float
    mode: str = "closed loop"
    measured: dict | None = None  # the HDR windows' totals (see loadtest/windows.py), when any completed
    invalid: tuple[dict, ...] = ()  # judgement.Invalid: code, message

    def table(self) -> str:
        rows = [
            ("mode", self.mode),
            ("requests", f"{self.requests}"),
            ("failures", f"{self.failures}"),
            ("throughput", f"{self.requests_per_second:.1f} req/s"),
            ("latency p50", f"{self.p50_ms:.1f} ms"),
            ("latency p99", f"{self.p99_ms:.1f} ms"),
            ("latency mean", f"{self.average_ms:.1f} ms"),
        ]
        if self.measured and self.mode == "open loop":
            m = self.measured
            rows += [("service p50", f"{m['service_p50_ms']:.1f} ms (from the actual send)"),
                     ("service p99", f"{m['service_p99_ms']:.1f} ms"),
                     ("late sends", f"{m['late_share']:.1%}")]
        rows += [("INVALID", reason["message"]) for reason in self.invalid]
        return "\n".join(f"  {name:<13} {value}" for name, value in rows)


def read_summary(prefix: str | Path) -> LoadSummary:
    """The final totals the locustfile writes to PREFIX_summary.json when the run ends."""
    path = Path(f"{prefix}_summary.json")
    if not path.is_file():
        raise ValueError(f"{path} is missing: run `python -m histoserve.loadtest locust ... --csv {prefix}`")
    data = json.loads(path.read_text())
    known = {f.name for f in fields(LoadSummary)}
    return LoadSummary(**{k: tuple(v) if k == "invalid" else v for k, v in data.items() if k in known})


def plot_history(prefix: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(f"{prefix}_stats_history.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["Name"] == "Aggregated" and r["50%"] not in ("N/A", "")]
    if not rows:
        raise ValueError(f"{prefix}_stats_history.csv has no samples with latencies")
    start = int(rows[0]["Timestamp"])
    seconds = [int(r["Timestamp"]) - start for r in rows]
    figure, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(8, 6))
    top.plot(seconds, [float(r["Requests/s"]) for r in rows], label="requests/s")
    top.plot(seconds, [float(r["Failures/s"]) for r in rows], label="failures/s", color="tab:red")
    top.set_ylabel("per second")
    top.legend(loc="lower right")
    top.set_title(f"Locust: {rows[-1]['User Count']} users")
    for column, style in (("50%", "-"), ("99%", "--")):
        bottom.plot(seconds, [float(r[column]) for r in rows], style, label=f"p{column.rstrip('%')}")
    bottom.set_ylabel("latency (ms)")
    bottom.set_xlabel("seconds since start")
    bottom.legend(loc="upper right")
    figure.tight_layout()
    out = Path(f"{prefix}_latency.png")
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`python -m histoserve.loadtest report`'s options (loadtest/__main__.py)."""
    parser.add_argument("prefix", help="the --csv prefix given to locust, e.g. reports/locust")


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        summary = read_summary(args.prefix)
        plot = plot_history(args.prefix)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(summary.table())
    print(f"  plot          {plot}")
    return 0


if __name__ == "__main__":  # the older spelling, python -m histoserve.loadtest.report PREFIX
    from histoserve.loadtest.__main__ import main

    sys.exit(main(["report", *sys.argv[1:]]))
