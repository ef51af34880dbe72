"""`starchart worker`: keeps the records true while nobody is asking — jobs, interrupted applies, expiry."""

from __future__ import annotations

import logging
import time

from model_registry.errors import StarchartError

log = logging.getLogger("starchart.worker")


def run_worker(once: bool = False, interval: float = 10.0) -> int:
    from model_registry.workflow import Registry

    registry = Registry.from_env()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    while True:
        try:
            changed = registry.refresh_jobs()
            reconciled = registry.reconcile()
            expired = registry.expire_requests()
            if changed or reconciled or expired:
                log.info("jobs changed: %d, applies reconciled: %d, requests expired: %d",
                         changed, len(reconciled), expired)
        except StarchartError as exc:
            log.warning("worker pass failed: %s", exc)
        except Exception:  # keep watching; the traceback is in the log
            log.exception("worker pass failed")
        if once:
            return 0
        time.sleep(interval)
