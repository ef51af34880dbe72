"""Vertex AI settings that starchart.yaml holds, checked without any Google library (the configuration loads them).

A model's `endpoint:` block says whether and how its default version is served from a Vertex AI endpoint;
accelerators are named as Vertex AI's AcceleratorType names them (`nvidia-tesla-t4:2` is accepted too).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

from model_registry.domain.errors import InvalidInput

# aiplatform_v1.AcceleratorType's names (all but UNSPECIFIED); a test keeps this in step with the library
ACCELERATORS = (
    "NVIDIA_TESLA_K80", "NVIDIA_TESLA_P100", "NVIDIA_TESLA_V100", "NVIDIA_TESLA_P4", "NVIDIA_TESLA_T4",
    "NVIDIA_TESLA_A100", "NVIDIA_A100_80GB", "NVIDIA_L4", "NVIDIA_H100_80GB", "NVIDIA_H100_MEGA_80GB",
    "NVIDIA_H200_141GB", "NVIDIA_B200", "NVIDIA_GB200", "NVIDIA_RTX_PRO_6000", "TPU_V2", "TPU_V3", "TPU_V4_POD",
    "TPU_V5_LITEPOD",
)
MACHINE_TYPE = re.compile(r"^[a-z][a-z0-9]*-[a-z0-9-]+$")
ENDPOINT_KEYS = ("enabled", "machine_type", "min_replicas", "max_replicas", "accelerator")
ENDPOINT_EXAMPLE = "endpoint: {enabled: true, machine_type: n1-standard-2, min_replicas: 1, max_replicas: 1}"


def parse_accelerator(text: str) -> tuple[str, int]:
    """'nvidia-tesla-t4:2' -> ('NVIDIA_TESLA_T4', 2); the count defaults to 1."""
    kind, _, count = text.strip().partition(":")
    kind = kind.strip().upper().replace("-", "_")
    if kind not in ACCELERATORS:
        close = [a for a in ACCELERATORS if kind and (kind in a or a.endswith(kind.split("_")[-1]))]
        raise InvalidInput(f"unknown accelerator {text!r}",
                           f"use TYPE:COUNT with TYPE one of {', '.join(close or ACCELERATORS)}")
    try:
        n = int(count) if count.strip() else 1
    except ValueError:
        n = 0
    if n < 1:
        raise InvalidInput(f"invalid accelerator count in {text!r}", "use TYPE:COUNT with COUNT 1, 2, 4 or 8")
    return kind, n


@dataclass(frozen=True)
class EndpointSettings:
    """How a model's default is served: dedicated machines on a Vertex AI endpoint."""

    machine_type: str = "n1-standard-2"
    min_replicas: int = 1
    max_replicas: int = 1
    accelerator: str | None = None  # TYPE:COUNT, e.g. NVIDIA_TESLA_T4:1


def endpoint_settings(model: str, raw: Any) -> EndpointSettings | None:
    """A model's `endpoint` policy: None unless it says `enabled: true` (deployments cost money).

    Settings already checked (an EndpointSettings, as the configuration holds them) are returned as they are."""
    where = f"models.{model}.endpoint"
    if raw is None or raw is False:
        return None
    if raw is True:
        return EndpointSettings()
    if isinstance(raw, EndpointSettings):
        return raw
    if not isinstance(raw, Mapping):
        raise InvalidInput(f"{where} must be a mapping", f"e.g. {ENDPOINT_EXAMPLE}")
    unknown = sorted(set(raw) - set(ENDPOINT_KEYS))
    if unknown:
        raise InvalidInput(f"unknown key(s) {unknown} in {where}", f"known keys: {', '.join(ENDPOINT_KEYS)}")
    enabled = raw.get("enabled", False)
    if not isinstance(enabled, bool):
        raise InvalidInput(f"{where}.enabled must be true or false, not {enabled!r}", f"e.g. {ENDPOINT_EXAMPLE}")
    if not enabled:
        return None
    machine_type = str(raw.get("machine_type") or EndpointSettings.machine_type)
    if not MACHINE_TYPE.match(machine_type):
        raise InvalidInput(f"{where}.machine_type {machine_type!r} is not a machine type",
                           "use a Vertex AI prediction machine type such as n1-standard-2")
    try:
        low = int(raw.get("min_replicas", 1))
        high = int(raw.get("max_replicas", low))
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"{where}: min_replicas and max_replicas must be whole numbers",
                           f"e.g. {ENDPOINT_EXAMPLE}") from exc
    if low < 1 or high < low:
        raise InvalidInput(f"{where}: need 1 <= min_replicas <= max_replicas (got {low} and {high})",
                           "min_replicas machines run (and bill) all the time")
    accelerator = raw.get("accelerator")
    if accelerator:
        kind, count = parse_accelerator(str(accelerator))
        accelerator = f"{kind}:{count}"
    return EndpointSettings(machine_type, low, high, accelerator or None)
