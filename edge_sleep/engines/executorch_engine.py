"""The ExecuTorch engine: a runtime's wake steps and predictions through its exported programs.

``EdgeSleep(..., engine="executorch")`` exports ``train.pte`` and ``infer.pte`` (with their ``.ptd``
files) on first use and after every night (:meth:`ExecuTorchEngine.weights_changed`), and then:

- ``learn`` runs the wake step through ``train.pte`` (loss and the adapters' gradients), clips the
  gradient like ``torch.nn.utils.clip_grad_norm_``, applies SGD with ExecuTorch's optimizer, and
  undoes a step whose loss, gradient or weights are not finite, as the torch engine does. The
  adapters are copied back into the Python model after each step, so ``state_dict``, ``save`` and
  the night see exactly what the program learned.
- ``logits``/``predict`` run ``infer.pte`` (adapters folded into the weights) while the adapters
  are as exported, and ``train.pte``'s ``logits`` method (adapters passed in) once a step moved them.
- Before the first batch (no input shape to export with yet) ``logits`` runs the model eagerly.
- The night stays on torch; the next call re-exports. ``train.pte`` and ``infer.pte`` come out
  byte-identical (only the ``.ptd`` files change), which :meth:`rebuild` checks.

This is what an app's native code does with the same files; the engine lets the conformance tests
and the latency benchmark drive it from Python.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from edge_sleep.engines.protocol import Learner, StepResult
from edge_sleep.engines.torch_engine import eval_logits
from edge_sleep.errors import ExportError, InputError
from edge_sleep.export.manifest import Manifest
from edge_sleep.modelio import logits_of
from edge_sleep.store import ReplayBatch
from edge_sleep.wake import all_finite

if TYPE_CHECKING:
    from edge_sleep.config import WakeConfig

__all__ = ["ExecuTorchEngine"]


def _clip_(grads: list[torch.Tensor], max_norm: float | None) -> float:
    """Scale ``grads`` in place to global L2 norm ``max_norm`` (torch's formula); the norm before."""
    norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
    if max_norm is not None and math.isfinite(norm):
        coef = min(1.0, max_norm / (norm + 1e-6))
        for g in grads:
            g.mul_(coef)
    return norm


class ExecuTorchEngine:
    """Runs one runtime's wake steps and predictions through its exported ExecuTorch programs.

    Satisfies :class:`edge_sleep.engines.Engine`; the programs are (re-)exported on the first call
    after :meth:`weights_changed`.

    Args:
        directory: where the programs are written (default: a private temporary folder).
        max_batch: the largest batch ``learn`` and one program call take (``logits`` splits).
    """

    name = "executorch"

    def __init__(self, directory: str | Path | None = None, max_batch: int = 256) -> None:
        self._tmp = None if directory is not None else tempfile.TemporaryDirectory(prefix="edge-sleep-engine-")
        self.directory = Path(directory if directory is not None else self._tmp.name) / "programs"  # type: ignore[union-attr]
        self.max_batch = max_batch
        self.manifest: Manifest | None = None
        self.rebuilds = 0
        self._train: Any = None
        self._infer: Any = None
        self._params: dict[str, torch.Tensor] = {}
        self._before: dict[str, torch.Tensor] | None = None  # the adapters before the last step
        self._optimizer: Any = None
        self._lr: float | None = None
        self._moved = False
        self._stale = True

    def weights_changed(self) -> None:
        """The runtime changed the weights (a night, a load): the next call re-exports."""
        self._stale = True

    def _ready(self, learner: Learner) -> None:
        if self._stale:
            self.rebuild(learner)
            self._stale = False

    # ----------------------------------------------------------------- export
    def rebuild(self, learner: Learner) -> None:
        """Export ``learner``'s programs (weights, masks, anchor as they are now) and load them."""
        from executorch.extension.pybindings.portable_lib import _load_for_executorch
        from executorch.extension.training import TrainingModule

        from edge_sleep.export import export_programs, load_program

        before = self.manifest
        with torch.enable_grad():  # may be called from inside no_grad (EdgeSleep.logits)
            # the first export fixes the programs' bounds (replay inputs or not) for the engine's life
            manifest = export_programs(learner, None, self.directory, int8=False, onnx=False, train=True,
                                       consolidate=False, max_batch=self.max_batch,
                                       max_replay=None if before is None else before.max_replay)
        if before is not None:
            for name in ("train.pte", "infer.pte"):
                if before.files[name]["sha256"] != manifest.files[name]["sha256"]:
                    raise ExportError(f"re-exporting after a night changed {name}; only the .ptd files may "
                                      "change. This is a bug in edge-sleep: please report it.")
        manifest.verify(self.directory, ["train.pte", "train.ptd"])  # load_program checks infer's
        try:
            module = _load_for_executorch(str(self.directory / "train.pte"),
                                          data_path=str(self.directory / "train.ptd"))
        except RuntimeError as e:
            raise ExportError(f"ExecuTorch could not load {str(self.directory / 'train.pte')!r} ({e}).") from e
        self._train = TrainingModule(module)
        self._module = module
        self._infer = load_program(self.directory, "infer")
        self.manifest = manifest
        self._params, self._optimizer, self._moved = {}, None, False
        self._lr = None
        self.rebuilds += 1

    # ------------------------------------------------------------------- day
    def check_batch(self, learner: Learner, x: torch.Tensor) -> None:
        """Refuse a batch larger than the programs take, or a step whose replay (the wake config)
        ``train.pte`` cannot take: it has no replay inputs, or a smaller replay bound (``InputError``)."""
        self._ready(learner)
        cfg = learner.wake_config
        if x.shape[0] > self.max_batch:
            raise InputError(f"a batch of {x.shape[0]} examples; the ExecuTorch engine's programs take at most "
                             f"{self.max_batch}. Fix: split the batch, or pass a larger engine max_batch.")
        if not cfg.replays or self.manifest is None:
            return
        if self.manifest.max_replay == 0:
            raise InputError(f"WakeConfig(replay_batch={cfg.replay_batch}) replays, but train.pte was exported "
                             "without replay inputs (the wake config did not replay then). Fix: keep the wake "
                             "config the engine was built with, or build a new EdgeSleep with this one.")
        if cfg.replay_batch > self.manifest.max_replay:
            raise InputError(f"WakeConfig(replay_batch={cfg.replay_batch}); train.pte takes replay batches of at "
                             f"most {self.manifest.max_replay}. Fix: keep WakeConfig.replay_batch as exported.")

    def _replay(self, batch: ReplayBatch | None, weight: float, x: torch.Tensor,
                num_classes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """``(inputs, logits, labels, weight)`` of a replay term; one zero row, weight 0, if absent."""
        if batch is None or weight <= 0:
            zero = torch.zeros((1, *x.shape[1:]), dtype=x.dtype)
            return zero, torch.zeros(1, num_classes), torch.zeros(1, dtype=torch.long), 0.0
        logits = batch.logits if batch.logits is not None else torch.zeros(batch.y.shape[0], num_classes)
        return batch.x.to(x.dtype).contiguous(), logits.float(), batch.y.long(), float(weight)

    def _step_inputs(self, x: torch.Tensor, y: torch.Tensor, replay_logits: ReplayBatch | None,
                     replay_labels: ReplayBatch | None, cfg: WakeConfig) -> tuple[torch.Tensor, ...]:
        """``forward``'s inputs in a ``train.pte`` with replay: the batch, both replay terms, their weights."""
        assert self.manifest is not None
        c = self.manifest.num_classes
        xd, zd, _, a = self._replay(replay_logits if (replay_logits is not None
                                                      and replay_logits.logits is not None) else None,
                                    cfg.replay_alpha, x, c)
        xl, _, yl, b = self._replay(replay_labels, cfg.replay_beta, x, c)
        for name, r in (("distill", xd), ("label", xl)):
            if r.shape[0] > self.manifest.max_replay:
                raise InputError(f"a {name} replay batch of {r.shape[0]}; train.pte takes at most "
                                 f"{self.manifest.max_replay}. Fix: keep WakeConfig.replay_batch as exported.")
        return x.contiguous(), y, xd, zd, xl, yl, torch.tensor([a, b], dtype=torch.float32)

    def step(self, learner: Learner, x: torch.Tensor, y: torch.Tensor, replay_logits: ReplayBatch | None,
             replay_labels: ReplayBatch | None) -> StepResult:
        """One guarded wake step; the same contract as :func:`edge_sleep.wake.wake_step`."""
        from executorch.extension.training import get_sgd_optimizer

        cfg: WakeConfig = learner.wake_config
        self.check_batch(learner, x)
        assert self.manifest is not None
        if self.manifest.max_replay == 0:
            outs = self._train.forward_backward("forward", (x.contiguous(), y))
        else:
            outs = self._train.forward_backward("forward", self._step_inputs(x, y, replay_logits, replay_labels, cfg))
        loss, new_loss, replay, penalty, logits = outs[:5]
        losses: dict[str, Any] = {"loss": float(loss), "new_loss": float(new_loss), "replay_loss": float(replay),
                                  "penalty": float(penalty), "grad_norm": float("nan"), "skipped": None}
        if self._optimizer is None or self._lr != cfg.lr:
            self._params = self._train.named_parameters()
            self._optimizer = get_sgd_optimizer(self._params, cfg.lr, 0.0, 0.0, 0.0, False)
            self._lr = cfg.lr
        if not math.isfinite(losses["loss"]):
            losses["skipped"] = "non-finite loss"
            return losses, x, logits
        grads = self._train.named_gradients()
        losses["grad_norm"] = _clip_(list(grads.values()), cfg.max_grad_norm)
        if not math.isfinite(losses["grad_norm"]):
            losses["skipped"] = "non-finite gradient"
            return losses, x, logits
        before = {n: p.clone() for n, p in self._params.items()}
        self._before = before
        self._optimizer.step(grads)
        if not all_finite(list(self._params.values())):
            for n, p in self._params.items():
                p.copy_(before[n])
            losses["skipped"] = "non-finite weights"
            return losses, x, logits
        self._moved = True
        self.copy_adapters_to(learner.model)
        return losses, x, logits

    @torch.no_grad()
    def undo_step(self, learner: Learner) -> None:
        """Put the adapters back where the last step found them, in the program and in the model."""
        before = self._before
        if before is None:
            return
        for n, p in self._params.items():
            p.copy_(before[n])
        self._before = None
        self.copy_adapters_to(learner.model)

    @contextlib.contextmanager
    def weights_before_step(self, learner: Learner) -> Iterator[None]:
        """The eager model with the adapters the last step found; the program is not touched."""
        if self._before is None:
            yield
            return
        own = dict(learner.model.named_parameters())
        with torch.no_grad():
            for name, b in self._before.items():
                own[name.removeprefix("model.")].copy_(b)
        try:
            yield
        finally:
            self.copy_adapters_to(learner.model)

    @torch.no_grad()
    def copy_adapters_to(self, model: torch.nn.Module) -> None:
        """Write the program's current adapters into ``model`` (names without the ``model.`` prefix)."""
        own = dict(model.named_parameters())
        for name, p in self._params.items():
            own[name.removeprefix("model.")].copy_(p)

    # ------------------------------------------------------------ predictions
    def logits(self, learner: Learner, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """Logits of a checked batch, in program-sized chunks (eagerly before the first batch)."""
        if learner.num_classes is None:  # nothing to export with yet
            return eval_logits(learner.model, lambda part: logits_of(learner.model(part)), x, batch_size)
        self._ready(learner)
        assert self.manifest is not None
        x = x.cpu()
        step = min(self.max_batch, self.manifest.max_batch, batch_size)
        chunks = []
        for i in range(0, x.shape[0], step):
            part = x[i:i + step].contiguous()
            if not self._moved:
                chunks.append(self._infer(part))
            else:
                adapters = [self._params[f"model.{n}"] for n in self.manifest.adapters]
                chunks.append(self._module.run_method("logits", (part, *adapters))[0].clone())
        return torch.cat(chunks)

    @property
    def serving_from(self) -> str:
        """``"infer.pte"`` while the adapters are as exported, else ``"train.pte"`` (live adapters)."""
        return "train.pte" if self._moved else "infer.pte"
