"""metrika-crm-bridge: CRM webhooks in, Yandex Metrika CDP contacts and orders out.

Routes and event handlers only; the work is in chalicelib. Clients are created on first use, so a cold
start that serves a webhook never pays for what it does not touch.
"""
import os

from chalice import AuthResponse, Chalice, Rate

from chalicelib.errors import ApiError
from chalicelib.settings import APP_NAME, get_settings

app = Chalice(app_name=APP_NAME)
FORM = "application/x-www-form-urlencoded"

_STORE = None
_QUEUE = None
_SOURCES = {}  # crm name → CrmSource, filled on first use (tests may fill it first)


def get_store():
    global _STORE
    if _STORE is None:
        import boto3
        from chalicelib.store import Store
        settings = get_settings()
        _STORE = Store(boto3.client("dynamodb"), settings.config_table, settings.state_table)
    return _STORE


def get_queue():
    global _QUEUE
    if _QUEUE is None:
        import boto3
        from chalicelib.pipeline import EventQueue
        _QUEUE = EventQueue(boto3.client("sqs"), get_settings().events_queue)
    return _QUEUE


def get_metrika(integration):
    from chalicelib.metrika.client import MetrikaClient
    from chalicelib.metrika.governor import QuotaGovernor
    token = integration["metrika_token"]
    governor = QuotaGovernor(get_store(), token, daily_budget=get_settings().metrika_daily_budget)
    return MetrikaClient(token, get_settings().metrika_api_url, governor=governor)


def get_sources():
    if not _SOURCES:
        from chalicelib.crm.amocrm.source import AmoCrmSource
        from chalicelib.crm.bitrix24.source import Bitrix24Source
        _SOURCES["amocrm"] = AmoCrmSource(get_store().reserve_slot)
        _SOURCES["bitrix24"] = Bitrix24Source(get_store().reserve_slot)
    return _SOURCES


def get_admin_token():
    from chalicelib.admin import admin_token
    return admin_token(get_settings())


@app.middleware("http")
def api_errors(event, get_response):
    try:
        response = get_response(event)
    except ApiError as error:
        return error.to_response()
    if response.status_code == 500:
        # Something under us failed (DynamoDB or SQS unreachable…); Chalice logged the traceback. A 503
        # in our JSON shape tells the CRM to retry, and nothing was half-written: state is only marked
        # dirty together with its queued message.
        return ApiError(503, "unavailable", "the service could not record this request; please retry").to_response()
    return response


@app.authorizer()
def admin(auth_request):
    from chalicelib.admin import is_admin
    if is_admin(auth_request.token, get_admin_token()):
        return AuthResponse(routes=["*"], principal_id="admin")
    return AuthResponse(routes=[], principal_id="anonymous")


# Start of routes.

@app.route("/health")
def health():
    return {"status": "ok"}


@app.route("/integrations/{integration_id}", methods=["PUT"], authorizer=admin)
def put_integration(integration_id):
    from chalicelib.integrations import save_integration
    return save_integration(get_store(), integration_id, app.current_request.json_body,
                            lambda config: get_metrika(config).counter_time_zone(config["counter_id"]))


@app.route("/integrations/{integration_id}", methods=["GET"], authorizer=admin)
def get_integration(integration_id):
    from chalicelib.integrations import get_integration as read, public_view
    return public_view(read(get_store(), integration_id))


@app.route("/integrations/{integration_id}", methods=["DELETE"], authorizer=admin)
def delete_integration(integration_id):
    from chalicelib.errors import not_found
    if not get_store().delete_integration(integration_id):
        raise not_found(f"integration {integration_id!r}")
    return {"deleted": integration_id}


@app.route("/integrations/{integration_id}/status-mapping", methods=["GET"], authorizer=admin)
def get_status_mapping(integration_id):
    from chalicelib.status_mapping import read_mapping
    return read_mapping(get_store(), integration_id)


