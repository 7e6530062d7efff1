"""``train.pte``: the whole wake step as one program call, adapters in and adapters out.

The program computes one guarded SGD step of the LoRA adapters, exactly what
:func:`edge_sleep.wake.wake_step` does in eager torch: the loss, its gradient with respect to the
adapters (traced into the graph, no autograd at run time), gradient clipping to a global L2 norm,
the finite checks, and the update. Its methods (``train.ptd`` holds every frozen tensor):

- ``step(x, y, x_distill, z_distill, x_label, y_label, hyper, *adapters)``: a step on a new batch
  with the two replay terms; a step without one of them passes one dummy row and a weight of 0. A
  program exported with ``max_replay=0`` (a runtime that never replays by day) takes
  ``step(x, y, hyper, *adapters)``: one copy of the model's graph instead of three;
- ``logits(x, *adapters)``: eval-mode logits with the adapters given.

``hyper = [lr, max_grad_norm, replay_alpha, replay_beta]`` (float32; ``inf`` turns clipping off; a
program without replay ignores the last two). A step returns ``(loss, new_loss, replay_loss, penalty, grad_norm,
status, logits, *new_adapters)``: ``status`` is 0 when the step was applied, else 1 (non-finite
loss), 2 (non-finite gradient) or 3 (non-finite updated weights), and then ``new_adapters`` are the
adapters passed in, unchanged. The adapters come and go in :func:`adapter_names` order, so an app
keeps them in its own buffers and saves them whenever it likes.

The loss is ``CE(f(x), y) + alpha * MSE(f(x_distill), z_distill) + beta * CE(f(x_label), y_label) +
penalty``. An adapted layer computes ``x @ W^T + s * (x @ A^T) @ B^T + bias`` (``W^T`` stored
transposed, so the product is one ``mm``), or, in a runtime whose nights prune,
``x @ (W^T + s * (A^T @ B^T) * M^T) + bias`` so that a pruned weight stays zero. With the anchor on
(``anchor_lambda > 0``) each adapted layer adds ``sum(min(lambda F, 1 / (2 lr)) * (W_eff - W*)^2)``
(the cap from the ``lr`` passed in), and the anchored weights the day cannot move add a constant.
Which of these terms a program has depends on the configuration only, never on the values (an
anchor of zeros before the first night is still an anchor), so after a night only ``train.ptd``
changes. The graph is delegated to XNNPACK where it lowers.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim

from edge_sleep.adapters import LoRALinear, lora_modules
from edge_sleep.errors import ConfigError
from edge_sleep.export.identity import EXPORT_ID_METHOD, WEIGHTS_ID_METHOD, check_id_value, id_program, new_export_id
from edge_sleep.export.infer import ProgramFiles, positional_keys
from edge_sleep.export.layout import export_with_layout, module_tensors
from edge_sleep.export.release import releases_export_state
from edge_sleep.modelio import logits_of

__all__ = ["StepLinear", "to_train_program", "train_state_module", "adapter_names", "STEP_OUTPUTS", "TRAIN_TAG", "MAX_REPLAY",
           "STEP_STATUS"]

TRAIN_TAG = "train"  # train.ptd
MAX_REPLAY = 1024
#: ``status`` output of a step: what a non-zero code means (the step then changed nothing).
STEP_STATUS = {0: None, 1: "non-finite loss", 2: "non-finite gradient", 3: "non-finite weights"}
#: the outputs of ``step`` before the new adapters, in order.
STEP_OUTPUTS = ["loss", "new_loss", "replay_loss", "penalty", "grad_norm", "status", "logits"]


def _squares(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    total = torch.zeros(())
    for t in tensors:
        total = total + (t * t).sum()
    return total


class StepLinear(nn.Module):
    """A :class:`LoRALinear` in the form the training program computes fast; frozen parts are buffers.

    Args:
        m: the adapted layer (its weights, mask and adapters are copied).
        masked: keep a keep-mask (the runtime's nights prune), all ones if ``m`` has none yet.
        anchored: keep the anchor's coefficients and gap (the wake step is anchored).
        fisher_term: ``lambda * F_anchor`` of its weight, or ``None`` (zeros).
        reference: the anchor's reference ``W*`` of its weight, or ``None`` (then the gap is ``W``,
            which the zero coefficients make irrelevant).
    """

    weight_t: torch.Tensor
    bias: torch.Tensor | None
    mask_t: torch.Tensor | None
    anchor_coef_t: torch.Tensor | None
    anchor_gap_t: torch.Tensor | None

    def __init__(self, m: LoRALinear, *, masked: bool, anchored: bool, fisher_term: torch.Tensor | None,
                 reference: torch.Tensor | None) -> None:
        super().__init__()
        w = m.weight.detach()
        self.scaling = float(m.scaling)
        self.in_features, self.out_features = w.shape[1], w.shape[0]
        self.register_buffer("weight_t", w.t().contiguous().clone())
        self.register_buffer("bias", None if m.bias is None else m.bias.detach().clone())
        mask = None
        if masked:
            mask = torch.ones_like(w) if m.weight_mask is None else m.weight_mask.to(w.dtype)
        self.register_buffer("mask_t", None if mask is None else mask.t().contiguous().clone())
        coef_t = gap_t = None
        if anchored:
            coef_t = (torch.zeros_like(w) if fisher_term is None else fisher_term.detach().to(w.dtype)).t().contiguous()
            gap_t = (w if reference is None else w - reference.detach().to(w.dtype)).t().contiguous()
        self.register_buffer("anchor_coef_t", coef_t)
        self.register_buffer("anchor_gap_t", gap_t)
        self.lora_a = nn.Parameter(m.lora_a.detach().clone())
        self.lora_b = nn.Parameter(m.lora_b.detach().clone())

    def _delta_t(self) -> torch.Tensor:
        """``s * (A^T @ B^T)``, masked: the transposed update, ``(in, out)``."""
        delta = torch.mm(self.lora_a.t(), self.lora_b.t()) * self.scaling
        return delta if self.mask_t is None else delta * self.mask_t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if self.mask_t is None:
            out = torch.mm(flat, self.weight_t) + torch.mm(torch.mm(flat, self.lora_a.t()), self.lora_b.t()) * self.scaling
        else:
            out = torch.mm(flat, self.weight_t + self._delta_t())
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def penalty(self, cap: torch.Tensor) -> torch.Tensor:
        """``sum(min(lambda F, cap) * (W_eff - W*)^2)`` of this layer (0 without the anchor)."""
        if self.anchor_coef_t is None or self.anchor_gap_t is None:
            return torch.zeros(())
        d = self.anchor_gap_t + self._delta_t()
        return (torch.minimum(self.anchor_coef_t, cap) * (d * d)).sum()


def adapter_names(model: nn.Module) -> list[str]:
    """The adapters' names in the program's order: ``<layer>.lora_a``, ``<layer>.lora_b``."""
    layers = [n for n, m in model.named_modules() if isinstance(m, (LoRALinear, StepLinear))]
    return [f"{n}.{p}" for n in layers for p in ("lora_a", "lora_b")]


class _Loss(nn.Module):
    """The wake step's loss terms ``(loss, new_loss, replay_loss, penalty, logits)`` of ``model``."""

    penalty_const: torch.Tensor

    def __init__(self, model: nn.Module, penalty_const: float) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("penalty_const", torch.tensor(penalty_const, dtype=torch.float32))

    def forward(self, hyper: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                *replay: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits = logits_of(self.model(x))
        new_loss = F.cross_entropy(logits, y)
        replay_loss = torch.zeros(())
        if replay:
            xd, zd, xl, yl = replay
            replay_loss = (hyper[2] * F.mse_loss(logits_of(self.model(xd)), zd)
                           + hyper[3] * F.cross_entropy(logits_of(self.model(xl)), yl))
        cap = 0.5 / hyper[0]
        penalty = self.penalty_const
        for m in self.model.modules():
            if isinstance(m, StepLinear):
                penalty = penalty + m.penalty(cap)
        return new_loss + replay_loss + penalty, new_loss, replay_loss, penalty, logits


def _step_function(loss: _Loss, names: list[str], frozen: list[str]) -> Callable[..., tuple[torch.Tensor, ...]]:
    """``fn(*frozen, x, y, *replay, hyper, *adapters)``: one guarded SGD step, pure (traced by make_fx)."""
    k = len(names)

    def fn(*args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        buffers, rest = args[:len(frozen)], args[len(frozen):]
        inputs, adapters = rest[:-k], rest[-k:]
        hyper = inputs[-1]
        leaves = [a.detach().requires_grad_(True) for a in adapters]
        state = {**dict(zip(frozen, buffers)), **dict(zip(names, leaves))}
        with torch.enable_grad():
            total, new_loss, replay_loss, penalty, logits = torch.func.functional_call(
                loss, state, (hyper, *inputs[:-1]))
            grads = torch.autograd.grad(total, leaves)
        grad_norm = torch.sqrt(_squares(grads))
        coef = torch.clamp(hyper[1] / (grad_norm + 1e-6), max=1.0)  # torch.nn.utils.clip_grad_norm_
        step = hyper[0] * coef
        new = [a - step * g for a, g in zip(adapters, grads)]
        total = total.detach()
        status = torch.where(~torch.isfinite(total), 1,
                             torch.where(~torch.isfinite(grad_norm), 2,
                                         torch.where(~torch.isfinite(_squares(new)), 3, 0)))
        keep = status != 0
        out = [torch.where(keep, a, n) for a, n in zip(adapters, new)]
        return (total, new_loss.detach(), replay_loss.detach(), penalty.detach(), grad_norm, status,
                logits.detach(), *out)

    return fn


class _Traced(nn.Module):
    """A traced step graph with its frozen tensors as buffers (what ``torch.export`` exports)."""

    def __init__(self, graph: nn.Module, frozen: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.graph = graph
        self.keys = list(frozen)
        for i, t in enumerate(frozen.values()):
            self.register_buffer(f"frozen_{i}", t)

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        buffers = [getattr(self, f"frozen_{i}") for i in range(len(self.keys))]
        return self.graph(*buffers, *args)


class _Logits(nn.Module):
    """``logits(x, *adapters)``: eval-mode logits with the adapters passed in."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model, self.names = model, names

    def forward(self, x: torch.Tensor, *adapters: torch.Tensor) -> torch.Tensor:
        return logits_of(torch.func.functional_call(self.model, dict(zip(self.names, adapters)), (x,),
                                                    strict=False))


@torch.no_grad()
def _train_form(model: nn.Module, *, masked: Callable[[str], bool], anchored: bool,
                fisher_terms: dict[str, torch.Tensor], references: dict[str, torch.Tensor],
                lr: float) -> tuple[nn.Module, float]:
    """A CPU copy with every LoRALinear replaced by a StepLinear, and the constant penalty of the
    anchored weights the day cannot move (capped with ``lr``)."""
    clone = copy.deepcopy(model).cpu()
    done: set[str] = set()
    for name, lora in list(lora_modules(clone).items()):
        key = f"{name}.weight"
        layer = StepLinear(lora, masked=masked(key), anchored=anchored, fisher_term=fisher_terms.get(key),
                           reference=references.get(key))
        parent_name, _, child = name.rpartition(".")
        setattr(clone.get_submodule(parent_name) if parent_name else clone, child, layer)
        done.add(key)
    params = dict(model.named_parameters())
    const = 0.0
    cap = 0.5 / lr
    for key, term in fisher_terms.items():  # frozen all day: their terms do not change
        if key not in done:
            gap = params[key].detach().cpu() - references[key].cpu()
            const += float((term.cpu().clamp(max=cap) * gap.pow(2)).sum())
    for p in clone.parameters():
        p.requires_grad_(False)
    return clone, const


def _without_empty_permuted(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Rewrite ``empty_permuted`` in the identity order (which some backward graphs allocate with,
    LLaMA's among them, and ExecuTorch's kernels lack) as ``empty`` of the same shape: the same
    uninitialized contiguous tensor. Another order is left as it is (ExecuTorch then refuses the
    program when it loads the method)."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target != torch.ops.aten.empty_permuted.default:
            continue
        if list(node.args[1]) != list(range(len(node.args[1]))):
            continue
        with graph.inserting_before(node):
            new = graph.call_function(torch.ops.aten.empty.memory_format, (node.args[0],), dict(node.kwargs))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    graph.lint()
    gm.recompile()
    return gm


def _trace_step(loss: _Loss, names: list[str], example: tuple[torch.Tensor, ...],
                shapes: tuple[object, ...], unused: set[str]) -> torch.export.ExportedProgram:
    """``torch.export`` of one step method: make_fx traces forward, backward and update into one
    graph of aten operators, which is then exported with the frozen tensors as buffers."""
    from torch.fx.experimental.proxy_tensor import make_fx

    loss = loss.train()
    adapter_keys = [f"model.{n}" for n in names]
    state = module_tensors(loss)
    frozen = {n: t.detach() for n, t in state.items() if n not in adapter_keys}
    fn = _step_function(loss, adapter_keys, list(frozen))
    adapters = tuple(state[k].detach().clone() for k in adapter_keys)
    graph = make_fx(fn, tracing_mode="symbolic", decomposition_table=_decompositions())(
        *frozen.values(), *example, *adapters)
    graph = _without_empty_permuted(graph)
    inputs = [n for n in graph.graph.nodes if n.op == "placeholder"]
    unused.update(name for name, node in zip(frozen, inputs) if not node.users)
    constants = _lift_constants(graph)
    return _tagged_export(_Traced(graph, {**constants, **frozen}), (*example, *adapters),
                          ((*shapes, *(None for _ in adapters)),))


def _decompositions() -> Any:
    """Backward operators ExecuTorch has no kernel for, written as the operators it has (LLaMA's
    SiLU: ``silu_backward``)."""
    from torch._decomp import get_decompositions

    aten = torch.ops.aten
    return get_decompositions([aten.silu_backward, aten.sigmoid_backward, aten.tanh_backward])


def _lift_constants(gm: torch.fx.GraphModule) -> dict[str, torch.Tensor]:
    """Turn the tensors make_fx kept as attributes of the graph (a causal mask built in the forward)
    into its first inputs, and return them by name: ``torch.export`` loses such attributes of a
    nested graph module when it unlifts it."""
    graph = gm.graph
    first = next(n for n in graph.nodes if n.op == "placeholder")
    constants: dict[str, torch.Tensor] = {}
    for node in list(graph.nodes):
        if node.op != "get_attr":
            continue
        value = getattr(gm, str(node.target))
        if not isinstance(value, torch.Tensor):
            continue
        name = f"constant_{len(constants)}"
        with graph.inserting_before(first):
            placeholder = graph.placeholder(name)
        placeholder.meta = dict(node.meta)
        node.replace_all_uses_with(placeholder)
        graph.erase_node(node)
        constants[name] = value.detach().clone()
        delattr(gm, str(node.target))  # make_fx registered it as a buffer
    graph.lint()
    gm.recompile()
    return constants


def _tagged_export(module: nn.Module, args: tuple[torch.Tensor, ...],
                   shapes: tuple[object, ...] | None, tag: str = TRAIN_TAG) -> torch.export.ExportedProgram:
    """``torch.export`` with every constant tagged for the ``.ptd`` ``tag`` (default ``train.ptd``),
    XNNPACK's included (XNNPACK reads the tag from the constant's placeholder)."""
    ep = torch.export.export(module, args, dynamic_shapes=shapes, strict=False)
    user = set(ep.graph_signature.user_inputs)
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name not in user:
            node.meta.setdefault("custom", {})["delegate_constant_tag"] = tag
    return ep


def _partitioner() -> object:
    """XNNPACK's partitioner with every ``mm`` delegated: a frozen weight as a static weight (packed
    once, when the method loads), and a product with an adapter, which is an input of the step,
    as a dynamic one (packed on each call). The stock partitioner takes one or the other for all."""
    from executorch.backends.xnnpack.partition.config import ALL_PARTITIONER_CONFIGS
    from executorch.backends.xnnpack.partition.config.gemm_configs import MMConfig
    from executorch.backends.xnnpack.partition.config.generic_node_configs import SoftmaxConfig
    from executorch.backends.xnnpack.partition.config.xnnpack_config import ConfigPrecisionType
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.backends.xnnpack.utils.utils import get_input_node, is_param_node

    class AdapterMM(MMConfig):  # type: ignore[misc]
        def _get_weight_deps(self, node: torch.fx.Node, ep: torch.export.ExportedProgram,
                             precision: ConfigPrecisionType) -> tuple[bool, list[torch.fx.Node]]:
            if precision == ConfigPrecisionType.FP32 and not is_param_node(ep, get_input_node(node, self.weight_idx)):
                return True, []
            return super()._get_weight_deps(node, ep, precision)  # type: ignore[no-any-return]

    # softmax stays outside: the backward reads its output, and a partition that takes and returns
    # it is refused by XNNPACK ("pass through arguments")
    configs = [AdapterMM if c is MMConfig else c for c in ALL_PARTITIONER_CONFIGS if c is not SoftmaxConfig]
    return XnnpackPartitioner(configs=configs)


@releases_export_state
def to_train_program(model: nn.Module, example: torch.Tensor, num_classes: int, *,
                     lr: float, masked: Callable[[str], bool] = lambda _: False, anchored: bool = False,
                     fisher_terms: dict[str, torch.Tensor] | None = None,
                     references: dict[str, torch.Tensor] | None = None,
                     max_batch: int = 64, max_replay: int = MAX_REPLAY, export_id: str | None = None) -> ProgramFiles:
    """Export the wake step of an adapted ``model`` as an ExecuTorch program (see the module docstring).

    Args:
        model: a model with :class:`LoRALinear` layers (``attach_lora``); it is copied, not changed.
        example: an example input batch of at least 2 rows.
        num_classes: logits per example.
        lr: the learning rate the constant penalty of frozen anchored weights is capped with.
        masked: ``weight name -> bool``: whether that adapted layer carries a keep-mask.
        anchored: the step adds the anchor penalty (``anchor_lambda > 0``).
        fisher_terms: ``{weight name: lambda * F_anchor}`` (uncapped), or ``None`` (zeros).
        references: ``{weight name: W*}`` of the anchor, or ``None``.
        max_batch: the largest new batch (at least 2); max_replay: the largest replay batch (0: a
            ``step`` without replay inputs; else at least 4).
        export_id: the id written into ``train.pte`` and ``train.ptd`` (:mod:`edge_sleep.export.
            identity`; default: a new one).

    Returns:
        :class:`ProgramFiles` with ``train.pte`` bytes (methods ``step``, ``logits``, ``export_id``
        and ``weights_id``) and ``{"train": train.ptd bytes}``.

    Raises:
        ConfigError: the model has no adapters, or a bound is out of range.
    """
    from executorch.backends.xnnpack.operators import node_visitor
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.emit import _emitter

    if not lora_modules(model):
        raise ConfigError("train.pte", ["the model has no LoRA adapters; the training program trains "
                                        "adapters only. Use WakeConfig(train='adapters')"])
    if max_batch < 2 or (max_replay != 0 and max_replay < 4):
        raise ConfigError("train.pte", [f"max_batch={max_batch}, max_replay={max_replay}; expected at least 2, "
                                        "and 0 or at least 4"])
    export_id = new_export_id() if export_id is None else check_id_value(export_id)
    loss, names = train_state_module(model, lr=lr, masked=masked, anchored=anchored, fisher_terms=fisher_terms,
                                     references=references)
    # distinct example sizes, so the trace keeps the three batch dimensions apart
    x, xd, xl = (example[:1].expand(n, *example.shape[1:]).contiguous() for n in (2, 3, 4))
    y, yl = torch.zeros(2, dtype=torch.long), torch.zeros(4, dtype=torch.long)
    z = torch.zeros(3, num_classes)
    hyper = torch.tensor([0.1, 1.0, 0.5, 0.5])
    b = Dim("batch", min=1, max=max_batch)

    def export(module: nn.Module, unused: set[str]) -> tuple[bytes, bytes]:
        assert isinstance(module, _Loss)
        if max_replay:
            r1, r2 = Dim("distill", min=1, max=max_replay), Dim("label", min=1, max=max_replay)
            step = _trace_step(module, names, (x, y, xd, z, xl, yl, hyper),
                               ({0: b}, {0: b}, {0: r1}, {0: r1}, {0: r2}, {0: r2}, None), unused)
        else:
            step = _trace_step(module, names, (x, y, hyper), ({0: b}, {0: b}, None), unused)
        params = dict(module.model.named_parameters())
        adapters = tuple(params[n].detach().clone() for n in names)
        programs = {"step": step,
                    "logits": _tagged_export(_Logits(copy.deepcopy(module.model).eval(), names), (x, *adapters),
                                             ({0: b}, tuple(None for _ in adapters))),
                    WEIGHTS_ID_METHOD: id_program(export_id, TRAIN_TAG)}
        with positional_keys(node_visitor, TRAIN_TAG):
            lowered = to_edge_transform_and_lower(programs, partitioner=[_partitioner()],
                                                  compile_config=EdgeCompileConfig(_check_ir_validity=False),
                                                  constant_methods={EXPORT_ID_METHOD: export_id})
        with positional_keys(_emitter, TRAIN_TAG):  # no buffer shared because two values are equal today
            program = lowered.to_executorch(ExecutorchBackendConfig(external_constants=lambda _: TRAIN_TAG))
        (blob,) = program._tensor_data.values()
        return bytes(program.buffer), bytes(blob)

    program, data, layout = export_with_layout(loss, export, exclude=frozenset(f"model.{n}" for n in names))
    return ProgramFiles(program=program, data={TRAIN_TAG: data}, layout=layout, export_id=export_id)


def train_state_module(model: nn.Module, *, lr: float, masked: Callable[[str], bool], anchored: bool,
                       fisher_terms: dict[str, torch.Tensor] | None,
                       references: dict[str, torch.Tensor] | None) -> tuple[nn.Module, list[str]]:
    """The module ``train.pte`` is exported from (its state is what ``train.ptd`` holds, the adapters
    aside, under ``model.<adapter name>``), and the adapters' names in the program's order."""
    form, const = _train_form(model, masked=masked, anchored=anchored, fisher_terms=fisher_terms or {},
                              references=references or {}, lr=lr)
    return _Loss(form, const), adapter_names(form)
