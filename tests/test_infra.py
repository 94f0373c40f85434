"""`make infra`: the two CloudFormation templates, and tools/infra.py deploying them through change
sets — on a moto_server of this module's own (moto's CloudFormation takes ~2 s to load, paid once here),
and against what `chalice deploy` names where the emulator cannot tell (alarms, log group names).

moto does not emulate: IMPORT change sets (it tries to create the resources: the test checks what it
received, and the plan is checked as a pure function), rollback and failed
resource events, Outputs of a stack made by a change set, parameter constraints (AllowedValues,
MinValue), the change list of a parameter-only update, a log group's new retention on update, "no
changes" after a parameter update (it keeps comparing with the parameters the stack was created with),
AWS::CloudWatch::Alarm and AWS::SNS::Subscription (skipped with a warning), and a table's
TimeToLiveSpecification / PointInTimeRecoverySpecification (ignored). Those parts are checked as pure functions or on the templates themselves.
"""
from __future__ import annotations

import copy
import io
import json
import os
from pathlib import Path

import boto3
import pytest

from tools import infra
from chalicelib.queue import MAX_RECEIVE_COUNT
from chalicelib.settings import load_settings

ROOT = Path(__file__).resolve().parent.parent
CHALICE_CONFIG = json.loads((ROOT / ".chalice" / "config.json").read_text())
STAGE = infra.load_template(infra.STAGE_TEMPLATE.read_text())
SHARED = infra.load_template(infra.SHARED_TEMPLATE.read_text())


def chalice_functions(stage: str) -> dict[str, str]:
    """Chalice's name of each function → its name in AWS, from the graph `chalice deploy` builds."""
    from chalice.cli.factory import CLIFactory
    from chalice.deploy import models
    from chalice.deploy.appgraph import ApplicationGraphBuilder
    config = CLIFactory(str(ROOT)).create_config_obj(chalice_stage_name=stage)
    found: dict[str, str] = {}

    def walk(resource) -> None:
        if isinstance(resource, models.LambdaFunction):
            found[resource.resource_name] = resource.function_name
        elif isinstance(resource, models.RestAPI):
            walk(resource.lambda_function)
            for authorizer in resource.authorizers:
                walk(authorizer)
        elif hasattr(resource, "lambda_function"):  # the SQS event source, the schedules
            walk(resource.lambda_function)

    for resource in ApplicationGraphBuilder().build(config, stage).resources:
        walk(resource)
    return found


def stage_params(stage: str, **overrides) -> dict[str, str]:
    settings = load_settings({"STAGE": stage})
    return {**infra.stage_parameters(settings, visibility_timeout_seconds=infra.visibility_timeout(CHALICE_CONFIG, stage)),
            **overrides}


# --- the templates, as `chalice deploy` will meet them ---------------------------------------------------

@pytest.mark.parametrize("stage", ["dev", "prod"])
def test_every_function_chalice_deploys_has_its_log_group_and_the_alarms_watch_them(stage):
    functions = chalice_functions(stage)
    assert set(functions) == {"api_handler", "admin", "on_events_message", "reconcile_all", "confirm_uploads",
                              "refresh_tokens"}
    assert functions["api_handler"] == f"metrika-crm-bridge-{stage}"  # Chalice's back-compat exception
    params = stage_params(stage)
    groups = {infra.resolve(r["Properties"]["LogGroupName"], params): infra.resolve(r["Properties"]["RetentionInDays"], params)
              for r in STAGE["Resources"].values() if r["Type"] == "AWS::Logs::LogGroup"}
    assert groups == {f"/aws/lambda/{name}": {"Ref": "LogRetentionDays"} for name in functions.values()}
    alarms = {logical_id: r["Properties"] for logical_id, r in STAGE["Resources"].items() if r["Type"] == "AWS::CloudWatch::Alarm"}
    worker = alarms["WorkerErrorsAlarm"]["Dimensions"]
    assert [(d["Name"], infra.resolve(d["Value"], params)) for d in worker] == [("FunctionName", functions["on_events_message"])]
    config = __import__("chalice.cli.factory", fromlist=["CLIFactory"]).CLIFactory(str(ROOT)).create_config_obj(
        chalice_stage_name=stage)
    api = {d["Name"]: d["Value"] for d in alarms["ApiServerErrorsAlarm"]["Dimensions"]}
    # API Gateway names the metric after the REST API, which Chalice names after the app (swagger title).
    assert api == {"ApiName": config.app_name, "Stage": config.api_gateway_stage}


