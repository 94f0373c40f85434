"""`.chalice/config.json` and the IAM policies agree with the code that runs under them (each function's
policy against its calls: tests/test_least_privilege.py)."""
import json
import re
from pathlib import Path

import pytest
from chalice.cli.factory import CLIFactory

from tools import infra
from tools.policies import ACCESS, EVENT_SOURCE, SQS_BATCH_ACTIONS
from chalicelib.settings import load_settings

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("stage", ["dev", "prod"])
def test_stage_config_matches_settings(stage):
    config = CLIFactory(str(ROOT)).create_config_obj(chalice_stage_name=stage)
    env = config.scope(stage, "api_handler").environment_variables
    settings = load_settings({"STAGE": stage})
    assert (env["CONFIG_TABLE"], env["STATE_TABLE"], env["EVENTS_QUEUE"]) == (
        settings.config_table, settings.state_table, settings.events_queue)
    assert "ADMIN_TOKEN" not in env and "METRIKA_API_URL" not in env  # secrets and targets never in config
    assert "ALLOW_LOOPBACK_CRM" not in env  # the local stack's leave to call loopback CRMs, never deployed
    assert not load_settings({"STAGE": stage, **env}).allow_loopback_crm
    worker = config.scope(stage, "on_events_message")
    chalice_config = json.loads((ROOT / ".chalice" / "config.json").read_text())
    assert infra.visibility_timeout(chalice_config, stage) == 6 * worker.lambda_timeout  # what `make infra` sets


def test_every_aws_operation_in_the_source_is_granted_to_some_function():
    """A static net under tests/test_least_privilege.py (which runs the paths on the emulator): an
    operation the code calls that no function's policy grants fails here in the fast tier already."""
    granted = {action for access in (*ACCESS.values(), *EVENT_SOURCE.values())
               for actions in access.values() for action in actions}
    used = set()
    # sandbox/worker.py: the local stand-in for Lambda's SQS event source (EVENT_SOURCE).
    for source in ("chalicelib/store/dynamodb.py", "chalicelib/queue.py", "chalicelib/admin.py", "chalicelib/amocrm_install.py",
                   "sandbox/worker.py"):
        text = (ROOT / source).read_text()
        used |= {f"dynamodb:{_camel(m)}" for m in re.findall(r"_db\.(\w+)\(", text)}
        used |= {f"sqs:{SQS_BATCH_ACTIONS.get(_camel(m), _camel(m))}" for m in re.findall(r"_sqs\.(\w+)\(", text)}
        used |= {f"ssm:{_camel(m)}" for m in re.findall(r"\bssm\.(\w+)\(", text)}
    assert {"dynamodb:UpdateItem", "sqs:SendMessage", "ssm:GetParameter"} <= used  # the patterns still match
    assert used <= granted, used - granted


def _camel(snake: str) -> str:
    return "".join(part.title() for part in snake.split("_"))


SIZES = {"api_handler": (28, 1024), "admin": (10, 256), "reconcile_all": (60, 256), "confirm_uploads": (60, 256),
         "refresh_tokens": (60, 256)}
WORKER_MEMORY = {"dev": 512, "prod": 1024}


@pytest.mark.parametrize("stage", ["dev", "prod"])
def test_each_function_has_its_size_and_its_units_of_work_fit_its_time(stage):
    """Per-function timeouts and memory (Chalice's `lambda_functions` keys: `api_handler`, the authorizer
    by its function name), and the deadline margins (chalicelib/deadline.py) against them."""
    from chalicelib import backfill, deadline, ingest, schedules, worker
    config = CLIFactory(str(ROOT)).create_config_obj(chalice_stage_name=stage)
    sizes = {name: (config.scope(stage, name).lambda_timeout, config.scope(stage, name).lambda_memory_size)
             for name in (*SIZES, "on_events_message")}
    assert sizes == {**SIZES, "on_events_message": (300, WORKER_MEMORY[stage])}
    # The API answers before API Gateway gives up (29 s) with a bare 502: a JSON 504 at worst.
    assert sizes["api_handler"][0] < deadline.GATEWAY_TIMEOUT
    worker_timeout = sizes["on_events_message"][0]
    # Every unit of work fits an invocation at least twice over, with its reserve for the last writes.
    # (The schedules' jobs run in the worker since issue 15; the schedules themselves only queue them.)
    longest_start = max(worker.GROUP_SECONDS, backfill.START_SECONDS, ingest.INBOX_SECONDS, schedules.JOB_SECONDS)
    assert worker.RESERVE_SECONDS + 2 * longest_start <= worker_timeout
    assert worker.RESERVE_SECONDS + backfill.STEP_SECONDS + backfill.UPLOAD_SECONDS <= worker_timeout
    # No step outlives its message: the invocation ends (clipped calls, reserve) before the message is
    # visible again, and a held entity is still held when a step's retry comes.
    assert infra.visibility_timeout(json.loads((ROOT / ".chalice" / "config.json").read_text()), stage) >= 6 * worker_timeout
    assert backfill.HOLD_SECONDS >= backfill.MAX_DELAY + worker_timeout


@pytest.mark.parametrize("stage", ["dev", "prod"])
def test_the_sweeps_claim_grace_outlasts_a_crashed_workers_hidden_message(stage):
    """A worker that died after claiming leaves its message hidden for the queue's visibility timeout;
    SQS then hands it out again and the next worker claims it anew. Until then the stuck sweep must take
    the claim for live (chalicelib/store CLAIM_GRACE_SECONDS), or it queues a duplicate."""
    from chalicelib.store import CLAIM_GRACE_SECONDS
    chalice_config = json.loads((ROOT / ".chalice" / "config.json").read_text())
    worker = CLIFactory(str(ROOT)).create_config_obj(chalice_stage_name=stage).scope(stage, "on_events_message")
    assert CLAIM_GRACE_SECONDS >= infra.visibility_timeout(chalice_config, stage) + worker.lambda_timeout
