"""Issue 15, item 6: DynamoDB writes per delivered update, on the steady path.

A deal changes in the CRM → its webhook is recorded (`Ingest`) → the worker re-reads it from the CRM and
uploads it (`Worker`, `delivery.Sink`) → the confirm job reads Metrika's verdict (`schedules.Jobs`). The
store is `DynamoStore` on moto's DynamoDB; every write call (PutItem, UpdateItem, DeleteItem, and each
item of a BatchWriteItem or TransactWriteItems) is counted through a botocore `before-call` hook, by
table and by the store method that made it (the outermost `DynamoStore` method on the calling thread).
The CRM is the amoCRM or Bitrix24 sandbox and Metrika the Metrika sandbox, over loopback HTTP; the queue
is the in-memory one (SQS is no DynamoDB cost). Failed conditional writes are counted too: DynamoDB bills
them as writes.

Scenarios (each measured after a first delivery of the same deals, so the path is the steady one):

* amocrm-lead: one amoCRM lead updated (its contact rides along in the delivery);
* amocrm-batch: 10 amoCRM leads updated, one webhook each, delivered by one worker batch;
* bitrix24-deal: one Bitrix24 deal updated.

    python -m bench.writes            (about 10 seconds)
"""
from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import wraps
from typing import Any, Iterator

WRITE_OPERATIONS = ("PutItem", "UpdateItem", "DeleteItem", "BatchWriteItem", "TransactWriteItems")
# Writes whose cost one delivered update shares with the others of its Metrika request (the upload's
# record, the governor's lease and day count) or of its worker batch / CRM read (the CRM rate limiter).
SHARED_METHODS = frozenset({"record_upload", "confirm_upload", "acquire_lease", "release_lease", "count_request",
                            "reserve_slot", "put_products", "put_cursor"})


@dataclass
class Writes:
    """Write calls counted, by (store method, table)."""

    calls: Counter = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return sum(self.calls.values())

    def by_method(self) -> Counter:
        out: Counter = Counter()
        for (method, _), n in self.calls.items():
            out[method] += n
        return out

    def by_table(self) -> Counter:
        out: Counter = Counter()
        for (_, table), n in self.calls.items():
            out[table] += n
        return out

    def own(self) -> int:
        """Writes made for one entity or customer (not shared by a request or a batch)."""
        return sum(n for (method, _), n in self.calls.items() if method not in SHARED_METHODS)

    def shared(self) -> int:
        return self.total - self.own()