def test_the_alarms_are_those_of_the_issue_and_each_notifies_the_topic():
    alarms = {r["Properties"].get("MetricName", logical_id): r["Properties"] for logical_id, r in STAGE["Resources"].items()
              if r["Type"] == "AWS::CloudWatch::Alarm"}
    schedules = alarms.pop("ScheduleErrorsAlarm")  # one more than the issue asks: the two schedules' errors
    watched = {m["Id"]: m["MetricStat"]["Metric"] for m in schedules["Metrics"] if "MetricStat" in m}
    params = stage_params("prod")
    assert {k: (m["MetricName"], infra.resolve(m["Dimensions"][0]["Value"], params)) for k, m in watched.items()} == {
        "reconcile": ("Errors", chalice_functions("prod")["reconcile_all"]),
        "confirm": ("Errors", chalice_functions("prod")["confirm_uploads"]),
        "refresh": ("Errors", chalice_functions("prod")["refresh_tokens"])}
    assert [m["Expression"] for m in schedules["Metrics"] if m.get("ReturnData")] == [
        "FILL(reconcile, 0) + FILL(confirm, 0) + FILL(refresh, 0)"]
    assert (schedules["ComparisonOperator"], schedules["Threshold"]) == ("GreaterThanThreshold", 0)
    assert schedules["AlarmActions"] == [{"Ref": "AlarmTopic"}]
    assert {(p["Namespace"], name, p["Statistic"], p["ComparisonOperator"], p["Threshold"]) for name, p in alarms.items()} == {
        ("AWS/SQS", "ApproximateNumberOfMessagesVisible", "Maximum", "GreaterThanThreshold", 0),
        ("AWS/SQS", "ApproximateAgeOfOldestMessage", "Maximum", "GreaterThanThreshold", 1200),
        ("AWS/Lambda", "Errors", "Sum", "GreaterThanThreshold", 0),
        ("AWS/ApiGateway", "5XXError", "Sum", "GreaterThanThreshold", 0),
        ("metrika-crm-bridge", "MetrikaBudgetUsedPercent", "Maximum", "GreaterThanThreshold", 80)}
    assert alarms["ApproximateNumberOfMessagesVisible"]["Dimensions"] == [
        {"Name": "QueueName", "Value": {"Fn::GetAtt": ["DeadLetterQueue", "QueueName"]}}]
    assert alarms["ApproximateAgeOfOldestMessage"]["Dimensions"] == [
        {"Name": "QueueName", "Value": {"Fn::GetAtt": ["EventsQueue", "QueueName"]}}]
    assert alarms["MetrikaBudgetUsedPercent"]["Dimensions"] == [{"Name": "Stage", "Value": {"Ref": "Stage"}}]
    # Longer than the longest wait by design: a retry's delay (SQS's 900 s cap) plus one worker run.
    worker_timeout = max(infra.worker_timeout(CHALICE_CONFIG, stage) for stage in CHALICE_CONFIG["stages"])
    assert alarms["ApproximateAgeOfOldestMessage"]["Threshold"] >= 900 + min(worker_timeout, 300)
    for props in alarms.values():
        assert props["AlarmActions"] == props["OKActions"] == [{"Ref": "AlarmTopic"}]
        assert props["TreatMissingData"] == "notBreaching" and props["EvaluationPeriods"] == 1


