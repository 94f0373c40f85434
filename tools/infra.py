"""`make infra STAGE=…`: the stateful resources as two CloudFormation stacks, created and updated in place.

    python -m tools.infra --stage prod [--alarm-email ops@example.com] [--log-retention-days 30]

* `infra/shared.yaml` → stack `metrika-crm-bridge-shared`: the Metrika quota table every stage shares.
* `infra/stage.yaml`  → stack `metrika-crm-bridge-<stage>`: tables, queues, alarm topic, alarms, log groups.

Each is deployed through a change set: CREATE when the stack does not exist, UPDATE otherwise; a change
set without changes is deleted and counts as success, so running it again is harmless. What changed is
printed; a failed operation (CloudFormation rolls it back) exits non-zero with the stack events' reasons.

The parameters come from the code: table and queue names from `settings.py`, the queue's visibility
timeout = 6 × the worker's `lambda_timeout` as Chalice reads `.chalice/config.json` (raise the timeout,
run `make infra`, then `chalice deploy`: the queue is updated in place, its messages kept). The operator
chooses only the log retention and the alarm e-mail; left out, the stack keeps what it has.

**Adopting resources made before the templates.** The first `make infra` created tables and queues with
boto3, and Lambda creates a function's log group on its first run. A stack cannot create what already
exists, so when the stage stack does not exist yet, the named resources that do exist are first imported
(an IMPORT change set with their names and key schema only), and the normal UPDATE then applies every
other property — point-in-time recovery, deletion protection, TTL, the visibility timeout, retention.

boto3 takes the endpoints from its own variables (`AWS_ENDPOINT_URL_CLOUDFORMATION`, …), so this module
runs unchanged against moto_server (tests/test_infra.py). The local stack, the tests' session and the
bench harness take the faster `--emulator` path: the templates' tables and queues made directly
(`create_directly`), because moto's CloudFormation costs ~1.5 s of CPU to load in each server.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterable, TextIO

import boto3
from botocore.exceptions import BotoCoreError, ClientError
from botocore.parsers import ResponseParserError

from chalicelib.settings import APP_NAME, Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
SHARED_TEMPLATE = ROOT / "infra" / "shared.yaml"
STAGE_TEMPLATE = ROOT / "infra" / "stage.yaml"
CHALICE_CONFIG = ROOT / ".chalice" / "config.json"
SHARED_STACK = f"{APP_NAME}-shared"
WORKER_FUNCTION = "on_events_message"
# Lambda's guidance for an SQS event source: visibility timeout ≥ 6 × the function's timeout ("Creating
# and configuring an Amazon SQS event source mapping", https://docs.aws.amazon.com/lambda/latest/dg/services-sqs-configure.html).
VISIBILITY_FACTOR = 6
DEFAULT_LOG_RETENTION_DAYS = 30
POLL_SECONDS = 5.0
MAX_WAIT_SECONDS = 30 * 60
NO_CHANGES = ("didn't contain changes", "No updates are to be performed")
DONE = {"CREATE_COMPLETE", "UPDATE_COMPLETE", "IMPORT_COMPLETE"}  # anything else an operation ends in failed
# Stack states in which a stack holds nothing: CREATE instead of UPDATE (ROLLBACK_COMPLETE is deleted first).
ABSENT = {"REVIEW_IN_PROGRESS", "ROLLBACK_COMPLETE", "DELETE_COMPLETE"}
# The properties an IMPORT declares (the rest follows in the UPDATE, which is how it gets applied: a
# change set compares templates, so a property imported as declared would never be set on the resource).
IMPORT_PROPERTIES = {
    "AWS::DynamoDB::Table": ("TableName", "KeySchema", "AttributeDefinitions", "BillingMode"),
    "AWS::SQS::Queue": ("QueueName",),
    "AWS::Logs::LogGroup": ("LogGroupName",),
}
NAME_PROPERTY = {"AWS::DynamoDB::Table": "TableName", "AWS::SQS::Queue": "QueueName",
                 "AWS::Logs::LogGroup": "LogGroupName"}


class DeployFailed(Exception):
    """A stack operation failed (and was rolled back): the message carries CloudFormation's reasons."""


