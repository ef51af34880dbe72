"""The review forms' callback ids and where a submitted form's answer goes.

The Slack listeners need these to register and to read a submission before anything else has loaded: this module
stays free of the command table and the results (the web process listens while those load, see bot.app).
"""

from __future__ import annotations

import json

REJECT_VIEW, TRY_VIEW = "review.reject_reason", "review.try_instance"


def form_home(metadata: str) -> bool:
    """Whether a reject form was opened from the Home tab."""
    try:
        return bool(json.loads(metadata).get("h"))
    except (ValueError, AttributeError):
        return False


def form_card(metadata: str) -> tuple[str | None, str | None]:
    """(channel, message ts) of the card a reject form belongs to; (None, None) when unreadable."""
    try:
        meta = json.loads(metadata)
        return meta.get("c"), meta.get("t")
    except (ValueError, AttributeError):
        return None, None
