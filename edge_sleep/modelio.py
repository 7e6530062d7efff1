"""How edge-sleep talks to an arbitrary ``nn.Module``: logits, fingerprints, hook points, latents."""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from edge_sleep.errors import ConfigError

__all__ = [
    "import_model_factory",
    "logits_of",
    "model_fingerprint",
    "activation_module_names",
    "split_sequential",
]

_ACTIVATIONS = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.ELU, nn.Mish,
    nn.Hardswish, nn.SELU, nn.Softplus,
)


def logits_of(output: Any) -> torch.Tensor:
    """The logits tensor of a model output: a tensor, a Hugging Face ``ModelOutput`` or a tuple.

    Raises:
        TypeError: if no tensor of logits can be found.
    """
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(
        f"model returned {type(output).__name__}; expected a logits tensor, a tuple starting with "
        "one, or an object with a .logits tensor (Hugging Face). Wrap the model so forward returns logits."
    )


def model_fingerprint(model: nn.Module, latent_layer: str | None = None) -> str:
    """A short hash of the model's class, parameter names and shapes (not values).

    Two instances of the same architecture share a fingerprint; a store written by one can be
    replayed into the other.
    """
    h = hashlib.sha256(type(model).__name__.encode())
    for name, p in model.named_parameters():
        # LoRA adapter tensors are not part of the architecture the store depends on.
        if ".lora_" in name:
            continue
        h.update(f"{name.replace('.base.', '.')}:{tuple(p.shape)};".encode())
    h.update(f"latent={latent_layer}".encode())
    return h.hexdigest()[:16]


def activation_module_names(model: nn.Module) -> list[str]:
    """Names of the activation modules (ReLU, GELU, SiLU, HF ``*Activation``...) in ``model``."""
    names = []
    for name, m in model.named_modules():
        if not name:
            continue
        if isinstance(m, _ACTIVATIONS) or type(m).__name__.endswith("Activation"):
            names.append(name)
    return names


def split_sequential(model: nn.Module, layer: str) -> tuple[nn.Sequential, nn.Sequential]:
    """Split an ``nn.Sequential`` after child ``layer``: ``(encoder, head)``, sharing modules.

    Raises:
        ConfigError: if the model is not an ``nn.Sequential`` or has no child named ``layer``.
    """
    if not isinstance(model, nn.Sequential):
        raise ConfigError(
            "StoreConfig",
            [f"latent_layer={layer!r} needs an nn.Sequential model, got {type(model).__name__}; "
             "store the input (latent_layer=None) or wrap the model's trunk in nn.Sequential"],
        )
    names = [n for n, _ in model.named_children()]
    if layer not in names:
        raise ConfigError("StoreConfig", [f"latent_layer={layer!r}; expected one of {names}"])
    k = names.index(layer) + 1
    children = list(model.children())
    return nn.Sequential(*children[:k]), nn.Sequential(*children[k:])


def import_model_factory(spec: str) -> Callable[..., nn.Module]:
    """``"package.module:callable"`` -> that callable, which builds a fresh model.

    Raises:
        ConfigError: the spec is not ``MODULE:CALLABLE``, does not import, or names no callable.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError("model factory", [f"{spec!r}; expected MODULE:CALLABLE, e.g. edge_sleep.bench.pmnist:mlp"])
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError("model factory", [f"cannot import {spec!r} ({e}). Fix: name an importable module and a "
                                            "callable in it that returns the model"]) from None
    if not callable(factory):
        raise ConfigError("model factory", [f"{spec!r} is a {type(factory).__name__}, not callable"])
    return factory  # type: ignore[no-any-return]
