"""``night.pte``: the night's Phase 1 replay step as one program call, base weights in and out.

One call is one step of :func:`edge_sleep.sleep.run_sleep`'s Phase 1, the same arithmetic as the
torch night: the replay forward of a batch of stored records with the consolidation noise added
to the hidden states, the replay loss ``label_weight * CE(logits, y) + distill_weight *
MSE(logits, target)``, its gradient with respect to the base weights (traced into the graph), the
SGD update, the keep-masks (a pruned weight stays zero) and the finite checks. Its methods
(``night.ptd`` holds the frozen tensors and the masks):

- ``replay_step(x, y, target, hyper, *noise, *weights)`` returns ``(loss, status, *new_weights)``;
  ``hyper = [lr, label_weight, distill_weight, noise_std]``; ``noise`` holds one standard normal
  tensor per noisy hidden state, in the order the forward reaches them, each of that state's
  shape (the app draws them; a night without noise passes zeros, or ``noise_std`` 0); ``status``
  is 0 when the step was applied, else 1, 2 or 3 (a non-finite loss, gradient or updated weights):
  then the new weights are not to be used, and the night is abandoned, its weights going back to
  where it started, as the torch night does (so the program selects nothing, which costs a copy of
  every weight a step).
- ``fisher_step(x, y, target, valid, hyper, *weights, *sums)`` returns ``sums`` plus the batch's
  per-sample squared gradients of the clean replay loss (no noise) with respect to each weight:
  the night's empirical diagonal Fisher, accumulated over its last ``fisher_steps`` steps by the
  app (``F = sums / samples``), as :func:`edge_sleep.fisher.fisher_sums` computes it. The batch
  has a fixed size, the night's ``fisher_batch`` (``vmap`` under a symbolic batch specialises
  it); ``valid`` is 1.0 for a record and 0.0 for a row of padding, which adds exactly nothing. The
  per-sample gradients of one call exist at once, so that size bounds its memory.
- ``export_id`` and ``weights_id`` (:mod:`edge_sleep.export.identity`).

The noise of a hidden state ``h`` is ``noise_std * rms(h) * eps``, ``rms`` over each sample's
features, as :class:`edge_sleep.sleep.ConsolidationNoise` computes it. An adapted layer computes
with its base weight only: at night the adapters have been merged (``B`` is zero), so the layer
equals its base. The weights come and go in :func:`night_weight_names` order.

Not yet a program: the anchor update (arithmetic on the Fisher an app holds); the night's Phase 2
is ``consolidate.pte``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
from edge_sleep.export.train import (_decompositions, _lift_constants, _partitioner, _squares, _tagged_export, _Traced,
                                     _without_empty_permuted)
from edge_sleep.modelio import logits_of

__all__ = ["to_night_program", "night_state_module", "night_weight_names", "noise_shapes", "NIGHT_TAG", "NIGHT_OUTPUTS", "NIGHT_HYPER"]

NIGHT_TAG = "night"  # night.ptd
#: ``replay_step``'s outputs before the new weights, in order.
NIGHT_OUTPUTS = ["loss", "status"]
#: ``replay_step``'s ``hyper`` input, in order.
NIGHT_HYPER = ["lr", "label_weight", "distill_weight", "noise_std"]


class _BaseLinear(nn.Module):
    """An adapted layer at night: its base weight and bias only (the merged adapter is zero)."""

    def __init__(self, lora: LoRALinear) -> None:
        super().__init__()
        self.weight = lora.weight
        self.bias = lora.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # a matmul, not F.linear: XNNPACK takes an mm with a weight that is an input (the base
        # weights are the step's inputs), while addmm's falls to the slow portable kernel
        out = torch.matmul(x, self.weight.t())
        return out if self.bias is None else out + self.bias


def _night_form(head: nn.Module) -> nn.Module:
    """A CPU copy of ``head`` with every adapted layer replaced by its base (same parameter names)."""
    clone = copy.deepcopy(head).cpu()
    for name, lora in list(lora_modules(clone).items()):
        parent_name, _, child = name.rpartition(".")
        setattr(clone.get_submodule(parent_name) if parent_name else clone, child, _BaseLinear(lora))
    for p in clone.parameters():
        p.requires_grad_(False)
    return clone


def night_weight_names(head: nn.Module, trained: list[str]) -> list[str]:
    """The weights ``replay_step`` takes and returns: ``trained`` (the runtime's night parameters)
    that ``head`` computes with, in ``head``'s parameter order."""
    wanted = set(trained)
    return [n for n, _ in head.named_parameters() if n in wanted]


@contextmanager
def _noise_hooks(model: nn.Module, names: list[str], noise: list[torch.Tensor] | None,
                 std: torch.Tensor | None, shapes: list[tuple[int, ...]] | None = None) -> Iterator[None]:
    """Add ``std * rms(h) * noise[i]`` to the i-th noisy hidden state the forward reaches (or,
    with ``noise`` None, record the states' shapes into ``shapes``)."""
    modules = dict(model.named_modules())
    reached = iter(noise or [])

    def hook(module: nn.Module, inputs: Any, output: Any) -> Any:
        if not isinstance(output, torch.Tensor) or not output.is_floating_point():
            return None
        if noise is None:
            assert shapes is not None
            shapes.append(tuple(output.shape))
            return None
        assert std is not None
        dims = tuple(range(1, output.ndim))
        rms = output.detach().pow(2).mean(dim=dims, keepdim=True).sqrt() if dims else output.detach().abs()
        return output + std * rms * next(reached)

    handles = [modules[n].register_forward_hook(hook) for n in names]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def noise_shapes(head: nn.Module, noise_layers: list[str], example: torch.Tensor) -> list[tuple[int, ...]]:
    """The shapes of the noisy hidden states ``head``'s forward on ``example`` reaches, in order
    (batch first): the ``noise`` inputs of ``replay_step``."""
    shapes: list[tuple[int, ...]] = []
    form = _night_form(head).eval()
    with torch.no_grad(), _noise_hooks(form, noise_layers, None, None, shapes):
        form(example)
    return shapes


class _NightLoss(nn.Module):
    """The night's replay loss of ``model`` (noise from inputs), and the keep-masks as float buffers."""

    def __init__(self, model: nn.Module, noise_layers: list[str], masks: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self.noise_layers = noise_layers
        self.mask_keys = list(masks)
        for i, m in enumerate(masks.values()):
            self.register_buffer(f"keep_{i}", m.detach().float().cpu().clone())

    def forward(self, hyper: torch.Tensor, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor,
                noise: list[torch.Tensor]) -> torch.Tensor:
        with _noise_hooks(self.model, self.noise_layers, noise, hyper[3]):
            logits = logits_of(self.model(x))
        return hyper[1] * F.cross_entropy(logits, y) + hyper[2] * F.mse_loss(logits, target)


def _fisher_function(loss: _NightLoss, names: list[str], frozen: list[str]) -> Callable[..., tuple[torch.Tensor, ...]]:
    """``fn(*frozen, x, y, target, valid, hyper, *weights, *sums)``: the sums plus the batch's
    per-sample squared gradients of the clean replay loss (no noise), as
    :func:`edge_sleep.fisher.fisher_sums` takes them, a sample's loss times its ``valid`` (1 or 0:
    the batch is of fixed size, a row of padding adds exactly nothing), pure."""
    k = len(names)

    def fn(*args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        buffers, rest = args[:len(frozen)], args[len(frozen):]
        x, y, target, valid, hyper = rest[:5]
        weights, sums = rest[5:5 + k], rest[5 + k:]
        # the model's frozen tensors under its own names (the masks are the loss module's, unused here)
        held = {n.removeprefix("model."): t for n, t in zip(frozen, buffers) if n.startswith("model.")}

        def one(ws: tuple[torch.Tensor, ...], xi: torch.Tensor, yi: torch.Tensor, ti: torch.Tensor,
                vi: torch.Tensor) -> torch.Tensor:
            state = {**held, **dict(zip(names, ws))}
            logits = logits_of(torch.func.functional_call(loss.model, state, (xi.unsqueeze(0),)))
            return vi * (hyper[1] * F.cross_entropy(logits, yi.unsqueeze(0))
                         + hyper[2] * F.mse_loss(logits, ti.unsqueeze(0)))

        grads = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0, 0, 0))(tuple(weights), x, y, target, valid)
        return tuple(s + g.pow(2).sum(dim=0) for s, g in zip(sums, grads))

    return fn


def _step_function(loss: _NightLoss, names: list[str], frozen: list[str],
                   n_noise: int) -> Callable[..., tuple[torch.Tensor, ...]]:
    """``fn(*frozen, x, y, target, hyper, *noise, *weights)``: one guarded replay step, pure."""
    k = len(names)
    masks = {key: f"keep_{i}" for i, key in enumerate(loss.mask_keys)}

    def fn(*args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        buffers, rest = args[:len(frozen)], args[len(frozen):]
        x, y, target, hyper = rest[:4]
        noise, weights = list(rest[4:4 + n_noise]), rest[4 + n_noise:]
        assert len(weights) == k
        held = dict(zip(frozen, buffers))
        leaves = [w.detach().requires_grad_(True) for w in weights]
        state = {**held, **{f"model.{n}": t for n, t in zip(names, leaves)}}
        with torch.enable_grad():
            total = torch.func.functional_call(loss, state, (hyper, x, y, target, noise))
            grads = torch.autograd.grad(total, leaves)
        new = [w - hyper[0] * g for w, g in zip(weights, grads)]
        new = [w * held[masks[n]] if n in masks else w for n, w in zip(names, new)]  # pruned stay zero
        total = total.detach()
        status = torch.where(~torch.isfinite(total), 1,
                             torch.where(~torch.isfinite(_squares(grads)), 2,
                                         torch.where(~torch.isfinite(_squares(new)), 3, 0)))
        return (total, status, *new)  # status != 0: the night is abandoned, these are not used

    return fn


def night_state_module(head: nn.Module, *, trained: list[str], noise_layers: list[str],
                       masks: dict[str, torch.Tensor]) -> tuple[nn.Module, list[str]]:
    """The module ``night.pte`` is exported from (its state, the weights aside, is what
    ``night.ptd`` holds: the frozen tensors and the keep-masks), and the weights' names in order."""
    names = night_weight_names(head, trained)
    loss = _NightLoss(_night_form(head), noise_layers, {n: m for n, m in masks.items() if n in set(names)})
    return loss.train(), names


@releases_export_state
def to_night_program(head: nn.Module, example: torch.Tensor, num_classes: int, *, trained: list[str],
                     noise_layers: list[str], masks: dict[str, torch.Tensor], max_batch: int = 64,
                     max_fisher: int = 32, export_id: str | None = None) -> ProgramFiles:
    """Export the night's replay step of ``head`` (the runtime's replay forward: stored record ->
    logits) as an ExecuTorch program (see the module docstring).

    Args:
        head: the module the night replays through; it is copied, not changed.
        example: an example batch of stored records (at least 2 rows).
        num_classes: logits per record.
        trained: the names of the parameters the night trains (the runtime's base weights).
        noise_layers: the modules whose outputs get the consolidation noise.
        masks: ``{weight name: keep-mask}`` of the weights kept at zero where pruned: every
            prunable weight when the nights prune (the program must not change when the first
            night prunes), else those with a pruned weight already.
        max_batch: the largest replay batch.
        max_fisher: the largest batch ``fisher_step`` takes (the night's ``fisher_batch``).
        export_id: the id written into ``night.pte`` and ``night.ptd`` (default: a new one).

    Returns:
        :class:`ProgramFiles` with ``night.pte`` bytes and ``{"night": night.ptd bytes}``.

    Raises:
        ConfigError: the head computes with none of ``trained``, or ``max_batch < 2``.
    """
    from executorch.backends.xnnpack.operators import node_visitor
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.emit import _emitter
    from torch.fx.experimental.proxy_tensor import make_fx

    export_id = new_export_id() if export_id is None else check_id_value(export_id)
    names = night_weight_names(head, trained)
    if not names or max_batch < 2 or max_fisher < 1:
        raise ConfigError("night.pte", [f"the replay forward computes with none of {trained[:4]}... or max_batch="
                                        f"{max_batch} < 2 or max_fisher={max_fisher} < 1"])
    loss, names = night_state_module(head, trained=trained, noise_layers=noise_layers, masks=masks)
    x = example[:1].expand(2, *example.shape[1:]).contiguous()
    shapes = noise_shapes(head, noise_layers, x)
    b = Dim("batch", min=1, max=max_batch)
    xf = example[:1].expand(max_fisher, *example.shape[1:]).contiguous()
    yf, tf, valid = torch.zeros(max_fisher, dtype=torch.long), torch.zeros(max_fisher, num_classes), torch.ones(max_fisher)
    y, target = torch.zeros(2, dtype=torch.long), torch.zeros(2, num_classes)
    hyper = torch.tensor([0.01, 1.0, 1.0, 0.1])
    noise = tuple(torch.zeros(s) for s in shapes)
    keys = [f"model.{n}" for n in names]

    def export(module: nn.Module, unused: set[str]) -> tuple[bytes, bytes]:
        assert isinstance(module, _NightLoss)
        state = module_tensors(module)
        frozen = {n: t.detach() for n, t in state.items() if n not in keys}
        weights = tuple(state[k].detach().clone() for k in keys)
        fn = _step_function(module, names, list(frozen), len(shapes))
        graph = make_fx(fn, tracing_mode="symbolic", decomposition_table=_decompositions())(
            *frozen.values(), x, y, target, hyper, *noise, *weights)
        graph = _without_empty_permuted(graph)
        sums = tuple(torch.zeros_like(w) for w in weights)
        fisher_graph = make_fx(_fisher_function(module, names, list(frozen)), tracing_mode="real",
                               decomposition_table=_decompositions())(
            *frozen.values(), xf, yf, tf, valid, hyper, *weights, *sums)
        fisher_graph = _without_empty_permuted(fisher_graph)
        read: set[str] = set()
        for g in (graph, fisher_graph):
            inputs = [n for n in g.graph.nodes if n.op == "placeholder"]
            read.update(name for name, node in zip(frozen, inputs) if node.users)
        unused.update(set(frozen) - read)
        constants = _lift_constants(graph)
        dynamic = ({0: b}, {0: b}, {0: b}, None, *({0: b} for _ in shapes), *(None for _ in weights))
        step = _tagged_export(_Traced(graph, {**constants, **frozen}), (x, y, target, hyper, *noise, *weights),
                              (dynamic,), NIGHT_TAG)
        fisher_constants = _lift_constants(fisher_graph)
        fisher = _tagged_export(_Traced(fisher_graph, {**fisher_constants, **frozen}),
                                (xf, yf, tf, valid, hyper, *weights, *sums), None, NIGHT_TAG)
        programs = {"replay_step": step, "fisher_step": fisher, WEIGHTS_ID_METHOD: id_program(export_id, NIGHT_TAG)}
        with positional_keys(node_visitor, NIGHT_TAG):
            lowered = to_edge_transform_and_lower(programs, partitioner=[_partitioner()],
                                                  compile_config=EdgeCompileConfig(_check_ir_validity=False),
                                                  constant_methods={EXPORT_ID_METHOD: export_id})
        with positional_keys(_emitter, NIGHT_TAG):
            program = lowered.to_executorch(ExecutorchBackendConfig(external_constants=lambda _: NIGHT_TAG))
        (blob,) = program._tensor_data.values()
        return bytes(program.buffer), bytes(blob)

    program, data, layout = export_with_layout(loss, export, exclude=frozenset(keys))
    return ProgramFiles(program=program, data={NIGHT_TAG: data}, layout=layout, export_id=export_id)
