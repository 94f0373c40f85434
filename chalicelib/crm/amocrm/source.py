"""The amoCRM `CrmSource`: bulk reads through the API client, then the pure translation. Every failure
reaches the caller as the error taxonomy with source "amocrm", raised by the client (`api.classify`).

Orders carry the integration's `currency`, else the account's; phones are read as written in the
integration's `phone_region`, else the account's `country`, else Russia. Both account values come from
`GET /api/v4/account` ("Параметры аккаунта",
https://www.amocrm.ru/developers/content/crm_platform/account-info; Kommo "Account parameters",
https://developers.kommo.com/reference/account-parameters: `country`, `currency`), read when the integration lacks one of them and kept in the store per account (`scope` from
the base URL, so a new base URL is read afresh: `account`), re-read once a day and after every save of
the integration. An answer that is not the account model (no account `id`) is a failed read, never an
account that names no currency.
"""
from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable

from ...errors import BridgeError, Misconfigured, Transient
from ...logs import log_event
from ...metrika.schemas import normalize_product_id
from ...normalize import DEFAULT_PHONE_REGION, is_phone_region
from .. import CONTACT, ORDER, BackfillPage, EntityRef, EntityRows, slot_waiter
from .account import ACCOUNT_MAX_AGE, account_scope
from .api import MIN_INTERVAL, AmoCrmClient
from .translate import contact_entity, default_mapping, lead_rows, main_contact_id

if TYPE_CHECKING:
    from ...oauth import TokenKeeper
    from ...store import CrmAccountStore

DEFAULT_CLIENT_ID_FIELD = "_YM_UID"


class _ProcessAccounts:
    """The account cache when no store is given (tools, some tests): this process only."""

    def __init__(self) -> None:
        self._accounts: dict[str, dict] = {}

    def get_crm_account(self, scope: str) -> dict | None:
        return dict(self._accounts[scope]) if scope in self._accounts else None

    def put_crm_account(self, scope: str, account: dict) -> None:
        self._accounts[scope] = dict(account)


def _is_account(data: Any) -> bool:
    """The account model of `GET /api/v4/account`: an object with the account's `id` (a positive number)."""
    account_id = data.get("id") if isinstance(data, dict) else None
    return (isinstance(account_id, int) and not isinstance(account_id, bool) and account_id > 0) or (
        isinstance(account_id, str) and account_id.isascii() and account_id.isdigit() and int(account_id) > 0)


@dataclass(frozen=True)
class Settings:
    """What the translation needs from the integration, with the account's defaults filled in."""

    client_id_field: str
    currency: str | None
    phone_region: str
    cost_field: str | None


