"""Process-wide XLA defaults for sampling and benchmarks (call before the first JAX computation).

XLA reads ``XLA_FLAGS`` once, when it creates the backend, so the entry points (``sample.py``, the benchmarks)
call :func:`apply_xla_defaults` first thing. A flag the user already set is left as it is.
"""
from __future__ import annotations

import os
from typing import MutableMapping

# flag -> value, each with the measurement that justifies it (benchmarks/RESULTS.md)
XLA_DEFAULTS: dict[str, str] = {
    # cuBLAS instead of Triton for every GEMM: the DiT chunk step takes 2.7 % less device time on an H100
    # (benchmarks/profile_chunk.py, nam: 364 -> 354 ms); a GPU-only flag, ignored on CPU and TPU.
    "--xla_gpu_enable_triton_gemm": "false",
}


def apply_xla_defaults(env: MutableMapping[str, str] | None = None) -> str:
    """Append :data:`XLA_DEFAULTS` the user has not set to ``XLA_FLAGS``; returns the resulting flags."""
    env = os.environ if env is None else env
    flags = env.get("XLA_FLAGS", "")
    extra = [f"{k}={v}" for k, v in XLA_DEFAULTS.items() if k not in flags]
    if extra:
        env["XLA_FLAGS"] = " ".join([flags] + extra if flags else extra)
    return env.get("XLA_FLAGS", "")
