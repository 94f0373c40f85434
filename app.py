"""metrika-crm-bridge: CRM webhooks in, Yandex Metrika CDP contacts and orders out.

Routes and event handlers only; the work is in chalicelib (docs/architecture.md). Clients are created
on first use, so a cold start that serves a webhook never pays for what it does not touch.
"""
import functools
import json
import os
import time
import traceback
import uuid

from chalice import AuthResponse, AuthRoute, Chalice, Rate, Response

from chalicelib import deadline
from chalicelib.admin import AUTHORIZER_CACHE_SECONDS
from chalicelib.errors import ApiError, OutOfTime, Unavailable, invalid, timed_out
from chalicelib.ids import is_integration_id
from chalicelib.settings import APP_NAME, get_settings

# Worker invocations at once (the SQS event source's maximum concurrency, 2-1000: "ScalingConfig",
# https://docs.aws.amazon.com/lambda/latest/dg/API_ScalingConfig.html). Each runs up to 8 integrations
# side by side (chalicelib/worker.py, WORKER_THREADS), so 10 work on up to 80 integrations at once.
# Why not more: a Metrika token's requests past its 3 slots wait, polling its lease items (failed
# conditional writes, billed like writes); the governor lets at most 3 threads per process hold or wait
# for a token's leases, so 10 workers keep a saturated token to at most 30 pollers. Why not fewer: with
# a token per client, throughput grows with workers until the CRMs' own limits per account (amoCRM 7/s,
# Bitrix24 2/s), which the shared limiter holds whatever the number of workers.
WORKER_CONCURRENCY = 10
DYNAMODB_CONNECTIONS = 64

app = Chalice(app_name=APP_NAME)
FORM = "application/x-www-form-urlencoded"
MAX_JSON_DEPTH = 32  # admin bodies are a few levels deep; deeper is an attack, not a config

_STORE = None
_QUEUE = None
_ADMIN_TOKENS = None  # (settings, chalicelib.admin.AdminTokenCache): re-reads the SSM parameter on its own schedule
_CONSOLE_LINKS = None  # chalicelib.console_links.ConsoleLinks: link tokens' answers, cached briefly
_SOURCES = {}  # crm name → CrmSource, filled on first use (tests may fill it first)
_AMOCRM_SECRET = None  # (settings, chalicelib.amocrm_install.ClientSecret): our amoCRM app's client secret


def get_store():
    global _STORE
    if _STORE is None:
        import boto3
        from botocore.config import Config
        from chalicelib.store.dynamodb import DynamoStore
        settings = get_settings()
        # The worker's 8 integrations at once may each write 8 items at once (chalicelib/parallel.py):
        # botocore's pool of 10 would open and drop a connection per call past ten.
        client = boto3.client("dynamodb", config=Config(max_pool_connections=DYNAMODB_CONNECTIONS))
        _STORE = DynamoStore(client, settings.config_table, settings.state_table, quota_table=settings.quota_table)
    return _STORE


def get_queue():
    global _QUEUE
    if _QUEUE is None:
        import boto3
        from chalicelib.queue import EventQueue
        _QUEUE = EventQueue(boto3.client("sqs"), get_settings().events_queue)
    return _QUEUE


def get_metrika(integration):
    from chalicelib.metrika.client import MetrikaClient
    from chalicelib.metrika.governor import QuotaGovernor
    if "metrika_token" not in integration:  # installed from the CRM, no counter connected yet
        from chalicelib.errors import ApiError
        raise ApiError(409, "metrika_not_connected", "this integration has no Metrika counter yet: PUT it with "
                                                     "counter_id and metrika_token first")
    token = integration["metrika_token"]
    governor = QuotaGovernor(get_store(), token, daily_budget=get_settings().metrika_daily_budget,
                             stage=get_settings().stage)
    return MetrikaClient(token, get_settings().metrika_api_url, governor=governor)


def get_sources():
    if not _SOURCES:
        from chalicelib.crm.amocrm.source import AmoCrmSource
        from chalicelib.crm.bitrix24.source import Bitrix24Source
        _SOURCES["amocrm"] = AmoCrmSource(get_store().reserve_slot, accounts=get_store(), keeper=get_amocrm_keeper())
        from chalicelib.bitrix24_app import keep_alive_for, tokens_for
        # An installed application's calls take their access token from the TOKENS item (single writer).
        _SOURCES["bitrix24"] = Bitrix24Source(
            get_store().reserve_slot, tokens_for=lambda integration: tokens_for(get_bitrix24_keeper())(integration),
            keep_alive=lambda integration: keep_alive_for(get_bitrix24_keeper())(integration))
    return _SOURCES


