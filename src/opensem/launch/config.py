"""configs/launch_config.yaml: `opensem launch --cloud` (SkyPilot's names where it has them: cloud, accelerators,
num_nodes, idle_minutes_to_autostop)."""

from __future__ import annotations

import re
from typing import Literal, Optional

from pydantic import Field, field_validator

from opensem.config import Strict

class LaunchConfig(Strict):
    cloud: Optional[str] = Field("runpod", description="runpod, aws, gcp, azure, lambda, kubernetes, ... (SkyPilot's names), or local")
    gpu: Optional[str] = Field("RTX4090:1", description="SkyPilot accelerators, e.g. RTX4090:1, A100-80GB:1 (null: CPU only)")
    nodes: int = Field(1, ge=1, le=64, description="More than 1: the hf engine's data-parallel training with torchrun across nodes")
    stages: Optional[list[str]] = Field(None, description="Stages to run remotely (default: pipeline_config.yaml's)")
    engine: Literal["auto", "unsloth", "hf"] = Field("unsloth", description="Training engine on the GPU (multi-node: hf)")
    max_hours: float = Field(2.0, gt=0, le=720, description="The job ends itself after this long; the budget is price x max_hours")
    max_cost_usd: Optional[float] = Field(None, gt=0, description="Refuse to launch when price x max_hours is above this")
    price_per_hour: Optional[float] = Field(None, gt=0, description="USD per hour for the whole cluster when the catalog has no price")
    idle_minutes: int = Field(10, ge=1, le=10_080, description="Autodown: the cluster is deleted after this long idle")
    region: Optional[str] = None
    use_spot: bool = Field(False, description="Spot instances, as a SkyPilot managed job that recovers from preemption "
                           "(checkpoints, replies and finished stages on `bucket`)")
    bucket: Optional[str] = Field(None, description="Where a spot job keeps its workspace: s3://NAME/PATH, gs://, r2://, az://, ... "
                                  "(mounted into the job; not needed with --cloud local)")
    disk_size: int = Field(100, ge=20, le=65_536, description="GB")
    cluster_name: Optional[str] = Field(None, description="Lower-case letters, digits and '-', starting with a letter; "
                                        "default: opensem-<workspace folder>")
    secrets: list[str] = Field(default_factory=lambda: ["OPENAI_API_KEY", "ANTHROPIC_API_KEY", "HF_TOKEN", "WANDB_API_KEY"],
                               description="Environment variables passed by name when set here; their values are never written")
    sync_models: bool = Field(False, description="Also upload models/ (adapters, exports) already made here")
    sync_cache: bool = Field(False, description="Also upload .opensem/cache (teacher replies, answers) so the remote reuses them")

    @field_validator("secrets")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        bad = [x for x in v if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", x)]
        if bad:
            raise ValueError(f"{bad[0]!r} is not an environment variable name (list names only, never values)")
        return v

    @field_validator("cluster_name")
    @classmethod
    def _cluster(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not re.fullmatch(r"[a-z][a-z0-9-]{0,62}", v):
            raise ValueError(f"{v!r} is not a cluster name: lower-case letters, digits and '-', starting with a letter, at most 63 "
                             f"characters (it names a folder and a cloud cluster)")
        return v

    @field_validator("stages")
    @classmethod
    def _stage_names(cls, v: Optional[list[str]]) -> Optional[list[str]]:
        bad = [x for x in v or [] if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*(:[A-Za-z_][A-Za-z0-9_]*)?", x)]
        if bad:
            raise ValueError(f"{bad[0]!r} is not a stage name (a registered stage, or package.module:attribute)")
        return v
