"""Where a base runs and in what precision: chosen once when it loads, then used by every step.

    device  auto: the GPU when one is visible, else the CPU; or cpu, cuda, cuda:1, ...
    dtype   auto: bfloat16 on a GPU. On the CPU, bfloat16 only when the CPU has bf16 matrix kernels
            and the base is at least CPU_BF16_MIN_HIDDEN wide, else float32; or float32, bfloat16

Why the CPU rule depends on width: with bf16 kernels (AVX512-BF16 or AMX), bf16 weights trained and
evaluated a 1024-wide Llama about 2x faster than fp32 on 2 cores, but at the demo family's width
(96) fp32 was the faster one: there the matmuls are too small for the conversions to pay. The
crossover is measured by ``python bench/bench_precision.py`` (bench/results/precision.json,
``bf16_from_hidden``), and CPU_BF16_MIN_HIDDEN is that width.

Every step that runs a model (training, evaluation, zero-shot, transfer, revalidation, re-tuning,
hot swap, the nightly run) gets it from ``load_base``, already placed: the evaluation and training
code runs on whatever device the weights are on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CPU_BF16_MIN_HIDDEN = 256  # bench/results/precision.json: bf16_from_hidden

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


class PlacementError(ValueError):
    """A device or dtype that does not exist, or is not available on this machine."""


def cpu_bf16_kernels() -> bool:
    """Whether this CPU has bf16 matrix instructions (AVX512-BF16 or AMX) for oneDNN to use."""
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # torch.cpu's own probes (private)
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


@dataclass(frozen=True)
class Placement:
    device: str = "auto"
    dtype: str = "auto"

    def __post_init__(self):
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise PlacementError(f"dtype {self.dtype!r}: use auto, {', '.join(DTYPES)}")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError:
                raise PlacementError(f"device {self.device!r}: use auto, cpu, cuda or cuda:<index>") from None

    def torch_device(self) -> torch.device:
        """The device, checked to exist here."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise PlacementError(f"device {self.device!r}: this machine has no CUDA GPU that torch can use; "
                                 "use --device cpu (or auto)")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise PlacementError(f"device {self.device!r}: only {torch.cuda.device_count()} GPU(s) visible")
        return device

    def torch_dtype(self, device: torch.device, hidden_size: int) -> torch.dtype:
        """The weights' dtype on ``device`` for a base ``hidden_size`` wide."""
        if self.dtype != "auto":
            return DTYPES[self.dtype]
        if device.type == "cuda":
            return torch.bfloat16
        wide = hidden_size >= CPU_BF16_MIN_HIDDEN
        return torch.bfloat16 if device.type == "cpu" and wide and cpu_bf16_kernels() else torch.float32

    def resolve(self, config) -> tuple[torch.device, torch.dtype]:
        """(device, dtype) for a model of ``config`` (a transformers config)."""
        device = self.torch_device()
        return device, self.torch_dtype(device, config.get_text_config().hidden_size)


def placed(model) -> str:
    """Where a model's base weights are and in what dtype, e.g. ``cpu bfloat16``, ``cuda:0 float32``:
    what each step records of where it ran."""
    weight = model.get_input_embeddings().weight
    return f"{weight.device} {str(weight.dtype).removeprefix('torch.')}"
