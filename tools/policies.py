"""The IAM policy of each function in each stage, generated from one description (`ACCESS`).

Chalice gives every function its own role when `autogen_policy` is off (`metrika-crm-bridge-<stage>-<name>`,
the authorizer included: chalice/deploy/appgraph.py, `_create_role_reference`), and reads that role's
policy from the function's `iam_policy_file` in `.chalice/config.json` ("Configuration File",
https://aws.github.io/chalice/topics/configfile.html, per-function `lambda_functions` settings). The files
`.chalice/policy-<stage>-<function>.json` are written from `ACCESS` for every stage, so dev and prod
cannot drift; tests/test_least_privilege.py checks the committed files are these, and that each function
calls exactly what its policy grants: nothing missing, nothing unused.

    python -m tools.policies          # write the files
    python -m tools.policies --check  # exit 1 if a committed file differs from what ACCESS gives

Resources are exact names (the stage's tables, the shared quota table, the queues, the stage's SSM
parameter); account and region stay `*`, because Chalice copies a policy file as it is, with no
substitution.

Logs: CreateLogStream and PutLogEvents on the function's own log group only, no logs:CreateLogGroup.
Lambda creates `/aws/lambda/<function name>` on a first invocation only when it does not exist yet
("Configuring CloudWatch log groups", https://docs.aws.amazon.com/lambda/latest/dg/monitoring-cloudwatchlogs-loggroups.html);
infra/stage.yaml creates all five before `chalice deploy` (README, Deploy), with their retention. AWS's
list of the three actions ("Sending Lambda function logs to CloudWatch Logs", section "Required IAM
permissions", https://docs.aws.amazon.com/lambda/latest/dg/monitoring-cloudwatchlogs.html) covers the
group Lambda makes itself; AWS's own least-privilege example grants CreateLogGroup apart, on the account,
and the two others on the function's group `...:log-group:/aws/lambda/<function name>:*`, and notes that
a role missing them leaves the function running, unlogged (AWS Lambda Operator Guide, "Access to
CloudWatch Logs", https://serverlessland.com/content/service/lambda/guides/aws-lambda-operator-guide/access-logs;
"Applying the principles of least privilege", https://docs.aws.amazon.com/lambda/latest/operatorguide/least-privilege.html).
So a log group deleted by hand costs its logs until `make infra` puts it back, never an invocation.

The admin token is a SecureString under the account's AWS managed key `aws/ssm` (README's
`put-parameter` names no key): that key's policy lets the account's principals decrypt through Parameter
Store, so the authorizer needs ssm:GetParameter only. A customer managed key would need kms:Decrypt on
it in the authorizer's policy ("How AWS Systems Manager Parameter Store uses AWS KMS",
https://docs.aws.amazon.com/kms/latest/developerguide/services-parameter-store.html).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import urlsplit

from chalicelib.settings import APP_NAME, Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
CHALICE_DIR = ROOT / ".chalice"

# The resources a function may touch, by role in the app (resolved per stage by `resources`).
CONFIG, STATE, QUOTA, EVENTS, DEAD_LETTERS, ADMIN_TOKEN, AMOCRM_SECRET, BITRIX24_SECRET = (
    "config_table", "state_table", "quota_table", "events_queue", "dead_letter_queue", "admin_token",
    "amocrm_client_secret", "bitrix24_client_secret")

_DYNAMO_READ = ("dynamodb:GetItem", "dynamodb:Query")

# What each function's own code calls, per resource: the one description both stages' policies come
# from. Every entry is exercised by tests/test_least_privilege.py, which fails on an action granted and
# never called as much as on one called and not granted.
ACCESS: dict[str, dict[str, tuple[str, ...]]] = {
    # Routes: webhooks (record, large bodies into the inbox), admin routes (integrations, mappings,
    # catalogue, history import start, reconcile, confirm, status, replay, delete), dead-letter redrive.
    # Installs from amoCRM (chalicelib/amocrm_install.py) and of the Bitrix24 application
    # (chalicelib/bitrix24_app.py): each CRM's client secret (SSM), the tokens item
    # (UpdateItem: a version written atomically, chalicelib/oauth.py). Saving an amoCRM integration
    # marks its kept account record stale (UpdateItem, chalicelib/crm/amocrm/account.py `expire_account`).
    "api_handler": {
        CONFIG: ("dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:UpdateItem", "dynamodb:DeleteItem", "dynamodb:Query",
                 "dynamodb:Scan"),
        AMOCRM_SECRET: ("ssm:GetParameter",),
        BITRIX24_SECRET: ("ssm:GetParameter",),
        STATE: ("dynamodb:GetItem", "dynamodb:UpdateItem", "dynamodb:DeleteItem", "dynamodb:Query",
                "dynamodb:BatchGetItem", "dynamodb:BatchWriteItem"),
        QUOTA: ("dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:UpdateItem", "dynamodb:DeleteItem"),
        EVENTS: ("sqs:GetQueueUrl", "sqs:SendMessage"),
        DEAD_LETTERS: ("sqs:GetQueueUrl", "sqs:GetQueueAttributes", "sqs:ReceiveMessage", "sqs:DeleteMessage"),
    },
    # The authorizer reads the admin token (and, during a rotation's overlap, its previous version), and a
    # console link's token digest (one item of the config table, chalicelib/console_links.py).
    "admin": {
        ADMIN_TOKEN: ("ssm:GetParameter",),
        CONFIG: ("dynamodb:GetItem",),
    },
    # The worker: deliveries, retries, inbox expansion, history-import steps, dead-letter flags, and each
    # integration's scheduled jobs (reconciliation: sweep, CRM changes, re-queue; confirmation: Metrika's
    # upload listing, FAILED uploads sent again, a settled upload's pending record replaced by its
    # final one and its CARRIED# items deleted; the jobs' cursors).
    # Installed (OAuth) integrations refresh their tokens: the tokens item, and each CRM's client secret.
    "on_events_message": {
        CONFIG: ("dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:UpdateItem", "dynamodb:Scan"),
        AMOCRM_SECRET: ("ssm:GetParameter",),
        BITRIX24_SECRET: ("ssm:GetParameter",),
        STATE: ("dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:UpdateItem", "dynamodb:DeleteItem",
                "dynamodb:Query", "dynamodb:BatchGetItem", "dynamodb:BatchWriteItem"),
        QUOTA: ("dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:UpdateItem", "dynamodb:DeleteItem"),
        EVENTS: ("sqs:GetQueueUrl", "sqs:SendMessage"),
    },
    # The schedules list the integrations (a scan of their config items) and queue a job for each.
    "reconcile_all": {
        CONFIG: ("dynamodb:Scan",),
        EVENTS: ("sqs:GetQueueUrl", "sqs:SendMessage"),
    },
    "confirm_uploads": {
        CONFIG: ("dynamodb:Scan",),
        EVENTS: ("sqs:GetQueueUrl", "sqs:SendMessage"),
    },
    "refresh_tokens": {
        CONFIG: ("dynamodb:Scan",),
        EVENTS: ("sqs:GetQueueUrl", "sqs:SendMessage"),
    },
}

# What Lambda itself does with a function's role, beside the function's code:
# * the SQS event source mapping polls the events queue and deletes what the worker handled ("Creating and
#   configuring an Amazon SQS event source mapping", section "Setting up Lambda execution role
#   permissions", https://docs.aws.amazon.com/lambda/latest/dg/services-sqs-configure.html: the
#   AWSLambdaSQSQueueExecutionRole managed policy's sqs:ReceiveMessage, sqs:DeleteMessage,
#   sqs:GetQueueAttributes). No sqs:ChangeMessageVisibility: neither Lambda nor our code changes it.
# * every function's log lines go to its own log group (see the module docstring).
EVENT_SOURCE: dict[str, dict[str, tuple[str, ...]]] = {
    "on_events_message": {EVENTS: ("sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:GetQueueAttributes")},
}
LOG_ACTIONS = ("logs:CreateLogStream", "logs:PutLogEvents")
FUNCTIONS = tuple(ACCESS)
_SIDS = {CONFIG: "ConfigTable", STATE: "StateTable", QUOTA: "QuotaTable", EVENTS: "EventsQueue",
         DEAD_LETTERS: "DeadLetterQueue", ADMIN_TOKEN: "AdminToken", AMOCRM_SECRET: "AmoCrmClientSecret",
         BITRIX24_SECRET: "Bitrix24ClientSecret"}


def function_name(stage: str, function: str) -> str:
    """The Lambda function's name as Chalice deploys it: the API handler is `<app>-<stage>` (kept for
    backwards compatibility, chalice/deploy/appgraph.py `_create_rest_api_model`), every other function
    `<app>-<stage>-<name>`. infra/stage.yaml names the log groups after these."""
    return f"{APP_NAME}-{stage}" if function == "api_handler" else f"{APP_NAME}-{stage}-{function}"


def stage_settings(stage: str, chalice_config: dict | None = None) -> Settings:
    """The settings a deployed function of `stage` runs with: .chalice/config.json's environment
    variables (top level, then the stage's) through `load_settings`, as the Lambda reads them."""
    config = chalice_config if chalice_config is not None else json.loads((CHALICE_DIR / "config.json").read_text())
    env = {**config.get("environment_variables", {}), **config["stages"][stage].get("environment_variables", {})}
    return load_settings({"STAGE": stage, **env})


def table_arn(name: str) -> str:
    return f"arn:aws:dynamodb:*:*:table/{name}"


def queue_arn(name: str) -> str:
    return f"arn:aws:sqs:*:*:{name}"


def parameter_arn(name: str) -> str:
    # A parameter's ARN has no double slash: "/a/b" is "parameter/a/b" ("Actions, resources, and condition
    # keys for AWS Systems Manager", resource type `parameter`,
    # https://docs.aws.amazon.com/service-authorization/latest/reference/list_awssystemsmanager.html).
    return f"arn:aws:ssm:*:*:parameter/{name.lstrip('/')}"


def log_group_arn(stage: str, function: str) -> str:
    return f"arn:aws:logs:*:*:log-group:/aws/lambda/{function_name(stage, function)}:*"


def resources(settings: Settings) -> dict[str, str]:
    """Each resource role's ARN in the stage `settings` describe."""
    if not settings.admin_token_parameter:
        raise ValueError(f"stage {settings.stage!r} names no ADMIN_TOKEN_PARAMETER in .chalice/config.json")
    return {CONFIG: table_arn(settings.config_table), STATE: table_arn(settings.state_table),
            QUOTA: table_arn(settings.quota_table), EVENTS: queue_arn(settings.events_queue),
            DEAD_LETTERS: queue_arn(settings.dead_letter_queue),
            ADMIN_TOKEN: parameter_arn(settings.admin_token_parameter),
            AMOCRM_SECRET: parameter_arn(settings.amocrm_client_secret_parameter
                                         or f"/{APP_NAME}/{settings.stage}/amocrm-client-secret"),
            BITRIX24_SECRET: parameter_arn(settings.bitrix24_client_secret_parameter)}


def policy(stage: str, function: str, settings: Settings | None = None) -> dict:
    """The policy document of `function` in `stage`: one statement per resource, actions sorted."""
    arns = resources(settings or stage_settings(stage))
    statements = [{"Sid": "OwnLogGroup", "Effect": "Allow", "Action": sorted(LOG_ACTIONS),
                   "Resource": log_group_arn(stage, function)}]
    granted: dict[str, set[str]] = {}
    for source in (ACCESS[function], EVENT_SOURCE.get(function, {})):
        for role, actions in source.items():
            granted.setdefault(role, set()).update(actions)
    for role in sorted(granted, key=list(_SIDS).index):
        statements.append({"Sid": _SIDS[role], "Effect": "Allow", "Action": sorted(granted[role]),
                           "Resource": arns[role]})
    return {"Version": "2012-10-17", "Statement": statements}


def policy_file(stage: str, function: str) -> str:
    """The file name, relative to .chalice/, that config.json's `iam_policy_file` names."""
    return f"policy-{stage}-{function}.json"


def render(document: dict) -> str:
    return json.dumps(document, indent=2) + "\n"


def generated(chalice_config: dict | None = None) -> dict[str, str]:
    """Every policy file's text, by file name, for every stage of .chalice/config.json."""
    config = chalice_config if chalice_config is not None else json.loads((CHALICE_DIR / "config.json").read_text())
    return {policy_file(stage, function): render(policy(stage, function, stage_settings(stage, config)))
            for stage in config["stages"] for function in FUNCTIONS}


def granted_pairs(document: dict) -> set[tuple[str, str]]:
    """(action, resource) pairs a policy document allows (Action and Resource as string or list)."""
    pairs = set()
    for statement in document["Statement"]:
        if statement.get("Effect") != "Allow":
            continue
        actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        targets = statement["Resource"] if isinstance(statement["Resource"], list) else [statement["Resource"]]
        pairs |= {(action, target) for action in actions for target in targets}
    return pairs


# --- AWS calls as IAM sees them (the least-privilege test records calls and maps them here) -------------

# Batch operations are authorised per action of their entries ("Actions, resources, and condition keys
# for Amazon SQS", https://docs.aws.amazon.com/service-authorization/latest/reference/list_amazonsqs.html:
# SendMessageBatch is sqs:SendMessage, DeleteMessageBatch sqs:DeleteMessage …).
SQS_BATCH_ACTIONS = {"SendMessageBatch": "SendMessage", "DeleteMessageBatch": "DeleteMessage",
                "ChangeMessageVisibilityBatch": "ChangeMessageVisibility"}
# DynamoDB transactions need the per-item actions of their items, not an action of their own ("Using
# IAM policies with DynamoDB transactions", https://docs.aws.amazon.com/amazondynamodb/latest/developerguide/transaction-apis-iam.html).
_TRANSACT_ITEMS = {"Put": "PutItem", "Update": "UpdateItem", "Delete": "DeleteItem",
                   "ConditionCheck": "ConditionCheckItem", "Get": "GetItem"}


def iam_requests(service: str, operation: str, params: dict[str, Any]) -> set[tuple[str, str]]:
    """The (IAM action, resource ARN) pairs one AWS API call needs, from its service (botocore's
    endpoint prefix), operation name and request parameters. Pure: tests feed it what botocore's
    `before-call` event carries. An operation it does not know raises, so a new kind of call cannot
    slip past the least-privilege test unmapped."""
    if service == "dynamodb":
        if operation in ("TransactWriteItems", "TransactGetItems"):
            return {(f"dynamodb:{_TRANSACT_ITEMS[kind]}", _table(body))
                    for item in params["TransactItems"] for kind, body in item.items()}
        if operation in ("BatchGetItem", "BatchWriteItem"):
            return {(f"dynamodb:{operation}", table_arn(name)) for name in params["RequestItems"]}
        if operation in ("GetItem", "PutItem", "UpdateItem", "DeleteItem", "Query", "Scan"):
            return {(f"dynamodb:{operation}", _table(params))}
    elif service == "sqs":
        action = f"sqs:{SQS_BATCH_ACTIONS.get(operation, operation)}"
        if operation == "GetQueueUrl":
            return {(action, queue_arn(params["QueueName"]))}
        if action in ("sqs:SendMessage", "sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:GetQueueAttributes",
                      "sqs:ChangeMessageVisibility"):
            return {(action, queue_arn(urlsplit(params["QueueUrl"]).path.rstrip("/").rpartition("/")[2]))}
    elif service == "ssm" and operation == "GetParameter":
        # `name:<version>` or `name:<label>` selects a version of the same parameter: the resource is the
        # parameter ("GetParameter", request parameter Name,
        # https://docs.aws.amazon.com/systems-manager/latest/APIReference/API_GetParameter.html). Parameter
        # names cannot hold a colon, so the selector is whatever follows the first one (after the ARN's
        # own colons, when the parameter is named by its ARN).
        name = params["Name"]
        if name.startswith("arn:"):
            name = name.partition(":parameter/")[2]
        return {("ssm:GetParameter", parameter_arn(name.partition(":")[0]))}
    raise ValueError(f"no IAM mapping for {service}:{operation}; add it to tools/policies.py")


def _table(params: dict[str, Any]) -> str:
    """A table's ARN, or its index's (a Query or Scan naming IndexName is authorised on the index)."""
    arn = table_arn(params["TableName"])
    return f"{arn}/index/{params['IndexName']}" if params.get("IndexName") else arn


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write (or --check) the IAM policy file of each function and stage.")
    parser.add_argument("--check", action="store_true", help="exit 1 if a committed file differs")
    args = parser.parse_args(None if argv is None else list(argv))
    stale = []
    for name, text in generated().items():
        path = CHALICE_DIR / name
        if path.exists() and path.read_text() == text:
            continue
        stale.append(name)
        if not args.check:
            path.write_text(text)
    if args.check and stale:
        print(f"out of date (run python -m tools.policies): {', '.join(stale)}", file=sys.stderr)
        return 1
    print(("stale: " if args.check else "written: ") + (", ".join(stale) or "none"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