class AmoCrmSource:
    """`reserve_slot(scope, interval, now) -> start time` is the shared rate limiter (DynamoDB), so
    every worker together stays under 7 requests a second per amoCRM token. `accounts` keeps what
    `/api/v4/account` said (a `CrmAccountStore`: the state store), so it is asked once, not per delivery."""

    def __init__(self, reserve_slot: Callable[[str, float, float], float], *, accounts: CrmAccountStore | None = None,
                 clock: Callable[[], float] = time.time, keeper: TokenKeeper | None = None, **client_options: Any) -> None:
        self._reserve_slot = reserve_slot
        self._keeper = keeper  # installed (OAuth) integrations' tokens: chalicelib.oauth
        self._accounts = accounts if accounts is not None else _ProcessAccounts()
        self._clock = clock
        self._client_options = client_options

    def client_for(self, integration: dict) -> AmoCrmClient:
        connection = integration["connection"]
        if connection.get("auth") == "oauth":
            return self._oauth_client(integration)
        scope = "amocrm:" + hashlib.sha256(f"{connection['base_url']}|{connection['access_token']}".encode()).hexdigest()[:16]
        wait_for_slot = slot_waiter(self._reserve_slot, scope, MIN_INTERVAL)
        return AmoCrmClient(connection["base_url"], connection["access_token"], wait_for_slot=wait_for_slot,
                            **self._client_options)

    def keep_alive(self, integration: dict) -> bool:
        """The scheduled refresh of an installed integration: refresh when the tokens were last
        refreshed more than 30 days ago (`oauth.MAX_IDLE_SECONDS`), so the 3-month refresh token of an
        account without deals does not age out. True when it refreshed."""
        from .oauth import MAX_IDLE_SECONDS
        if self._keeper is None:
            return False
        tokens_id = f"amocrm-{integration['connection'].get('account_id')}"
        return self._keeper.keep_alive(tokens_id, integration, max_idle=MAX_IDLE_SECONDS)

    def _oauth_client(self, integration: dict) -> AmoCrmClient:
        """An installed integration: the access token from the token keeper (refreshed when due), and
        on a 401 one forced refresh and one retry (`AmoCrmClient`'s `reauthorize`). The tokens are the
        account's (`amocrm-<account id>`, as the install stores them); the rate scope too, since the
        token changes daily."""
        if self._keeper is None:
            raise Misconfigured("this deployment has no amoCRM OAuth client configured (AMOCRM_CLIENT_ID)", source="amocrm")
        connection = integration["connection"]
        tokens_id = f"amocrm-{connection.get('account_id')}"
        keeper = self._keeper
        scope = "amocrm:" + hashlib.sha256(f"{connection['base_url']}|oauth|{tokens_id}".encode()).hexdigest()[:16]
        return AmoCrmClient(connection["base_url"], keeper.access_token(tokens_id, integration),
                            wait_for_slot=slot_waiter(self._reserve_slot, scope, MIN_INTERVAL),
                            reauthorize=lambda rejected: keeper.access_token(tokens_id, integration, rejected=rejected),
                            **self._client_options)

    def settings(self, client: AmoCrmClient, integration: dict) -> Settings:
        """The integration's settings; a missing `currency` or `phone_region` from the account."""
        account = {}
        if not integration.get("currency") or not integration.get("phone_region"):
            account = self.account(client, integration)
        currency = integration.get("currency") or str(account.get("currency") or "").upper()
        country = str(account.get("country") or "").upper()
        region = integration.get("phone_region") or (country if is_phone_region(country) else DEFAULT_PHONE_REGION)
        return Settings(client_id_field=integration.get("client_id_field") or DEFAULT_CLIENT_ID_FIELD,
                        currency=currency if re.fullmatch(r"[A-Z]{3}", currency) else None,
                        phone_region=region, cost_field=integration.get("cost_field") or None)

    def account(self, client: AmoCrmClient, integration: dict) -> dict:
        """`country` and `currency` of the integration's account, from the store when read in the last
        day from the same base URL and not made stale by a save since (`account.expire_account`), else
        from `GET /api/v4/account` (then stored). A failed read raises, so orders are not sent in a
        guessed currency; an older copy is used rather than failing. A 200 that is not the account (not
        an object with its `id`: a proxy's or a maintenance answer) is a failed read, and is not kept."""
        base_url = integration["connection"]["base_url"]
        scope = account_scope(base_url)
        cached = self._accounts.get_crm_account(scope)
        if cached is not None and cached.get("base_url") != base_url:
            cached = None
        now = self._clock()
        if cached is not None and now - float(cached.get("read_at") or 0) < ACCOUNT_MAX_AGE:
            return cached
        try:
            data = client.get("/api/v4/account")
            if not _is_account(data):
                raise Transient("amoCRM's GET /api/v4/account answered something that is not the account (no account "
                                f"id): {' '.join(repr(data)[:200].split())}", source="amocrm")
        except BridgeError as exc:
            if cached is None:
                raise
            log_event("crm_account_stale", crm="amocrm", error=exc.message[:300])
            return cached
        account = {"base_url": base_url, "read_at": int(now),
                   "country": str(data.get("country") or "")[:8], "currency": str(data.get("currency") or "")[:8]}
        self._accounts.put_crm_account(scope, account)
        return account

    def snapshot(self, integration: dict, mapping: list[dict], refs: list[EntityRef],
                 attributes: list[dict] = ()) -> dict[tuple[str, str], EntityRows]:
        """Two to four requests for a whole batch: leads (with contacts and products), then contacts
        (and, once a day per account, the account's country and currency)."""
        client = self.client_for(integration)
        settings = self.settings(client, integration)
        lead_ids = [r.crm_id for r in refs if r.kind == ORDER]
        leads = {str(lead["id"]): lead for lead in client.leads(lead_ids)} if lead_ids else {}
        rows = self._lead_entities(client, settings, mapping, attributes, list(leads.values()),
                                   [r.crm_id for r in refs if r.kind == CONTACT])
        for ref in refs:
            rows.setdefault((ref.kind, ref.crm_id), EntityRows(gone=True))
        return rows

    def _lead_entities(self, client: AmoCrmClient, settings: Settings, mapping: list[dict], attributes: list[dict],
                       leads: list[dict], contact_ids: list[str]) -> dict[tuple[str, str], EntityRows]:
        """Leads (with their main contacts, read in bulk) and contacts → rows, keyed by (kind, id)."""
        wanted = [str(cid) for cid in map(main_contact_id, leads) if cid is not None] + contact_ids
        contacts = {c["id"]: c for c in client.contacts(wanted)} if wanted else {}
        now = datetime.now(timezone.utc)
        pipelines = None
        rows: dict[tuple[str, str], EntityRows] = {}
        for lead in leads:
            options = dict(mapping=mapping, client_id_field=settings.client_id_field, now=now,
                           currency=settings.currency, phone_region=settings.phone_region,
                           cost_field=settings.cost_field, attributes=attributes)
            entity = lead_rows(lead, contacts, pipelines=pipelines, **options)
            if entity.error and pipelines is None:  # name the stage for the person who must map it
                pipelines = {p["id"]: p for p in client.pipelines()}
                entity = lead_rows(lead, contacts, pipelines=pipelines, **options)
            rows[(ORDER, str(lead["id"]))] = entity
        for contact_id in contact_ids:
            contact = contacts.get(int(contact_id))
            if contact is not None:
                rows[(CONTACT, contact_id)] = contact_entity(contact, settings.client_id_field, now,
                                                             phone_region=settings.phone_region, attributes=attributes)
        return rows

    def product_names(self, integration: dict, products: dict[str, dict]) -> dict[str, str]:
        """Names of linked catalog elements, one bulk read per catalog
        (https://www.amocrm.ru/developers/content/crm_platform/catalogs-api "Каталоги")."""
        client = self.client_for(integration)
        by_catalog: dict[Any, list[str]] = {}
        for hint in products.values():
            if hint.get("catalog_id") and hint.get("element_id"):
                by_catalog.setdefault(hint["catalog_id"], []).append(str(hint["element_id"]))
        return {normalize_product_id(e["id"]): e.get("name") or str(e["id"])
                for catalog_id, ids in by_catalog.items() for e in client.catalog_elements(catalog_id, ids)}

    def catalog(self, integration: dict) -> dict[str, str]:
        """Every element of the account's product catalogs (`type` products)."""
        client = self.client_for(integration)
        return {normalize_product_id(e["id"]): e.get("name") or str(e["id"])
                for c in client.catalogs() if c.get("type") == "products"
                for e in client.all_catalog_elements(c["id"])}

    def backfill_page(self, integration: dict, mapping: list[dict], attributes: list[dict], phase: str,
                      since: int, cursor: dict | None) -> BackfillPage:
        """One API page (250) of contacts, or of leads plus one bulk read of their main contacts."""
        client = self.client_for(integration)
        settings = self.settings(client, integration)
        page = (cursor or {}).get("page", 1)
        entity = "contacts" if phase == "contacts" else "leads"
        items, more = client.page(entity, since, page, with_=None if phase == "contacts" else "contacts,catalog_elements")
        if phase == "contacts":
            now = datetime.now(timezone.utc)
            rows = {(CONTACT, str(c["id"])): contact_entity(c, settings.client_id_field, now,
                                                            phone_region=settings.phone_region, attributes=attributes)
                    for c in items}
        else:
            rows = self._lead_entities(client, settings, mapping, attributes, items, [])
        kind = CONTACT if phase == "contacts" else ORDER
        times = {(kind, str(i["id"])): int(i.get("updated_at") or 0) for i in items}
        requests = 1 + (phase != "contacts" and any(main_contact_id(i) for i in items))
        return BackfillPage(rows, times, {"page": page + 1} if more else None, requests=requests)

    def default_mapping(self, integration: dict) -> list[dict]:
        """Proposed status mapping from the account's pipelines (142 → PAID, 143 → CANCELLED, the rest
        IN_PROGRESS)."""
        return default_mapping(self.client_for(integration).pipelines())

    def fields(self, integration: dict) -> list[dict]:
        """The fields a custom attribute can be read from, for the console: leads' (orders) and contacts',
        by id, as `crm_field` takes them."""
        client = self.client_for(integration)
        return [{"id": str(f["id"]), "name": str(f.get("name") or f["id"]), "code": f.get("code"), "entity": entity,
                 "type": f.get("type")}
                for entity, path in (("order", "leads"), ("contact", "contacts"))
                for f in client.custom_fields(path) if isinstance(f, dict) and "id" in f]

    def changed_since(self, integration: dict, since: int) -> list[EntityRef]:
        """Leads updated since `since` (Unix seconds), for reconciliation."""
        return [EntityRef(ORDER, str(lead["id"]), int(lead["updated_at"]), "reconcile")
                for lead in self.client_for(integration).leads_updated_since(since)]

    def webhook_health(self, integration: dict, integration_id: str) -> dict:
        """Our webhook as amoCRM lists it: registered, and not `disabled` after failed deliveries
        (https://www.amocrm.ru/developers/content/crm_platform/webhooks-api, the webhook list with its
        `disabled` flag)."""
        mine = [h for h in self.client_for(integration).webhooks()
                if f"/webhooks/amocrm/{integration_id}" in str(h.get("destination", ""))]
        return {"registered": bool(mine), "disabled": any(h.get("disabled") for h in mine),
                "events": sorted({e for h in mine for e in h.get("settings") or []})}