# --- parameters (pure) -------------------------------------------------------------------------------

def worker_timeout(config: dict, stage: str) -> int:
    """The queue worker's `lambda_timeout` for `stage`, resolved exactly as Chalice resolves it (stage
    function > stage > function > top level > Chalice's default)."""
    from chalice.config import Config  # a dev tool's import: `make infra` runs in the dev venv
    from chalice.constants import DEFAULT_LAMBDA_TIMEOUT
    scoped = Config(chalice_stage=stage, function_name=WORKER_FUNCTION, config_from_disk=config)
    return int(scoped.lambda_timeout or DEFAULT_LAMBDA_TIMEOUT)


def visibility_timeout(config: dict, stage: str) -> int:
    return VISIBILITY_FACTOR * worker_timeout(config, stage)


def shared_parameters(settings: Settings) -> dict[str, str | None]:
    return {"QuotaTableName": settings.quota_table}


def stage_parameters(settings: Settings, *, visibility_timeout_seconds: int, log_retention_days: int | None = None,
                     alarm_email: str | None = None) -> dict[str, str | None]:
    """The stage stack's parameters. The operator's choices (log retention, alarm e-mail) are None when
    not given: the stack keeps its current value (the template's default on creation), so a plain
    `make infra` never drops an e-mail subscription or a retention chosen before."""
    return {"Stage": settings.stage, "ConfigTableName": settings.config_table, "StateTableName": settings.state_table,
            "EventsQueueName": settings.events_queue, "DeadLetterQueueName": settings.dead_letter_queue,
            "VisibilityTimeout": str(visibility_timeout_seconds),
            "LogRetentionDays": None if log_retention_days is None else str(log_retention_days),
            "AlarmEmail": alarm_email}


def fill_parameters(parameters: dict[str, str | None], *, current: dict[str, str],
                    defaults: dict[str, str]) -> dict[str, str]:
    """Every parameter with a value: a None one keeps the stack's current value (what UsePreviousValue
    does, spelt out: moto compares a previous Number with the string sent and sees a change), or takes
    the template's default for a stack being created."""
    filled = {}
    for key, value in parameters.items():
        value = value if value is not None else current.get(key, defaults.get(key))
        if value is not None:
            filled[key] = value
    return filled


def parameter_defaults(template: dict) -> dict[str, str]:
    return {k: str(p["Default"]) for k, p in template.get("Parameters", {}).items() if "Default" in p}


def stage_stack_name(stage: str) -> str:
    return f"{APP_NAME}-{stage}"


# --- templates (pure) --------------------------------------------------------------------------------

