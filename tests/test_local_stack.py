"""README command 1, tried as a new user would: start the local stack, create an integration, PUT a
status mapping with plain HTTP, see it in the Metrika sandbox, send a webhook, stop with Ctrl-C."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from sandbox.local_stack import free_port
from tests.conftest import amocrm_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def stack():
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "METRIKA_API_URL", "ADMIN_TOKEN"))}
    process = subprocess.Popen([sys.executable, "-m", "sandbox.local_stack", "--port", str(port)], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines, info = [], {}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and "Ctrl-C" not in "".join(lines[-1:]):
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        for key in ("admin token", "Metrika target", "API "):
            if line.strip().startswith(key.strip()):
                info[key.strip()] = line.split()[-1] if key != "Metrika target" else line.split()[2]
    assert "Ctrl-C" in "".join(lines), "".join(lines)
    yield {"api": f"http://127.0.0.1:{port}", "token": info["admin token"], "metrika": info["Metrika target"],
           "process": process, "output": lines}
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)


def test_a_new_user_can_create_an_integration_and_push_a_mapping(stack):
    headers = {"Authorization": f"Bearer {stack['token']}"}
    created = requests.put(f"{stack['api']}/integrations/shop", headers=headers, json=amocrm_config(), timeout=10)
    assert created.status_code == 200, created.text
    assert created.json()["timezone"] == "Europe/Moscow"  # read from the sandbox counter
    mapping = {"entries": [{"crm_status": "7001:142", "metrika_status_id": "won", "type": "PAID", "humanized": "Won"}]}
    assert requests.put(f"{stack['api']}/integrations/shop/status-mapping", headers=headers, json=mapping,
                        timeout=10).status_code == 200
    state = requests.get(stack["metrika"] + "/_sandbox/state", timeout=10).json()
    assert state["counters"]["4242"]["order_statuses"] == [{"id": "won", "type": "PAID", "humanized": "Won"}]
    assert requests.get(f"{stack['api']}/integrations/shop", timeout=10).status_code == 401


def test_webhooks_reach_the_worker(stack):
    headers = {"Authorization": f"Bearer {stack['token']}"}
    requests.put(f"{stack['api']}/integrations/shop2", headers=headers, json=amocrm_config(), timeout=10)
    secret = amocrm_config()["connection"]["webhook_secret"]
    response = requests.post(f"{stack['api']}/webhooks/amocrm/shop2", params={"secret": secret}, timeout=10,
                             data={"account[id]": "32427762", "leads[status][0][id]": "5",
                                   "leads[status][0][last_modified]": "1790000000"})
    assert response.json() == {"accepted": 1, "queued": 1, "ignored": 0}
    # This build has no amoCRM source yet: the worker takes the message and parks the deal visibly.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        line = stack["process"].stdout.readline()
        if '"entity_parked"' in line:
            assert '"integration_id": "shop2"' in line
            return
    pytest.fail("the worker did not pick up the message")


def process_group(pgid: int) -> list[int]:
    """Live (non-zombie) processes in a process group, read from /proc."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(stat.parent.name))
    return members


def test_ctrl_c_stops_everything(stack):
    process = stack["process"]
    assert len(process_group(process.pid)) == 5  # launcher, moto_server, Metrika sandbox, chalice local, worker
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    assert process.wait(timeout=30) == 0
    deadline = time.monotonic() + 10
    while process_group(process.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert process_group(process.pid) == []
