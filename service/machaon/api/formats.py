"""How the web page shows times, durations, sizes and UIDs: the templates' filters."""

from __future__ import annotations

from datetime import UTC, datetime

from markupsafe import Markup

from ..display import short_uid


def parse(value: str | None) -> datetime | None:
    """An ISO time from operations (UTC, ending in Z) in the server's local time."""
    if not value:
        return None
    return datetime.fromisoformat(value).astimezone()


def zone_name() -> str:
    now = datetime.now().astimezone()
    offset = now.strftime("%z")
    return f"{now.tzname()}, UTC{offset[:3]}:{offset[3:]}"


def when(value: str | None) -> Markup | str:
    """A time from operations as the server's local time, in a <time> element holding the UTC."""
    local = parse(value)
    if local is None:
        return "—"
    today = datetime.now().astimezone().date()
    shown = f"{local:%H:%M:%S}" if local.date() == today else f"{local:%Y-%m-%d %H:%M:%S}"
    return Markup('<time datetime="{}" title="{}">{}</time>').format(
        value, f"{local:%Y-%m-%d %H:%M:%S} ({zone_name()})", shown)


def ago(value: str | None) -> str:
    at = parse(value)
    if at is None:
        return ""
    return duration((datetime.now(UTC) - at).total_seconds()) + " ago"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} days"


def size(count: int | None) -> str:
    if count is None:
        return "unknown"
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if count < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1000  # type: ignore[assignment]
    raise AssertionError("unreachable")


def dicom_date(value: str | None) -> str:
    """A DICOM date (YYYYMMDD) as 2026-12-01."""
    if value and len(value) == 8 and value.isdigit():
        return f"{value[:4]}-{value[4:6]}-{value[6:]}"
    return value or ""


def short_uid_or_blank(uid: str | None) -> str:
    return short_uid(uid) if uid else ""


def counted(n: int, one: str, many: str) -> str:
    """1 study, 2 studies."""
    return f"{n} {one if n == 1 else many}"
