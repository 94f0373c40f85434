"""Custom CloudWatch metrics as Embedded Metric Format (EMF) log lines: one JSON object per line on
stdout, which Lambda sends to CloudWatch Logs, where CloudWatch extracts the metric ("Specification:
Embedded metric format", https://docs.aws.amazon.com/AmazonCloudWatch/latest/monitoring/CloudWatch_Embedded_Metric_Format_Specification.html).
No `cloudwatch:PutMetricData` call or permission: the function's log group is all it needs.

The line goes to stdout with `print`, not through `logging`: the Lambda runtime's log handler prefixes
a level, time and request id, and a line that does not start with the JSON object is not EMF.
"""
from __future__ import annotations

import json
import sys

NAMESPACE = "metrika-crm-bridge"
BUDGET_USED_METRIC = "MetrikaBudgetUsedPercent"


def budget_used_line(*, stage: str, used: int, budget: int, quota_key: str, timestamp_ms: int) -> str:
    """The EMF line for one counted Metrika request: `MetrikaBudgetUsedPercent` (Unit Percent) of the
    token's daily budget, dimension `Stage`. `quota_key` (a hash prefix, not the token) and the raw
    counts ride along as plain properties for Logs Insights; they are no dimensions, so one metric per
    stage stays one metric whatever the number of tokens (the alarm takes the Maximum)."""
    percent = 100.0 if budget <= 0 else round(min(used, budget) * 100.0 / budget, 2)
    return json.dumps({
        "_aws": {"Timestamp": timestamp_ms, "CloudWatchMetrics": [{
            "Namespace": NAMESPACE, "Dimensions": [["Stage"]],
            "Metrics": [{"Name": BUDGET_USED_METRIC, "Unit": "Percent"}]}]},
        "Stage": stage, BUDGET_USED_METRIC: percent,
        "quota_key": quota_key, "requests_today": used, "daily_budget": budget,
    }, separators=(",", ":"))


def write_line(line: str) -> None:
    # One write of the whole line: `print` writes the line and its newline apart, and the worker's
    # threads (chalicelib/worker.py) could put another line between them, which CloudWatch cannot parse.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