class WriteCounter:
    """Counts a boto3 DynamoDB client's write calls, attributed to the `DynamoStore` method that made them."""

    def __init__(self, client: Any, tables: dict[str, str]) -> None:
        self._tables = {name: role for role, name in tables.items()}  # table name → "state" / "config" / "quota"
        self._local = threading.local()
        self._lock = threading.Lock()
        self.writes = Writes()
        client.meta.events.register("before-parameter-build.dynamodb", self._record)

    def reset(self) -> Writes:
        with self._lock:
            done, self.writes = self.writes, Writes()
        return done

    def _record(self, model: Any, params: dict, **_: Any) -> None:
        if model.name not in WRITE_OPERATIONS:
            return
        method = (getattr(self._local, "stack", None) or ["(outside the store)"])[0]
        if model.name == "BatchWriteItem":
            items = [(t, len(r)) for t, r in params.get("RequestItems", {}).items()]
        elif model.name == "TransactWriteItems":
            items = [(next(iter(i.values()))["TableName"], 1) for i in params.get("TransactItems", [])]
        else:
            items = [(params.get("TableName", "?"), 1)]
        with self._lock:
            for table, n in items:
                self.writes.calls[(method, self._tables.get(table, table))] += n

    def wrap(self, store: Any) -> Any:
        """Wrap the store object's public methods so each write is attributed to the outermost one."""
        for name in [n for n in dir(store) if not n.startswith("_") and callable(getattr(store, n))]:
            real = getattr(store, name)

            @wraps(real)
            def wrapped(*args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
                stack = self._local.__dict__.setdefault("stack", [])
                stack.append(_name)
                try:
                    return _real(*args, **kwargs)
                finally:
                    stack.pop()
            setattr(store, name, wrapped)
        return store


class Rig:
    """The delivery path in process on DynamoStore (moto) with a counted client; CRM sources and the
    Metrika client over loopback HTTP to the sandboxes; the in-memory queue."""

    def __init__(self, metrika_url: str) -> None:
        import boto3

        from chalicelib.crm.amocrm.source import AmoCrmSource
        from chalicelib.crm.bitrix24.source import Bitrix24Source
        from chalicelib.ingest import Ingest
        from chalicelib.queue import MemoryQueue
        from chalicelib.settings import get_settings
        from chalicelib.store.dynamodb import DynamoStore
        from chalicelib.worker import Worker
        settings = get_settings()
        client = boto3.client("dynamodb")
        self.counter = WriteCounter(client, {"config": settings.config_table, "state": settings.state_table,
                                             "quota": settings.quota_table})
        self.store = self.counter.wrap(DynamoStore(client, settings.config_table, settings.state_table,
                                                   quota_table=settings.quota_table))
        self.queue = MemoryQueue()
        self.metrika_url = metrika_url
        self.sources = {"amocrm": AmoCrmSource(self.store.reserve_slot, accounts=self.store),
                        "bitrix24": Bitrix24Source(self.store.reserve_slot)}
        self.ingest = Ingest(self.store, self.queue, max_body_bytes=2 * 1024 * 1024)
        self.worker = Worker(self.store, self.queue, self.metrika_for, self.sources)

    def metrika_for(self, integration: dict) -> Any:
        from chalicelib.metrika.client import MetrikaClient
        from chalicelib.metrika.governor import QuotaGovernor
        token = integration["metrika_token"]
        return MetrikaClient(token, self.metrika_url, governor=QuotaGovernor(self.store, token, emit=lambda line: None))

    def integration(self, config: dict) -> str:
        from chalicelib.mapping_admin import replace_mapping
        from chalicelib.operations import default_mapping
        integration_id = "writes-" + uuid.uuid4().hex[:10]
        self.store.put_integration(integration_id, config)
        replace_mapping(self.store, integration_id, {"entries": default_mapping(self.store, self.sources, integration_id)},
                        self.metrika_for)
        return integration_id

    def drain(self) -> None:
        """The worker on every queued message (one batch of up to 100), until the queue is empty."""
        for _ in range(20):
            bodies = self.queue.receive(100)
            if not bodies:
                return
            self.worker.handle(bodies)
        raise AssertionError("the queue did not drain")

    def confirm(self, integration_id: str) -> dict:
        """The confirm job, as the worker runs it for a schedule's run."""
        from chalicelib.schedules import Jobs
        return Jobs(self.store, self.queue, self.metrika_for, self.sources).run("confirm", integration_id,
                                                                                 str(int(time.time()) + 1))


@dataclass
class Measured:
    """One scenario's update: the writes from the webhooks to the uploads (`delivery`), and those of the
    confirm job's run that confirmed the uploads (`confirmation`)."""

    scenario: str
    delivered: int  # updates delivered (entities whose change went up)
    webhooks: int  # webhook requests the CRM sent for them
    uploads: int  # Metrika upload requests
    delivery: Writes
    confirmation: Writes

    def per_update(self) -> float:
        """Every write from the webhook to the upload's confirmation, the confirm run's own included."""
        return (self.delivery.total + self.confirmation.total) / self.delivered

    def steady_per_update(self) -> float:
        """What a delivered update costs on the steady path: its own writes, and its share of its worker
        batch's CRM read and of its upload (the request's governor writes and the upload's record and
        confirmation). The confirm run's read of Metrika (a lease and a day count) and its cursor are per
        integration and schedule period, whatever number of uploads it confirms: left out (`run_writes`)."""
        upload_record = self.confirmation.by_method()["confirm_upload"]
        return (self.delivery.total + upload_record) / self.delivered

    def run_writes(self) -> int:
        return self.confirmation.total - self.confirmation.by_method()["confirm_upload"]


def _amocrm_config(amocrm: Any, secret: str) -> dict:
    return {"crm": "amocrm", "counter_id": 7000 + uuid.uuid4().int % 1000,
            "metrika_token": "y0_writes-" + uuid.uuid4().hex[:8], "timezone": "Europe/Moscow",
            "connection": {"base_url": amocrm.url, "access_token": amocrm.token, "account_id": str(amocrm.account_id),
                           "webhook_secret": secret}}


def _post_amocrm(rig: Rig, integration_id: str, amocrm: Any, secret: str) -> int:
    bodies = [body for _, body in amocrm.outbox]
    amocrm.outbox.clear()
    for body in bodies:
        rig.ingest.amocrm(integration_id, body, {"secret": secret})
    return len(bodies)


def _uploads(metrika: Any) -> int:
    """Metrika upload requests (contacts or orders, JSON or CSV) the sandbox answered."""
    return sum(1 for r in metrika.requests if r["method"] == "POST" and "/data/" in r["path"])


def _ensure_pipeline(amocrm: Any) -> None:
    if not any(p["id"] == PIPELINE for p in amocrm.pipelines):
        amocrm.add_pipeline(PIPELINE, "Продажи", [(FIRST_STAGE, "Первичный контакт"), (NEXT_STAGE, "Переговоры")],
                            is_main=True)


PIPELINE, FIRST_STAGE, NEXT_STAGE = 7001, 1001, 1002


def _update(rig: Rig, metrika: Any, integration_id: str, change: Any) -> tuple[Writes, Writes, int, int]:
    """Run `change` (which posts the webhooks, returning how many) through the worker, then the confirm
    job; the writes of each part, the webhooks and the uploads."""
    rig.counter.reset()
    metrika.requests.clear()
    webhooks = change()
    rig.drain()
    delivery = rig.counter.reset()
    uploads = _uploads(metrika)
    result = rig.confirm(integration_id)
    assert result.get("passed") == uploads, result
    return delivery, rig.counter.reset(), webhooks, uploads


def measure_amocrm(rig: Rig, amocrm: Any, metrika: Any, *, deals: int = 1, stage_change: bool = False) -> Measured:
    """`deals` amoCRM leads (each with its own contact) delivered once, then each updated: its price
    (one `update_lead` webhook) or, with `stage_change`, its stage too (amoCRM sends `update_lead` and
    `status_lead`: two webhooks); one worker batch, then the confirm job. The contacts stay as they were."""
    _ensure_pipeline(amocrm)
    secret = "writes-amo-secret-" + uuid.uuid4().hex[:12]
    integration_id = rig.integration(_amocrm_config(amocrm, secret))
    leads = []
    for i in range(deals):
        contact = amocrm.create_contact(f"Покупатель {i}", phones=[f"+7 916 555-{i // 100:02d}-{i % 100:02d}"],
                                        emails=[f"buyer{i}-{uuid.uuid4().hex[:6]}@example.com"], notify=False)
        leads.append(amocrm.create_lead(f"Заказ {i}", PIPELINE, FIRST_STAGE, price=1000 + i, contacts=[contact["id"]],
                                        client_id=f"17171717{i:02d}123456789"))
    _post_amocrm(rig, integration_id, amocrm, secret)
    rig.drain()
    rig.confirm(integration_id)

    def change() -> int:
        for i, lead in enumerate(leads):
            amocrm.update_lead(lead["id"], price=2000 + i, **({"status_id": NEXT_STAGE} if stage_change else {}))
        return _post_amocrm(rig, integration_id, amocrm, secret)

    delivery, confirmation, webhooks, uploads = _update(rig, metrika, integration_id, change)
    states = [rig.store.get_entity(integration_id, "order", str(lead["id"])) for lead in leads]
    assert all(s and not s.get("dirty") and s.get("content_hash") and "queued_until" not in s for s in states), states
    name = ("amocrm-lead" if deals == 1 else f"amocrm-batch-{deals}") + ("-stage" if stage_change else "-price")
    return Measured(name, deals, webhooks, uploads, delivery, confirmation)


def measure_bitrix24(rig: Rig, bitrix: Any, metrika: Any) -> Measured:
    """One Bitrix24 deal (with its contact) delivered once, then its amount changed: one ONCRMDEALUPDATE."""
    application_token = "writes-b24-" + uuid.uuid4().hex[:12]
    config = {"crm": "bitrix24", "counter_id": 8000 + uuid.uuid4().int % 1000,
              "metrika_token": "y0_writes-" + uuid.uuid4().hex[:8], "timezone": "Europe/Moscow",
              "connection": {"webhook_url": bitrix.webhook_url, "application_token": application_token}}
    if "2" not in bitrix.categories:  # the deal's funnel
        bitrix.add_funnel(2, "Опт", [("NEW", "Новая", None), ("WON", "Оплачено", "S"), ("LOSE", "Отказ", "F")])
    integration_id = rig.integration(config)
    contact = bitrix.create_contact("Анна", "Петрова", phones=["+7 916 555-01-02"],
                                    emails=[f"anna-{uuid.uuid4().hex[:6]}@example.com"], notify=False)
    deal = bitrix.create_deal("Заказ", stage_id="C2:NEW", category_id=2, opportunity="15990.00",
                              contact_id=contact["ID"], notify=False)

    def post(event: str) -> int:
        rig.ingest.bitrix24(integration_id, bitrix.event_body(event, deal["ID"], application_token), {})
        return 1

    post("ONCRMDEALADD")
    rig.drain()
    rig.confirm(integration_id)

    def change() -> int:
        bitrix.update_deal(deal["ID"], notify=False, OPPORTUNITY="17990.00")
        return post("ONCRMDEALUPDATE")

    delivery, confirmation, webhooks, uploads = _update(rig, metrika, integration_id, change)
    state = rig.store.get_entity(integration_id, "order", str(deal["ID"]))
    assert state and not state.get("dirty") and state.get("content_hash"), state
    return Measured("bitrix24-deal", 1, webhooks, uploads, delivery, confirmation)


def report(measured: list[Measured]) -> str:
    lines = []
    for m in measured:
        lines.append(f"\n{m.scenario}: {m.delivered} update(s), {m.webhooks} webhook(s), {m.uploads} upload request(s): "
                     f"{m.steady_per_update():.2f} writes per update on the steady path "
                     f"(own {m.delivery.own() / m.delivered:.2f}); {m.run_writes()} for the confirm run itself; "
                     f"all told {m.per_update():.2f} per update")
        for part, writes in (("delivery", m.delivery), ("confirmation", m.confirmation)):
            lines.append(f"  {part}: {writes.total} writes; by table: "
                         + ", ".join(f"{t} {n}" for t, n in sorted(writes.by_table().items())))
            for (method, table), n in sorted(writes.calls.items(), key=lambda kv: (-kv[1], kv[0])):
                kind = "shared" if method in SHARED_METHODS else "own"
                lines.append(f"    {method:<22} {table:<7} {n:>3}  ({n / m.delivered:.2f} per update, {kind})")
    return "\n".join(lines)


@contextmanager
def _stack() -> Iterator[dict]:
    from bench.harness import environment
    with environment() as env:
        yield env


def main() -> None:
    with _stack() as env:
        rig = Rig(env["metrika"].url)
        measured = [measure_amocrm(rig, env["amocrm"], env["metrika"]),
                    measure_amocrm(rig, env["amocrm"], env["metrika"], stage_change=True),
                    measure_amocrm(rig, env["amocrm"], env["metrika"], deals=10),
                    measure_amocrm(rig, env["amocrm"], env["metrika"], deals=10, stage_change=True),
                    measure_bitrix24(rig, env["bitrix24"], env["metrika"])]
    print(report(measured))


if __name__ == "__main__":
    main()
