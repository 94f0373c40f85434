"""The admin token: where it comes from and how a request's bearer token is checked."""
from __future__ import annotations

import hmac
from functools import lru_cache

from .settings import Settings


def admin_token(settings: Settings) -> str | None:
    """`ADMIN_TOKEN` locally; in AWS an SSM SecureString named by `ADMIN_TOKEN_PARAMETER`, read once,
    so the token never sits in `.chalice/config.json` or the Lambda's environment."""
    if settings.admin_token:
        return settings.admin_token
    if settings.admin_token_parameter:
        return _from_ssm(settings.admin_token_parameter)
    return None


@lru_cache(maxsize=4)
def _from_ssm(name: str) -> str:
    import boto3
    return boto3.client("ssm").get_parameter(Name=name, WithDecryption=True)["Parameter"]["Value"]


def is_admin(authorization: str | None, expected: str | None) -> bool:
    """`Authorization: Bearer <token>`, compared in constant time. No configured token: nobody is admin."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token or not expected:
        return False
    return hmac.compare_digest(token.strip().encode("utf-8"), expected.encode("utf-8"))
