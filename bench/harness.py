"""Shared set-up for the benchmarks: moto_server and the sandboxes on loopback, the app's environment,
and small statistics helpers. Every benchmark measures its floor in the same run."""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from sandbox.amocrm import AmoCrmSandbox, seed_demo
from sandbox.bitrix24 import Bitrix24Sandbox
from sandbox.bitrix24 import seed_demo as seed_bitrix
from sandbox.local_stack import emulator_env, free_port, start_moto, stop, wait_http
from sandbox.metrika import MetrikaSandbox

ADMIN_TOKEN = "bench-admin-" + uuid.uuid4().hex
AMO_SECRET = "bench-amo-secret-0123456789"
B24_TOKEN = "bench-b24-application-token"


@contextmanager
def environment() -> Iterator[dict]:
    """moto_server, Metrika/amoCRM/Bitrix24 sandboxes, tables and queues; the app's env set."""
    port = free_port()
    moto = start_moto(port)
    metrika = MetrikaSandbox(daily_limit=10**9).start()
    amocrm = AmoCrmSandbox(token="bench-amo").start()
    bitrix = Bitrix24Sandbox(bucket_size=10**6).start()
    env = {**emulator_env(f"http://127.0.0.1:{port}"), "STAGE": "dev",
           "ADMIN_TOKEN": ADMIN_TOKEN, "METRIKA_API_URL": metrika.url, "WORKER_BATCHING_WINDOW": "0",
           "ALLOW_LOOPBACK_CRM": "1"}  # the CRM sandboxes listen on loopback
    os.environ.update(env)
    from tools.infra import ensure_resources
    from chalicelib.settings import get_settings
    get_settings.cache_clear()
    ensure_resources(emulator=True)
    seeded = {"amocrm": seed_demo(amocrm), "bitrix24": seed_bitrix(bitrix)}
    try:
        yield {"env": env, "metrika": metrika, "amocrm": amocrm, "bitrix24": bitrix, "seeded": seeded}
    finally:
        for server in (metrika, amocrm, bitrix):
            server.stop()
        stop([moto])


def amocrm_config(amocrm) -> dict:
    return {"crm": "amocrm", "counter_id": 9090, "metrika_token": "y0_bench", "timezone": "Europe/Moscow",
            "connection": {"base_url": amocrm.url, "access_token": amocrm.token, "webhook_secret": AMO_SECRET}}


def bitrix24_config(bitrix) -> dict:
    return {"crm": "bitrix24", "counter_id": 9091, "metrika_token": "y0_bench", "timezone": "Europe/Moscow",
            "connection": {"webhook_url": bitrix.webhook_url, "application_token": B24_TOKEN}}


def percentiles(samples: list[float]) -> dict:
    ordered = sorted(samples)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"p50": statistics.median(ordered), "p95": pick(0.95), "p99": pick(0.99)}


def ms(value: float) -> str:
    return f"{value * 1000:.2f} ms"


def table(title: str, header: list[str], rows: list[list]) -> str:
    lines = [f"\n### {title}\n", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


@contextmanager
def chalice_local(env: dict[str, str]) -> Iterator[str]:
    """The app under `chalice local` on a free loopback port, with `env` (the local stack's); yields its
    base URL once /health answers, and stops it afterwards."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", "from chalice.cli import main; main()", "local",
                               "--no-autoreload", "--port", str(port), "--stage", "dev"],
                              cwd=Path(__file__).resolve().parent.parent, env={**os.environ, **env, "STAGE": "dev"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(base + "/health")
        yield base
    finally:
        server.terminate()
        server.wait()
