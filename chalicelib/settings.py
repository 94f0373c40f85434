"""Environment → typed settings, read once per process.

Every name the deployment can set lives here, so `.chalice/config.json`, the local stack and the tests
agree on one list.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

APP_NAME = "metrika-crm-bridge"
DEFAULT_METRIKA_API_URL = "https://api-metrika.yandex.net"
MAX_WEBHOOK_BYTES = 2 * 1024 * 1024  # see load_settings


@dataclass(frozen=True)
class Settings:
    stage: str
    config_table: str
    state_table: str
    events_queue: str
    # Metrika's quota items (in-flight leases, day counters): one table for every stage, because the
    # limits are per token (infra/shared.yaml).
    quota_table: str
    metrika_api_url: str
    max_webhook_bytes: int
    admin_token: str | None
    admin_token_parameter: str | None
    admin_token_overlap_seconds: int
    worker_retry_limit: int
    upload_row_limit: int
    metrika_daily_budget: int
    # CRM URLs may point at loopback (http:// included): the local stack's and the tests' sandboxes.
    # Off unless ALLOW_LOOPBACK_CRM=1; never set in `.chalice/config.json` (tests/test_deploy_config.py).
    allow_loopback_crm: bool = False
    # amoCRM external integration (OAuth, chalicelib/amocrm_install.py). The client id in the stage's
    # environment; the client secret in SSM (`amocrm_client_secret_parameter`), or AMOCRM_CLIENT_SECRET for
    # the local stack and tests. `public_url`: this API's base URL (redirect URI and webhook destinations).
    amocrm_client_id: str | None = None
    amocrm_client_secret: str | None = None
    amocrm_client_secret_parameter: str | None = None
    amocrm_auth_url: str = "https://www.amocrm.ru/oauth"
    # Exact host:port names an install's `referer` may name over http: the amoCRM sandbox only.
    amocrm_sandbox_hosts: tuple[str, ...] = ()
    # This API's base URL (e.g. https://abc.execute-api.eu-central-1.amazonaws.com/api): amoCRM's redirect
    # URI and webhooks, and the handlers the Bitrix24 application binds (absent there: the install
    # request's Host).
    public_url: str | None = None
    # The Bitrix24 application (chalicelib/bitrix24_app.py). The OAuth server every refresh goes to (the
    # client secret and refresh tokens go nowhere else): the vendor's documented default, or the sandbox.
    bitrix24_oauth_url: str = "https://oauth.bitrix.info"
    bitrix24_client_id: str = ""
    # The client secret: BITRIX24_CLIENT_SECRET (the local stack, tests), else the SSM SecureString
    # `/metrika-crm-bridge/<stage>/bitrix24-client-secret`, read on first use.
    bitrix24_client_secret: str | None = None

    @property
    def bitrix24_client_secret_parameter(self) -> str:
        return f"/{APP_NAME}/{self.stage}/bitrix24-client-secret"

    @property
    def dead_letter_queue(self) -> str:
        return f"{self.events_queue}-dlq"


def load_settings(env: dict[str, str] | None = None) -> Settings:
    env = os.environ if env is None else env
    stage = env.get("STAGE", "dev")
    prefix = f"{APP_NAME}-{stage}"
    return Settings(
        stage=stage,
        config_table=env.get("CONFIG_TABLE", f"{prefix}-config"),
        state_table=env.get("STATE_TABLE", f"{prefix}-state"),
        events_queue=env.get("EVENTS_QUEUE", f"{prefix}-events"),
        quota_table=env.get("QUOTA_TABLE", f"{APP_NAME}-quota"),
        metrika_api_url=env.get("METRIKA_API_URL", DEFAULT_METRIKA_API_URL).rstrip("/"),
        # The largest CRM body is an amoCRM mass action (250 leads with their custom fields: 0.4 MB with
        # 2 filled fields a lead, 1.1 MB with 10). 2 MiB is the body of chalicelib.crm.form.MAX_KEYS
        # fields at ~80 bytes each, so the two limits agree; far under API Gateway's 10 MB payload and
        # Lambda's 6 MB request ("Lambda quotas", https://docs.aws.amazon.com/lambda/latest/dg/gettingstarted-limits.html).
        max_webhook_bytes=int(env.get("MAX_WEBHOOK_BYTES", str(MAX_WEBHOOK_BYTES))),
        admin_token=env.get("ADMIN_TOKEN") or None,
        admin_token_parameter=env.get("ADMIN_TOKEN_PARAMETER") or None,
        # How long the token before the last `put-parameter --overwrite` stays valid (chalicelib/admin.py).
        admin_token_overlap_seconds=max(0, int(env.get("ADMIN_TOKEN_OVERLAP_SECONDS", "900"))),
        worker_retry_limit=int(env.get("WORKER_RETRY_LIMIT", "12")),
        upload_row_limit=int(env.get("UPLOAD_ROW_LIMIT", "1000")),
        metrika_daily_budget=int(env.get("METRIKA_DAILY_BUDGET", "5000")),
        allow_loopback_crm=env.get("ALLOW_LOOPBACK_CRM", "") == "1",
        amocrm_client_id=env.get("AMOCRM_CLIENT_ID") or None,
        amocrm_client_secret=env.get("AMOCRM_CLIENT_SECRET") or None,
        amocrm_client_secret_parameter=env.get("AMOCRM_CLIENT_SECRET_PARAMETER",
                                               f"/{APP_NAME}/{stage}/amocrm-client-secret") or None,
        amocrm_auth_url=env.get("AMOCRM_AUTH_URL", "https://www.amocrm.ru/oauth"),
        amocrm_sandbox_hosts=tuple(h.strip().lower() for h in env.get("AMOCRM_SANDBOX_HOSTS", "").split(",") if h.strip()),
        bitrix24_oauth_url=(env.get("BITRIX24_OAUTH_URL") or "https://oauth.bitrix.info").rstrip("/"),
        bitrix24_client_id=env.get("BITRIX24_CLIENT_ID", ""),
        bitrix24_client_secret=env.get("BITRIX24_CLIENT_SECRET") or None,
        public_url=(env.get("PUBLIC_URL") or "").rstrip("/") or None,
    )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return load_settings()