def test_state_is_kept_safe_and_expires_where_it_should():
    tables = {**{k: r for k, r in STAGE["Resources"].items() if r["Type"] == "AWS::DynamoDB::Table"},
              **{k: r for k, r in SHARED["Resources"].items() if r["Type"] == "AWS::DynamoDB::Table"}}
    assert set(tables) == {"ConfigTable", "StateTable", "QuotaTable"}
    for logical_id, table in tables.items():
        props = table["Properties"]
        assert (table["DeletionPolicy"], table["UpdateReplacePolicy"]) == ("Retain", "Retain"), logical_id
        assert props["KeySchema"] == [{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "sk", "KeyType": "RANGE"}]
        assert props["AttributeDefinitions"] == [{"AttributeName": "pk", "AttributeType": "S"},
                                                 {"AttributeName": "sk", "AttributeType": "S"}]
        assert props["BillingMode"] == "PAY_PER_REQUEST" and props["DeletionProtectionEnabled"] is True
        assert props["PointInTimeRecoverySpecification"] == {"PointInTimeRecoveryEnabled": True}
    ttl = {"AttributeName": "expires_at", "Enabled": True}  # the attribute chalicelib.store writes
    assert tables["StateTable"]["Properties"]["TimeToLiveSpecification"] == ttl
    assert tables["QuotaTable"]["Properties"]["TimeToLiveSpecification"] == ttl
    assert "TimeToLiveSpecification" not in tables["ConfigTable"]["Properties"]  # integrations never expire
    events, dlq = STAGE["Resources"]["EventsQueue"], STAGE["Resources"]["DeadLetterQueue"]
    assert events["DeletionPolicy"] == dlq["DeletionPolicy"] == "Retain"
    assert events["Properties"]["RedrivePolicy"] == {"deadLetterTargetArn": {"Fn::GetAtt": ["DeadLetterQueue", "Arn"]},
                                                     "maxReceiveCount": MAX_RECEIVE_COUNT}  # the worker flags on that receive
    assert events["Properties"]["VisibilityTimeout"] == {"Ref": "VisibilityTimeout"}
    # A dead-lettered message keeps its first enqueue time: the DLQ must keep messages longer.
    assert dlq["Properties"]["MessageRetentionPeriod"] == 14 * 86400 > events["Properties"]["MessageRetentionPeriod"]
    assert set(STAGE["Outputs"]) == {"ConfigTableName", "StateTableName", "EventsQueueUrl", "EventsQueueArn",
                                     "DeadLetterQueueUrl", "DeadLetterQueueArn", "AlarmTopicArn"}


def test_the_worker_timeout_is_read_as_chalice_reads_it():
    base = {"version": "2.0", "app_name": "a", "lambda_timeout": 10, "stages": {"s": {}}}
    assert infra.worker_timeout({"version": "2.0", "app_name": "a", "stages": {"s": {}}}, "s") == 60  # Chalice's default
    assert infra.worker_timeout(base, "s") == 10
    top_function = {**base, "lambda_functions": {"on_events_message": {"lambda_timeout": 20}}}
    assert infra.worker_timeout(top_function, "s") == 20
    stage_level = copy.deepcopy(top_function)
    stage_level["stages"]["s"]["lambda_timeout"] = 30
    assert infra.worker_timeout(stage_level, "s") == 30  # a stage's value beats the top-level function's
    stage_function = copy.deepcopy(stage_level)
    stage_function["stages"]["s"]["lambda_functions"] = {"on_events_message": {"lambda_timeout": 300},
                                                         "reconcile_all": {"lambda_timeout": 900}}
    assert infra.visibility_timeout(stage_function, "s") == 1800
    for stage in CHALICE_CONFIG["stages"]:
        assert stage_params(stage)["VisibilityTimeout"] == str(6 * infra.worker_timeout(CHALICE_CONFIG, stage))


# --- adopting what the first `make infra` made (IMPORT: not emulated, so checked as a plan) ---------------

