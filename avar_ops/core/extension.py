"""Loads the compiled extension once and checks that it fits this machine and this torch."""

from __future__ import annotations

import functools
import importlib
import os

import torch

# AVAR_EXTENSION picks the build the ops come from. "cuda_emulation" loads avar_ops._C_emu (built with
# AVAR_BUILD_CUDA_EMULATION=1), where float16 / bfloat16 CPU tensors run the CUDA kernels on an emulated device:
# tests use it to run the CUDA code on machines without a GPU. Only one of the two can be loaded in a process,
# since both register torch.ops.avar.
_BUILDS = {"default": "_C", "cuda_emulation": "_C_emu"}


@functools.lru_cache(maxsize=None)
def load_extension():
    which = os.environ.get("AVAR_EXTENSION", "default")
    if which not in _BUILDS:
        raise ImportError(f"AVAR_EXTENSION must be one of {sorted(_BUILDS)}, got {which!r}")
    name = _BUILDS[which]
    try:
        _C = importlib.import_module(f"avar_ops.{name}")
    except ImportError as e:
        how = (
            "AVAR_BUILD_CUDA_EMULATION=1 pip install --no-build-isolation -e ."
            if which == "cuda_emulation"
            else "pip install --no-build-isolation -e ."
        )
        raise ImportError(
            f"avar_ops.{name} is not built or does not match this torch ({torch.__version__}): build it with "
            f"`{how}` ({e})"
        ) from e
    built_for = _C.cpu_capability
    here = torch.backends.cpu.get_cpu_capability()
    if built_for == "AVX512" and not here.startswith("AVX512") or built_for == "AVX2" and here == "DEFAULT":
        raise ImportError(
            f"avar_ops.{name} was built for {built_for} but this CPU offers {here}: rebuild here, or build with "
            "AVAR_CPU_CAPABILITY=AVX2 (or DEFAULT) for older CPUs"
        )
    return _C
