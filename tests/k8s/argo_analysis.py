"""What the Argo Rollouts controller (v1.9) does with a canary step's analysis, done here against a real
Prometheus: merge the AnalysisTemplates' arguments with the step's (utils/analysis/helpers.go,
flattenArgs and MergeArgs), substitute `{{args.x}}` into each metric (ResolveMetricArgs), run the
Prometheus query (an instant query; a vector becomes the list `result`), and judge each measurement
with the metric's successCondition and failureCondition (utils/evaluate/evaluate.go: failure wins,
neither is Inconclusive) and the metric from its measurements (failureLimit, inconclusiveLimit).

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


def prometheus_query(address: str, query: str) -> list[float]:
    url = f"{address}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=10) as response:
        data = json.loads(response.read())["data"]
    if data["resultType"] == "scalar":
        return [float(data["result"][1])]
    return [float(sample["value"][1]) for sample in data["result"]]


@dataclass
class MetricOutcome:
    name: str
    phase: str                     # Successful, Failed, Inconclusive, Error
    measurements: list[tuple[str, list[float]]]


def run_metric(metric: dict, query: Callable[[str], list[float]], interval_s: float) -> MetricOutcome:
    """`count` measurements `interval_s` apart (the template's interval, scaled down for a test), with
    the metric's limits: more failures than failureLimit fail it (at once), more inconclusive ones
    than inconclusiveLimit leave it Inconclusive, five errors in a row (consecutiveErrorLimit 4) Error."""
    count, failure_limit = int(metric.get("count", 1)), int(metric.get("failureLimit", 0))
    inconclusive_limit, error_limit = int(metric.get("inconclusiveLimit", 0)), int(metric.get("consecutiveErrorLimit", 4))
    measurements, errors = [], 0
    for index in range(count):
        if index:
            time.sleep(interval_s)
        try:
            result = query(metric["provider"]["prometheus"]["query"])
            phase = judge(metric, result)
        except OSError:
            result, phase = [], "Error"
        measurements.append((phase, result))
        errors = errors + 1 if phase == "Error" else 0
        if errors > error_limit:
            return MetricOutcome(metric["name"], "Error", measurements)
        if sum(p == "Failed" for p, _ in measurements) > failure_limit:
            return MetricOutcome(metric["name"], "Failed", measurements)
    if sum(p == "Inconclusive" for p, _ in measurements) > inconclusive_limit:
        return MetricOutcome(metric["name"], "Inconclusive", measurements)
    return MetricOutcome(metric["name"], "Successful", measurements)
