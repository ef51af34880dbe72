"""What changes if a candidate version replaces the default: parameters, signature, metrics, program."""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Mapping

LOWER_IS_BETTER = ("loss", "error", "mae", "mse", "rmse", "latency", "perplexity")
DIGEST_FIELDS = ("model", "name", "deployment_uri", "program", "args", "metrics", "signature", "trained_by", "job_id")


def canonical(value: Any) -> str:
    """The one JSON encoding that digests and the audit chain hash: sorted keys, no spaces, UTF-8 as is."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def version_digest(version: Mapping[str, Any]) -> str:
    """The identity of what a review card shows about one version."""
    return hashlib.sha256(canonical({k: version.get(k) for k in DIGEST_FIELDS}).encode()).hexdigest()


def parse_args(args: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Trainer args as parameters: --k=v, --k v and bare --flag; the rest is kept in order."""
    params: dict[str, Any] = {}
    positional: list[str] = []
    items = list(args)
    i = 0
    while i < len(items):
        item = items[i]
        if item.startswith("--") and len(item) > 2:
            key, eq, value = item[2:].partition("=")
            if eq:
                params[key] = value
            elif i + 1 < len(items) and not items[i + 1].startswith("--"):
                params[key] = items[i + 1]
                i += 1
            else:
                params[key] = True
        else:
            positional.append(item)
        i += 1
    if positional:
        params["(positional)"] = " ".join(positional)
    return params


def metric_direction(name: str) -> str:
    return "lower" if any(word in name.lower() for word in LOWER_IS_BETTER) else "higher"


def _fits(narrow: list[int] | None, wide: list[int] | None) -> bool:
    """True if every tensor of shape `narrow` also has shape `wide` (-1 and None are unknown)."""
    if wide is None:
        return True
    if narrow is None or len(narrow) != len(wide):
        return False
    return all(w == -1 or n == w for n, w in zip(narrow, wide))


def _shape_text(shape: list[int] | None) -> str:
    return "unknown rank" if shape is None else "(" + ", ".join(str(d) for d in shape) + ")"


