"""``train.pte``: the wake-time training step, with only the LoRA adapters trainable.

The program has two methods over one set of weights (``train.ptd``):

- ``forward(x, y, x_distill, z_distill, x_label, y_label, replay_weights)`` returns
  ``(loss, new_loss, replay_loss, penalty, logits)`` followed by the adapters' gradients (ExecuTorch
  training: ``torch.export`` -> ``_export_forward_backward``). The loss is the wake step's
  (``edge_sleep.wake``): ``CE(f(x), y) + a * MSE(f(x_distill), z_distill) + b * CE(f(x_label),
  y_label) + penalty``, with ``replay_weights = [a, b]``. A step without a replay term passes one
  dummy row and a weight of 0. A program exported with ``max_replay=0`` (a runtime that never
  replays during the day) takes ``forward(x, y)`` only: one copy of the model's graph instead of
  three.
- ``logits(x, *adapters)`` returns the logits of ``x`` in eval mode with the adapters given as
  inputs (in :func:`adapter_names` order), so predictions use the adapters as they are after any
  number of training steps.

Every adapted layer computes ``F.linear(x, W + s * (B @ A) * M, bias)`` with its keep-mask ``M``
(all ones before the first prune) and adds ``sum(c * (W_eff - W*)^2)`` to the penalty, where
``c = min(lambda * F_anchor, 1 / (2 lr))`` and ``W*`` are the anchor's (zero before the first
night). The penalty terms of the weights the day cannot move are constants, summed at export time.
``W``, ``M``, ``c`` and ``W*`` live in ``train.ptd`` under their module names, so after a night only
the ``.ptd`` changes. SGD is applied by the caller (:mod:`edge_sleep.engines.executorch_engine`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim

from edge_sleep.adapters import LoRALinear, lora_modules
from edge_sleep.errors import ConfigError
from edge_sleep.export.release import releases_export_state
from edge_sleep.export.infer import ProgramFiles, positional_keys
from edge_sleep.modelio import logits_of

__all__ = ["TrainLinear", "to_train_program", "adapter_names", "TRAIN_TAG", "MAX_REPLAY"]

TRAIN_TAG = "train"  # train.ptd
MAX_REPLAY = 1024


class TrainLinear(nn.Module):
    """A :class:`LoRALinear` as the training program computes it: frozen parts are buffers.

    Args:
        m: the adapted layer (its weights, mask and adapters are copied).
        coef: the capped anchor coefficients ``min(lambda F, 1/(2 lr))`` of its weight, or ``None``.
        reference: the anchor's reference for its weight, or ``None``.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    mask: torch.Tensor
    anchor_coef: torch.Tensor
    anchor_ref: torch.Tensor

    def __init__(self, m: LoRALinear, coef: torch.Tensor | None, reference: torch.Tensor | None) -> None:
        super().__init__()
        w = m.weight.detach()
        self.scaling = m.scaling
        self.register_buffer("weight", w.clone())
        self.register_buffer("bias", None if m.bias is None else m.bias.detach().clone())
        keep = torch.ones_like(w, dtype=torch.bool) if m.weight_mask is None else m.weight_mask.bool()
        self.register_buffer("mask", keep.clone())  # bool: one byte a weight in train.ptd
        self.register_buffer("anchor_coef", torch.zeros_like(w) if coef is None else coef.detach().clone())
        self.register_buffer("anchor_ref", torch.zeros_like(w) if reference is None else reference.detach().clone())
        self.lora_a = nn.Parameter(m.lora_a.detach().clone())
        self.lora_b = nn.Parameter(m.lora_b.detach().clone())

    def effective_weight(self) -> torch.Tensor:
        return self.weight + self.scaling * (self.lora_b @ self.lora_a) * self.mask.to(self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight(), self.bias)

    def penalty(self) -> torch.Tensor:
        return (self.anchor_coef * (self.effective_weight() - self.anchor_ref).pow(2)).sum()


def adapter_names(model: nn.Module) -> list[str]:
    """The trainable tensors' names in the program's order: ``<layer>.lora_a``, ``<layer>.lora_b``."""
    layers = [n for n, m in model.named_modules() if isinstance(m, (LoRALinear, TrainLinear))]
    return [f"{n}.{p}" for n in layers for p in ("lora_a", "lora_b")]