def get_bitrix24_oauth():
    from chalicelib.bitrix24_app import client_secret
    from chalicelib.crm.bitrix24.oauth import Bitrix24OAuth
    settings = get_settings()
    return Bitrix24OAuth(settings.bitrix24_oauth_url, settings.bitrix24_client_id, lambda: client_secret(settings))


def get_bitrix24_keeper():
    """Installed Bitrix24 applications' tokens (chalicelib/oauth.py), as `Bitrix24App.keeper` builds them,
    without the app's queue: a CRM call's token needs no SQS client."""
    from chalicelib.bitrix24_app import DUE, Bitrix24Refresher
    from chalicelib.oauth import TokenKeeper
    return TokenKeeper(get_store(), Bitrix24Refresher(get_bitrix24_oauth()), due=DUE, integrations=get_store())


def get_bitrix24_app():
    from chalicelib.bitrix24_app import Bitrix24App
    from chalicelib.crm.bitrix24.api import Bitrix24Client
    settings = get_settings()
    return Bitrix24App(get_store(), get_queue(), get_bitrix24_oauth(), allow_loopback=settings.allow_loopback_crm,
                       client_for=lambda endpoint, auth: Bitrix24Client(endpoint, auth=auth))


def get_amocrm_secret():
    global _AMOCRM_SECRET
    if _AMOCRM_SECRET is None or _AMOCRM_SECRET[0] is not get_settings():
        from chalicelib.amocrm_install import ClientSecret
        _AMOCRM_SECRET = (get_settings(), ClientSecret(get_settings()))
    return _AMOCRM_SECRET[1]


def get_amocrm_oauth():
    from chalicelib.amocrm_install import oauth_for
    return oauth_for(get_settings(), get_amocrm_secret())


def get_amocrm_keeper():
    """Installed amoCRM integrations' tokens (chalicelib/oauth.py); None where installs are not configured."""
    from chalicelib.crm.amocrm.oauth import DUE
    from chalicelib.oauth import TokenKeeper
    settings = get_settings()
    if not settings.amocrm_client_id or not settings.public_url:
        return None
    return TokenKeeper(get_store(), get_amocrm_oauth(), due=DUE, integrations=get_store())


def get_admin_tokens():
    global _ADMIN_TOKENS
    settings = get_settings()
    if _ADMIN_TOKENS is None or _ADMIN_TOKENS[0] is not settings:  # made again when the settings are reloaded
        from chalicelib.admin import admin_tokens
        _ADMIN_TOKENS = (settings, admin_tokens(settings))
    return _ADMIN_TOKENS[1]


def get_console_links():
    global _CONSOLE_LINKS
    if _CONSOLE_LINKS is None:
        from chalicelib.console_links import ConsoleLinks
        _CONSOLE_LINKS = ConsoleLinks(lambda integration_id, link_id: get_store().get_console_link(integration_id, link_id))
    return _CONSOLE_LINKS


def get_ingest():
    from chalicelib.ingest import Ingest
    return Ingest(get_store(), get_queue(), max_body_bytes=get_settings().max_webhook_bytes)


def get_backfill():
    from chalicelib.backfill import Backfill
    return Backfill(get_store(), get_queue(), get_metrika, get_sources(), row_limit=get_settings().upload_row_limit)


def get_dead_letters():
    from chalicelib.queue import DeadLetterQueue, redrive_client
    settings = get_settings()
    return DeadLetterQueue(redrive_client(), settings.dead_letter_queue, settings.events_queue)


def get_worker():
    from chalicelib.worker import Worker
    settings = get_settings()
    return Worker(get_store(), get_queue(), get_metrika, get_sources(), row_limit=settings.upload_row_limit,
                  retry_limit=settings.worker_retry_limit, backfill_for=get_backfill)


