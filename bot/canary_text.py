"""A canary as text (the CLI, the console and the lines the Slack card is built from): its split, its bake, both
sides' figures side by side, agreement on mirrored requests, and where it stands."""

from __future__ import annotations

from typing import Any, Mapping

from bot.text import PLAIN, Style, Text, render
from handlers import results as r


def _pct(value: Any) -> str:
    return "-" if value is None else f"{100 * float(value):.1f}%"


def _ms(value: Any) -> str:
    return "-" if value is None else f"{float(value):.1f} ms"


def split_text(split: Mapping[str, int]) -> str:
    return ", ".join(f"{version} {share}%" for version, share in split.items()) or "(none)"


def figure_rows(view: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(what, candidate, default) rows of the figures; empty when the backend gives none."""
    figures = view.get("figures")
    if not figures:
        return []
    cand, base = figures["candidate"], figures["base"]
    return [("requests", str(cand["requests"]), str(base["requests"])),
            ("errors", f"{cand['errors']} ({_pct(cand['error_rate'])})", f"{base['errors']} ({_pct(base['error_rate'])})"),
            ("latency p50", _ms(cand["p50_ms"]), _ms(base["p50_ms"])),
            ("latency p99", _ms(cand["p99_ms"]), _ms(base["p99_ms"]))]


VERTEX_AGREEMENT = ("agreement: not measured on Vertex AI (each request is answered by one deployment and none is "
                    "mirrored to the other)")


def agreement_text(view: Mapping[str, Any]) -> str:
    figures = view.get("figures")
    vertex = view.get("backend") == "vertex"
    if not figures:
        return f"no figures read yet from Cloud Monitoring; {VERTEX_AGREEMENT}" if vertex else "no figures read yet"
    if vertex and not figures["mirrored"]:
        return VERTEX_AGREEMENT
    if not figures["mirrored"]:
        return "agreement: no mirrored requests yet"
    return (f"agreement on mirrored requests: {_pct(figures['agreement'])} ({figures['agreed']} of "
            f"{figures['mirrored']} instances answered alike)")


def standing(view: Mapping[str, Any], style: Style) -> str:
    e = style.emoji
    if view["running"]:
        verdict = view.get("verdict") or {}
        if verdict.get("action") == "wait":
            return f"{e('raised_hand')}{verdict['why']}"
        return f"{e('hatching_chick')}running, {verdict.get('why') or 'baking'}"
    state = view["state"]
    if state == "applied":
        return f"{e('rocket')}promoted to 100% at {view['ended_at']}: {view.get('why') or ''}".rstrip(": ")
    if state == "rolled_back":
        return f"{e('leftwards_arrow_with_hook')}rolled back at {view['ended_at']}: {view.get('why') or ''}"
    if state == "applying":
        return f"{e('hourglass_flowing_sand')}" + ("promoting to 100%…" if view["started_at"] else "starting…")
    if state == "failed":
        return f"{e('x')}the canary did not start: {view.get('error') or 'unknown error'}"
    return state


def canary_lines(view: Mapping[str, Any], style: Style = PLAIN) -> list[str]:
    limits = view["limits"]
    lines = [f"Canary of {view['model']}: {style.code(view['candidate'])} against the default "
             f"{style.code(view['base'])} (promotion request #{view['request_id']})",
             f"traffic: {split_text(view['split'])}; bake {view['bake_seconds']}s"
             + (f" from {view['started_at']} until {view['bake_until']}" if view.get("started_at") else ""),
             standing(view, style)]
    rows = figure_rows(view)
    if rows:
        width = max(len(w) for w, _, _ in rows)
        lines.append(f"{'':{width}}  {'candidate':>20}  {'default':>20}")
        lines += [f"{what:{width}}  {cand:>20}  {base:>20}" for what, cand, base in rows]
    if view.get("figures_unavailable"):
        lines.append(f"figures unavailable: {view['figures_unavailable']}")
    lines.append(agreement_text(view))
    lines.append(f"limits: max_error_rate {_pct(limits['max_error_rate'])}, max_p99_ratio {limits['max_p99_ratio']:g}, "
                 f"judged after {limits['min_requests']} requests a side, auto_promote "
                 f"{'on' if limits['auto_promote'] else 'off'}")
    if view.get("error") and view["running"]:
        lines.append(f"last promotion attempt failed: {view['error']}")
    return lines


@render.register(r.CanaryShown)
@render.register(r.CanaryCard)
@render.register(r.CanaryChanged)
def _canary(result: r.CanaryResult, style: Style = PLAIN) -> Text:
    lines = canary_lines(dict(result.canary), style)
    return Text(lines[0], lines)