@app.route("/integrations/{integration_id}/status-mapping", methods=["PUT"], authorizer=admin)
def put_status_mapping(integration_id):
    from chalicelib.status_mapping import replace_mapping
    return replace_mapping(get_store(), integration_id, app.current_request.json_body, get_metrika,
                           _ingest().requeue_held)


@app.route("/integrations/{integration_id}/status-mapping/defaults", methods=["GET"], authorizer=admin)
def propose_status_mapping(integration_id):
    return {"integration_id": integration_id, "entries": _default_mapping(integration_id)}


@app.route("/integrations/{integration_id}/status-mapping/defaults", methods=["POST"], authorizer=admin)
def apply_status_mapping_defaults(integration_id):
    from chalicelib.status_mapping import merge_defaults, read_mapping, replace_mapping
    current = read_mapping(get_store(), integration_id)["entries"]
    entries = merge_defaults(current, _default_mapping(integration_id))
    return replace_mapping(get_store(), integration_id, {"entries": entries}, get_metrika, _ingest().requeue_held)


@app.route("/integrations/{integration_id}/attributes", methods=["GET"], authorizer=admin)
def get_attributes(integration_id):
    from chalicelib.attributes import read_attributes
    return read_attributes(get_store(), integration_id)


@app.route("/integrations/{integration_id}/attributes", methods=["PUT"], authorizer=admin)
def put_attributes(integration_id):
    from chalicelib.attributes import replace_attributes
    return replace_attributes(get_store(), integration_id, app.current_request.json_body, get_metrika)


@app.route("/integrations/{integration_id}/products/sync", methods=["POST"], authorizer=admin)
def sync_products(integration_id):
    from chalicelib.operations import sync_catalog
    return sync_catalog(get_store(), get_metrika, get_sources(), integration_id)


@app.route("/integrations/{integration_id}/backfill", methods=["POST"], authorizer=admin)
def start_backfill(integration_id):
    return _backfill().start(integration_id, app.current_request.json_body)


@app.route("/integrations/{integration_id}/backfill", methods=["GET"], authorizer=admin)
def backfill_status(integration_id):
    return _backfill().status(integration_id)


@app.route("/integrations/{integration_id}/backfill/stop", methods=["POST"], authorizer=admin)
def stop_backfill(integration_id):
    return _backfill().stop(integration_id)


@app.route("/integrations/{integration_id}/reconcile", methods=["POST"], authorizer=admin)
def reconcile_integration(integration_id):
    body = app.current_request.json_body or {}
    return _reconcile(integration_id, since=body.get("since") if isinstance(body, dict) else None)


@app.route("/integrations/{integration_id}/status", methods=["GET"], authorizer=admin)
def integration_status(integration_id):
    from chalicelib.integrations import get_integration as read
    from chalicelib.operations import integration_status as status
    integration = read(get_store(), integration_id)
    return status(get_store(), integration_id, requests_today=get_metrika(integration).governor.used_today(),
                  webhook_health=_webhook_health(integration_id, integration),
                  backfill=_backfill().status(integration_id)["backfill"])


@app.route("/integrations/{integration_id}/replay", methods=["POST"], authorizer=admin)
def replay_integration(integration_id):
    from chalicelib.integrations import get_integration as read
    from chalicelib.operations import replay
    read(get_store(), integration_id)
    return replay(get_store(), _ingest().requeue, integration_id, app.current_request.json_body)


@app.route("/webhooks/amocrm/{integration_id}", methods=["POST"], content_types=[FORM])
def amocrm_webhook(integration_id):
    request = app.current_request
    return _ingest().amocrm(integration_id, request.raw_body, request.query_params or {})


@app.route("/webhooks/bitrix24/{integration_id}", methods=["POST"], content_types=[FORM])
def bitrix24_webhook(integration_id):
    return _ingest().bitrix24(integration_id, app.current_request.raw_body)

# End of routes. Start of event handlers.