def test_an_import_declares_only_the_existing_resources_by_name_and_keys():
    existing = {"ConfigTable": {"TableName": "metrika-crm-bridge-prod-config"},
                "EventsQueue": {"QueueUrl": "https://sqs.eu-central-1.amazonaws.com/1/metrika-crm-bridge-prod-events"},
                "WorkerLogGroup": {"LogGroupName": "/aws/lambda/metrika-crm-bridge-prod-on_events_message"}}
    body, to_import = infra.import_plan(STAGE, existing)
    assert set(body) == {"AWSTemplateFormatVersion", "Parameters", "Resources"}  # an import may add no outputs
    assert body["Parameters"] == STAGE["Parameters"]
    assert body["Resources"] == {
        "ConfigTable": {"Type": "AWS::DynamoDB::Table", "DeletionPolicy": "Retain", "Properties": {
            "TableName": {"Ref": "ConfigTableName"}, "BillingMode": "PAY_PER_REQUEST",
            "AttributeDefinitions": STAGE["Resources"]["ConfigTable"]["Properties"]["AttributeDefinitions"],
            "KeySchema": STAGE["Resources"]["ConfigTable"]["Properties"]["KeySchema"]}},
        # The visibility timeout, the redrive policy, PITR, deletion protection and retention are left to the
        # UPDATE that follows: a change set compares templates, so what the import declared would never be set.
        "EventsQueue": {"Type": "AWS::SQS::Queue", "DeletionPolicy": "Retain",
                        "Properties": {"QueueName": {"Ref": "EventsQueueName"}}},
        "WorkerLogGroup": {"Type": "AWS::Logs::LogGroup", "DeletionPolicy": "Delete", "Properties": {
            "LogGroupName": {"Fn::Sub": "/aws/lambda/metrika-crm-bridge-${Stage}-on_events_message"}}}}
    assert to_import == [
        {"ResourceType": "AWS::DynamoDB::Table", "LogicalResourceId": "ConfigTable", "ResourceIdentifier": existing["ConfigTable"]},
        {"ResourceType": "AWS::SQS::Queue", "LogicalResourceId": "EventsQueue", "ResourceIdentifier": existing["EventsQueue"]},
        {"ResourceType": "AWS::Logs::LogGroup", "LogicalResourceId": "WorkerLogGroup",
         "ResourceIdentifier": existing["WorkerLogGroup"]}]
    json.dumps(body)  # sent as JSON


def test_named_resources_resolve_every_name_the_stage_owns():
    named = infra.named_resources(STAGE, stage_params("prod"))
    assert named == {
        "ConfigTable": ("AWS::DynamoDB::Table", "metrika-crm-bridge-prod-config"),
        "StateTable": ("AWS::DynamoDB::Table", "metrika-crm-bridge-prod-state"),
        "DeadLetterQueue": ("AWS::SQS::Queue", "metrika-crm-bridge-prod-events-dlq"),
        "EventsQueue": ("AWS::SQS::Queue", "metrika-crm-bridge-prod-events"),
        **{k: ("AWS::Logs::LogGroup", f"/aws/lambda/{name}") for k, name in zip(
            ["ApiHandlerLogGroup", "AdminLogGroup", "WorkerLogGroup", "ReconcileLogGroup", "ConfirmLogGroup",
             "RefreshTokensLogGroup"],
            ["metrika-crm-bridge-prod", "metrika-crm-bridge-prod-admin", "metrika-crm-bridge-prod-on_events_message",
             "metrika-crm-bridge-prod-reconcile_all", "metrika-crm-bridge-prod-confirm_uploads",
             "metrika-crm-bridge-prod-refresh_tokens"])}}
    assert infra.named_resources(SHARED, {"QuotaTableName": "q"}) == {"QuotaTable": ("AWS::DynamoDB::Table", "q")}


# --- what CloudFormation answers (pure) -------------------------------------------------------------------

def test_failure_reasons_are_the_last_operations_oldest_first():
    def event(i, logical_id, status, reason=None):
        return {"EventId": f"e{i}", "LogicalResourceId": logical_id, "ResourceType": "AWS::SQS::Queue",
                "ResourceStatus": status, **({"ResourceStatusReason": reason} if reason else {})}
    events = [event(9, "stack", "UPDATE_ROLLBACK_COMPLETE"),
              event(8, "EventsQueue", "UPDATE_FAILED", "Value 50000 for VisibilityTimeout is out of range"),
              event(7, "StateTable", "UPDATE_FAILED", "Resource update cancelled"),
              event(6, "StateTable", "UPDATE_IN_PROGRESS"),
              event(5, "stack", "UPDATE_IN_PROGRESS", "User Initiated"),
              event(4, "Old", "CREATE_FAILED", "an earlier operation's failure")]
    assert infra.failure_reasons(events, since="e4") == [
        "  StateTable (AWS::SQS::Queue): UPDATE_FAILED: Resource update cancelled",
        "  EventsQueue (AWS::SQS::Queue): UPDATE_FAILED: Value 50000 for VisibilityTimeout is out of range"]
    assert len(infra.failure_reasons(events, since=None)) == 3
    assert infra.failure_reasons(events, since="e9") == []


