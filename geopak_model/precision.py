"""Mixed precision: one place that decides the autocast dtype, so training, the embedding cache, validation and
the predictor agree.

bf16 where the GPU supports it (Ampere and newer); fp16 otherwise (T4, V100), which needs a ``GradScaler`` in
training because fp16 gradients underflow; no autocast on CPU (features stay float32).
"""

from __future__ import annotations

import contextlib

import torch

AMP_DTYPES = ("auto", "bf16", "fp16")


def amp_dtype(device: torch.device | str, amp: bool, requested: str = "auto") -> torch.dtype | None:
    """The autocast dtype for ``device`` (None: run in float32). ``requested`` is "auto", "bf16" or "fp16"."""
    if requested not in AMP_DTYPES:
        raise ValueError(f"amp_dtype must be one of {AMP_DTYPES}, got {requested!r}")
    device = torch.device(device)
    if not amp or device.type != "cuda":
        return None
    if requested == "fp16":
        return torch.float16
    bf16_ok = torch.cuda.is_bf16_supported(including_emulation=False)
    if requested == "bf16":
        if not bf16_ok:
            raise RuntimeError(f"amp_dtype 'bf16' requested but {torch.cuda.get_device_name(device)} has no bf16; "
                               "use 'auto' or 'fp16'")
        return torch.bfloat16
    return torch.bfloat16 if bf16_ok else torch.float16


def autocast(device: torch.device | str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``dtype``, or a no-op context when ``dtype`` is None."""
    device = torch.device(device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def dtype_name(dtype: torch.dtype | None) -> str:
    """"bf16", "fp16" or "fp32": what is stored in cache metadata and checkpoints."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}.get(dtype, str(dtype))
