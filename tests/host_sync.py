"""Find the operations that make the host wait for the device, and the Python lines that issue them.

A CUDA graph (and any decode loop that should keep the GPU busy) needs a forward that never reads tensor values
on the host and never makes a shape from them. `HostSyncRecorder` is a context manager that records, per
(operation, source line), every such operation run inside it, on any device, so that it can be proven on the
CPU:

- value reads: `.item()`, `bool(t)` / `if t`, `int(t)`, `float(t)` (all `aten._local_scalar_dense`), `.tolist()`,
  `.numpy()`, `.cpu()`, `torch.equal`, `is_nonzero`;
- data-dependent shapes: `nonzero` / `argwhere`, `masked_select`, `unique*`, boolean-mask indexing
  (`t[mask]`, `t[mask] = x`), `repeat_interleave` without `output_size`;
- copies between host and device memory (a blocking copy waits for the GPU; a pageable one cannot be captured).
  On a CPU-only run there are none to see.

`.tolist()`, `.numpy()` and boolean-mask indexing of a CPU tensor reach no aten operation that tells, so the
recorder also watches the Python-level tensor methods (a `TorchFunctionMode`) besides the aten operations (a
`TorchDispatchMode`). Each record names the innermost frame under `root` (a folder), or "elsewhere".
"""

from __future__ import annotations

import os
import traceback
from collections import Counter
from typing import Optional

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten
_HERE = os.path.abspath(__file__)

_VALUE_READS = {_aten._local_scalar_dense, _aten.equal, _aten.is_nonzero}
_DATA_SHAPED = {_aten.nonzero, _aten.masked_select, _aten.argwhere}
_INDEXING = {_aten.index, _aten.index_put, _aten.index_put_, _aten._index_put_impl_}
_COPIES = {_aten._to_copy, _aten.copy_, _aten._copy_from}
_METHODS = {"tolist", "numpy", "cpu", "item", "__bool__", "__int__", "__float__", "__index__"}


def _devices(args, kwargs) -> set:
    return {a.device.type for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)}


def _is_host_sync(func, args, kwargs) -> bool:
    packet = func.overloadpacket
    if packet in _VALUE_READS or packet in _DATA_SHAPED or packet.__name__.lstrip("_").startswith("unique"):
        return True
    if packet is _aten.repeat_interleave and kwargs.get("output_size") is None and len(args) < 4:
        return isinstance(args[0], torch.Tensor) and (len(args) < 2 or isinstance(args[1], torch.Tensor))
    if packet in _INDEXING:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())
    if packet in _COPIES:
        target = kwargs.get("device")
        devices = _devices(args, kwargs) | ({torch.device(target).type} if target is not None else set())
        return "cpu" in devices and len(devices) > 1
    return False


class HostSyncRecorder:
    """`with HostSyncRecorder(root) as rec: ...`; then `rec.hits` counts (operation, "file:line function")."""

    def __init__(self, root: str):
        self.root = os.path.abspath(root) + os.sep
        self.hits: Counter = Counter()

    def _record(self, what: str) -> None:
        site = "elsewhere"
        for frame in reversed(traceback.extract_stack()):
            path = os.path.abspath(frame.filename)
            if path.startswith(self.root) and path != _HERE:
                site = f"{os.path.relpath(path, os.path.dirname(self.root[:-1]))}:{frame.lineno} {frame.name}"
                break
        self.hits[(what, site)] += 1

    def under_root(self) -> Counter:
        return Counter({k: n for k, n in self.hits.items() if k[1] != "elsewhere"})

    def __enter__(self):
        recorder = self

        class _Functions(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                name = getattr(func, "__name__", "")
                if name in _METHODS:
                    recorder._record(f"Tensor.{name}")
                elif name == "__getitem__" or name == "__setitem__":
                    index = args[1] if len(args) > 1 else None
                    parts = index if isinstance(index, tuple) else (index,)
                    if any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts):
                        recorder._record(f"Tensor.{name} with a boolean mask")
                return func(*args, **(kwargs or {}))

        class _Ops(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if _is_host_sync(func, args, kwargs):
                    recorder._record(str(func))
                return func(*args, **kwargs)

        self._modes = (_Functions(), _Ops())
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> Optional[bool]:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        return None
