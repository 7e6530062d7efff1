"""The on-device programs: ExecuTorch (XNNPACK) and ONNX exports of an :class:`EdgeSleep` model.

Every function here reads the runtime through :class:`edge_sleep.engines.Learner` (an
:class:`EdgeSleep` is one), so this package does not import the runtime.

``export_programs(es, example_input, out_dir)`` writes, atomically:

- ``infer.pte`` + ``weights.ptd``: fp32 inference, dynamic batch, every weight in the ``.ptd``;
- ``infer_int8.pte`` + ``weights_int8.ptd``: PT2E int8 (per-channel weights, dynamic activations);
- ``train.pte`` + ``train.ptd``: the whole wake step (loss, gradient, clipping, finite checks and
  the SGD update of the adapters, one call) and the live logits, for a model with LoRA adapters
  (:mod:`edge_sleep.export.train`);
- ``night.pte`` + ``night.ptd``: the night's Phase 1 replay step (the consolidation noise, the replay
  loss, its gradient and the SGD update of the base weights, the keep-masks; one call a step;
  :mod:`edge_sleep.export.night`);
- ``consolidate.pte``: the night's Phase 2 for one weight matrix, exact selection of the prune and
  strengthen thresholds included (:mod:`edge_sleep.export.consolidate`);
- ``model.onnx``: the same graph for ONNX Runtime, checked with ``onnx.checker``;
- ``manifest.json``: the export id (:mod:`edge_sleep.export.identity`), SHA-256 of every file, the input shape and dtype, the model fingerprint the
  replay store uses, the LoRA rank and targets.

The ``.pte`` files hold no weights, so after a night only the ``.ptd`` files change; a test
checks that re-exporting after a night gives byte-identical programs. :func:`load_program` runs
a program from Python with its files verified and its inputs checked.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from edge_sleep.adapters import lora_modules
from edge_sleep.atomic import atomic_directory
from edge_sleep.engines.protocol import Learner
from edge_sleep.errors import CallOrderError, InputError
from edge_sleep.export.consolidate import ConsolidateProgram, load_consolidate, to_consolidate_program
from edge_sleep.export.infer import ProgramFiles, inference_form, to_infer_program
from edge_sleep.export.manifest import MANIFEST_FORMAT_VERSION, Manifest, read_manifest
from edge_sleep.export.onnx import to_onnx
from edge_sleep.export.runner import ExportedProgram, load_program
from edge_sleep.export.layout import Layout, module_tensors, patch, probed
from edge_sleep.export.identity import check_id_value, new_export_id
from edge_sleep.export.night import NIGHT_TAG, night_state_module, night_weight_names, noise_shapes, to_night_program
from edge_sleep.export.signature import (consolidate_signature, id_signatures, infer_signature, night_signature,
                                         train_signature)
from edge_sleep.export.train import TRAIN_TAG, adapter_names, to_train_program, train_state_module

__all__ = ["export_programs", "write_weights", "learned_tensors", "export_onnx", "anchor_terms", "to_train_program", "load_consolidate",
           "ConsolidateProgram", "to_consolidate_program", "load_program", "read_manifest", "Manifest", "ExportedProgram",
           "ProgramFiles", "inference_form", "to_infer_program", "to_onnx", "MANIFEST_FORMAT_VERSION"]


def _example_batch(es: Learner, example: torch.Tensor | None) -> torch.Tensor:
    if not isinstance(es, Learner):
        raise InputError(f"es is a {type(es).__name__}; expected an EdgeSleep runtime. Fix: wrap the model "
                         "with EdgeSleep(model, ...) or load a checkpoint with EdgeSleep.load.")
    if es.input_spec is None or es.num_classes is None:
        raise CallOrderError("export_programs() needs a runtime that has learned at least one batch (the "
                             "input shape and class count come from it); call learn() first, or load a "
                             "checkpoint saved after learning.")
    shape, is_float = es.input_spec
    if example is None:
        example = torch.zeros((2, *shape), dtype=torch.float32 if is_float else torch.int64)
    example = es.check_input(example, "example_input").cpu()
    example = example.float() if example.is_floating_point() else example
    if example.shape[0] == 1:  # a batch of one would be specialised by torch.export
        example = example.expand(2, *example.shape[1:]).contiguous()
    return example


def _check_max_batch(max_batch: object) -> int:
    if not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 2:
        raise InputError(f"max_batch={max_batch!r}; expected an integer >= 2.")
    return max_batch


def export_onnx(es: Learner, example_input: torch.Tensor | None, path: str | Path, *,
                max_batch: int = 64) -> Path:
    """Write ``es``'s model as one ONNX file (input ``x``, output ``logits``, dynamic batch).

    The graph computes with the effective weights (adapters folded in), checked with
    ``onnx.checker``. Returns the path written.
    """
    max_batch = _check_max_batch(max_batch)
    x = _example_batch(es, example_input)
    data = to_onnx(inference_form(es.model), x, max_batch=max_batch)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def anchor_terms(es: Learner) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``({weight: lambda F}, {weight: reference})`` of the wake-time anchor (empty if off or empty).

    ``train.pte`` caps ``lambda F`` at ``1 / (2 lr)`` with the learning rate it is called with."""
    cfg = es.wake_config
    if not es.anchor or cfg.anchor_lambda <= 0:
        return {}, {}
    return {n: cfg.anchor_lambda * f for n, f in es.anchor.fisher.items()}, dict(es.anchor.reference)


