"""What `GET /api/v4/account` said, as the state store keeps it (`CrmAccountStore`): the account's
`country` and `currency` ("Параметры аккаунта", https://www.amocrm.ru/developers/content/crm_platform/account-info;
Kommo "Account parameters", https://developers.kommo.com/reference/account-parameters), one record per
account, found by the integration's base URL.

A kept record is fresh for a day (`ACCOUNT_MAX_AGE`). Saving the integration (`PUT /integrations/{id}`)
makes it stale at once (`expire_account`), so the next delivery reads the account again: a record from
before the admin's last save is never taken as current. A stale record still serves while amoCRM cannot
be read (`AmoCrmSource.account`).

Standard library only: the admin's save imports this without the amoCRM client.
"""
from __future__ import annotations

import hashlib
from typing import Any

# An account's currency rarely changes; re-read daily so a change made in amoCRM shows within a day
# (at once when the integration is saved).
ACCOUNT_MAX_AGE = 24 * 3600


def account_scope(base_url: str) -> str:
    """The store key of an account: its base URL, so a new base URL is another account."""
    return "amocrm:" + hashlib.sha256(base_url.rstrip("/").lower().encode()).hexdigest()[:16]


def expire_account(accounts: Any, base_url: str) -> None:
    """Mark the kept record of the account at `base_url` stale (read at 0), keeping its values as the
    fallback for a read that fails. `accounts`: a `CrmAccountStore`."""
    if base_url:
        accounts.expire_crm_account(account_scope(base_url))


__all__ = ["ACCOUNT_MAX_AGE", "account_scope", "expire_account"]
