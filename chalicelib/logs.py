"""One JSON line per event. Callers pass chosen fields; anything that looks like a secret is redacted
as a second line of defence."""
from __future__ import annotations

import json
import logging
import re

logger = logging.getLogger("metrika_crm_bridge")
logger.setLevel(logging.INFO)
# At DEBUG, botocore prints whole DynamoDB items (tokens, phones) and urllib3 prints request paths
# (a Bitrix24 incoming-webhook URL carries its secret in the path): never let them go below INFO.
for _noisy in ("botocore", "urllib3"):
    logging.getLogger(_noisy).setLevel(logging.INFO)
_SECRET_KEY = re.compile(r"token|secret|password|webhook_url|authorization", re.IGNORECASE)


def log_event(event: str, **fields: object) -> None:
    record = {"event": event, **{k: ("[redacted]" if _SECRET_KEY.search(k) else v) for k, v in fields.items()}}
    logger.info(json.dumps(record, ensure_ascii=False, default=str, sort_keys=True))
