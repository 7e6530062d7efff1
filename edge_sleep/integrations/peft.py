"""PEFT interoperability: a model with PEFT LoRA adapters is taken as it is, and the runtime's
adapters are written in the files PEFT loads.

A runtime adapts with its own :class:`~edge_sleep.adapters.LoRALinear`. A model that arrives
with PEFT LoRA layers (``get_peft_model(model, LoraConfig(...))``) keeps them: :func:`adopt_peft_`
swaps each PEFT layer for a ``LoRALinear`` that computes the same function with the same ``A``,
``B`` and scale, and leaves PEFT's ``modules_to_save`` copies trainable, as PEFT does. The model
computes exactly what it computed before.

The other way, :func:`save_adapters` writes ``adapter_config.json`` and
``adapter_model.safetensors``, which ``peft.PeftModel.from_pretrained(base, folder)`` loads.
The adapters are the day's learning *on the base as it stands*: each night merges the day's
adapters into the base weights and consolidates them, so after a night the base is no longer the
pretrained one. :func:`save_base` writes that base (a Hugging Face model folder that
``from_pretrained`` loads); base and adapters together give the runtime's model.

Nothing here imports ``peft``: PEFT's layers are recognised by their attributes, and the files are
plain JSON and safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edge_sleep.adapters import LoRALinear, is_conv1d, lora_modules
from edge_sleep.atomic import atomic_directory
from edge_sleep.errors import CheckpointError, ConfigError, EdgeSleepError, first_line

__all__ = ["peft_lora_layers", "peft_problems", "adopt_peft_", "save_adapters", "save_base",
           "PEFT_PREFIX", "ADAPTER_CONFIG", "ADAPTER_WEIGHTS"]

PEFT_PREFIX = "base_model.model."  # what PEFT puts before a module's name in its model and its files
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _is_peft_lora(module: nn.Module) -> bool:
    """A PEFT LoRA layer: a ``base_layer`` and ``lora_A``/``lora_B`` dictionaries keyed by adapter."""
    return (hasattr(module, "base_layer") and isinstance(getattr(module, "lora_A", None), nn.ModuleDict)
            and isinstance(getattr(module, "lora_B", None), nn.ModuleDict))


def _is_modules_to_save(module: nn.Module) -> bool:
    """PEFT's ``ModulesToSaveWrapper``: the frozen ``original_module`` and trainable copies by adapter."""
    return hasattr(module, "original_module") and isinstance(getattr(module, "modules_to_save", None), nn.ModuleDict)