def _masked(es: Learner) -> Callable[[str], bool]:
    """Which adapted weights ``train.pte`` keeps a keep-mask for: all when the nights prune (the
    program must not change when the first night prunes), else those with a pruned weight already
    (a checkpoint of a runtime that pruned; a night that does not prune leaves all-ones masks)."""
    prunes = es.sleep_config.prune_frac > 0
    masked = {f"{n}.weight" for n, m in lora_modules(es.model).items()
              if m.weight_mask is not None and not bool(m.weight_mask.bool().all())}
    return lambda key: prunes or key in masked


def _train_settings(es: Learner) -> dict[str, Any]:
    """What ``train.pte``'s frozen tensors are made of, as :func:`to_train_program` takes it."""
    terms, refs = anchor_terms(es)
    return {"lr": es.wake_config.lr, "masked": _masked(es), "anchored": es.wake_config.anchor_lambda > 0,
            "fisher_terms": terms, "references": refs}


def _night_settings(es: Learner) -> dict[str, Any]:
    """What ``night.pte``'s frozen tensors are made of, as :func:`to_night_program` takes it: the
    keep-masks of the weights :func:`_masked` names (all-ones where nothing is pruned yet)."""
    masked = _masked(es)
    params = es.base_parameters
    masks = {n: es.masks[n] if n in es.masks else torch.ones_like(params[n], dtype=torch.bool)
             for n in es.prunable if n in params and masked(n)}
    return {"trained": list(params), "noise_layers": list(es.noise_layers), "masks": masks}


def learned_tensors(es: Learner, ptd: str) -> dict[str, torch.Tensor]:
    """The tensors of ``ptd`` (``"weights.ptd"``, ``"train.ptd"`` or ``"night.ptd"``) a night
    changes, as ``es`` holds them now, under the names of the export folder's layout."""
    if ptd == "weights.ptd":
        module: torch.nn.Module = inference_form(es.model)
        skip: frozenset[str] = frozenset()
    elif ptd == "train.ptd":
        module, names = train_state_module(es.model, **_train_settings(es))
        skip = frozenset(f"model.{n}" for n in names)
    elif ptd == "night.ptd":
        module, names = night_state_module(es.replay_head, **_night_settings(es))
        skip = frozenset(f"model.{n}" for n in names)
    else:
        raise InputError(f"ptd={ptd!r}; expected 'weights.ptd', 'train.ptd' or 'night.ptd'.")
    return {n: t.detach() for n, t in module_tensors(module).items() if n not in skip and probed(t)}


def write_weights(es: Learner, out_dir: str | Path) -> Manifest | None:
    """Write ``es``'s weights into an export folder's ``.ptd`` files in place of
    the old ones, without an export (what a device does after a night), and return the new manifest.

    Every ``.pte`` stays as it is. Returns ``None``, changing nothing, when the folder cannot take
    them that way: a ``.ptd`` without a layout (int8 weights, convolutions), or a model or
    configuration whose tensors differ from the layout's (another architecture, the anchor or
    pruning switched on or off); export again then.
    """
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    if manifest.fingerprint != es.fingerprint:
        return None
    ptds = [p for p in ("weights.ptd", "train.ptd", "night.ptd") if p in manifest.files]
    if "weights_int8.ptd" in manifest.files or any(p not in manifest.layouts for p in ptds):
        return None
    new: dict[str, bytes] = {}
    for name in ptds:
        layout = Layout.from_json(manifest.layouts[name])
        tensors = learned_tensors(es, name)
        if set(tensors) != set(layout.tensors) | set(layout.unread):
            return None
        try:
            new[name] = patch((out_dir / name).read_bytes(), layout, tensors)
        except ValueError:
            return None
    manifest.verify(out_dir)
    with atomic_directory(out_dir) as tmp:
        for kept in manifest.files:
            if kept not in new:  # unchanged: a link to the same file (files are replaced, never edited)
                try:
                    os.link(out_dir / kept, tmp / kept)
                except OSError:
                    shutil.copy2(out_dir / kept, tmp / kept)
        for written, data in new.items():
            manifest.add_file(tmp, written, data)
        manifest.write(tmp)
    return manifest