def test_parameters_left_out_keep_the_stacks_values():
    params = {"Stage": "prod", "AlarmEmail": None, "LogRetentionDays": None}
    defaults = infra.parameter_defaults(STAGE)
    assert defaults == {"LogRetentionDays": "30", "AlarmEmail": ""}
    assert infra.fill_parameters(params, current={"Stage": "prod", "AlarmEmail": "ops@example.com", "LogRetentionDays": "90"},
                                 defaults=defaults) == {"Stage": "prod", "AlarmEmail": "ops@example.com", "LogRetentionDays": "90"}
    assert infra.fill_parameters(params, current={}, defaults=defaults) == {  # created: the template's defaults
        "Stage": "prod", "AlarmEmail": "", "LogRetentionDays": "30"}
    given = {"Stage": "prod", "AlarmEmail": "", "LogRetentionDays": "7"}  # given: they win, "" included
    assert infra.fill_parameters(given, current={"AlarmEmail": "ops@example.com"}, defaults=defaults) == given


def test_no_change_is_recognised_as_cloudformation_and_moto_say_it():
    assert infra.is_no_change("The submitted information didn't contain changes. Submit different information to create a change set.")
    assert infra.is_no_change("An error occurred (ValidationError) when calling the CreateChangeSet operation: No updates are to be performed.")
    assert not infra.is_no_change("Parameters: [Stage] must have values")


def test_changes_are_printed_one_line_each():
    change = {"Type": "Resource", "ResourceChange": {
        "Action": "Modify", "LogicalResourceId": "EventsQueue", "ResourceType": "AWS::SQS::Queue", "Replacement": "False",
        "Details": [{"Target": {"Attribute": "Properties", "Name": "VisibilityTimeout", "RequiresRecreation": "Never"}},
                    {"Target": {"Attribute": "Properties", "Name": "VisibilityTimeout", "RequiresRecreation": "Never"}}]}}
    assert infra.describe_change(change) == "Modify EventsQueue (AWS::SQS::Queue): VisibilityTimeout"
    renamed = {"ResourceChange": {"Action": "Modify", "LogicalResourceId": "StateTable", "ResourceType": "AWS::DynamoDB::Table",
                                  "Replacement": "True", "Details": [{"Target": {"Name": "TableName"}}]}}
    assert infra.describe_change(renamed) == "Modify StateTable (AWS::DynamoDB::Table): TableName, replacement: True"


# --- on the emulator ----------------------------------------------------------------------------------
# Each test deploys its own stage (xdist may run them on different workers, each with this module's
# moto_server); the fixture deploys the shared stack and "dev" first, so every test finds them made.

def deploy(url, stage, config=CHALICE_CONFIG, **options):
    out = io.StringIO()
    result = infra.ensure_resources(load_settings({"STAGE": stage}), clients=infra.Clients.create(url),
                                    chalice_config=config, out=out, **options)
    return result, out.getvalue()


