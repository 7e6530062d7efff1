"""Engines: what runs a runtime's wake steps and predictions, below the runtime.

- :class:`Engine` and :class:`Learner` (:mod:`edge_sleep.engines.protocol`): the seam. The
  runtime depends on the protocols; no engine imports the runtime.
- :class:`TorchEngine` (:mod:`edge_sleep.engines.torch_engine`): eager PyTorch, any model.
- ``ExecuTorchEngine`` (:mod:`edge_sleep.engines.executorch_engine`, imported on first use
  because it loads ExecuTorch): the exported ``train.pte`` and ``infer.pte``.
"""

from edge_sleep.engines.protocol import Engine, Learner, StepResult
from edge_sleep.engines.torch_engine import TorchEngine, eval_logits

__all__ = ["Engine", "Learner", "StepResult", "TorchEngine", "eval_logits"]
