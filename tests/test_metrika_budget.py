"""Metrika's limits per token across stages, and the budget metric (CloudWatch Embedded Metric Format).

The governor of each stage runs on its own DynamoStore (its own config and state tables) and one quota
table, as deployed; the EMF line is checked against the specification's shape ("Specification:
Embedded metric format", https://docs.aws.amazon.com/AmazonCloudWatch/latest/monitoring/CloudWatch_Embedded_Metric_Format_Specification.html).
"""
from __future__ import annotations

import json
import uuid
from contextlib import ExitStack

import boto3
import pytest

from chalicelib.errors import Transient
from chalicelib.metrics import BUDGET_USED_METRIC, NAMESPACE, budget_used_line
from chalicelib.metrika.governor import QuotaGovernor, quota_key
from chalicelib.store.memory import MemoryStore

NOW = 1_750_000_000.0  # 2025-06-15T15:06:40Z
MS = int(NOW * 1000)


class Clock:
    def __init__(self, t: float = NOW) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += seconds


def assert_emf(line: str, *, stage: str, percent: float) -> dict:
    """One JSON object on one line, as the EMF specification requires of a log event: `_aws` with a
    millisecond Timestamp and one metric directive; every dimension and metric it names present at the
    root, the dimension a string and the metric a number."""
    assert "\n" not in line
    document = json.loads(line)
    metadata = document["_aws"]
    assert isinstance(metadata["Timestamp"], int) and metadata["Timestamp"] > 10**12
    (directive,) = metadata["CloudWatchMetrics"]
    assert directive == {"Namespace": NAMESPACE, "Dimensions": [["Stage"]],
                         "Metrics": [{"Name": BUDGET_USED_METRIC, "Unit": "Percent"}]}
    assert document["Stage"] == stage and isinstance(document["Stage"], str)
    value = document[BUDGET_USED_METRIC]
    assert isinstance(value, (int, float)) and not isinstance(value, bool) and value == percent
    return document


def test_budget_line_shape_and_percent():
    line = budget_used_line(stage="prod", used=4000, budget=5000, quota_key="abc", timestamp_ms=int(NOW * 1000))
    document = assert_emf(line, stage="prod", percent=80.0)
    assert document["_aws"]["Timestamp"] == 1_750_000_000_000
    assert (document["requests_today"], document["daily_budget"], document["quota_key"]) == (4000, 5000, "abc")
    assert_emf(budget_used_line(stage="dev", used=1, budget=3, quota_key="k", timestamp_ms=MS), stage="dev", percent=33.33)
    assert_emf(budget_used_line(stage="dev", used=7, budget=5, quota_key="k", timestamp_ms=MS), stage="dev", percent=100.0)
    assert_emf(budget_used_line(stage="dev", used=1, budget=0, quota_key="k", timestamp_ms=MS), stage="dev", percent=100.0)


def test_each_counted_request_emits_one_line_and_a_spent_budget_emits_100():
    token, clock, lines = "y0_" + uuid.uuid4().hex, Clock(), []
    governor = QuotaGovernor(MemoryStore(clock=clock), token, daily_budget=2, stage="prod", clock=clock,
                             sleep=clock.sleep, emit=lines.append)
    for _ in range(2):
        with governor.request():
            pass
    with pytest.raises(Transient) as refused:
        with governor.request():
            pytest.fail("a request past the budget must not run")
    assert refused.value.daily_quota
    assert [json.loads(line)[BUDGET_USED_METRIC] for line in lines] == [50.0, 100.0, 100.0]
    for line in lines:
        assert_emf(line, stage="prod", percent=json.loads(line)[BUDGET_USED_METRIC])
        assert token not in line and json.loads(line)["quota_key"] == quota_key(token)


def test_the_default_metric_goes_to_stdout_as_one_line(capsys):
    clock = Clock()
    governor = QuotaGovernor(MemoryStore(clock=clock), "y0_" + uuid.uuid4().hex, daily_budget=4, stage="dev",
                             clock=clock, sleep=clock.sleep)
    with governor.request():
        pass
    (line,) = capsys.readouterr().out.splitlines()
    assert_emf(line, stage="dev", percent=25.0)


def test_dev_and_prod_on_one_token_share_three_slots_and_one_budget(service_env):
    """Two stages' stores on the emulator: their own tables, the one quota table. Governors on both
    hold at most 3 requests in flight together and spend one daily budget."""
    from tools.infra import Clients, ensure_resources
    from chalicelib.settings import load_settings
    from chalicelib.store.dynamodb import DynamoStore
    clock, token, client = Clock(), "y0_" + uuid.uuid4().hex, boto3.client("dynamodb")
    governors, lines = {}, []
    for stage in ("dev", "prod"):
        settings = load_settings({"STAGE": stage})
        ensure_resources(settings, emulator=True, clients=Clients.create())
        store = DynamoStore(client, settings.config_table, settings.state_table, quota_table=settings.quota_table,
                            clock=clock)
        governors[stage] = QuotaGovernor(store, token, daily_budget=5, max_wait=1, stage=stage, clock=clock,
                                         sleep=clock.sleep, emit=lines.append)
    dev, prod = governors["dev"], governors["prod"]
    with ExitStack() as held:
        for governor in (dev, prod, dev):
            held.enter_context(governor.request())
        for governor in (prod, dev):
            with pytest.raises(Transient, match="already in flight"):
                with governor.request():
                    pytest.fail("a fourth request in flight")
    with prod.request():  # the three finished: a slot is free again
        pass
    assert dev.used_today() == prod.used_today() == 4
    with dev.request():
        pass
    with pytest.raises(Transient) as refused:
        with prod.request():
            pass
    assert refused.value.daily_quota and dev.remaining() == prod.remaining() == 0
    assert [json.loads(line)["Stage"] for line in lines] == ["dev", "prod", "dev", "prod", "dev", "prod"]
    assert [json.loads(line)[BUDGET_USED_METRIC] for line in lines] == [20.0, 40.0, 60.0, 80.0, 100.0, 100.0]
