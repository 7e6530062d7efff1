"""Dreams by recombination: a night's replay records mixed in pairs (mixup, Zhang et al. 2018).

A dream is not a stored record but a blend of two: ``lam * a + (1 - lam) * b`` of their latents,
the same blend of their stored logits (the distillation target), and a soft label that puts
``lam`` on ``a``'s class and ``1 - lam`` on ``b``'s. Cross-entropy on that soft label is
``lam * CE(a's label) + (1 - lam) * CE(b's label)``. The night replays dreams in place of a share
of each batch (``SleepConfig.dream_fraction``); its Fisher and its probe always see the records
themselves.

Pure functions; the randomness comes from the generator passed in, so a night repeats.

Example:
    >>> import torch
    >>> x = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    >>> y = torch.tensor([0, 1])
    >>> mx, probs, _ = mix_records(x, y, None, 1.0, 2, torch.Generator().manual_seed(0))
    >>> probs.sum(dim=1)
    tensor([1., 1.])
    >>> bool(torch.allclose(mx.sum(dim=1) / 2, probs[:, 1]))  # the blend's weight on class 1 is its weight on x[1]
    True
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from edge_sleep.errors import ConfigError

if TYPE_CHECKING:
    from edge_sleep.store import ReplayStore

__all__ = ["mix_records", "check_blendable"]


def _integer_records(fraction: float, dtype: torch.dtype) -> ConfigError:
    return ConfigError("sleep", [
        f"dream_fraction={fraction!r} with {dtype} records; expected floating-point latents: integer records "
        "(token ids) cannot be blended. Fix: SleepConfig(dream_fraction=0.0), or store a float latent "
        "(StoreConfig.latent_layer)"])


def check_blendable(store: ReplayStore, fraction: float) -> None:
    """Refuse, before a night starts, dreams on a store whose records are integers (token ids)."""
    if fraction > 0 and len(store) > 0:
        first = store.read(store.slots()[:1])
        if not first.x.is_floating_point():
            raise _integer_records(fraction, first.x.dtype)


def mix_records(x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None, fraction: float, num_classes: int,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Replace the first ``round(fraction * n)`` records of a batch by dreams.

    Each dream blends record ``i`` with a partner drawn from the batch (a random permutation) at a
    weight ``lam`` uniform in ``[0, 1]``.

    Args:
        x: latents ``(n, ...)``, floating point.
        y: labels ``(n,)``.
        target: stored logits ``(n, C)`` or ``None``.
        fraction: share of the batch replaced, in ``[0, 1]``.
        num_classes: ``C``, the width of the soft labels.
        generator: the source of the partners and the weights.

    Returns:
        ``(x, probs, target)``: the batch with its dreams, every label as class probabilities
        ``(n, C)`` (one-hot for the records left as they were), and the blended targets.

    Raises:
        ConfigError: integer latents (token ids cannot be blended), or ``fraction`` outside ``[0, 1]``.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ConfigError("sleep", [f"dream_fraction={fraction!r}; expected a share in [0, 1]"])
    if not x.is_floating_point():
        raise _integer_records(fraction, x.dtype)
    n = x.shape[0]
    k = round(fraction * n)
    probs = F.one_hot(y, num_classes).to(x.dtype)
    if k == 0:
        return x, probs, target
    partner = torch.randperm(n, generator=generator)[:k].to(x.device)
    lam = torch.rand(k, generator=generator).to(device=x.device, dtype=x.dtype)
    shape = (k,) + (1,) * (x.ndim - 1)
    x = x.clone()
    x[:k] = lam.view(shape) * x[:k] + (1 - lam.view(shape)) * x[partner]
    probs[:k] = lam[:, None] * probs[:k] + (1 - lam[:, None]) * probs[partner]
    if target is not None:
        target = target.clone()
        target[:k] = lam[:, None] * target[:k] + (1 - lam[:, None]) * target[partner]
    return x, probs, target