def load_template(text: str) -> dict:
    """A CloudFormation YAML template as the JSON form CloudFormation reads (`!Ref x` → {"Ref": x},
    `!GetAtt a.b` → {"Fn::GetAtt": [a, b]}, `!Sub s` → {"Fn::Sub": s}, …)."""
    import yaml  # a dev dependency (requirements-dev.txt), as `make infra` is a dev tool

    class Loader(yaml.SafeLoader):
        pass

    def intrinsic(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> dict:
        if isinstance(node, yaml.ScalarNode):
            value: Any = loader.construct_scalar(node)
        elif isinstance(node, yaml.SequenceNode):
            value = loader.construct_sequence(node, deep=True)
        else:
            value = loader.construct_mapping(node, deep=True)
        if suffix == "GetAtt" and isinstance(value, str):
            value = value.split(".", 1)
        return {suffix if suffix in ("Ref", "Condition") else f"Fn::{suffix}": value}

    Loader.add_multi_constructor("!", intrinsic)
    return yaml.load(text, Loader=Loader)  # noqa: S506 - a SafeLoader subclass


def resolve(value: Any, parameters: dict[str, str | None]) -> Any:
    """A property value with `Ref` to parameters and `Fn::Sub` of parameters resolved (what a resource's
    name is made of here); anything else, or a parameter without a value (None), is left as it is."""
    given = {k: v for k, v in parameters.items() if v is not None}
    if isinstance(value, dict) and set(value) == {"Ref"} and value["Ref"] in given:
        return given[value["Ref"]]
    if isinstance(value, dict) and set(value) == {"Fn::Sub"} and isinstance(value["Fn::Sub"], str):
        text = value["Fn::Sub"]
        for key, replacement in given.items():
            text = text.replace("${" + key + "}", replacement)
        return text
    return value


def named_resources(template: dict, parameters: dict[str, str | None]) -> dict[str, tuple[str, str]]:
    """logical id → (type, name) of every resource this module can look up by name."""
    out = {}
    for logical_id, resource in template["Resources"].items():
        prop = NAME_PROPERTY.get(resource["Type"])
        if prop is not None:
            name = resolve(resource.get("Properties", {}).get(prop), parameters)
            if isinstance(name, str):
                out[logical_id] = (resource["Type"], name)
    return out


def import_plan(template: dict, existing: dict[str, dict[str, str]]) -> tuple[dict, list[dict]]:
    """The template and `ResourcesToImport` of an IMPORT change set adopting `existing` (logical id →
    CloudFormation identifier, e.g. {"TableName": …}): those resources only, with the properties of
    IMPORT_PROPERTIES, their DeletionPolicy, the template's parameters and no outputs (an import may
    add nothing else)."""
    resources, to_import = {}, []
    for logical_id, identifier in sorted(existing.items()):
        resource = template["Resources"][logical_id]
        kept = IMPORT_PROPERTIES[resource["Type"]]
        resources[logical_id] = {
            "Type": resource["Type"],
            "DeletionPolicy": resource.get("DeletionPolicy", "Delete"),
            "Properties": {k: v for k, v in resource.get("Properties", {}).items() if k in kept},
        }
        to_import.append({"ResourceType": resource["Type"], "LogicalResourceId": logical_id,
                          "ResourceIdentifier": identifier})
    body = {"AWSTemplateFormatVersion": template.get("AWSTemplateFormatVersion", "2010-09-09"),
            "Parameters": template.get("Parameters", {}), "Resources": resources}
    return body, to_import


def is_no_change(reason: str) -> bool:
    """CloudFormation's way of saying a change set (or an update) would change nothing."""
    return any(marker in reason for marker in NO_CHANGES)


def failure_reasons(events: Iterable[dict], *, since: str | None) -> list[str]:
    """From stack events (newest first, as DescribeStackEvents lists them), the failed resources'
    reasons recorded after the event `since` (the newest before the operation began), oldest first."""
    reasons = []
    for event in events:
        if since is not None and event["EventId"] == since:
            break
        if event["ResourceStatus"].endswith("FAILED") and event.get("ResourceStatusReason"):
            reasons.append(f"  {event['LogicalResourceId']} ({event.get('ResourceType', '')}): "
                           f"{event['ResourceStatus']}: {event['ResourceStatusReason']}")
    return list(reversed(reasons))


def describe_change(change: dict) -> str:
    """One line per change a change set lists: `Modify EventsQueue (AWS::SQS::Queue): VisibilityTimeout`."""
    rc = change.get("ResourceChange", {})
    details = sorted({d.get("Target", {}).get("Name") for d in rc.get("Details", []) if d.get("Target", {}).get("Name")})
    replacement = f", replacement: {rc['Replacement']}" if rc.get("Replacement") in ("True", "Conditional") else ""
    return (f"{rc.get('Action', '?')} {rc.get('LogicalResourceId', '?')} ({rc.get('ResourceType', '?')})"
            f"{': ' + ', '.join(details) if details else ''}{replacement}")


# --- CloudFormation adapter ----------------------------------------------------------------------------

class Clients:
    """The boto3 clients this module uses, each made on first use (the emulator path needs two of four)."""

    def __init__(self, endpoint_url: str | None = None) -> None:
        self._endpoint_url = endpoint_url

    @classmethod
    def create(cls, endpoint_url: str | None = None) -> "Clients":
        return cls(endpoint_url)

    def _client(self, service: str) -> Any:
        return boto3.client(service, endpoint_url=self._endpoint_url) if self._endpoint_url else boto3.client(service)

    @cached_property
    def cloudformation(self) -> Any:
        return self._client("cloudformation")

    @cached_property
    def dynamodb(self) -> Any:
        return self._client("dynamodb")

    @cached_property
    def sqs(self) -> Any:
        return self._client("sqs")

    @cached_property
    def logs(self) -> Any:
        return self._client("logs")


@dataclass
class StackResult:
    stack: str
    action: str  # "created" | "updated" | "unchanged", prefixed by "imported, " after an import
    changes: list[str] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)


