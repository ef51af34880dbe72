"""Plain-text rendering for the CLI and the console: tables, diffs, requests, audit events."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any


def table(rows: Iterable[dict[str, Any]], columns: Sequence[tuple[str, str]], empty: str = "(none)") -> str:
    rows = list(rows)
    if not rows:
        return empty
    cells = [[_cell(r.get(key)) for key, _ in columns] for r in rows]
    widths = [max(len(title), *(len(c[i]) for c in cells)) for i, (_, title) in enumerate(columns)]
    head = "  ".join(title.ljust(w) for (_, title), w in zip(columns, widths)).rstrip()
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join([head, *lines])


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_cell(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return str(value).splitlines()[0] if str(value) else ""


def fmt_number(value: Any) -> str:
    return "-" if value is None else (f"{value:.4f}" if isinstance(value, float) else str(value))


def shape_text(shape: Any) -> str:
    return "unknown rank" if shape is None else "(" + ", ".join(str(d) for d in shape) + ")"


def diff_lines(diff: dict[str, Any]) -> list[str]:
    """The review content as lines: what a reviewer must see before approving."""
    cand, base = diff["candidate"], diff.get("base")
    out = [f"Candidate {cand['name']} (job {cand['job_id']}, trained by {cand['trained_by']})"]
    out.append(f"Default   {base['name']} (job {base['job_id']}, trained by {base['trained_by']})" if base
               else "Default   (none yet)")
    sig = diff["signature"]
    if sig["breaking"]:
        out.append("BREAKING signature changes:")
        out += [f"  ! {b}" for b in sig["breaking"]]
    changes = [("input", c) for c in sig["inputs"]] + [("output", c) for c in sig["outputs"]]
    if changes:
        out.append("Signature:")
        for kind, c in changes:
            detail = {"renamed": f"→ {c.get('to')}", "removed": "", "added": "",
                      "dtype": f"{c.get('base')} → {c.get('candidate')}",
                      "shape": f"{shape_text(c.get('base'))} → {shape_text(c.get('candidate'))}"}[c["change"]]
            out.append(f"  {kind} {c['name']}: {c['change']} {detail}".rstrip())
    elif base:
        out.append("Signature: unchanged")
    out.append("Parameters:" if diff["parameters"] else "Parameters: unchanged")
    out += [f"  {p['name']}: {fmt_number(p['base'])} → {fmt_number(p['candidate'])}" for p in diff["parameters"]]
    if diff["metrics"]:
        out.append("Metrics:")
        for m in diff["metrics"]:
            delta = "" if m["delta"] is None else f" ({m['delta']:+.4f}, {'better' if m['better'] else 'worse' if m['better'] is False else 'same'}; {m['direction']} is better)"
            out.append(f"  {m['name']}: {fmt_number(m['base'])} → {fmt_number(m['candidate'])}{delta}")
    prog = diff["program"]
    if prog["changed"]:
        out.append(f"Program: changed {str(prog['base'])[:12]} → {str(prog['candidate'])[:12]} ({prog['module']})")
    else:
        out.append(f"Program: {str(prog['candidate'])[:12]} ({prog['module']})" + (", unchanged" if base else ""))
    return out


def request_lines(req: dict[str, Any]) -> list[str]:
    head = (f"Promotion request #{req['id']} ({req['kind']}): {req['model']} {req['base'] or '(none)'} → "
            f"{req['candidate']} — {req['state']}")
    out = [head, f"Requested by {req['requested_by']}" + (f": {req['reason']}" if req.get("reason") else ""),
           f"Approvals {req['approvals']}/{req['required_approvals']}, expires {req['expires_at']}"]
    out += [f"  {d['decision'].rstrip('e')}ed by {d['user']} at {d['at']}" + (f": {d['reason']}" if d.get("reason") else "")
            for d in req.get("decisions", [])]
    if req.get("error"):
        out.append(f"Error: {req['error']}")
    return out


def default_at_lines(answer: dict[str, Any]) -> list[str]:
    """`audit MODEL --at T`: the default then, and the decisions and training behind it."""
    out = [f"At {answer['at']} the default of {answer['model']} was {answer['version']} "
           f"(since {answer['since']}, {answer['how']})"]
    out.append(f"  requested by {answer.get('requested_by') or '-'}; approved by "
               f"{', '.join(answer.get('approved_by') or []) or '- (first version of a new model)'}")
    if answer.get("job_id"):
        program = answer.get("program") or {}
        out.append(f"  from job {answer['job_id']} trained by {answer.get('trained_by')}")
        out.append(f"  args: {' '.join(answer.get('args') or []) or '(none)'}")
        out.append(f"  program: {program.get('module')} sha256 {str(program.get('sha256'))[:16]}")
    return out