@app.on_sqs_message(queue=get_settings().events_queue,
                    batch_size=int(os.environ.get("WORKER_BATCH_SIZE", "100")),
                    maximum_batching_window_in_seconds=int(os.environ.get("WORKER_BATCHING_WINDOW", "5")),
                    # At most 3 workers at once: Metrika allows 3 requests in flight per token.
                    maximum_concurrency=3)
def on_events_message(event):
    from chalicelib.pipeline import Worker
    settings = get_settings()
    worker = Worker(get_store(), get_queue(), get_metrika, get_sources(),
                    row_limit=settings.upload_row_limit, retry_limit=settings.worker_retry_limit)
    return vars(worker.handle(record.body for record in event))

@app.schedule(Rate(int(os.environ.get("RECONCILE_MINUTES", "10")), unit=Rate.MINUTES))
def reconcile_all(event):
    results = {}
    for integration_id in get_store().list_integration_ids():
        try:
            results[integration_id] = _reconcile(integration_id)
        except Exception as exc:  # one broken integration must not stop the others
            from chalicelib.logs import log_event
            log_event("reconcile_failed", integration_id=integration_id, error=type(exc).__name__)
    return results

@app.schedule(Rate(int(os.environ.get("CONFIRM_MINUTES", "15")), unit=Rate.MINUTES))
def confirm_uploads(event):
    from chalicelib.operations import confirm_uploads as confirm
    results = {}
    for integration_id in get_store().list_integration_ids():
        integration = get_store().get_integration(integration_id)
        if integration:
            results[integration_id] = confirm(get_store(), get_metrika(integration), integration_id,
                                              integration["counter_id"])
    return results

# End of event handlers.


def _default_mapping(integration_id):
    from chalicelib.crm import PermanentSourceError, RetryableSourceError
    from chalicelib.errors import ApiError, invalid
    from chalicelib.integrations import get_integration as read
    integration = read(get_store(), integration_id)
    source = get_sources().get(integration["crm"])
    if source is None:
        raise invalid(f"default status mappings for {integration['crm']} are not available in this build")
    try:
        return source.default_mapping(integration)
    except PermanentSourceError as exc:
        raise ApiError(422, "crm_refused", f"could not read the CRM's stages: {exc}") from exc
    except RetryableSourceError as exc:
        raise ApiError(502, "crm_unavailable", f"could not read the CRM's stages: {exc}; try again later") from exc


def _webhook_health(integration_id, integration):
    """amoCRM switches a webhook off after too many failed deliveries: say so (None for other CRMs)."""
    source = get_sources().get(integration["crm"])
    if not hasattr(source, "webhook_health"):
        return None
    from chalicelib.crm import PermanentSourceError, RetryableSourceError
    try:
        return source.webhook_health(integration, integration_id)
    except (PermanentSourceError, RetryableSourceError) as exc:
        return {"error": str(exc)}


def _reconcile(integration_id, since=None):
    import time
    from chalicelib.crm import PermanentSourceError, RetryableSourceError
    from chalicelib.errors import ApiError, invalid
    from chalicelib.integrations import get_integration as read
    if since is not None and not isinstance(since, int):
        raise invalid("since must be Unix seconds")
    source = get_sources().get(read(get_store(), integration_id)["crm"])
    try:
        return _ingest().reconcile(integration_id, source, now=int(time.time()), since=since)
    except PermanentSourceError as exc:
        raise ApiError(422, "crm_refused", f"could not list changed deals: {exc}") from exc
    except RetryableSourceError as exc:
        raise ApiError(502, "crm_unavailable", f"could not list changed deals: {exc}; try again later") from exc


def _backfill():
    from chalicelib.backfill import Backfill
    return Backfill(get_store(), get_queue(), get_metrika, get_sources(), row_limit=get_settings().upload_row_limit)


def _ingest():
    from chalicelib.pipeline import Ingest
    return Ingest(get_store(), get_queue(), get_settings().max_webhook_bytes)