class StackDeployer:
    """One stack through change sets, waiting on an injectable clock (the emulator answers at once)."""

    def __init__(self, clients: Clients, *, out: TextIO | None = None, poll_seconds: float = POLL_SECONDS,
                 max_wait: float = MAX_WAIT_SECONDS, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._clients = clients
        self._out, self._poll, self._max_wait, self._sleep, self._clock = out, poll_seconds, max_wait, sleep, clock

    def deploy(self, stack: str, template_text: str, parameters: dict[str, str | None], *,
               tags: dict[str, str]) -> StackResult:
        status = self._status(stack)
        if status is not None and status.endswith("_IN_PROGRESS") and status != "REVIEW_IN_PROGRESS":
            raise DeployFailed(f"{stack} is busy ({status}); run again when the operation in progress ends")
        if status == "UPDATE_ROLLBACK_FAILED":
            raise DeployFailed(f"{stack} is UPDATE_ROLLBACK_FAILED: fix the cause shown in its events, then "
                               f"`aws cloudformation continue-update-rollback --stack-name {stack}`")
        if status == "ROLLBACK_COMPLETE":
            # A first creation that failed: the stack holds nothing (tables and queues are retained, and
            # the import below adopts them again). CloudFormation only allows deleting it.
            self._say(f"{stack}: ROLLBACK_COMPLETE from an earlier failed creation; deleting the empty stack")
            started = self._latest_event_id(stack)
            self._clients.cloudformation.delete_stack(StackName=stack)
            self._wait_stack(stack, after=started)
        current = self._parameters(stack) if status is not None and status not in ABSENT else {}
        parameters = fill_parameters(parameters, current=current, defaults=parameter_defaults(load_template(template_text)))
        imported = False
        if status is None or status in ABSENT:
            imported = self._import_existing(stack, template_text, parameters, tags)
        change_type = "UPDATE" if imported or (status is not None and status not in ABSENT) else "CREATE"
        result = self._apply(stack, change_type, {"TemplateBody": template_text}, parameters, tags)
        if imported:
            result.action = f"imported, {result.action}"
        result.outputs = self._outputs(stack)
        return result

    # --- steps ---

    def _import_existing(self, stack: str, template_text: str, parameters: dict[str, str],
                         tags: dict[str, str]) -> bool:
        template = load_template(template_text)
        existing = self._existing(named_resources(template, parameters))
        if not existing:
            return False
        body, to_import = import_plan(template, existing)
        self._say(f"{stack}: adopting resources that already exist: "
                  + ", ".join(f"{r['LogicalResourceId']} ({next(iter(r['ResourceIdentifier'].values()))})" for r in to_import))
        self._apply(stack, "IMPORT", {"TemplateBody": json.dumps(body), "ResourcesToImport": to_import},
                    parameters, tags)
        return True

    def _apply(self, stack: str, change_type: str, template: dict, parameters: dict[str, str],
               tags: dict[str, str]) -> StackResult:
        name = f"make-infra-{change_type.lower()}-{int(time.time() * 1000)}"
        try:
            self._clients.cloudformation.create_change_set(
                StackName=stack, ChangeSetName=name, ChangeSetType=change_type, **template,
                Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in parameters.items()],
                # An import only adopts (tagging adopted resources could fail it); the UPDATE right after
                # tags the stack and, through it, what it holds.
                Tags=[] if change_type == "IMPORT" else [{"Key": k, "Value": v} for k, v in tags.items()])
        except ClientError as exc:
            # CloudFormation creates a FAILED change set (below); moto refuses at once, as UpdateStack does.
            if is_no_change(str(exc)):
                self._say(f"{stack}: no changes")
                return StackResult(stack, "unchanged")
            raise DeployFailed(f"{stack}: {change_type} change set refused: {exc}") from exc
        change_set = self._wait_change_set(stack, name)
        if change_set["Status"] == "FAILED":
            reason = change_set.get("StatusReason", "")
            if is_no_change(reason):
                self._clients.cloudformation.delete_change_set(StackName=stack, ChangeSetName=name)
                self._say(f"{stack}: no changes")
                return StackResult(stack, "unchanged")
            self._clients.cloudformation.delete_change_set(StackName=stack, ChangeSetName=name)
            raise DeployFailed(f"{stack}: change set {name} failed: {reason}")
        changes = [describe_change(c) for c in change_set.get("Changes", [])]
        for line in changes:
            self._say(f"{stack}: {line}")
        started = self._latest_event_id(stack)
        try:
            self._clients.cloudformation.execute_change_set(StackName=stack, ChangeSetName=name)
        except (ClientError, BotoCoreError, ResponseParserError) as exc:  # CloudFormation reports failures
            # in the stack events; moto answers the call with them (an IMPORT, which it does not emulate,
            # even in DynamoDB's JSON, which botocore cannot parse as CloudFormation's XML)
            raise DeployFailed(f"{stack}: executing {change_type} failed: {exc}") from exc
        final = self._wait_stack(stack, after=started)
        if final not in DONE:
            reasons = self._failures(stack, since=started) or ["  (no reason in the stack events)"]
            raise DeployFailed("\n".join([f"{stack}: {final}", *reasons]))
        action = {"CREATE": "created", "UPDATE": "updated", "IMPORT": "imported"}[change_type]
        self._say(f"{stack}: {final}")
        return StackResult(stack, action, changes)

    # --- reads ---

    def _status(self, stack: str) -> str | None:
        try:
            return self._clients.cloudformation.describe_stacks(StackName=stack)["Stacks"][0]["StackStatus"]
        except ClientError as exc:
            if "does not exist" in str(exc):
                return None
            raise

    def _parameters(self, stack: str) -> dict[str, str]:
        described = self._clients.cloudformation.describe_stacks(StackName=stack)["Stacks"][0]
        return {p["ParameterKey"]: p["ParameterValue"] for p in described.get("Parameters") or []}

    def _outputs(self, stack: str) -> dict[str, str]:
        described = self._clients.cloudformation.describe_stacks(StackName=stack)["Stacks"][0]
        return {o["OutputKey"]: o["OutputValue"] for o in described.get("Outputs") or []}

    def _existing(self, named: dict[str, tuple[str, str]]) -> dict[str, dict[str, str]]:
        """logical id → import identifier of each named resource that exists outside any stack."""
        found: dict[str, dict[str, str]] = {}
        for logical_id, (kind, name) in named.items():
            if kind == "AWS::DynamoDB::Table":
                try:
                    self._clients.dynamodb.describe_table(TableName=name)
                    found[logical_id] = {"TableName": name}
                except ClientError as exc:
                    if exc.response["Error"]["Code"] != "ResourceNotFoundException":
                        raise
            elif kind == "AWS::SQS::Queue":
                try:
                    found[logical_id] = {"QueueUrl": self._clients.sqs.get_queue_url(QueueName=name)["QueueUrl"]}
                except ClientError as exc:
                    if "NonExistentQueue" not in exc.response["Error"]["Code"]:
                        raise
            elif kind == "AWS::Logs::LogGroup":
                groups = self._clients.logs.describe_log_groups(logGroupNamePrefix=name)["logGroups"]
                if any(g["logGroupName"] == name for g in groups):
                    found[logical_id] = {"LogGroupName": name}
        return found

    def _latest_event_id(self, stack: str) -> str | None:
        events = self._clients.cloudformation.describe_stack_events(StackName=stack).get("StackEvents", [])
        return events[0]["EventId"] if events else None

    def _failures(self, stack: str, *, since: str | None) -> list[str]:
        pages = self._clients.cloudformation.get_paginator("describe_stack_events").paginate(StackName=stack)
        return failure_reasons((event for page in pages for event in page["StackEvents"]), since=since)

    def _wait_change_set(self, stack: str, name: str) -> dict:
        deadline = self._clock() + self._max_wait
        while True:
            change_set = self._describe_change_set(stack, name)
            if change_set["Status"] in ("CREATE_COMPLETE", "FAILED"):
                return change_set
            if self._clock() >= deadline:
                raise DeployFailed(f"{stack}: change set {name} still {change_set['Status']} after {self._max_wait:.0f} s")
            self._sleep(self._poll)

    def _describe_change_set(self, stack: str, name: str) -> dict:
        pages = self._clients.cloudformation.get_paginator("describe_change_set").paginate(StackName=stack, ChangeSetName=name)
        first: dict | None = None
        for page in pages:
            if first is None:
                first = page
            else:
                first["Changes"] = first.get("Changes", []) + page.get("Changes", [])
        assert first is not None
        return first

    def _wait_stack(self, stack: str, *, after: str | None) -> str:
        """The stack's status once the operation started after event `after` has ended: a status that is
        no longer *_IN_PROGRESS, with an event newer than `after` (so an earlier operation's final
        status, read before this one shows, is not taken for its end). DELETE_COMPLETE once gone."""
        deadline = self._clock() + self._max_wait
        while True:
            try:
                status = self._clients.cloudformation.describe_stacks(StackName=stack)["Stacks"][0]["StackStatus"]
            except ClientError as exc:
                if "does not exist" in str(exc):
                    return "DELETE_COMPLETE"
                raise
            if not status.endswith("_IN_PROGRESS") and self._latest_event_id(stack) != after:
                return status
            if self._clock() >= deadline:
                raise DeployFailed(f"{stack}: still {status} after {self._max_wait:.0f} s")
            self._sleep(self._poll)

    def _say(self, line: str) -> None:
        if self._out is not None:
            print(line, file=self._out, flush=True)