def _export_night(es: Learner, x: torch.Tensor, manifest: Manifest, tmp: Path, max_batch: int) -> None:
    """Write ``night.pte`` + ``night.ptd`` for ``es`` into ``tmp`` and describe them in ``manifest``."""
    with torch.no_grad():
        records = es.encoder(x).detach()
    settings = _night_settings(es)
    cfg = es.sleep_config
    files = to_night_program(es.replay_head, records, manifest.num_classes, **settings, max_batch=max_batch,
                             max_fisher=cfg.fisher_batch, export_id=manifest.export_id)
    manifest.add_file(tmp, "night.pte", files.program)
    manifest.add_file(tmp, "night.ptd", files.data[NIGHT_TAG])
    if files.layout is not None:
        manifest.layouts["night.ptd"] = files.layout.to_json()
    manifest.programs["night"] = {"pte": "night.pte", "ptd": "night.ptd"}
    params = es.base_parameters
    names = night_weight_names(es.replay_head, settings["trained"])
    noise = [["batch", *s[1:]] for s in noise_shapes(es.replay_head, settings["noise_layers"], records)]
    manifest.signatures["night"] = night_signature(
        list(records.shape[1:]), "float32" if records.is_floating_point() else "int64", manifest.num_classes,
        noise, {n: list(params[n].shape) for n in names}, cfg.fisher_batch) | id_signatures()
    manifest.night = {"lr": cfg.lr, "label_weight": cfg.label_weight, "distill_weight": cfg.distill_weight,
                      "noise_std": cfg.noise_std, "batch_size": cfg.batch_size, "fisher_steps": cfg.fisher_steps,
                      "fisher_batch": cfg.fisher_batch, "weights": names}


