"""What the CRM-specific webhook parsers hand to the pipeline."""
from __future__ import annotations

from dataclasses import dataclass

ORDER = "order"
CONTACT = "contact"


@dataclass(frozen=True)
class EntityRef:
    """A CRM entity a webhook says has changed. The worker re-reads it from the CRM, so the reference
    carries only what ordering and routing need: which entity, when it changed, and how."""

    kind: str  # ORDER (a deal/lead) or CONTACT
    crm_id: str
    event_time: int  # Unix seconds of the change as the CRM reports it
    action: str  # add / update / status / delete / restore … as named by the CRM


class WebhookError(ValueError):
    """The body is not a webhook this CRM sends; the message says what is wrong."""
