"""The Home tab: what waits for one person, built by the core; its buttons are the review card's own."""

from __future__ import annotations

from handlers.results import Failure, HomeTab
from handlers.table import Invocation

HOME_DAYS = 7  # failures of the last week


def home(inv: Invocation, notice: Failure | None = None) -> HomeTab:
    return HomeTab(inv.core.overview.home(inv.user, days=HOME_DAYS), notice)
