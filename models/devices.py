"""Devices, dtypes and module preparation shared by every model loader."""
from __future__ import annotations

import logging
import os
from typing import Sequence

import torch

logger = logging.getLogger(__name__)

_DTYPES = {
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}

def choose_cpu_threads(requested: int | None, *, small_model: bool, environ=None) -> int | None:
    """The torch CPU thread count of a run, or None to keep torch's (one per physical core).

    ``requested`` (``--threads``) wins, then ``$OMP_NUM_THREADS`` (torch already follows it: None). A small
    model (``RunModelSpec.small``: the tiny and shapes models) gets 1: its kernels are too small to
    share, and on a busy machine more threads only spin (a baseline_tiny step: 3.6 s with torch's 2 threads,
    0.43 s with one; the README's first command: 183 s and 82 s, docs/BENCHMARKS.md). On CPU the count
    changes the last bits of floating-point sums, so a run records it (config.json, ``torch_threads``).
    """
    if requested is not None:
        if requested < 1:
            raise ValueError(f"threads must be at least 1, found {requested}")
        return requested
    environ = os.environ if environ is None else environ
    if environ.get("OMP_NUM_THREADS"):
        return None
    return 1 if small_model else None


def apply_cpu_threads(threads: int | None) -> None:
    """``torch.set_num_threads(threads)`` unless None (see :func:`choose_cpu_threads`)."""
    if threads is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def resolve_device(name: str | torch.device | None = None) -> torch.device:
    """``name`` as a torch.device; None picks CUDA when available, else CPU."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {name!r} (expected e.g. 'cpu', 'cuda', 'cuda:1')") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available on this machine")
    return device


def resolve_dtype(name: str | torch.dtype | None, device: torch.device | str) -> torch.dtype:
    """``name`` ("fp16", "bf16", "fp32" or a torch dtype) as a torch.dtype.

    None gives fp16 on CUDA (as the reference) and fp32 elsewhere (fp16 on CPU is slow and lossy).
    """
    device = torch.device(device)
    if name is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(name, torch.dtype):
        dtype = name
    else:
        key = str(name).lower().removeprefix("torch.")
        if key not in _DTYPES:
            raise ValueError(f"unknown dtype {name!r}; expected one of fp16, bf16, fp32 (or a torch dtype)")
        dtype = _DTYPES[key]
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"unsupported model dtype {dtype}; expected float16, bfloat16 or float32")
    if dtype == torch.float16 and device.type == "cpu":
        logger.warning("fp16 on CPU is slow and some kernels are missing; consider fp32 or bf16")
    return dtype


def cast_module(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast floating-point parameters and buffers to ``dtype`` (no-op when they already are).

    Uses half()/float()/bfloat16(): diffusers' `.to(dtype)` logs a spurious fp32-modules warning.
    """
    if all(t.dtype == dtype for t in module.parameters() if t.is_floating_point()):
        return module
    cast = {torch.float16: module.half, torch.float32: module.float, torch.bfloat16: module.bfloat16}[dtype]
    return cast()


def prepare_modules(modules: Sequence[torch.nn.Module], device: torch.device, dtype: torch.dtype) -> None:
    """Move to device/dtype, switch to eval mode and freeze parameters (guidance needs gradients
    w.r.t. latents only)."""
    for module in modules:
        cast_module(module, dtype)
        module.to(device=device)
        module.eval()
        module.requires_grad_(False)


def build_seeded(seed: int, build, device: torch.device | None = None):
    """Run ``build()`` with the torch RNG seeded, without touching the caller's RNG state."""
    devices = [device] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return build()