class _TrainStep(nn.Module):
    """``forward(x, y)``: the wake step's outputs without replay (a program exported with ``max_replay=0``)."""

    penalty_const: torch.Tensor

    def __init__(self, model: nn.Module, penalty_const: float) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("penalty_const", torch.tensor(penalty_const, dtype=torch.float32))

    def _layers(self) -> Iterator[TrainLinear]:
        return (m for m in self.model.modules() if isinstance(m, TrainLinear))

    def _outputs(self, logits: torch.Tensor, y: torch.Tensor, replay: torch.Tensor) -> tuple[torch.Tensor, ...]:
        new_loss = F.cross_entropy(logits, y)
        penalty = self.penalty_const
        for m in self._layers():
            penalty = penalty + m.penalty()
        loss = new_loss + replay + penalty
        return loss, new_loss.detach(), replay.detach(), penalty.detach(), logits.detach()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self._outputs(logits_of(self.model(x)), y, torch.zeros(()))


class _ReplayStep(_TrainStep):
    """``forward(x, y, x_distill, z_distill, x_label, y_label, replay_weights)``: the step with replay."""

    def forward(self, x: torch.Tensor, y: torch.Tensor, x_distill: torch.Tensor,  # type: ignore[override]
                z_distill: torch.Tensor, x_label: torch.Tensor, y_label: torch.Tensor,
                replay_weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits = logits_of(self.model(x))
        replay = (replay_weights[0] * F.mse_loss(logits_of(self.model(x_distill)), z_distill)
                  + replay_weights[1] * F.cross_entropy(logits_of(self.model(x_label)), y_label))
        return self._outputs(logits, y, replay)


class _Logits(nn.Module):
    """``logits(x, *adapters)``: eval-mode logits with the adapters passed in."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model, self.names = model, names

    def forward(self, x: torch.Tensor, *adapters: torch.Tensor) -> torch.Tensor:
        return logits_of(torch.func.functional_call(self.model, dict(zip(self.names, adapters)), (x,),
                                                    strict=False))


@torch.no_grad()
def _train_form(model: nn.Module, anchor_coefs: dict[str, torch.Tensor],
                references: dict[str, torch.Tensor]) -> tuple[nn.Module, float]:
    """A CPU copy with every LoRALinear replaced by a TrainLinear, and the constant penalty."""
    clone = copy.deepcopy(model).cpu()
    done: set[str] = set()
    for name, lora in list(lora_modules(clone).items()):
        key = f"{name}.weight"
        layer = TrainLinear(lora, anchor_coefs.get(key), references.get(key))
        parent_name, _, child = name.rpartition(".")
        setattr(clone.get_submodule(parent_name) if parent_name else clone, child, layer)
        done.add(key)
    params = dict(model.named_parameters())
    const = 0.0
    for key, coef in anchor_coefs.items():  # frozen all day: their terms do not change
        if key not in done:
            const += float((coef.cpu() * (params[key].detach().cpu() - references[key].cpu()).pow(2)).sum())
    for p in clone.parameters():
        p.requires_grad_(False)
    for m in clone.modules():
        if isinstance(m, TrainLinear):
            m.lora_a.requires_grad_(True)
            m.lora_b.requires_grad_(True)
    return clone, const


def _without_empty_permuted(gm: torch.fx.GraphModule) -> None:
    """Rewrite ``empty_permuted`` in the identity order (which some backward graphs allocate with,
    LLaMA's among them, and ExecuTorch's kernels lack) as ``empty`` of the same shape: the same
    uninitialized contiguous tensor. In place, on an edge-dialect graph (after ``to_edge``:
    rewriting before it makes its re-trace specialize the batch dimension). Another order is left
    as it is (ExecuTorch then refuses the program when it loads the method)."""
    from executorch.exir.dialects._ops import ops as exir_ops

    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target != exir_ops.edge.aten.empty_permuted.default:
            continue
        if list(node.args[1]) != list(range(len(node.args[1]))):
            continue
        with graph.inserting_before(node):
            new = graph.call_function(exir_ops.edge.aten.empty.memory_format, (node.args[0],), dict(node.kwargs))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    graph.lint()
    gm.recompile()


@releases_export_state
def to_train_program(model: nn.Module, example: torch.Tensor, num_classes: int, *,
                     anchor_coefs: dict[str, torch.Tensor] | None = None,
                     references: dict[str, torch.Tensor] | None = None,
                     max_batch: int = 64, max_replay: int = MAX_REPLAY) -> ProgramFiles:
    """Export the wake step of an adapted ``model`` as an ExecuTorch training program.

    Args:
        model: a model with :class:`LoRALinear` layers (``attach_lora``); it is copied, not changed.
        example: an example input batch of at least 2 rows.
        num_classes: logits per example.
        anchor_coefs: ``{weight name: min(lambda F, 1/(2 lr))}`` of the anchor, or ``None``.
        references: ``{weight name: W*}`` of the anchor, or ``None``.
        max_batch: the largest new batch (at least 2); max_replay: the largest replay batch (0: a
            program without replay inputs; else at least 4: the export traces replay batches of 3
            and 4 rows).

    Returns:
        :class:`ProgramFiles` with ``train.pte`` bytes and ``{"train": train.ptd bytes}``.

    Raises:
        ConfigError: the model has no adapters, or a bound is out of range.
    """
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge
    from torch.export.experimental import _export_forward_backward

    if not lora_modules(model):
        raise ConfigError("train.pte", ["the model has no LoRA adapters; the training program trains "
                                        "adapters only. Use WakeConfig(train='adapters')"])
    if max_batch < 2 or (max_replay != 0 and max_replay < 4):
        raise ConfigError("train.pte", [f"max_batch={max_batch}, max_replay={max_replay}; expected at least 2, "
                                        "and 0 or at least 4"])
    form, const = _train_form(model, anchor_coefs or {}, references or {})
    names = adapter_names(form)
    # distinct example sizes, so torch.export keeps the three batch dimensions apart
    x, xd, xl = (example[:1].expand(n, *example.shape[1:]).contiguous() for n in (2, 3, 4))
    y, yl = torch.zeros(2, dtype=torch.long), torch.zeros(4, dtype=torch.long)
    z = torch.zeros(3, num_classes)
    b = Dim("batch", min=1, max=max_batch)
    if max_replay:
        r1, r2 = Dim("distill", min=1, max=max_replay), Dim("label", min=1, max=max_replay)
        train_ep = torch.export.export(_ReplayStep(form, const).train(), (x, y, xd, z, xl, yl, torch.ones(2)),
                                       dynamic_shapes=({0: b}, {0: b}, {0: r1}, {0: r1}, {0: r2}, {0: r2}, None),
                                       strict=True)
    else:
        train_ep = torch.export.export(_TrainStep(form, const).train(), (x, y),
                                       dynamic_shapes=({0: b}, {0: b}), strict=True)
    train_ep = _export_forward_backward(train_ep)

    params = dict(form.named_parameters())
    adapters = tuple(params[n].detach().clone() for n in names)
    logits_mod = _Logits(copy.deepcopy(form).eval(), names)
    logits_ep = torch.export.export(logits_mod, (x, *adapters),
                                    dynamic_shapes=({0: b}, tuple(None for _ in adapters)), strict=False)
    edge = to_edge({"forward": train_ep, "logits": logits_ep},
                   compile_config=EdgeCompileConfig(_check_ir_validity=False))
    _without_empty_permuted(edge.exported_program("forward").graph_module)
    # constants and trainable weights in one file (ExecuTorch names it _default_external_constant;
    # the program finds tensors by name, not by file name)
    from executorch.exir.emit import _emitter

    with positional_keys(_emitter, TRAIN_TAG):  # no buffer shared because two values are equal today
        program = edge.to_executorch(ExecutorchBackendConfig(external_constants=True,
                                                             external_mutable_weights=True))
    (blob,) = program._tensor_data.values()
    data = {TRAIN_TAG: bytes(blob)}
    return ProgramFiles(program=bytes(program.buffer), data=data)
