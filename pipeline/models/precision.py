"""The arithmetic the networks run in: bf16 autocast where the hardware has bf16 units, else exact fp32.

Certification is valid for any fixed denoise-classify function, so the precision is a speed choice,
but it is part of that function: the counts of a bf16 run differ from an fp32 run's, and a resume must
not mix them (the certify jobs record it with the run's inputs). bf16 keeps fp32's exponent range, so
no loss scaling is needed when fine-tuning either.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Literal

import torch

from pipeline.errors import UserError

Precision = Literal["bf16", "fp32"]
PRECISION_CHOICES = ("auto", "bf16", "fp32")


def cpu_has_bf16() -> bool:
    """Native bf16 instructions (AVX512-BF16 or AMX): oneDNN's bf16 convolutions then run about twice
    as fast as fp32 (digits models, one core: 0.56 vs 1.16 s per 1,024 samples). Without them bf16 is
    emulated and slower than fp32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_precision(requested: str, gpu: bool) -> Precision:
    """`auto`: bf16 on GPUs and on CPUs with native bf16, fp32 elsewhere; `bf16` / `fp32` as given."""
    if requested == "auto":
        return "bf16" if gpu or cpu_has_bf16() else "fp32"
    if requested not in ("bf16", "fp32"):
        raise UserError(f"unknown precision {requested!r}; choose one of {', '.join(PRECISION_CHOICES)}")
    return requested  # type: ignore[return-value]


def autocast(device: torch.device, precision: Precision):
    """bf16 autocast on `device`, or exact fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