def export_programs(es: Learner, example_input: torch.Tensor | None, out_dir: str | Path, *,
                    int8: bool = True, onnx: bool = True, train: bool | None = None, max_batch: int = 64,
                    max_replay: int | None = None, etrecord: bool = False, consolidate: bool = True,
                    night: bool = True, export_id: str | None = None) -> Manifest:
    """Export ``es``'s model as the on-device programs into ``out_dir`` (replaced atomically).

    Args:
        es: the runtime; its model (with adapters, masks and all) is exported as it is now.
        out_dir: the export folder; an existing one is replaced only once the new one is complete.
        example_input: an example batch, or ``None`` for zeros of the shape the runtime has
            learned from.
        int8: also write ``infer_int8.pte``.
        onnx: also write ``model.onnx``.
        train: also write ``train.pte`` + ``train.ptd`` (the wake step, adapters trainable);
            ``None``: when the model has adapters.
        max_batch: the largest batch the programs accept.
        max_replay: the largest replay batch ``train.pte`` accepts: 0 for a program without
            replay inputs, else at least 4 (default: 0 when the wake config never replays,
            ``replay_batch == 0`` or both replay weights 0; else its ``replay_batch``, at least 4).
        consolidate: also write ``consolidate.pte``, the night's Phase 2 kernel
            (:mod:`edge_sleep.export.consolidate`).
        night: also write ``night.pte`` + ``night.ptd``, the night's Phase 1 replay step
            (:mod:`edge_sleep.export.night`).
        etrecord: also write ``infer.etrecord`` (and ``infer_int8.etrecord``), which
            ``edge-sleep profile`` uses to name the operators it times.
        export_id: the id every program and ``.ptd`` carries (:mod:`edge_sleep.export.identity`):
            ``None`` for a new one; the folder's old id to export the same programs again.

    Returns:
        The written :class:`Manifest`.

    Raises:
        CallOrderError: the runtime has not learned anything yet (no input shape).
        InputError: ``example_input`` does not match the runtime's inputs, ``max_batch < 2``, or
            ``export_id`` is not 32 hex characters.
    """
    max_batch = _check_max_batch(max_batch)
    export_id = new_export_id() if export_id is None else check_id_value(export_id)
    x = _example_batch(es, example_input)
    model = inference_form(es.model)
    mods = lora_modules(es.model)
    first = next(iter(mods.values()), None)
    if train is None:
        train = first is not None
    if train and first is None:
        raise InputError("train=True, but the model has no adapters; train.pte trains LoRA adapters only. "
                         "Fix: use WakeConfig(train='adapters'), or export with train=False.")
    if max_replay is None:
        max_replay = max(4, es.wake_config.replay_batch) if es.wake_config.replays else 0
    if not isinstance(max_replay, int) or isinstance(max_replay, bool) or not (max_replay == 0 or max_replay >= 4):
        raise InputError(f"max_replay={max_replay!r}; expected 0 (no replay inputs) or an integer >= 4.")
    manifest = Manifest(
        fingerprint=es.fingerprint, input_shape=list(x.shape[1:]),
        input_dtype="float32" if x.is_floating_point() else "int64", max_batch=max_batch,
        num_classes=int(es.num_classes or 0),
        lora=None if first is None else {"rank": first.rank, "alpha": first.scaling * first.rank,
                                         "targets": sorted(mods)},
        max_replay=max_replay if train else 0,
        adapters=adapter_names(es.model) if train else [],
        export_id=export_id,
    )
    manifest.dims["batch"] = [1, max_batch]
    if manifest.max_replay:
        manifest.dims.update(distill=[1, manifest.max_replay], label=[1, manifest.max_replay])
    with atomic_directory(out_dir) as tmp:
        for name, quantized in (("infer", False), ("infer_int8", True)):
            if quantized and not int8:
                continue
            files = to_infer_program(model, x, int8=quantized, max_batch=max_batch, etrecord=etrecord,
                                     export_id=export_id)
            (stem, data), = files.data.items()
            manifest.add_file(tmp, f"{name}.pte", files.program)
            manifest.add_file(tmp, f"{stem}.ptd", data)
            if files.layout is not None:
                manifest.layouts[f"{stem}.ptd"] = files.layout.to_json()
            manifest.programs[name] = {"pte": f"{name}.pte", "ptd": f"{stem}.ptd"}
            manifest.signatures[name] = {**infer_signature(manifest.input_shape, manifest.input_dtype,
                                                           manifest.num_classes), **id_signatures()}
            if files.etrecord is not None:
                manifest.add_file(tmp, f"{name}.etrecord", files.etrecord)
                manifest.programs[name]["etrecord"] = f"{name}.etrecord"
        if train:
            files = to_train_program(es.model, x, manifest.num_classes, **_train_settings(es),
                                     max_batch=max_batch, max_replay=max_replay, export_id=export_id)
            manifest.add_file(tmp, "train.pte", files.program)
            manifest.add_file(tmp, "train.ptd", files.data[TRAIN_TAG])
            if files.layout is not None:
                manifest.layouts["train.ptd"] = files.layout.to_json()
            manifest.programs["train"] = {"pte": "train.pte", "ptd": "train.ptd"}
            params = dict(es.model.named_parameters())
            manifest.signatures["train"] = train_signature(
                manifest.input_shape, manifest.input_dtype, manifest.num_classes, manifest.max_replay,
                {n: list(params[n].shape) for n in manifest.adapters}) | id_signatures()
            cfg = es.wake_config
            manifest.hyperparameters = {
                "lr": cfg.lr, "max_grad_norm": cfg.max_grad_norm, "replay_alpha": cfg.replay_alpha,
                "replay_beta": cfg.replay_beta, "replay_batch": cfg.replay_batch, "anchor_lambda": cfg.anchor_lambda}
        if night:
            _export_night(es, x, manifest, tmp, max_batch)
        if consolidate:
            largest = max((es.model.get_parameter(n).numel() for n in es.prunable), default=2)
            manifest.add_file(tmp, "consolidate.pte", to_consolidate_program(largest, export_id))
            manifest.programs["consolidate"] = {"pte": "consolidate.pte"}
            manifest.signatures["consolidate"] = consolidate_signature() | id_signatures(with_ptd=False)
            manifest.dims["numel"] = [2, max(9, largest)]
        if onnx:
            manifest.add_file(tmp, "model.onnx", to_onnx(model, x, max_batch=max_batch))
            manifest.programs["onnx"] = {"onnx": "model.onnx"}
        manifest.write(tmp)
    return manifest
