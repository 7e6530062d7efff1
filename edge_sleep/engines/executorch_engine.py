"""The ExecuTorch engine: a runtime's wake steps and predictions through its exported programs.

``EdgeSleep(..., engine="executorch")`` exports ``train.pte`` and ``infer.pte`` (with their ``.ptd``
files) on first use and after every night (:meth:`ExecuTorchEngine.weights_changed`), and then:

- ``learn`` makes one call of ``train.pte``'s ``step`` per wake step: the program computes the
  loss and the adapters' gradient, clips it, checks that the loss, the gradient and the new
  adapters are finite, and returns the updated adapters (or the old ones, with a non-zero
  ``status``, for a step that would go non-finite), as the torch engine does in eager torch. The
  engine keeps the adapters and copies them into the Python model after each step, so
  ``state_dict``, ``save`` and the night see exactly what the program learned.
- ``logits``/``predict`` run ``infer.pte`` (adapters folded into the weights) while the adapters
  are as exported, and ``train.pte``'s ``logits`` method (adapters passed in) once a step moved them.
- Before the first batch (no input shape to export with yet) ``logits`` runs the model eagerly.
- The night stays on torch; the next call writes the new weights into ``train.ptd`` and
  ``weights.ptd`` at the offsets the export recorded, without exporting again (a folder that
  cannot take them that way, say with convolutions, is exported again, and then ``train.pte`` and
  ``infer.pte`` must come out byte-identical, which :meth:`rebuild` checks).

Only ``executorch.runtime`` runs the programs: what an app's native code does with the same files.
The engine lets the conformance tests and the latency benchmark drive them from Python.
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
from edge_sleep.export.train import STEP_OUTPUTS, STEP_STATUS
from edge_sleep.modelio import logits_of
from edge_sleep.store import ReplayBatch

if TYPE_CHECKING:
    from edge_sleep.config import WakeConfig

__all__ = ["ExecuTorchEngine"]


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
        self.rebuilds = 0  # exports
        self.weight_writes = 0  # .ptd files rewritten in place after a night
        self._train: Any = None  # train.pte's program (methods step and logits)
        self._step: Any = None
        self._logits: Any = None
        self._infer: Any = None
        self._adapters: list[torch.Tensor] = []  # in the manifest's order
        self._before: list[torch.Tensor] | None = None  # the adapters before the last step
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
        """Load ``learner``'s programs with its weights, masks and anchor as they are now.

        After the first export, the new values are written into the ``.ptd`` files in place of
        the old ones (:func:`edge_sleep.export.write_weights`, what a device does after a night);
        only a folder that cannot take them that way is exported again."""
        from edge_sleep.export import export_programs, load_program, write_weights
        from edge_sleep.export.runner import open_program

        before = self.manifest
        manifest = None if before is None else write_weights(learner, self.directory)
        if manifest is not None:
            self.weight_writes += 1
        else:
            with torch.enable_grad():  # may be called from inside no_grad (EdgeSleep.logits)
                # the first export fixes the programs' bounds (replay inputs or not) for the engine's life
                manifest = export_programs(learner, None, self.directory, int8=False, onnx=False, train=True, night=False,
                                           consolidate=False, max_batch=self.max_batch,
                                           max_replay=None if before is None else before.max_replay,
                                           export_id=None if before is None else before.export_id)
            self.rebuilds += 1
        if before is not None:
            for name in ("train.pte", "infer.pte"):
                if before.files[name]["sha256"] != manifest.files[name]["sha256"]:
                    raise ExportError(f"re-exporting after a night changed {name}; only the .ptd files may "
                                      "change. This is a bug in edge-sleep: please report it.")
        program = open_program(self.directory, manifest, "train")  # files, export ids and signatures checked
        try:
            step = program.load_method("step")
        except RuntimeError as e:
            raise ExportError(f"ExecuTorch could not load train.pte's step in {str(self.directory)!r} ({e}).") from e
        self._train, self._step, self._logits = program, step, None
        self._infer = load_program(self.directory, "infer")
        self.manifest = manifest
        own = dict(learner.model.named_parameters())
        self._adapters = [own[n].detach().cpu().clone() for n in manifest.adapters]
        self._before, self._moved = None, False

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
                     replay_labels: ReplayBatch | None, cfg: WakeConfig) -> list[torch.Tensor]:
        """``step``'s inputs: the batch, both replay terms (in a program with replay), the hyperparameters
        ``[lr, max_grad_norm, alpha, beta]`` and the adapters."""
        assert self.manifest is not None
        max_norm = math.inf if cfg.max_grad_norm is None else cfg.max_grad_norm
        if self.manifest.max_replay == 0:
            hyper = torch.tensor([cfg.lr, max_norm, 0.0, 0.0], dtype=torch.float32)
            return [x.contiguous(), y, hyper, *self._adapters]
        c = self.manifest.num_classes
        xd, zd, _, a = self._replay(replay_logits if (replay_logits is not None
                                                      and replay_logits.logits is not None) else None,
                                    cfg.replay_alpha, x, c)
        xl, _, yl, b = self._replay(replay_labels, cfg.replay_beta, x, c)
        for name, r in (("distill", xd), ("label", xl)):
            if r.shape[0] > self.manifest.max_replay:
                raise InputError(f"a {name} replay batch of {r.shape[0]}; train.pte takes at most "
                                 f"{self.manifest.max_replay}. Fix: keep WakeConfig.replay_batch as exported.")
        hyper = torch.tensor([cfg.lr, max_norm, a, b], dtype=torch.float32)
        return [x.contiguous(), y, xd, zd, xl, yl, hyper, *self._adapters]

    def step(self, learner: Learner, x: torch.Tensor, y: torch.Tensor, replay_logits: ReplayBatch | None,
             replay_labels: ReplayBatch | None) -> StepResult:
        """One guarded wake step: one call of ``step``; the same contract as :func:`edge_sleep.wake.wake_step`."""
        cfg: WakeConfig = learner.wake_config
        self.check_batch(learner, x)
        outs = self._step.execute(self._step_inputs(x, y.long(), replay_logits, replay_labels, cfg))
        named = dict(zip(STEP_OUTPUTS, outs))
        skipped = STEP_STATUS.get(int(named["status"]), f"status {int(named['status'])}")
        losses: dict[str, Any] = {k: float(named[k]) for k in ("loss", "new_loss", "replay_loss", "penalty", "grad_norm")}
        losses["skipped"] = skipped
        if skipped == "non-finite loss":  # eager takes no gradient then
            losses["grad_norm"] = float("nan")
        logits = named["logits"].clone()
        if skipped is not None:
            return losses, x, logits
        self._before = self._adapters
        self._adapters = [t.clone() for t in outs[len(STEP_OUTPUTS):]]  # the outputs are the method's memory
        self._moved = True
        self.copy_adapters_to(learner.model)
        return losses, x, logits

    @torch.no_grad()
    def undo_step(self, learner: Learner) -> None:
        """Put the adapters back where the last step found them, in the engine and in the model."""
        if self._before is None:
            return
        self._adapters, self._before = self._before, None
        self.copy_adapters_to(learner.model)

    @contextlib.contextmanager
    def weights_before_step(self, learner: Learner) -> Iterator[None]:
        """The eager model with the adapters the last step found; the engine's are not touched."""
        if self._before is None:
            yield
            return
        self._write(learner.model, self._before)
        try:
            yield
        finally:
            self.copy_adapters_to(learner.model)

    def copy_adapters_to(self, model: torch.nn.Module) -> None:
        """Write the engine's current adapters into ``model``."""
        self._write(model, self._adapters)

    @torch.no_grad()
    def _write(self, model: torch.nn.Module, adapters: list[torch.Tensor]) -> None:
        assert self.manifest is not None
        own = dict(model.named_parameters())
        for name, value in zip(self.manifest.adapters, adapters):
            own[name].copy_(value)

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
                chunks.append(self._logits_method().execute([part, *self._adapters])[0].clone())
        return torch.cat(chunks)

    def _logits_method(self) -> Any:
        if self._logits is None:
            self._logits = self._train.load_method("logits")
        return self._logits

    @property
    def serving_from(self) -> str:
        """``"infer.pte"`` while the adapters are as exported, else ``"train.pte"`` (live adapters)."""
        return "train.pte" if self._moved else "infer.pte"
