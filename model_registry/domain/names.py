"""StarChart names: model names, timestamps, job ids, version names, train paths."""

from __future__ import annotations

import contextlib
import difflib
import re
from datetime import datetime, timedelta, timezone

from model_registry.domain.errors import InvalidInput

MODEL_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
TS_FORMAT = "%Y%m%d%H%M%S"


def validate_model_name(name: str) -> str:
    if not isinstance(name, str) or not MODEL_NAME.match(name):
        shown = name if len(str(name)) <= 70 else str(name)[:67] + "..."
        raise InvalidInput(
            f"invalid model name {shown!r}",
            "a model name starts with a lowercase letter and has at most 63 lowercase letters, digits or underscores",
        )
    return name


def suggest(name: str, known: list[str]) -> str:
    """A 'did you mean' hint for a mistyped name, or ''."""
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return f"did you mean {close[0]}?" if close else ""


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def timestamp(at: datetime | None = None) -> str:
    return (at or utcnow()).strftime(TS_FORMAT)


def next_timestamp(ts: str) -> str:
    return (datetime.strptime(ts, TS_FORMAT) + timedelta(seconds=1)).strftime(TS_FORMAT)


def job_id(model: str, ts: str) -> str:
    return f"{model}_{ts}"


def version_name(ts: str) -> str:
    return f"v{ts}"


def split_job_id(job: str) -> tuple[str, str]:
    model, _, ts = job.rpartition("_")
    if not model or len(ts) != 14 or not ts.isdigit():
        raise InvalidInput(f"invalid job id {job!r}", "a job id looks like MODEL_YYYYmmddHHMMSS; see `state MODEL`")
    return model, ts


def train_path(bucket: str, model: str, ts: str) -> str:
    return f"{bucket.rstrip('/')}/{model}/{ts}"


def parse_duration(text: str) -> timedelta:
    """'72h', '7d', '30m', '45s' -> timedelta."""
    m = re.fullmatch(r"\s*(\d+)\s*([smhdw])\s*", str(text))
    if not m:
        raise InvalidInput(f"invalid duration {text!r}", "use a number and a unit: 30m, 72h, 7d, 2w")
    n, unit = int(m.group(1)), m.group(2)
    return timedelta(**{{"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}[unit]: n})


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """'7d' (that long ago), '2026-11-01', '2026-11-01T12:00', '2026-11-01 12:00:00Z' -> naive UTC."""
    now = now or utcnow()
    with contextlib.suppress(InvalidInput):  # not a duration: a date or a time, below
        return now - parse_duration(text)
    value = str(text).strip().replace("Z", "+00:00")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidInput(f"invalid time {text!r}", "use a duration such as 7d or 12h, or a date such as "
                           "2026-11-01 or 2026-11-01T09:30 (UTC)") from None
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(timezone.utc).replace(tzinfo=None)
    return parsed


def iso(value: datetime | None) -> str | None:
    """A naive UTC time as the views show it, to the second: '2026-11-27T09:30:00Z'."""
    return value.isoformat(timespec="seconds") + "Z" if value else None


def iso_text(value: str | None) -> str | None:
    """A time as the database's text of it ('2026-11-27 09:30:00.123456') in the views' form, as `iso` gives it."""
    return f"{value[:10]}T{value[11:19]}Z" if value else None