def answers(view):
    """Every answer is JSON in one shape. Bad input raises `ApiError` (4xx naming the field); our store
    or queue unreachable is a 503 (the CRM retries; what was written is harmless to write again); the
    CRM or Metrika not answering within the request's time is a 504 `timeout` naming it, before API
    Gateway's bare 502 (each route runs under a deadline of `api_seconds()`);
    anything else is a bug: a 500 with a request id, the traceback in the log under the same id."""
    @functools.wraps(view)
    def wrapped(*args, **kwargs):
        try:
            if "integration_id" in kwargs and not is_integration_id(kwargs["integration_id"]):
                # Checked for every route, before any lookup: DynamoDB refuses keys over 2 KB (a 500).
                raise invalid("integration id must be 1-64 characters: Latin letters, digits, _ and -",
                              {"integration_id": str(kwargs["integration_id"])[:80]})
            _console_access(kwargs.get("integration_id"))
            with deadline.invocation(api_seconds(), reserve=deadline.API_RESERVE):
                return json_answer(view(*args, **kwargs))
        except ApiError as error:
            return json_answer(error.body(), error.status)
        except OutOfTime as exc:  # a call no route turned into its own answer
            error = timed_out(exc)
            return json_answer(error.body(), error.status)
        except Unavailable as exc:
            _log_failure("unavailable", exc)
            return json_answer({"error": "unavailable", "message": f"{exc}; please retry"}, 503)
        except Exception as exc:  # noqa: BLE001 — a bug: say so, with an id to find it in the log
            request_id = _log_failure("internal_error", exc)
            return json_answer({"error": "internal_error", "request_id": request_id,
                                "message": f"an unexpected error occurred (request id {request_id})"}, 500)
    return wrapped


JSON_UTF8 = "application/json; charset=utf-8"


def json_answer(body, status=200):
    """Every JSON answer, written in one place: UTF-8 text (a Cyrillic stage name reads as itself, not
    as `\\u041f…` escapes) with its charset named. A view's own `Response` passes unchanged."""
    if isinstance(body, Response):
        return body
    return Response(body=json_text(body), status_code=status, headers={"Content-Type": JSON_UTF8})


def json_text(body):
    """`body` as JSON text that encodes to UTF-8: a lone surrogate (a CRM's or Metrika's `"\\ud800"`,
    decoded by json.loads) reads as U+FFFD instead of failing the answer after the view returned."""
    text = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


def _console_access(integration_id):
    """A console link's request reaches only its own integration's console routes (the authorizer's
    policy says so too: chalicelib/console_links.py)."""
    from chalicelib.console_links import check_access
    request = app.current_request
    if request is None:
        return
    context = request.context or {}
    check_access(context.get("authorizer"), request.method, context.get("resourcePath"), integration_id)


def api_seconds():
    """This request's time: API Gateway's 29 s from when it received the request, within the Lambda's
    own remaining time (`deadline.api_seconds`)."""
    context = getattr(app, "lambda_context", None)
    received = ((app.current_request.context if app.current_request else None) or {}).get("requestTimeEpoch")
    return deadline.api_seconds(
        lambda_remaining=context.get_remaining_time_in_millis() / 1000 if context is not None else None,
        received_at=received / 1000 if isinstance(received, (int, float)) and not isinstance(received, bool) else None,
        now=time.time())


def lambda_deadline(context, reserve):
    """The invocation's deadline from its Lambda context (`chalicelib.deadline`): the worker's and the
    schedules'. No context (a caller outside Lambda, such as a test), no deadline."""
    remaining = context.get_remaining_time_in_millis() / 1000 if context is not None else None
    return deadline.invocation(remaining, reserve=reserve)


def _log_failure(event, exc):
    from chalicelib.logs import log_event
    context = (app.current_request.context if app.current_request else None) or {}
    request_id = context.get("requestId") or uuid.uuid4().hex
    log_event(event, request_id=request_id, path=context.get("resourcePath"), error=type(exc).__name__,
              traceback=traceback.format_exc(limit=12))
    return request_id


def json_body():
    """The request's JSON body (None when empty), parsed here so that malformed or absurdly deep JSON
    is a 400, not a RecursionError."""
    raw = app.current_request.raw_body
    if not raw:
        return None
    try:
        body = json.loads(raw, parse_constant=_no_constant)
        json.dumps(body, ensure_ascii=False).encode("utf-8")  # a lone surrogate ("\ud800") cannot be stored or sent
    except (ValueError, RecursionError, UnicodeError):
        raise invalid("body is not valid JSON (NaN, Infinity, lone surrogates, numbers over 4,300 digits and "
                      "nesting too deep are refused)") from None
    if _depth(body) > MAX_JSON_DEPTH:
        raise invalid(f"body is nested more than {MAX_JSON_DEPTH} levels deep")
    return body


