"""`.chalice/config.json` and the IAM policies agree with the code that runs under them."""
import json
import re
from pathlib import Path

import pytest
from chalice.cli.factory import CLIFactory

from chalicelib import infra
from chalicelib.settings import load_settings

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("stage", ["dev", "prod"])
def test_stage_config_matches_settings_and_policy(stage):
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
    policy = json.loads((ROOT / ".chalice" / config.iam_policy_file).read_text())
    allowed = {action for statement in policy["Statement"] for action in statement["Action"]}
    resources = json.dumps(policy)
    assert settings.config_table in resources and settings.state_table in resources and settings.events_queue in resources
    used = set()
    for source in ("chalicelib/store/dynamodb.py", "chalicelib/queue.py", "chalicelib/backfill.py", "sandbox/worker.py"):
        text = (ROOT / source).read_text()
        used |= {f"dynamodb:{''.join(p.title() for p in m.split('_'))}" for m in re.findall(r"_db\.(\w+)\(", text)}
        used |= {f"sqs:{''.join(p.title() for p in m.split('_'))}".replace("Batch", "")
                 for m in re.findall(r"_sqs\.(\w+)\(", text)}
    assert used and used <= allowed, used - allowed