def _diff_tensors(kind: str, old: dict[str, Any], new: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    changes: list[dict[str, Any]] = []
    breaking: list[str] = []
    removed = [n for n in old if n not in new]
    added = [n for n in new if n not in old]
    renamed: dict[str, str] = {}
    for r in removed:
        match = next((a for a in added if a not in renamed.values()
                      and new[a].get("dtype") == old[r].get("dtype") and new[a].get("shape") == old[r].get("shape")),
                     None)
        if match and len(removed) == len(added):
            renamed[r] = match
    for r in removed:
        if r in renamed:
            changes.append({"name": r, "change": "renamed", "to": renamed[r], "breaking": True})
            breaking.append(f"{kind} `{r}` renamed to `{renamed[r]}`")
        else:
            changes.append({"name": r, "change": "removed", "base": old[r], "breaking": True})
            breaking.append(f"{kind} `{r}` removed")
    for a in added:
        if a in renamed.values():
            continue
        is_breaking = kind == "input"  # a serving request must supply every input
        changes.append({"name": a, "change": "added", "candidate": new[a], "breaking": is_breaking})
        if is_breaking:
            breaking.append(f"new required input `{a}`")
    for n in old:
        if n not in new:
            continue
        o, c = old[n], new[n]
        if o.get("dtype") != c.get("dtype"):
            changes.append({"name": n, "change": "dtype", "base": o.get("dtype"), "candidate": c.get("dtype"),
                            "breaking": True})
            breaking.append(f"{kind} `{n}` dtype changed: {o.get('dtype')} → {c.get('dtype')}")
        if o.get("shape") != c.get("shape"):
            # inputs may widen (callers' tensors still fit); outputs may narrow (callers still parse them)
            ok = _fits(o.get("shape"), c.get("shape")) if kind == "input" else _fits(c.get("shape"), o.get("shape"))
            changes.append({"name": n, "change": "shape", "base": o.get("shape"), "candidate": c.get("shape"),
                            "breaking": not ok})
            if not ok:
                breaking.append(f"{kind} `{n}` shape changed: {_shape_text(o.get('shape'))} → "
                                f"{_shape_text(c.get('shape'))}")
    return changes, breaking


def diff_signatures(base: dict[str, Any] | None, candidate: dict[str, Any]) -> dict[str, Any]:
    base = base or {}
    inputs, b_in = _diff_tensors("input", base.get("inputs", {}), candidate.get("inputs", {}))
    outputs, b_out = _diff_tensors("output", base.get("outputs", {}), candidate.get("outputs", {}))
    breaking = b_in + b_out
    if base and base.get("method_name") != candidate.get("method_name"):
        breaking.append(f"method changed: {base.get('method_name')} → {candidate.get('method_name')}")
    return {"inputs": inputs, "outputs": outputs, "breaking": breaking if base else []}


def diff_versions(candidate: Mapping[str, Any], base: Mapping[str, Any] | None) -> dict[str, Any]:
    """The review's content: candidate against the current default (or against nothing)."""
    new_p, old_p = parse_args(candidate.get("args", [])), parse_args(base.get("args", [])) if base else {}
    params = [
        {"name": k, "base": old_p.get(k), "candidate": new_p.get(k)}
        for k in sorted(set(new_p) | set(old_p)) if new_p.get(k) != old_p.get(k)
    ]
    metrics = []
    old_m = (base or {}).get("metrics", {}) or {}
    for name in sorted(set(candidate.get("metrics", {}) or {}) | set(old_m)):
        c, b = (candidate.get("metrics") or {}).get(name), old_m.get(name)
        delta = c - b if isinstance(c, (int, float)) and isinstance(b, (int, float)) else None
        direction = metric_direction(name)
        better = None if delta in (None, 0) else (delta < 0) == (direction == "lower")
        metrics.append({"name": name, "base": b, "candidate": c, "delta": delta, "direction": direction,
                        "better": better})
    cand_prog, base_prog = candidate.get("program", {}), (base or {}).get("program", {})
    return {
        "model": candidate.get("model"),
        "candidate": {k: candidate.get(k) for k in ("name", "job_id", "trained_by", "created_at", "deployment_uri")},
        "base": {k: base.get(k) for k in ("name", "job_id", "trained_by", "created_at", "deployment_uri")}
        if base else None,
        "parameters": params,
        "signature": diff_signatures(base.get("signature") if base else None, candidate.get("signature", {})),
        "metrics": metrics,
        "program": {
            "base": base_prog.get("sha256") if base else None, "candidate": cand_prog.get("sha256"),
            "module": cand_prog.get("module"), "base_module": base_prog.get("module") if base else None,
            "changed": bool(base) and (base_prog.get("sha256") != cand_prog.get("sha256")
                                       or base_prog.get("module") != cand_prog.get("module")),
        },
    }


def metric_fell(diff: Mapping[str, Any], metric: str, min_delta: float) -> str | None:
    """Why `metric` fell further than `min_delta` allows (the change in its better direction, candidate against the
    default), or None. A metric the candidate lacks, or reports as NaN or Infinity, has fallen: the run cannot be
    trusted. With no default, or a default without the metric, there is nothing to fall from."""
    found = next((m for m in diff.get("metrics") or [] if m["name"] == metric), None)
    value = found["candidate"] if found else None
    if value is None:
        return f"{metric} is missing from the candidate's metrics"
    if isinstance(value, str) or (isinstance(value, float) and not math.isfinite(value)):
        return f"{metric} is {value} (the training diverged)"
    if found is None or found["delta"] is None:
        return None
    change = found["delta"] if found["direction"] == "higher" else -found["delta"]
    if change < min_delta:
        return (f"{metric} changed by {found['delta']:+.4f} ({found['base']:.4g} → {value:.4g}; "
                f"{min_delta:+.4f} allowed in the better direction, {found['direction']} is better)")
    return None


def card_digest(candidate_digest: str, base_digest: str | None, diff: dict[str, Any]) -> str:
    return hashlib.sha256(canonical({"c": candidate_digest, "b": base_digest, "d": diff}).encode()).hexdigest()