def _no_constant(name):
    raise ValueError(f"{name} is not JSON")


def _depth(value, level=0):
    if level > MAX_JSON_DEPTH:
        return level
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return max((_depth(child, level + 1) for child in children), default=level)


@app.middleware("http")
def one_error_shape(request, get_response):
    """Chalice answers some requests itself (415 for another Content-Type, 405, a 500 outside `answers`)
    with `{"Code", "Message"}`: those are rewritten into the shape every other answer has."""
    from chalicelib.errors import reshape_chalice_error
    response = get_response(request)
    context = (request.context if request is not None else None) or {}
    body = reshape_chalice_error(response.status_code, response.body, request_id=context.get("requestId"))
    if body is not None:  # written as every other JSON answer is (json_answer): UTF-8 text, charset named
        response.body = json_text(body)
        response.headers = {**{k: v for k, v in (response.headers or {}).items() if k.lower() != "content-type"},
                            "Content-Type": JSON_UTF8}
    return response


@app.authorizer(ttl_seconds=AUTHORIZER_CACHE_SECONDS)
def admin(auth_request):
    # A token that cannot be checked (SSM unreachable) is refused like a wrong one: API Gateway answers
    # 403, never a 500 (rotation, overlap and cache times: chalicelib/admin.py).
    if get_admin_tokens().is_admin(auth_request.token):
        return AuthResponse(routes=["*"], principal_id="admin", context={"role": "admin"})
    # A console link: its own integration's console routes only (chalicelib/console_links.py).
    from chalicelib.admin import bearer_token
    from chalicelib.console_links import policy_routes
    integration_id = get_console_links().integration_for(bearer_token(auth_request.token))
    if integration_id is not None:
        return AuthResponse(routes=[AuthRoute(path, methods) for path, methods in policy_routes(integration_id)],
                            principal_id=f"console:{integration_id}",
                            context={"role": "console", "integration_id": integration_id})
    return AuthResponse(routes=[], principal_id="anonymous")


# Start of routes.

@app.route("/health")
def health():
    return {"status": "ok"}


@app.route("/integrations/{integration_id}", methods=["PUT"], authorizer=admin)
@answers
def put_integration(integration_id):
    from chalicelib.integrations import save_integration
    from chalicelib.mapping_admin import push_to_new_counter
    return save_integration(get_store(), integration_id, json_body(),
                            lambda config: get_metrika(config).counter_time_zone(config["counter_id"]),
                            allow_loopback=get_settings().allow_loopback_crm,
                            around_save=lambda config: push_to_new_counter(get_store(), integration_id, config,
                                                                           get_metrika))


@app.route("/integrations/{integration_id}", methods=["GET"], authorizer=admin)
@answers
def get_integration(integration_id):
    from chalicelib.integrations import get_integration as read, public_view
    return public_view(read(get_store(), integration_id))


@app.route("/integrations/{integration_id}", methods=["DELETE"], authorizer=admin)
@answers
def delete_integration(integration_id):
    from chalicelib.amocrm_install import remove_webhook
    from chalicelib.errors import not_found
    keeper = get_amocrm_keeper()  # an installed amoCRM integration's webhook goes first (best effort)
    removed = remove_webhook(get_store(), integration_id, keeper=keeper, oauth=keeper and get_amocrm_oauth(),
                             public_url=get_settings().public_url)
    if not get_store().delete_integration(integration_id):
        raise not_found(f"integration {integration_id!r}")
    return {"deleted": integration_id, **removed}


@app.route("/integrations/{integration_id}/status-mapping", methods=["GET"], authorizer=admin)
@answers
def get_status_mapping(integration_id):
    from chalicelib.mapping_admin import read_mapping
    return read_mapping(get_store(), integration_id)


@app.route("/integrations/{integration_id}/status-mapping", methods=["PUT"], authorizer=admin)
@answers
def put_status_mapping(integration_id):
    from chalicelib.mapping_admin import replace_mapping
    return replace_mapping(get_store(), integration_id, json_body(), get_metrika, get_ingest().requeue_held)


