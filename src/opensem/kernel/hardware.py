"""Hardware detection and the training profile applied to it (FR-B3).

- consumer NVIDIA GPU (RTX 4090 and friends, <= 32 GB): a hard VRAM cap (``max_vram_gb``, default 22),
  enforced with torch.cuda.set_per_process_memory_fraction, and a micro-batch / gradient-checkpointing
  choice that fits under it while keeping the effective batch size.
- data-centre GPU (A100, H100, H200, L40...): the whole card, bf16.
- older GPUs without bf16: fp16.
- CPU: fp32 (its linear layers through oneDNN where that is exact and faster: opensem/onednn.py); bf16 autocast
  only on request, also where the CPU has native bf16: it trains a different curve (the LoRA updates are rounded in
  the bf16 sums) for little speed over fp32 through oneDNN (bench/train_throughput.py); never 4-bit.
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass, field
from typing import Optional

from opensem.kernel.config import TrainConfig
from opensem.errors import ConfigError

CONSUMER_MARKERS = ("rtx", "geforce", "titan")
DATACENTER_MARKERS = ("a100", "h100", "h200", "h800", "a800", "l40", "b100", "b200", "gh200")


@dataclass
class Hardware:
    device: str  # cuda | mps | cpu
    name: str
    memory_gb: float
    bf16: bool
    cpu: str
    cpu_threads: int
    gpu_count: int = 0

    @property
    def kind(self) -> str:
        if self.device != "cuda":
            return self.device
        n = self.name.lower()
        if any(m in n for m in DATACENTER_MARKERS):
            return "datacenter-gpu"
        if any(m in n for m in CONSUMER_MARKERS) or self.memory_gb <= 32:
            return "consumer-gpu"
        return "datacenter-gpu"


@dataclass
class Profile:
    hardware: dict
    kind: str
    precision: str
    micro_batch_size: int
    gradient_accumulation_steps: int
    gradient_checkpointing: bool
    vram_cap_gb: Optional[float] = None
    checkpoint_layers: float = 0.0  # share of decoder layers whose activations are recomputed
    notes: list = field(default_factory=list)

    def describe(self) -> str:
        hw = self.hardware
        cap = f", VRAM cap {self.vram_cap_gb:g} GB" if self.vram_cap_gb else ""
        return (
            f"{self.kind}: {hw['name']} ({hw['memory_gb']:.0f} GB){cap}; {self.precision}; micro batch "
            f"{self.micro_batch_size} x accumulation {self.gradient_accumulation_steps}; gradient checkpointing "
            f"{'off' if not self.checkpoint_layers else 'all layers' if self.checkpoint_layers >= 1 else f'{self.checkpoint_layers:.0%} of layers'}"
        )


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as fh:
            flags = fh.read()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        return False


def detect_hardware() -> Hardware:
    import torch

    threads = torch.get_num_threads()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return Hardware(
            "cuda", props.name, props.total_memory / 2**30, torch.cuda.is_bf16_supported(), _cpu_name(), threads,
            torch.cuda.device_count(),
        )
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem = 0.0
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return Hardware("mps", "Apple GPU", mem, False, _cpu_name(), threads)
    return Hardware("cpu", _cpu_name(), mem, _cpu_has_bf16(), _cpu_name(), threads)


def estimate_gb(params_b: float, cfg: TrainConfig, micro_batch: int, checkpointing: bool, hidden: int, layers: int) -> float:
    """A rough peak-memory estimate for LoRA training (weights + activations), in GB."""
    weight_bytes = 0.55 if cfg.adapter == "qlora" else 2.0
    weights = params_b * 1e9 * weight_bytes / 2**30
    per_token = hidden * layers * (2 if checkpointing else 34) * 2  # bytes, bf16 activations
    acts = micro_batch * cfg.sequence_len * per_token / 2**30
    return weights * 1.15 + acts + 1.0  # +1 GB for CUDA context, LoRA states, logits


def cpu_activation_gb(cfg: TrainConfig, micro_batch: int, hidden: int, layers: int, precision: str) -> float:
    """Activations a CPU LoRA step keeps for the backward pass, at the longest batch (``micro_batch`` x
    ``sequence_len``) and no checkpointing: about 20 values per hidden unit per layer per token (measured on the
    embedded model in fp32: 1.3 MB a token)."""
    return micro_batch * cfg.sequence_len * hidden * layers * 20 * (2 if precision == "bf16" else 4) / 2**30


def check_adapter(cfg: TrainConfig, hw: Hardware) -> None:
    if cfg.adapter == "qlora" and hw.device != "cuda":
        raise ConfigError("configs/train_config.yaml: key 'adapter': qlora (4-bit) needs an NVIDIA GPU; use adapter: lora here")


def make_profile(cfg: TrainConfig, hw: Hardware, params_b: float = 0.0, hidden: int = 0, layers: int = 0) -> Profile:
    check_adapter(cfg, hw)
    kind = hw.kind
    notes: list[str] = []
    if cfg.precision != "auto":
        precision = cfg.precision
        if precision == "fp16" and hw.device == "cpu":
            raise ConfigError("configs/train_config.yaml: key 'precision': fp16 is not supported on the CPU; use bf16 or fp32")
    elif hw.device == "cuda":
        precision = "bf16" if hw.bf16 else "fp16"
    else:
        if hw.bf16:
            notes.append("CPU has native bf16, training stays fp32: bf16 autocast trains a different loss curve "
                         "(precision: bf16 to choose it)")
        precision = "fp32"
    mb, ga = cfg.micro_batch_size, cfg.gradient_accumulation_steps
    share: Optional[float] = None
    if isinstance(cfg.gradient_checkpointing, bool):
        gc: Optional[bool] = cfg.gradient_checkpointing
    elif isinstance(cfg.gradient_checkpointing, float):
        share = cfg.gradient_checkpointing
        gc = share > 0
    else:
        gc = None
    cap = None
    if kind == "consumer-gpu":
        cap = min(cfg.max_vram_gb, hw.memory_gb)
        if gc is None:
            gc = estimate_gb(params_b, cfg, mb, False, hidden, layers) > cap
        # halve the micro batch (doubling accumulation: same effective batch) until the estimate fits
        while mb > 1 and estimate_gb(params_b, cfg, mb, gc, hidden, layers) > cap:
            mb, ga = mb // 2, ga * 2
            notes.append(f"micro batch lowered to {mb} (accumulation {ga}) to stay under {cap:g} GB")
    elif gc is None and hw.device != "cuda":
        # CPU: recomputing activations costs about a fifth of a step (bench/train_throughput.py); memory is rarely
        # short. Keep them all when the largest batch's fit in half the memory, else recompute every other layer,
        # else every layer.
        need = cpu_activation_gb(cfg, mb, hidden, layers, precision)
        share = 0.0 if need <= hw.memory_gb / 2 else 0.5 if need / 2 <= hw.memory_gb / 2 else 1.0
        gc = share > 0
        if gc:
            notes.append(f"CPU: gradient checkpointing on {share:.0%} of the layers: {mb} x {cfg.sequence_len} tokens need "
                         f"about {need:.0f} GB of activations without it")
    elif gc is None:
        # data-centre GPUs have the memory: recomputing activations would only cost time
        gc = estimate_gb(params_b, cfg, mb, False, hidden, layers) > hw.memory_gb * 0.9
    if share is None:
        share = 1.0 if gc else 0.0
    return Profile(asdict(hw) | {"kind": kind}, kind, precision, mb, ga, bool(gc), cap, share if gc else 0.0, notes)


def apply_vram_cap(profile: Profile) -> None:
    """Enforce the cap: allocations beyond it raise OutOfMemoryError instead of freezing the desktop."""
    if profile.vram_cap_gb is None:
        return
    import torch

    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    torch.cuda.set_per_process_memory_fraction(min(1.0, profile.vram_cap_gb / total), 0)
