"""PHP-style bracket form bodies (`leads[status][0][id]=1`), as amoCRM and Bitrix24 send them."""
from __future__ import annotations

import re
from urllib.parse import parse_qsl

from . import WebhookError

_BRACKETS = re.compile(r"\[([^\[\]]*)\]")
MAX_KEYS = 5000


def parse_bracket_form(raw: bytes, *, max_keys: int = MAX_KEYS) -> dict:
    """Decode a form body exactly once into a tree of dicts and strings.

    Numeric keys stay dict keys: `linked_leads_id[<lead id>]` is keyed by id, not 0..n, so no guess
    is made about lists (amoCRM reference §7). A scalar never overwrites a subtree.
    """
    try:
        text = raw.decode("utf-8")
        pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=bool(text), max_num_fields=max_keys)
    except UnicodeDecodeError as exc:
        raise WebhookError("body is not UTF-8") from exc
    except ValueError as exc:
        raise WebhookError(f"body is not a form-encoded webhook: {exc}") from exc
    root: dict = {}
    for key, value in pairs:
        head, _, rest = key.partition("[")
        parts = [head] + (_BRACKETS.findall("[" + rest) if rest else [])
        node = root
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        if not isinstance(node.get(parts[-1]), dict):
            node[parts[-1]] = value
    return root