@app.route("/integrations/{integration_id}/status-mapping/defaults", methods=["GET"], authorizer=admin)
@answers
def propose_status_mapping(integration_id):
    from chalicelib.operations import default_mapping
    return {"integration_id": integration_id, "entries": default_mapping(get_store(), get_sources(), integration_id)}


@app.route("/integrations/{integration_id}/status-mapping/defaults", methods=["POST"], authorizer=admin)
@answers
def apply_status_mapping_defaults(integration_id):
    from chalicelib.mapping_admin import read_mapping, replace_mapping
    from chalicelib.operations import default_mapping
    from chalicelib.status_mapping import merge_defaults
    current = read_mapping(get_store(), integration_id)["entries"]
    entries = merge_defaults(current, default_mapping(get_store(), get_sources(), integration_id))
    return replace_mapping(get_store(), integration_id, {"entries": entries}, get_metrika, get_ingest().requeue_held)


@app.route("/integrations/{integration_id}/attributes", methods=["GET"], authorizer=admin)
@answers
def get_attributes(integration_id):
    from chalicelib.attributes import read_attributes
    return read_attributes(get_store(), integration_id)


@app.route("/integrations/{integration_id}/attributes", methods=["PUT"], authorizer=admin)
@answers
def put_attributes(integration_id):
    from chalicelib.attributes import replace_attributes
    return replace_attributes(get_store(), integration_id, json_body(), get_metrika)


@app.route("/integrations/{integration_id}/products/sync", methods=["POST"], authorizer=admin)
@answers
def sync_products(integration_id):
    from chalicelib.operations import sync_catalog
    return sync_catalog(get_store(), get_metrika, get_sources(), integration_id)


@app.route("/integrations/{integration_id}/backfill", methods=["POST"], authorizer=admin)
@answers
def start_backfill(integration_id):
    return get_backfill().start(integration_id, json_body())


@app.route("/integrations/{integration_id}/backfill", methods=["GET"], authorizer=admin)
@answers
def backfill_status(integration_id):
    return get_backfill().status(integration_id)


@app.route("/integrations/{integration_id}/backfill/stop", methods=["POST"], authorizer=admin)
@answers
def stop_backfill(integration_id):
    return get_backfill().stop(integration_id)


@app.route("/integrations/{integration_id}/reconcile", methods=["POST"], authorizer=admin)
@answers
def reconcile_integration(integration_id):
    return _reconcile(integration_id, json_body())


@app.route("/integrations/{integration_id}/confirm", methods=["POST"], authorizer=admin)
@answers
def confirm_integration_uploads(integration_id):
    body = json_body()
    if body not in (None, {}):
        raise invalid("this route takes no body (or {}): it confirms every upload still waiting")
    return _confirm(integration_id)


@app.route("/integrations/{integration_id}/status", methods=["GET"], authorizer=admin)
@answers
def integration_status(integration_id):
    from chalicelib.integrations import get_integration as read
    from chalicelib.operations import integration_status as status, webhook_health
    integration = read(get_store(), integration_id)
    from chalicelib.amocrm_install import token_status
    extra = token_status(get_store(), integration_id, integration)
    if "metrika_token" not in integration:  # installed, no Metrika counter connected yet
        return {"integration_id": integration_id, **extra}
    return {**status(get_store(), integration_id, requests_today=get_metrika(integration).governor.used_today(),
                     webhook_health=webhook_health(get_sources(), integration_id, integration),
                     backfill=get_backfill().status(integration_id)["backfill"]), **extra}


@app.route("/integrations/{integration_id}/replay", methods=["POST"], authorizer=admin)
@answers
def replay_integration(integration_id):
    from chalicelib.integrations import get_integration as read
    from chalicelib.operations import replay
    read(get_store(), integration_id)
    return replay(get_store(), get_ingest().requeue, integration_id, json_body())


@app.route("/dead-letters", methods=["GET"], authorizer=admin)
@answers
def count_dead_letters():
    return get_dead_letters().count()


@app.route("/dead-letters/redrive", methods=["POST"], authorizer=admin)
@answers
def redrive_dead_letters():
    from chalicelib.operations import redrive_limit
    limit = redrive_limit(json_body())  # a bad body is a 400 before any queue is touched
    return get_dead_letters().redrive(limit=limit)  # no round starts past the request's deadline