@pytest.fixture(scope="module")
def cfn_moto():
    from sandbox.local_stack import EMULATOR_ENV, free_port, start_moto, stop
    port = free_port()
    process = start_moto(port)
    saved = {k: os.environ.get(k) for k in EMULATOR_ENV}
    os.environ.update(EMULATOR_ENV)
    try:
        url = f"http://127.0.0.1:{port}"
        yield {"url": url, "first": deploy(url, "dev", alarm_email="ops@example.com")}
    finally:
        stop([process])
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.mark.stack  # a moto_server of its own
def test_make_infra_creates_both_stacks_then_finds_nothing_to_change(cfn_moto):
    url = cfn_moto["url"]
    result, printed = cfn_moto["first"]
    assert (result["shared"]["action"], result["stage"]["action"]) == ("created", "created")
    assert "metrika-crm-bridge-dev: Add EventsQueue (AWS::SQS::Queue)" in printed
    assert "metrika-crm-bridge-shared: CREATE_COMPLETE" in printed and "metrika-crm-bridge-dev: CREATE_COMPLETE" in printed
    db = boto3.client("dynamodb", endpoint_url=url)
    settings = load_settings({"STAGE": "dev"})
    for table in (settings.config_table, settings.state_table, settings.quota_table):
        described = db.describe_table(TableName=table)["Table"]
        assert described["KeySchema"] == [{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "sk", "KeyType": "RANGE"}]
        assert described["BillingModeSummary"]["BillingMode"] == "PAY_PER_REQUEST"
        assert described["DeletionProtectionEnabled"] is True
    sqs = boto3.client("sqs", endpoint_url=url)
    attributes = sqs.get_queue_attributes(QueueUrl=sqs.get_queue_url(QueueName=settings.events_queue)["QueueUrl"],
                                          AttributeNames=["All"])["Attributes"]
    dlq = sqs.get_queue_attributes(QueueUrl=sqs.get_queue_url(QueueName=settings.dead_letter_queue)["QueueUrl"],
                                   AttributeNames=["All"])["Attributes"]
    assert attributes["VisibilityTimeout"] == str(6 * infra.worker_timeout(CHALICE_CONFIG, "dev"))
    assert json.loads(attributes["RedrivePolicy"]) == {"deadLetterTargetArn": dlq["QueueArn"], "maxReceiveCount": 5}
    assert (attributes["MessageRetentionPeriod"], dlq["MessageRetentionPeriod"]) == ("345600", "1209600")
    logs = boto3.client("logs", endpoint_url=url).describe_log_groups(logGroupNamePrefix="/aws/lambda/metrika-crm-bridge-dev")
    assert {g["logGroupName"]: g["retentionInDays"] for g in logs["logGroups"]} == {
        f"/aws/lambda/{name}": 30 for name in chalice_functions("dev").values()}
    topics = boto3.client("sns", endpoint_url=url).list_topics()["Topics"]
    assert any(t["TopicArn"].endswith(":metrika-crm-bridge-dev-alarms") for t in topics)

    again, printed = deploy(url, "dev", alarm_email="ops@example.com")
    assert (again["shared"]["action"], again["stage"]["action"]) == ("unchanged", "unchanged")
    assert printed == "metrika-crm-bridge-shared: no changes\nmetrika-crm-bridge-dev: no changes\n"
    cfn = boto3.client("cloudformation", endpoint_url=url)
    assert not [c for c in cfn.list_change_sets(StackName="metrika-crm-bridge-dev")["Summaries"]
                if c["StackName"] == "metrika-crm-bridge-dev" and c["ExecutionStatus"] == "AVAILABLE"]  # none left
    # The operator's choices are kept when left out (a plain `make infra` drops no subscription), changed
    # when given: "" removes the e-mail.
    kept, _ = deploy(url, "dev")
    assert kept["stage"]["action"] == "unchanged"
    changed, _ = deploy(url, "dev", alarm_email="", log_retention_days=90)
    assert changed["stage"]["action"] == "updated"
    # (moto does not apply a log group's new retention; CloudFormation updates it in place.)
    stack = boto3.client("cloudformation", endpoint_url=url).describe_stacks(StackName="metrika-crm-bridge-dev")["Stacks"][0]
    assert {p["ParameterKey"]: p["ParameterValue"] for p in stack["Parameters"]}.keys() >= {"AlarmEmail", "LogRetentionDays"}
    assert {p["ParameterKey"]: p["ParameterValue"] for p in stack["Parameters"] if p["ParameterKey"] in (
        "AlarmEmail", "LogRetentionDays")} == {"AlarmEmail": "", "LogRetentionDays": "90"}


@pytest.mark.stack  # a moto_server of its own
def test_a_longer_worker_timeout_updates_the_queue_in_place_and_keeps_its_messages(cfn_moto):
    url = cfn_moto["url"]
    deploy(url, "slow")
    sqs = boto3.client("sqs", endpoint_url=url)
    settings = load_settings({"STAGE": "slow"})
    queue_url = sqs.get_queue_url(QueueName=settings.events_queue)["QueueUrl"]
    assert sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["VisibilityTimeout"])["Attributes"] == {
        "VisibilityTimeout": str(6 * infra.worker_timeout(CHALICE_CONFIG, "slow"))}  # not in config.json: defaults
    sqs.send_message(QueueUrl=queue_url, MessageBody='{"integration_id": "kept"}')
    config = copy.deepcopy(CHALICE_CONFIG)
    config["stages"]["slow"] = {"lambda_functions": {"on_events_message": {"lambda_timeout": 300}}}
    result, printed = deploy(url, "slow", config=config)
    assert (result["shared"]["action"], result["stage"]["action"]) == ("unchanged", "updated")
    assert "metrika-crm-bridge-slow: UPDATE_COMPLETE" in printed
    assert sqs.get_queue_url(QueueName=settings.events_queue)["QueueUrl"] == queue_url  # the same queue
    assert sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["VisibilityTimeout"])["Attributes"] == {
        "VisibilityTimeout": "1800"}
    messages = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10)["Messages"]
    assert [m["Body"] for m in messages] == ['{"integration_id": "kept"}']


