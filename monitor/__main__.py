"""python -m histoserve.monitor serve --repository model_repository --token-file TOKENS [--port 8010] [--window 500]
    [--record-file records.jsonl]
python -m histoserve.monitor report [records.jsonl.1] records.jsonl --repository model_repository [--window 200] [--out reports/monitor]

serve: the HTTP service clients send prediction records to (`python -m histoserve.client classify
--monitor-url http://HOST:8010`), exposing drift and label-free accuracy as Prometheus metrics
(monitor/service.py); with --record-file it keeps every record, and a restart takes up the windows
from it. Writers authenticate with a bearer token from --token-file (one per line; re-read when it
changes) or HISTOSERVE_MONITOR_TOKEN, and only records for model versions the repository holds are
taken. report: the same tests over record files (oldest first; lines that cannot be read are
skipped with a warning), in consecutive windows of --window records per model and version; prints
a table, writes report.json and report.png (p-values per test against the corrected level; the
accuracy estimate with its interval); under each drifting window, the trace ids of a few of its
requests (the least confident of those the clients traced; `trace_ids` in report.json and in the
service's GET /v1/report), to look up in the tracing back end. Exit codes: 0 no drift, 1 drift in some window (report), 2 the
records or baseline cannot be read.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from histoserve.formats.baseline import BaselineError, baseline_path, read_baseline
from histoserve.formats.options import FRACTION, POSITIVE, POSITIVE_INT, Range
from histoserve.formats.records import PredictionRecord, read_records
from histoserve.monitor.drift import ALPHA, MAX_ACCURACY_DROP, DriftReport, records_report
from histoserve.monitor.service import TOKEN_VARIABLE, Monitor, TokenError, WriterTokens, make_server, report_json


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m histoserve.monitor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="receive prediction records, expose drift metrics")
    report = commands.add_parser("report", help="drift over a records file (JSON lines)")
    report.add_argument("records", type=Path, nargs="+", help="record files, oldest first (a rotated records.jsonl.1 first)")
    for command in (serve, report):
        command.add_argument("--repository", type=Path, default=Path("model_repository"),
                             help="model repository with each version's drift_baseline.json (default: %(default)s)")
        command.add_argument("--alpha", type=Range(float, 0, 1, low_open=True, high_open=True), default=ALPHA,
                             help="family-wise false-alarm rate per window")
        command.add_argument("--max-accuracy-drop", type=FRACTION, default=MAX_ACCURACY_DROP,
                             help="flag an estimated accuracy this far under the baseline's (default: %(default)s)")
    serve.add_argument("--address", default="127.0.0.1")
    serve.add_argument("--port", type=Range(int, 0, 65535), default=8010, help="0: any free port")
    serve.add_argument("--window", type=POSITIVE_INT, default=500, help="records per model version in the sliding window")
    serve.add_argument("--min-window", type=POSITIVE_INT, default=100, help="records before drift is judged")
    serve.add_argument("--max-windows", type=POSITIVE_INT, default=32,
                       help="model versions watched at once; the one updated longest ago is dropped (default: %(default)s)")
    serve.add_argument("--token-file", type=Path,
                       help=f"bearer tokens writers must send, one per line (default: ${TOKEN_VARIABLE})")
    serve.add_argument("--record-file", type=Path,
                       help="append every accepted record here (JSON lines); replayed on start, read by `report`")
    serve.add_argument("--record-file-max-mb", type=POSITIVE, default=64,
                       help="past this size the file becomes FILE.1 (replacing the last one) and a new one starts "
                            "(default: %(default)s)")
    report.add_argument("--window", type=POSITIVE_INT, default=200, help="records per window (default: %(default)s)")
    report.add_argument("--out", type=Path, default=Path("reports/monitor"))
    serve.set_defaults(run=run_server)
    report.set_defaults(run=run_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


def run_server(args) -> int:
    try:
        tokens = WriterTokens(args.token_file)
        monitor = Monitor(args.repository, args.window, args.min_window, args.alpha, args.max_accuracy_drop, args.record_file,
                          int(args.record_file_max_mb * 2**20), args.max_windows).restore()
    except (OSError, ValueError, TokenError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if monitor.record_log is not None:
        print(f"monitor: {monitor.restored} record(s) replayed from {args.record_file}"
              + (f", {monitor.replay_refused} left out (model versions no longer in the repository)"
                 if monitor.replay_refused else ""), flush=True)
        warn_skipped(monitor.record_log.skipped)
    server = make_server(monitor, args.address, args.port, tokens)
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    print(f"monitor: listening on http://{args.address}:{server.server_address[1]} (POST /v1/records, GET /metrics), "
          f"baselines from {args.repository}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        if monitor.record_log is not None:
            monitor.record_log.close()
    return 0


def stop_on_sigterm(*_) -> None:
    raise KeyboardInterrupt  # serve_forever returns through the same path as Ctrl-C


def run_report(args) -> int:
    records, skipped = [], []
    try:
        for path in args.records:
            records.extend(read_records(path, skipped))
    except OSError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    warn_skipped(skipped)
    groups: dict[tuple[str, str], list[PredictionRecord]] = {}
    for record in records:
        groups.setdefault((record.model, record.version), []).append(record)
    rows: list[tuple[str, str, int, DriftReport]] = []
    for (model, version), mine in groups.items():
        try:
            baseline = read_baseline(baseline_path(args.repository, model, version))
        except BaselineError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        for start in range(0, len(mine) - args.window + 1, args.window):
            window = mine[start:start + args.window]
            rows.append((model, version, start, records_report(baseline, window, args.alpha, args.max_accuracy_drop)))
    if not rows:
        print(f"error: no model version has {args.window} records in {args.records} (use a smaller --window)", file=sys.stderr)
        return 2
    print(f"{'model':12} {'version':>7} {'records':>11} {'prediction':>10} {'input':>6} {'est. acc':>8} {'95% interval':>15} "
          f"{'baseline':>8}  drifted tests")
    for model, version, start, report in rows:
        drifted = ", ".join(t.name for t in report.tests if t.drifted) or "-"
        print(f"{model:12} {version:>7} {start:>5}–{start + report.window_size:<5} {yes(report.prediction_drift):>10} "
              f"{yes(report.input_drift):>6} {report.estimated_accuracy:8.3f} "
              f"{report.estimated_accuracy_low:7.3f}–{report.estimated_accuracy_high:<7.3f} {report.baseline_expected_accuracy:8.3f}"
              f"  {drifted}{' (accuracy drop)' if report.accuracy_dropped else ''}")
        if report.drift and report.trace_ids:
            print(f"{'':12} {'':>7} traces to follow: {', '.join(report.trace_ids)}")
    args.out.mkdir(parents=True, exist_ok=True)
    entries = [{"first_record": s, **report_json({(m, v): r})[0]} for m, v, s, r in rows]
    (args.out / "report.json").write_text(json.dumps(entries, indent=2))
    plot(rows, args.out / "report.png")
    print(f"wrote {args.out / 'report.json'} and {args.out / 'report.png'}")
    return 1 if any(r.drift for *_, r in rows) else 0


def warn_skipped(skipped: list[str]) -> None:
    for line in skipped[:5]:
        print(f"warning: skipped {line}", file=sys.stderr)
    if len(skipped) > 5:
        print(f"warning: skipped {len(skipped) - 5} more unreadable line(s)", file=sys.stderr)


def yes(flag: bool) -> str:
    return "DRIFT" if flag else "no"


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (tests, accuracy) = plt.subplots(2, 1, sharex=True, figsize=(9, 6))
    index = list(range(len(rows)))
    for name in [t.name for t in rows[0][3].tests]:
        values = [max(1e-12, next(t.p_value for t in r.tests if t.name == name)) for *_, r in rows]
        tests.plot(index, values, marker="o", markersize=3, label=name)
    tests.axhline(rows[0][3].corrected_alpha, color="red", linewidth=1, label="α ÷ tests (Bonferroni)")
    tests.set_yscale("log")
    tests.set_ylabel("p-value (window vs baseline)")
    tests.legend(fontsize=7, ncol=3)
    estimate = [r.estimated_accuracy for *_, r in rows]
    accuracy.fill_between(index, [r.estimated_accuracy_low for *_, r in rows], [r.estimated_accuracy_high for *_, r in rows],
                          alpha=0.3, label="95% interval")
    accuracy.plot(index, estimate, marker="o", markersize=3, label="estimated accuracy (label-free)")
    accuracy.plot(index, [r.baseline_expected_accuracy for *_, r in rows], linestyle="--", label="baseline")
    accuracy.set_xlabel("window (in record order; model/version as in report.json)")
    accuracy.set_ylabel("accuracy")
    accuracy.legend(fontsize=8)
    for axes in (tests, accuracy):
        axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    sys.exit(main())
