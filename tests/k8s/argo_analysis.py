"""What the Argo Rollouts controller (v1.9) does with a canary step's analysis, done here against a real
Prometheus: merge the AnalysisTemplates' arguments with the step's (utils/analysis/helpers.go,
flattenArgs and MergeArgs), substitute `{{args.x}}` into each metric (ResolveMetricArgs), run the
Prometheus query (an instant query; a vector becomes the list `result`), and judge each measurement
with the metric's successCondition and failureCondition (utils/evaluate/evaluate.go: failure wins,
neither is Inconclusive), each metric from its measurements (analysis/analysis.go: failureLimit,
inconclusiveLimit, consecutiveErrorLimit, consecutiveSuccessLimit, count), and a run from its metrics
(the first to end Failed, Error or Inconclusive ends the run; the worst phase is the run's).

The conditions are expressions of antonmedv/expr. Only the subset the templates use is understood
here (`result[0]`, `len(result)`, `isNaN(x)`, numbers, comparisons, `&&`, `||`, `!`, parentheses),
translated to Python; any other token is refused, so a template that outgrows the subset fails its
test instead of being judged by another language.
"""

from __future__ import annotations

import json
import math
import re
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

ARG = re.compile(r"\{\{\s*args\.([\w-]+)\s*\}\}")
TOKEN = re.compile(r"\s*(result\[0\]|len\(result\)|isNaN|&&|\|\||<=|>=|==|!=|<|>|!|\(|\)|-?\d+(?:\.\d+)?(?:e-?\d+)?)")


class AnalysisError(ValueError):
    """Arguments that do not resolve, or a condition outside the understood subset."""


def flatten_args(templates: list[dict]) -> list[dict]:
    combined: list[dict] = []
    for template in templates:
        for argument in template["spec"].get("args", []):
            previous = next((a for a in combined if a["name"] == argument["name"]), None)
            if previous is None:
                combined.append(dict(argument))
            elif "value" in previous and "value" in argument and previous["value"] != argument["value"]:
                raise AnalysisError(f"argument {argument['name']} specified with different values")
            elif "value" not in previous:
                previous.update(argument)
    return combined


def resolve_args(templates: list[dict], incoming: dict[str, str]) -> dict[str, str]:
    """The templates' arguments with the step's resolved values (`incoming`) merged in: every argument
    must end with a value, as Argo requires before it creates the AnalysisRun."""
    values = {}
    for argument in flatten_args(templates):
        value = incoming.get(argument["name"], argument.get("value"))
        if value is None:
            raise AnalysisError(f"argument {argument['name']} has no value")
        values[argument["name"]] = value
    return values


def resolve_metric(metric: dict, args: dict[str, str]) -> dict:
    text = json.dumps(metric)
    unknown = set(ARG.findall(text)) - set(args)
    if unknown:
        raise AnalysisError(f"metric {metric['name']}: unresolved {sorted(unknown)}")
    return json.loads(ARG.sub(lambda m: json.dumps(args[m.group(1)])[1:-1], text))


def condition(expression: str, result: list[float]) -> bool:
    python, position = [], 0
    while position < len(expression):
        match = TOKEN.match(expression, position)
        if not match or not match.group(1):
            if expression[position:].strip():
                raise AnalysisError(f"condition {expression!r}: {expression[position:]!r} is outside the understood subset of expr")
            break
        token = match.group(1)
        python.append({"&&": "and", "||": "or", "!": "not", "isNaN": "isnan"}.get(token, token))
        position = match.end()
    try:
        value = eval(" ".join(python), {"__builtins__": {}}, {"result": result, "len": len, "isnan": math.isnan})  # noqa: S307
    except IndexError as error:
        raise AnalysisError(f"condition {expression!r} on {result}: {error}") from error
    if not isinstance(value, bool):
        raise AnalysisError(f"condition {expression!r} gave {value!r}, not a bool")
    return value


def judge(metric: dict, result: list[float]) -> str:
    """One measurement: Successful, Failed, Inconclusive or Error (evaluate.EvaluateResult)."""
    try:
        success = condition(metric["successCondition"], result) if metric.get("successCondition") else None
        failure = condition(metric["failureCondition"], result) if metric.get("failureCondition") else None
    except AnalysisError:
        return "Error"
    if success is None and failure is None:
        return "Successful"
    if failure is None:
        failure = not success
    if success is None:
        success = not failure
    return "Failed" if failure else "Successful" if success else "Inconclusive"