@pytest.mark.stack  # a moto_server of its own
def test_the_emulators_fast_path_makes_what_cloudformation_makes(cfn_moto):
    """conftest, the bench harness and `make run` create the template's tables and queues directly."""
    clients = infra.Clients.create(cfn_moto["url"])
    via_cfn, quick = load_settings({"STAGE": "dev"}), load_settings({"STAGE": "direct"})  # dev: the fixture's stack
    visibility = infra.visibility_timeout(CHALICE_CONFIG, "dev")
    params = infra.stage_parameters(quick, visibility_timeout_seconds=visibility)
    assert infra.create_directly(clients, STAGE, params) == [quick.config_table, quick.state_table,
                                                             quick.dead_letter_queue, quick.events_queue]
    assert infra.create_directly(clients, STAGE, params) == []  # idempotent
    db, sqs = clients.dynamodb, clients.sqs

    def table(name):
        t = db.describe_table(TableName=name)["Table"]
        return t["KeySchema"], t["AttributeDefinitions"], t["BillingModeSummary"]["BillingMode"], t["DeletionProtectionEnabled"]

    def queue(name):
        attributes = sqs.get_queue_attributes(QueueUrl=sqs.get_queue_url(QueueName=name)["QueueUrl"],
                                              AttributeNames=["All"])["Attributes"]
        redrive = json.loads(attributes.get("RedrivePolicy", "{}"))
        return (attributes["VisibilityTimeout"], attributes["MessageRetentionPeriod"], redrive.get("maxReceiveCount"),
                redrive.get("deadLetterTargetArn", "").endswith(f"-{name.split('-')[-2]}-events-dlq"))

    assert table(quick.state_table) == table(via_cfn.state_table)
    assert table(quick.config_table) == table(via_cfn.config_table)
    assert queue(quick.events_queue) == queue(via_cfn.events_queue) == (str(visibility), "345600", 5, True)
    assert queue(quick.dead_letter_queue) == queue(via_cfn.dead_letter_queue) == ("30", "1209600", None, False)
    # TTL and PITR: moto's CloudFormation ignores them; the fast path sets them through the API.
    assert db.describe_time_to_live(TableName=quick.state_table)["TimeToLiveDescription"] == {
        "AttributeName": "expires_at", "TimeToLiveStatus": "ENABLED"}
    backups = db.describe_continuous_backups(TableName=quick.state_table)["ContinuousBackupsDescription"]
    assert backups["PointInTimeRecoveryDescription"]["PointInTimeRecoveryStatus"] == "ENABLED"
    # An existing queue with other attributes is brought to the template's (CreateQueue alone refuses with
    # QueueAlreadyExists: the first `make infra`'s bug).
    assert infra.create_directly(clients, STAGE, {**params, "VisibilityTimeout": "1800"}) == []
    queue_url = sqs.get_queue_url(QueueName=quick.events_queue)["QueueUrl"]
    assert sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["VisibilityTimeout"])["Attributes"] == {
        "VisibilityTimeout": "1800"}


@pytest.mark.stack  # a moto_server of its own
def test_resources_made_before_the_templates_are_found_for_the_import(cfn_moto):
    clients = infra.Clients.create(cfn_moto["url"])
    legacy = load_settings({"STAGE": "legacy"})
    params = infra.stage_parameters(legacy, visibility_timeout_seconds=360)
    infra.create_directly(clients, STAGE, params)  # what the first `make infra` made: tables and queues
    clients.logs.create_log_group(logGroupName="/aws/lambda/metrika-crm-bridge-legacy")  # Lambda's, on a first run
    clients.logs.create_log_group(logGroupName="/aws/lambda/metrika-crm-bridge-legacy-admin-old")  # a prefix only
    deployer = infra.StackDeployer(clients)
    found = deployer._existing(infra.named_resources(STAGE, params))
    url_of = {name: clients.sqs.get_queue_url(QueueName=name)["QueueUrl"] for name in (legacy.events_queue, legacy.dead_letter_queue)}
    assert found == {"ConfigTable": {"TableName": legacy.config_table}, "StateTable": {"TableName": legacy.state_table},
                     "EventsQueue": {"QueueUrl": url_of[legacy.events_queue]},
                     "DeadLetterQueue": {"QueueUrl": url_of[legacy.dead_letter_queue]},
                     "ApiHandlerLogGroup": {"LogGroupName": "/aws/lambda/metrika-crm-bridge-legacy"}}
    fresh = infra.stage_parameters(load_settings({"STAGE": "fresh"}), visibility_timeout_seconds=360)
    assert deployer._existing(infra.named_resources(STAGE, fresh)) == {}