def peft_lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: layer}`` of every PEFT LoRA layer in ``model`` (empty for a model without PEFT)."""
    return {n: m for n, m in model.named_modules() if _is_peft_lora(m)}


def _active(layer: nn.Module) -> list[str]:
    active = getattr(layer, "active_adapters", None)
    if active is None:
        active = getattr(layer, "active_adapter", [])
    return [active] if isinstance(active, str) else list(active)


def peft_problems(model: nn.Module) -> list[str]:
    """Why the PEFT layers of ``model`` cannot be taken as they are (empty: they can)."""
    problems = []
    for name, layer in peft_lora_layers(model).items():
        active = _active(layer)
        lora_a: Any = layer.lora_A
        if len(active) != 1 or active[0] not in lora_a:
            problems.append(f"PEFT layer {name!r} has active adapters {active}; expected exactly one. "
                            "Fix: model.set_adapter(name) for the one to learn in.")
            continue
        adapter = active[0]
        base: Any = layer.base_layer
        if not (isinstance(base, nn.Linear) or is_conv1d(base)):
            problems.append(f"PEFT layer {name!r} adapts a {type(base).__name__}; expected nn.Linear or Conv1D "
                            "(edge-sleep's adapters are linear). Fix: target only linear layers in LoraConfig.")
        if bool(getattr(layer, "use_dora", {}).get(adapter, False)):
            problems.append(f"PEFT layer {name!r} uses DoRA; expected plain LoRA. Fix: LoraConfig(use_dora=False).")
        if getattr(layer, "merged_adapters", []):
            problems.append(f"PEFT layer {name!r} has its adapter merged into the base; expected it unmerged. "
                            "Fix: model.unmerge_adapter() before handing the model over.")
        if bool(getattr(layer, "lora_bias", {}).get(adapter, False)):
            problems.append(f"PEFT layer {name!r} has a LoRA bias; expected none. Fix: LoraConfig(lora_bias=False).")
    return problems


@torch.no_grad()
def adopt_peft_(model: nn.Module) -> list[str]:
    """Swap every PEFT LoRA layer of ``model`` for a :class:`LoRALinear` with the same function.

    The new layer holds the PEFT layer's base weight and bias (frozen), and its active adapter's
    ``A``, ``B`` and scale (trainable). PEFT's dropout on the adapter's input is not kept: the
    runtime's adapters have none. Nothing else changes: what PEFT froze stays frozen, and its
    ``modules_to_save`` copies stay trainable.

    Returns:
        The names of the swapped layers.

    Raises:
        ConfigError: a layer :func:`peft_problems` refuses; the model is unchanged.
    """
    problems = peft_problems(model)
    if problems:
        raise ConfigError("EdgeSleep", problems)
    layers = peft_lora_layers(model)
    for name, layer in layers.items():
        adapter = _active(layer)[0]
        a: Any = layer.lora_A[adapter]  # type: ignore[index]
        b: Any = layer.lora_B[adapter]  # type: ignore[index]
        rank = int(a.weight.shape[0])
        scaling = float(layer.scaling[adapter])  # type: ignore[index]
        base: Any = layer.base_layer
        new = LoRALinear(base, rank, scaling * rank).to(device=a.weight.device)
        new.lora_a.copy_(a.weight)
        new.lora_b.copy_(b.weight)
        new.lora_a.requires_grad_(bool(a.weight.requires_grad))
        new.lora_b.requires_grad_(bool(b.weight.requires_grad))
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
    return list(layers)


def _hf_root(model: nn.Module) -> tuple[str, Any]:
    """``(name, module)`` of the Hugging Face model inside ``model``: ``model`` itself, the one PEFT
    wraps (``"base_model.model"``) or a wrapper's (:class:`~edge_sleep.integrations.transformers.PadMasked`'s
    ``"model"``); ``("", None)`` when there is none."""
    for name, m in model.named_modules():
        if type(m).__module__.startswith("peft."):
            continue  # PEFT's wrappers forward .config to the model they wrap
        if hasattr(getattr(m, "config", None), "to_json_string"):
            return name, m
    return "", None


def _plain_name(name: str, root: str) -> str:
    """A parameter's or module's name inside the Hugging Face model (the wrappers' prefix removed)."""
    return name[len(root) + 1:] if root and name.startswith(root + ".") else name


def _saved_copies(model: nn.Module) -> dict[str, nn.Module]:
    """``{name in the wrapped model: trained copy}`` of PEFT's ``modules_to_save`` wrappers."""
    root, _ = _hf_root(model)
    out = {}
    for name, m in model.named_modules():
        if _is_modules_to_save(m):
            active = _active(m)
            copies: Any = m.modules_to_save
            if len(active) == 1 and active[0] in copies:
                out[_plain_name(name, root)] = copies[active[0]]
    return out


def save_adapters(model: nn.Module, directory: str | Path, *, base_model_name_or_path: str | None = None) -> Path:
    """Write the adapters of ``model`` as a PEFT LoRA adapter folder, atomically.

    ``adapter_model.safetensors`` holds ``base_model.model.<layer>.lora_A.weight`` ``(r, in)`` and
    ``lora_B.weight`` ``(out, r)`` for each adapted layer, and the trained copies of PEFT's
    ``modules_to_save``; ``adapter_config.json`` names the layers, their rank and ``lora_alpha``.
    ``PeftModel.from_pretrained(base, directory)`` then computes what ``model`` computes, where
    ``base`` is the model's base as it stands (:func:`save_base`).

    Args:
        model: a model adapted by the runtime (``WakeConfig(train="adapters")``).
        directory: the adapter folder; replaced whole if it exists.
        base_model_name_or_path: recorded in the config for PEFT (for instance the folder
            :func:`save_base` wrote).

    Raises:
        ConfigError: the model has no adapters, or pruned weights (a keep-mask PEFT cannot
            express); nothing is written.
        CheckpointError: the files cannot be written; a folder already there is unchanged.
    """
    layers = lora_modules(model)
    if not layers:
        raise ConfigError("save_adapters", ["the model has no LoRA adapters; expected a runtime made with "
                                            "WakeConfig(train='adapters')"])
    masked = sorted(n for n, m in layers.items() if m.weight_mask is not None and not bool(m.weight_mask.all()))
    if masked:
        raise ConfigError("save_adapters", [f"layers {masked[:3]} have pruned weights, which PEFT's LoRA cannot "
                                            "express (it would add the update where the base is pruned); expected "
                                            "no pruning. Fix: SleepConfig(prune_frac=0.0) for a model whose "
                                            "adapters go to PEFT"])
    root, _ = _hf_root(model)
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for name, m in layers.items():
        key = _plain_name(name, root)
        tensors[f"{PEFT_PREFIX}{key}.lora_A.weight"] = m.lora_a.detach().cpu().contiguous()
        tensors[f"{PEFT_PREFIX}{key}.lora_B.weight"] = m.lora_b.detach().cpu().contiguous()
        ranks[key] = m.rank
        alphas[key] = m.scaling * m.rank
    copies = _saved_copies(model)
    for key, copy in copies.items():
        for pname, p in copy.named_parameters():
            tensors[f"{PEFT_PREFIX}{key}.{pname}"] = p.detach().cpu().contiguous()
    rank = max(set(ranks.values()), key=list(ranks.values()).count)
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    config = {
        "peft_type": "LORA", "task_type": None, "inference_mode": True,
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0, "bias": "none",
        "target_modules": sorted(ranks), "modules_to_save": sorted(copies) or None,
        "rank_pattern": {k: r for k, r in ranks.items() if r != rank},
        "alpha_pattern": {k: a for k, a in alphas.items() if a != alpha},
        "fan_in_fan_out": any(m.fan_in_fan_out for m in layers.values()), "init_lora_weights": True, "use_rslora": False, "use_dora": False,
    }
    return _write(directory, "save_adapters", {ADAPTER_WEIGHTS: tensors}, {ADAPTER_CONFIG: config})


def _base_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base weights of ``model`` under the names of the plain model: adapters and PEFT's
    trained copies left out, PEFT's prefix and ``original_module`` removed, a GPT-2 ``Conv1D``'s
    weight back in its ``(in, out)`` layout, shared tensors once."""
    conv1d = {f"{n}.weight" for n, m in lora_modules(model).items() if m.fan_in_fan_out}
    root, _ = _hf_root(model)
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in model.state_dict().items():
        if ".lora_" in f".{name}" or ".modules_to_save." in name:
            continue
        if t.data_ptr() in seen:  # tied weights (embeddings and decoder): from_pretrained ties them again
            continue
        seen.add(t.data_ptr())
        if name in conv1d:
            t = t.t()
        out[_plain_name(name, root).replace(".original_module.", ".")] = t.detach().cpu().contiguous()
    return out


def save_base(model: nn.Module, directory: str | Path) -> Path:
    """Write the base weights of ``model`` (without adapters) as a model folder, atomically.

    For a Hugging Face model (or one PEFT or :class:`~edge_sleep.integrations.transformers.PadMasked`
    wraps) the folder holds ``config.json`` and
    ``model.safetensors``: ``AutoModelFor....from_pretrained(directory)`` loads it, and PEFT loads
    :func:`save_adapters`' folder on top. For another ``nn.Module`` it holds ``model.safetensors``
    with the plain model's ``state_dict`` names (``safetensors.torch.load_file``).

    Raises:
        CheckpointError: the files cannot be written; a folder already there is unchanged.
    """
    _, hf = _hf_root(model)
    texts = {}
    if hf is not None:
        config = json.loads(hf.config.to_json_string(use_diff=False))
        config["architectures"] = [type(hf).__name__]
        texts["config.json"] = config
    return _write(directory, "save_base", {"model.safetensors": _base_tensors(model)}, texts)


def _write(directory: str | Path, who: str, tensors: dict[str, dict[str, torch.Tensor]],
           texts: dict[str, dict[str, Any]]) -> Path:
    from safetensors.torch import save_file

    directory = Path(directory)
    try:
        with atomic_directory(directory) as tmp:
            for fname, ts in tensors.items():
                save_file(ts, str(tmp / fname), metadata={"format": "pt"})
            for fname, obj in texts.items():
                (tmp / fname).write_text(json.dumps(obj, indent=2, sort_keys=True))
    except EdgeSleepError:
        raise
    except (OSError, RuntimeError) as e:
        raise CheckpointError(f"{who} could not write {str(directory)!r}: {first_line(e, type(e).__name__)}; the "
                              "folder there before (if any) is unchanged. Fix: free space on that disk and check "
                              "that it is writable, then try again.") from e
    return directory