def prometheus_query(address: str, query: str, at: float | None = None) -> list[float]:
    """An instant query, now or `at` (Unix seconds), as the controller's provider asks it."""
    parameters = {"query": query} if at is None else {"query": query, "time": f"{at:.3f}"}
    url = f"{address}/api/v1/query?" + urllib.parse.urlencode(parameters)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=10) as response:
        data = json.loads(response.read())["data"]
    if data["resultType"] == "scalar":
        return [float(data["result"][1])]
    return [float(sample["value"][1]) for sample in data["result"]]


@dataclass
class MetricOutcome:
    name: str
    phase: str                     # Successful, Failed, Inconclusive, Error; Running while measuring
    measurements: list[tuple[str, list[float]]]


def assess(metric: dict, measurements: list[tuple[str, list[float]]], terminating: bool = False) -> str:
    """A metric's phase from its measurements so far, as analysis/analysis.go assessMetricStatus (v1.9):
    failures over failureLimit fail it, inconclusive ones over inconclusiveLimit make it Inconclusive,
    errors in a row over consecutiveErrorLimit make it Error (the later check wins); then
    consecutiveSuccessLimit successes in a row make it Successful at once; at `count` (Error
    measurements do not count) it is Inconclusive if consecutiveSuccessLimit and failureLimit both
    apply, Failed if only consecutiveSuccessLimit does, else Successful. A terminating run (another
    metric ended it) ends a metric still running Successful."""
    if not measurements:
        return "Successful" if terminating else "Running"
    phases = [phase for phase, _ in measurements]
    failure_limit, inconclusive_limit = int(metric.get("failureLimit", 0)), int(metric.get("inconclusiveLimit", 0))
    error_limit, success_limit = int(metric.get("consecutiveErrorLimit", 4)), int(metric.get("consecutiveSuccessLimit", 0))
    consecutive_errors = consecutive_successes = 0
    for phase in phases:
        consecutive_errors = consecutive_errors + 1 if phase == "Error" else 0
        consecutive_successes = consecutive_successes + 1 if phase == "Successful" else 0
    verdict = None
    if failure_limit >= 0 and phases.count("Failed") > failure_limit:
        verdict = "Failed"
    if phases.count("Inconclusive") > inconclusive_limit:
        verdict = "Inconclusive"
    if consecutive_errors > error_limit:
        verdict = "Error"
    if verdict:
        return verdict
    if success_limit > 0 and consecutive_successes >= success_limit:
        return "Successful"
    count = int(metric.get("count", 1))
    if sum(phase != "Error" for phase in phases) >= count:
        if success_limit > 0:
            return "Inconclusive" if failure_limit >= 0 else "Failed"
        return "Successful"
    return "Successful" if terminating else "Running"


def measure(metric: dict, query: Callable[[str], list[float]]) -> tuple[str, list[float]]:
    try:
        result = query(metric["provider"]["prometheus"]["query"])
    except OSError:
        return "Error", []
    return judge(metric, result), result


def run_metric(metric: dict, query: Callable[[str], list[float]], interval_s: float) -> MetricOutcome:
    """One metric on its own: a measurement every `interval_s` (the template's interval, scaled down for
    a test) until `assess` ends it."""
    measurements: list[tuple[str, list[float]]] = []
    while True:
        measurements.append(measure(metric, query))
        phase = assess(metric, measurements)
        if phase != "Running":
            return MetricOutcome(metric["name"], phase, measurements)
        time.sleep(interval_s)


WORSE = ["Successful", "Running", "Pending", "Inconclusive", "Error", "Failed"]  # utils/analysis/helpers.go


def run_analysis(metrics: list[dict], query_at: Callable[[str, int], list[float]]) -> tuple[str, dict[str, MetricOutcome]]:
    """An AnalysisRun of `metrics` measured together, round by round (their common interval): round k's
    queries are asked with `query_at(query, k)`, so a caller can evaluate each round at its own moment
    of recorded data. A metric that ends Failed, Error or Inconclusive terminates the run (IsTerminating):
    the others end as `assess` says with terminating set. The run's phase is its metrics' worst."""
    outcomes = {m["name"]: MetricOutcome(m["name"], "Running", []) for m in metrics}
    for round_ in range(10_000):
        for metric in metrics:
            outcome = outcomes[metric["name"]]
            if outcome.phase == "Running":
                outcome.measurements.append(measure(metric, lambda q, at=round_: query_at(q, at)))
                outcome.phase = assess(metric, outcome.measurements)
        terminating = any(o.phase in ("Failed", "Error", "Inconclusive") for o in outcomes.values())
        if terminating:
            for metric in metrics:
                outcome = outcomes[metric["name"]]
                if outcome.phase == "Running":
                    outcome.phase = assess(metric, outcome.measurements, terminating=True)
        if all(o.phase != "Running" for o in outcomes.values()):
            break
    phase = max((o.phase for o in outcomes.values()), key=WORSE.index)
    return phase, outcomes