@pytest.mark.stack  # a moto_server of its own
def test_the_command_reports_and_exits_non_zero_when_a_stack_fails(cfn_moto, monkeypatch, capsys):
    for service in ("DYNAMODB", "SQS", "CLOUDFORMATION", "CLOUDWATCH_LOGS"):
        monkeypatch.setenv(f"AWS_ENDPOINT_URL_{service}", cfn_moto["url"])
    for name in ("CONFIG_TABLE", "STATE_TABLE", "EVENTS_QUEUE", "QUOTA_TABLE", "ALARM_EMAIL", "LOG_RETENTION_DAYS"):
        monkeypatch.delenv(name, raising=False)
    assert infra.main(["--stage", "dev", "--alarm-email", "ops@example.com"]) == 0
    printed = capsys.readouterr().out
    assert json.loads(printed[printed.index("{"):])["shared"]["action"] == "unchanged"
    assert infra.main(["--stage", "prd"]) == 2  # a typo: no stack for a stage Chalice does not know
    assert "stage 'prd' is not in .chalice/config.json (stages: dev, prod)" in capsys.readouterr().err
    # A queue name SQS refuses: moto fails the execution (CloudFormation would roll back and say why).
    monkeypatch.setenv("EVENTS_QUEUE", "bad name!")
    assert infra.main(["--stage", "prod"]) == 1
    error = capsys.readouterr().err
    assert error.startswith("make infra failed: metrika-crm-bridge-prod: executing CREATE failed")
    assert "Can only include alphanumeric characters" in error


@pytest.mark.stack  # a moto_server of its own
def test_a_stage_made_before_the_templates_is_imported_first(cfn_moto):
    """moto cannot import (it tries to create the table and fails): what it received is checked."""
    clients = infra.Clients.create(cfn_moto["url"])
    legacy = load_settings({"STAGE": "adopt"})
    infra.create_directly(clients, STAGE, infra.stage_parameters(legacy, visibility_timeout_seconds=360))
    out = io.StringIO()
    with pytest.raises(infra.DeployFailed, match="metrika-crm-bridge-adopt: executing IMPORT failed"):
        infra.StackDeployer(clients, out=out).deploy(
            "metrika-crm-bridge-adopt", infra.STAGE_TEMPLATE.read_text(),
            infra.stage_parameters(legacy, visibility_timeout_seconds=1800), tags={"app": "metrika-crm-bridge"})
    assert out.getvalue().startswith("metrika-crm-bridge-adopt: adopting resources that already exist: ConfigTable "
                                     f"({legacy.config_table}), DeadLetterQueue (")
    cfn = clients.cloudformation
    [summary] = [s for s in cfn.list_change_sets(StackName="metrika-crm-bridge-adopt")["Summaries"]
                 if s["StackName"] == "metrika-crm-bridge-adopt"]  # (moto lists every stack's)
    assert summary["ChangeSetName"].startswith("make-infra-import-")
    change_set = cfn.describe_change_set(StackName="metrika-crm-bridge-adopt", ChangeSetName=summary["ChangeSetName"])
    assert sorted(c["ResourceChange"]["LogicalResourceId"] for c in change_set["Changes"]) == [
        "ConfigTable", "DeadLetterQueue", "EventsQueue", "StateTable"]
    sent = {p["ParameterKey"]: p["ParameterValue"] for p in change_set["Parameters"]}
    assert sent["VisibilityTimeout"] == "1800" and sent["LogRetentionDays"] == "30" and sent["AlarmEmail"] == ""
