"""Scale tiers, as Cloud ML Engine named them, become Vertex AI worker pools (pool 0 = chief, pool 1 = workers):

    BASIC       chief n1-standard-4
    STANDARD_1  chief n1-highcpu-8 + 4 workers n1-highcpu-8
    PREMIUM_1   chief n1-highcpu-16 + 19 workers n1-highcpu-16
    BASIC_GPU   chief n1-standard-8 with 1 NVIDIA_TESLA_T4
    CUSTOM      chief --machine-type (default n1-standard-4)

Cloud ML Engine's STANDARD_1/PREMIUM_1 also had parameter servers (3 and 11). They are not mapped to
Vertex AI's pool 2: our trainers use MultiWorkerMirroredStrategy (all-reduce between chief and
workers), which has no use for parameter servers and would run the trainer on them as extra,
unexpected tasks; a Reduction Server pool only helps NCCL all-reduce on GPUs. `--workers N` means N
machines in all (chief + N-1 workers), as the local backend runs N processes; `--machine-type M`
and `--accelerator TYPE:COUNT` apply to every pool.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from model_registry.adapters.backends.base import TrainingSpec
from model_registry.adapters.backends.vertex_settings import parse_accelerator
from model_registry.domain.errors import InvalidInput


@dataclass(frozen=True)
class Pool:
    machine_type: str
    replicas: int
    accelerator: str | None = None
    accelerator_count: int = 0


SCALE_TIERS: dict[str, tuple[Pool, ...]] = {
    "BASIC": (Pool("n1-standard-4", 1),),
    "STANDARD_1": (Pool("n1-highcpu-8", 1), Pool("n1-highcpu-8", 4)),
    "PREMIUM_1": (Pool("n1-highcpu-16", 1), Pool("n1-highcpu-16", 19)),
    "BASIC_GPU": (Pool("n1-standard-8", 1, "NVIDIA_TESLA_T4", 1),),
}


def worker_pools(spec: TrainingSpec) -> list[Pool]:
    """The worker pools of a job: the scale tier's, then --workers, --machine-type, --accelerator on top."""
    tier = (spec.scale_tier or "BASIC").upper()
    if tier == "CUSTOM":
        pools = [Pool(spec.machine_type or "n1-standard-4", 1)]
    elif tier in SCALE_TIERS:
        pools = list(SCALE_TIERS[tier])
    else:
        raise InvalidInput(f"unknown scale tier {spec.scale_tier!r}",
                           f"use one of {', '.join([*SCALE_TIERS, 'CUSTOM'])} (BASIC_TPU is not supported)")
    if spec.workers > 1:
        pools = [pools[0], replace(pools[1] if len(pools) > 1 else pools[0], replicas=spec.workers - 1)]
    if spec.machine_type:
        pools = [replace(p, machine_type=spec.machine_type) for p in pools]
    if spec.accelerator:
        kind, count = parse_accelerator(spec.accelerator)
        pools = [replace(p, accelerator=kind, accelerator_count=count) for p in pools]
    return pools
