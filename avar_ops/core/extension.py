"""Loads the compiled extension once and checks that it fits this machine and this torch."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def load_extension():
    try:
        from avar_ops import _C
    except ImportError as e:
        raise ImportError(
            "avar_ops._C is not built or does not match this torch "
            f"({torch.__version__}): build it with `pip install --no-build-isolation -e .` ({e})"
        ) from e
    built_for = _C.cpu_capability
    here = torch.backends.cpu.get_cpu_capability()
    if built_for == "AVX512" and not here.startswith("AVX512") or built_for == "AVX2" and here == "DEFAULT":
        raise ImportError(
            f"avar_ops._C was built for {built_for} but this CPU offers {here}: rebuild here, or build with "
            "AVAR_CPU_CAPABILITY=AVX2 (or DEFAULT) for older CPUs"
        )
    return _C