# --- the emulator's fast path ---------------------------------------------------------------------------

def create_directly(clients: Clients, template: dict, parameters: dict[str, str | None]) -> list[str]:
    """The template's tables and queues, made through the DynamoDB and SQS APIs; idempotent, and an
    existing queue gets the template's attributes. For moto_server sessions (tests, bench, `make run`):
    0.45 s for both templates on a fresh server, against 1.9 s through moto's CloudFormation (which
    costs ~1.5 s of CPU to load). The topic, alarms and log groups are left out (nothing local reads
    them). Returns the names of what it made."""
    made: list[str] = []
    queue_arns: dict[str, str] = {}

    def value(raw: Any) -> Any:
        if isinstance(raw, dict) and set(raw) == {"Fn::GetAtt"} and raw["Fn::GetAtt"][1] == "Arn":
            return queue_arns[raw["Fn::GetAtt"][0]]  # a queue declared earlier in the template
        if isinstance(raw, dict) and not set(raw) & {"Ref", "Fn::Sub", "Fn::GetAtt"}:
            return {k: value(v) for k, v in raw.items()}
        return resolve(raw, parameters)

    for logical_id, resource in template["Resources"].items():
        props = {k: value(v) for k, v in resource.get("Properties", {}).items()}
        if resource["Type"] == "AWS::DynamoDB::Table":
            db = clients.dynamodb
            try:
                db.create_table(TableName=props["TableName"], KeySchema=props["KeySchema"],
                                AttributeDefinitions=props["AttributeDefinitions"], BillingMode=props["BillingMode"],
                                DeletionProtectionEnabled=bool(props.get("DeletionProtectionEnabled", False)))
                made.append(props["TableName"])
            except ClientError as exc:
                if exc.response["Error"]["Code"] != "ResourceInUseException":
                    raise
            if props.get("PointInTimeRecoverySpecification", {}).get("PointInTimeRecoveryEnabled"):
                db.update_continuous_backups(TableName=props["TableName"],
                                             PointInTimeRecoverySpecification={"PointInTimeRecoveryEnabled": True})
            ttl = props.get("TimeToLiveSpecification")
            if ttl and db.describe_time_to_live(TableName=props["TableName"])["TimeToLiveDescription"].get(
                    "TimeToLiveStatus") not in ("ENABLED", "ENABLING"):
                db.update_time_to_live(TableName=props["TableName"], TimeToLiveSpecification={
                    "AttributeName": ttl["AttributeName"], "Enabled": bool(ttl["Enabled"])})
        elif resource["Type"] == "AWS::SQS::Queue":
            attributes = {k: json.dumps(v) if isinstance(v, dict) else str(v)
                          for k, v in props.items() if k != "QueueName"}
            try:  # an existing queue takes the template's attributes (CreateQueue would refuse other ones)
                url = clients.sqs.get_queue_url(QueueName=props["QueueName"])["QueueUrl"]
                clients.sqs.set_queue_attributes(QueueUrl=url, Attributes=attributes)
            except ClientError as exc:
                if "NonExistentQueue" not in exc.response["Error"]["Code"]:
                    raise
                url = clients.sqs.create_queue(QueueName=props["QueueName"], Attributes=attributes)["QueueUrl"]
                made.append(props["QueueName"])
            queue_arns[logical_id] = clients.sqs.get_queue_attributes(
                QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    return made


# --- entry points --------------------------------------------------------------------------------------

def ensure_resources(settings: Settings | None = None, *, emulator: bool = False, clients: Clients | None = None,
                     chalice_config: dict | None = None, log_retention_days: int | None = None,
                     alarm_email: str | None = None, out: TextIO | None = None, **deployer_options: Any) -> dict:
    """Deploy the shared stack, then the stage's; returns each stack's result and outputs. `emulator`:
    the template's tables and queues only, straight through their APIs (`create_directly`): the local
    stack, the tests' session and the bench harness, on moto_server."""
    settings = settings or load_settings()
    clients = clients or Clients.create()
    config = chalice_config if chalice_config is not None else json.loads(CHALICE_CONFIG.read_text())
    shared_params = shared_parameters(settings)
    stage_params = stage_parameters(settings, visibility_timeout_seconds=visibility_timeout(config, settings.stage),
                                    log_retention_days=log_retention_days, alarm_email=alarm_email)
    if emulator:
        return {"created": create_directly(clients, load_template(SHARED_TEMPLATE.read_text()), shared_params)
                + create_directly(clients, load_template(STAGE_TEMPLATE.read_text()), stage_params)}
    deployer = StackDeployer(clients, out=out, **deployer_options)
    tags = {"app": APP_NAME}
    shared = deployer.deploy(SHARED_STACK, SHARED_TEMPLATE.read_text(), shared_params, tags=tags)
    stage = deployer.deploy(stage_stack_name(settings.stage), STAGE_TEMPLATE.read_text(), stage_params,
                            tags={**tags, "stage": settings.stage})
    return {"shared": shared.__dict__, "stage": stage.__dict__}


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Create or update the metrika-crm-bridge stacks (idempotent).")
    parser.add_argument("--stage", default="dev")
    parser.add_argument("--alarm-email", default=os.environ.get("ALARM_EMAIL"),
                        help="subscribe this address to the stage's alarm topic (env ALARM_EMAIL; \"\" removes it; "
                             "left out: kept as it is)")
    parser.add_argument("--log-retention-days", type=int,
                        default=int(os.environ["LOG_RETENTION_DAYS"]) if os.environ.get("LOG_RETENTION_DAYS") else None,
                        help=f"days each function's log is kept (env LOG_RETENTION_DAYS; left out: kept as it is, "
                             f"{DEFAULT_LOG_RETENTION_DAYS} on creation)")
    parser.add_argument("--emulator", action="store_true",
                        help="moto_server (make run): the tables and queues straight through their APIs")
    args = parser.parse_args(None if argv is None else list(argv))
    stages = json.loads(CHALICE_CONFIG.read_text()).get("stages", {})
    if args.stage not in stages:  # a typo would otherwise get a stack of its own that no deploy uses
        print(f"make infra: stage {args.stage!r} is not in .chalice/config.json (stages: {', '.join(stages)})",
              file=sys.stderr)
        return 2
    settings = load_settings({**os.environ, "STAGE": args.stage})
    try:
        result = ensure_resources(settings, emulator=args.emulator, log_retention_days=args.log_retention_days,
                                  alarm_email=args.alarm_email, out=sys.stdout)
    except (DeployFailed, ClientError, BotoCoreError) as exc:  # BotoCoreError: no credentials, no region, …
        print(f"make infra failed: {exc}", file=sys.stderr)
        return 1
    if args.emulator:
        print(json.dumps(result))
        return 0
    print(json.dumps({name: {"action": r["action"], "outputs": r["outputs"]} for name, r in result.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