# --- The web console (issue 17): its page, console links, and what its pages read. A console link's
# token reaches only chalicelib.console_links.CONSOLE_ROUTES of its own integration. ---

@app.route("/console")
def console_page():
    return _console_asset("index.html")


@app.route("/console/{name}")
def console_asset(name):
    return _console_asset(name)


@app.route("/integrations", methods=["GET"], authorizer=admin)
@answers
def list_integrations():
    from chalicelib.console_api import health, page_of_integrations
    from chalicelib.operations import webhook_health
    query = app.current_request.query_params or {}
    budget = get_settings().metrika_daily_budget

    def integration_health(integration_id, config):
        used = get_metrika(config).governor.used_today() if config.get("metrika_token") else None
        return health(get_store(), integration_id, requests_left=None if used is None else max(budget - used, 0),
                      webhook=webhook_health(get_sources(), integration_id, config))
    return page_of_integrations(get_store(), after=query.get("after"), limit=query.get("limit"),
                                health=integration_health)


@app.route("/integrations/{integration_id}/summary", methods=["GET"], authorizer=admin)
@answers
def integration_summary(integration_id):
    from chalicelib.console_api import integration_summary as summary
    return summary(get_store(), integration_id)


@app.route("/integrations/{integration_id}/stages", methods=["GET"], authorizer=admin)
@answers
def integration_stages(integration_id):
    from chalicelib.console_api import stages
    from chalicelib.operations import default_mapping
    return stages(get_store(), default_mapping(get_store(), get_sources(), integration_id), integration_id)


@app.route("/integrations/{integration_id}/fields", methods=["GET"], authorizer=admin)
@answers
def integration_fields(integration_id):
    from chalicelib.console_api import crm_fields
    return crm_fields(get_store(), get_sources(), integration_id)


@app.route("/integrations/{integration_id}/delivery", methods=["GET"], authorizer=admin)
@answers
def integration_delivery(integration_id):
    from chalicelib.console_api import delivery_series
    from chalicelib.integrations import get_integration as read
    read(get_store(), integration_id)
    return delivery_series(get_store(), integration_id)


@app.route("/integrations/{integration_id}/console-links", methods=["POST"], authorizer=admin)
@answers
def create_console_link(integration_id):
    from chalicelib.console_api import base_url
    from chalicelib.console_links import create
    return create(get_store(), integration_id, json_body(),
                  base_url(app.current_request, f"/integrations/{integration_id}/console-links"))


@app.route("/integrations/{integration_id}/console-links", methods=["GET"], authorizer=admin)
@answers
def list_console_links(integration_id):
    from chalicelib.console_links import listing
    return listing(get_store(), integration_id)


@app.route("/integrations/{integration_id}/console-links/{link_id}", methods=["DELETE"], authorizer=admin)
@answers
def revoke_console_link(integration_id, link_id):
    from chalicelib.console_links import revoke
    return revoke(get_store(), integration_id, link_id)


def _console_asset(name):
    from chalicelib.console_api import asset
    status, headers, body = asset(name)
    return Response(body=body, status_code=status, headers=headers)

# --- End of the web console. ---


@app.route("/webhooks/amocrm/{integration_id}", methods=["POST"], content_types=[FORM])
@answers
def amocrm_webhook(integration_id):
    request = app.current_request
    return get_ingest().amocrm(integration_id, request.raw_body, request.query_params or {},
                               encoding=request.headers.get("content-encoding"))


@app.route("/webhooks/bitrix24/{integration_id}", methods=["POST"], content_types=[FORM])
@answers
def bitrix24_webhook(integration_id):
    request = app.current_request
    return get_ingest().bitrix24(integration_id, request.raw_body, request.query_params or {},
                                 encoding=request.headers.get("content-encoding"))

@app.route("/install/bitrix24", methods=["POST"], content_types=[FORM])
@answers
def install_bitrix24():
    # Public: the install proves itself at our OAuth server before any write (chalicelib/bitrix24_app.py).
    from chalicelib.bitrix24_app import handler_base
    request = app.current_request
    base = handler_base(request.headers, (request.context or {}).get("stage"), get_settings().public_url)
    return get_bitrix24_app().install(request.raw_body, base)


