"""Give back what torch.export and ExecuTorch keep in module-level state after an export.

These stores outlive every export and grow with each one:

- ``torch.export.export(strict=True)`` traces through Dynamo, which installs the captured graph
  (``__compiled_fn_<n>_<uuid>``, an ``OptimizedModule`` holding the Dynamo graph, its
  ``ShapeEnv``, fake tensors and the *real* parameters of the model exported) and its helpers
  (``__import_*``, ``__builtins_dict_*``, ``___unnamed_scope_*``) as globals of
  ``torch._dynamo.functional_export``, the module of the frame it traces. Dynamo removes such
  globals with the compiled code's cache entry; export's capture creates none, so nothing ever
  removes them (torch 2.13). Each export kept about 2.3x the model's weights alive.
- ``executorch.exir.backend.utils.is_same_node`` is an unbounded ``lru_cache`` keyed by pairs of
  ``torch.fx.Node``: it keeps every partitioned graph alive; likewise
  ``torch.ao.quantization.fx.utils.assert_and_get_unique_device`` and torchao's
  ``torchao.utils._assert_and_get_unique_device`` (``functools.cache``) keep every int8 graph
  module that PT2E quantization prepared or converted, weights included.
- ``ShapeEnv``'s method caches (``functools.lru_cache`` on the class, keyed by the ``ShapeEnv``,
  some unbounded) keep each export's ``ShapeEnv`` alive, and with its fake-tensor cache the
  lowered XNNPACK module, its original ``ExportedProgram`` and that program's state dict. With
  the caches cleared, a ``ShapeEnv`` is still kept alive from C++ by its symbolic sizes, so its
  fake-tensor cache is emptied as well.

:func:`releases_export_state` wraps each ``to_*_program`` function: the globals installed during
the call are removed once it returns (the returned program no longer needs them) and the
caches are cleared. Exports are serialized by a lock, so one export never removes
the globals another one is still tracing with.
"""

from __future__ import annotations

import functools
import gc
import importlib
import sys
import threading
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

__all__ = ["releases_export_state"]

P = ParamSpec("P")
R = TypeVar("R")

_LOCK = threading.RLock()


def _loaded(module: str) -> dict[str, Any]:
    """The globals of ``module`` if it is imported (a module never imported holds nothing to release)."""
    found = sys.modules.get(module)
    return vars(found) if found is not None else {}


def _capture_globals() -> dict[str, Any]:
    """The globals of the module strict ``torch.export`` traces from (imported, so that what it
    holds before an export, dunders included, is known)."""
    try:
        return vars(importlib.import_module("torch._dynamo.functional_export"))
    except ImportError:
        return {}


def _release(before: set[str]) -> None:
    """Remove what the export installed and cached (see the module docstring).

    Each store is reached through torch's, torchao's and ExecuTorch's internals of the pinned
    versions; one that has moved is skipped (the export's result never depends on this).
    """
    scope = _capture_globals()
    for name in set(scope) - before:
        if name.startswith("__"):  # what Dynamo installs; never a name of the module itself
            scope.pop(name, None)
    shape_env = _loaded("torch.fx.experimental.symbolic_shapes").get("ShapeEnv")
    if isinstance(shape_env, type):
        for attr in list(vars(shape_env).values()):  # method caches keyed by the ShapeEnv itself
            clear = getattr(attr, "cache_clear", None)
            if callable(clear):
                clear()
        # A ShapeEnv with symbolic sizes is kept alive from C++ (its SymInts), which the collector
        # cannot see; its fake-tensor cache keys hold the lowered module and, through it, a copy of
        # every weight exported. Its other contents are small.
        for obj in gc.get_objects():
            if type(obj) is shape_env:
                cache = getattr(obj, "fake_tensor_cache", None)
                if cache is not None:
                    cache.clear()
    for module, name in (("executorch.exir.backend.utils", "is_same_node"),
                         # both functools.cache, keyed by the int8 graph module
                         ("torch.ao.quantization.fx.utils", "assert_and_get_unique_device"),
                         ("torchao.utils", "_assert_and_get_unique_device")):
        clear = getattr(_loaded(module).get(name), "cache_clear", None)
        if callable(clear):
            clear()


def releases_export_state(fn: Callable[P, R]) -> Callable[P, R]:
    """``fn`` (an export) with what torch.export and ExecuTorch leave in module globals released."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with _LOCK:
            before = set(_capture_globals())
            try:
                return fn(*args, **kwargs)
            finally:
                _release(before)

    return wrapper
