"""Integration ids: one pattern for every route, standard library only (the webhook path loads it)."""
from __future__ import annotations

import re

INTEGRATION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def is_integration_id(value: object) -> bool:
    """1-64 Latin letters, digits, _ and -. Anything else cannot name an integration (and would reach
    DynamoDB as a key it refuses, 2 KB at most)."""
    return isinstance(value, str) and INTEGRATION_ID.fullmatch(value) is not None