@app.route("/install/bitrix24/events", methods=["POST"], content_types=[FORM])
@answers
def bitrix24_app_event():
    # ONAPPUNINSTALL / ONOFFLINEEVENT, verified by the portal's application_token.
    request = app.current_request
    if len(request.raw_body or b"") > 64 * 1024:
        raise invalid("an application event is a few hundred bytes; this body is too large")
    return get_bitrix24_app().event(request.raw_body)


# Installing into amoCRM (OAuth): public, everything they take is verified (chalicelib/amocrm_install.py).
@app.route("/install/amocrm", methods=["GET"])
@answers
def install_amocrm():
    from chalicelib.amocrm_install import start_url
    return Response(status_code=302, body="", headers={"Location": start_url(get_settings(), get_amocrm_secret(),
                                                                              now=time.time())})


@app.route("/oauth/amocrm", methods=["GET"])
@answers
def oauth_amocrm():
    from chalicelib.amocrm_install import complete
    from chalicelib.operations import default_mapping
    settings = get_settings()
    oauth = get_amocrm_oauth()
    return complete(get_store(), oauth, app.current_request.query_params or {}, secret=get_amocrm_secret()(),
                    client_id=settings.amocrm_client_id, public_url=settings.public_url, now=time.time(),
                    propose=lambda integration_id: default_mapping(get_store(), get_sources(), integration_id))


@app.route("/oauth/amocrm/disable", methods=["GET"])
@answers
def disable_amocrm():
    from chalicelib.amocrm_install import disable
    settings = get_settings()
    if not settings.amocrm_client_id:
        from chalicelib.amocrm_install import not_configured
        raise not_configured("set AMOCRM_CLIENT_ID")
    return disable(get_store(), app.current_request.query_params or {}, client_id=settings.amocrm_client_id,
                   client_secret=get_amocrm_secret()(), now=time.time())

# End of routes. Start of event handlers.


@app.on_sqs_message(queue=get_settings().events_queue,
                    batch_size=int(os.environ.get("WORKER_BATCH_SIZE", "100")),
                    maximum_batching_window_in_seconds=int(os.environ.get("WORKER_BATCHING_WINDOW", "5")),
                    # Metrika's 3 requests in flight per token are the governor's leases, the CRMs' rates the
                    # shared limiter's: this caps cost, not correctness (WORKER_CONCURRENCY, above).
                    maximum_concurrency=WORKER_CONCURRENCY)
def on_events_message(event):
    from chalicelib.queue import received  # each body with its receive count (the last one flags)
    from chalicelib.worker import RESERVE_SECONDS
    with lambda_deadline(event.context, RESERVE_SECONDS):
        return vars(get_worker().handle(received(record.to_dict()) for record in event))


@app.schedule(Rate(int(os.environ.get("RECONCILE_MINUTES", "10")), unit=Rate.MINUTES))
def reconcile_all(event):
    # One message per integration; the worker reconciles each (chalicelib/schedules.py).
    return _fan_out("reconcile_all", event)


@app.schedule(Rate(int(os.environ.get("CONFIRM_MINUTES", "15")), unit=Rate.MINUTES))
def confirm_uploads(event):
    return _fan_out("confirm_uploads", event)



@app.schedule(Rate(1, unit=Rate.DAYS))
def refresh_tokens(event):
    # Installed integrations whose tokens sat idle for 30 days refresh them (chalicelib/schedules.py).
    return _fan_out("refresh_tokens", event)

# End of event handlers.


def _fan_out(job, event):
    from chalicelib.schedules import fan_out, run_id
    return fan_out(get_store(), get_queue(), job, run=run_id(getattr(event, "time", None), now=time.time()))


def _confirm(integration_id):
    from chalicelib.integrations import get_integration as read
    from chalicelib.operations import confirm_or_answer
    integration = read(get_store(), integration_id)
    return confirm_or_answer(get_store(), get_metrika(integration), integration_id, integration,
                             requeue=get_ingest().requeue)


def _reconcile(integration_id, body):
    from chalicelib.ingest import reconcile_or_answer, reconcile_since
    from chalicelib.integrations import get_integration as read
    since = reconcile_since(body, now=time.time())
    source = get_sources().get(read(get_store(), integration_id)["crm"])
    return reconcile_or_answer(get_ingest(), integration_id, source, since)
