"""Membership inference: does the model after sleep give away which examples the store kept?

The store's records are replayed night after night, far more often than any other example is
seen, so a model can come to fit them more tightly than examples it never kept. An attacker who
can query the model scores an example by its loss (a member tends to have a lower one) and
picks a threshold. This module runs that attack and a calibrated one and reports ROC AUC and
the true-positive rate at 1% false positives (the figure that matters for a few confidently
exposed users, Carlini et al. 2022, "Membership inference attacks from first principles").

Attacks (higher score = "member"):

* ``loss``: ``-loss(x)`` with one global threshold (Yeom et al. 2018).
* ``calibrated``: the loss against how hard the example is.
  With a reference model (one trained the same way that did not keep these examples), the score
  is ``loss_ref(x) - loss(x)`` (difficulty calibration, Watson et al. 2022). Without one, each
  example's loss is standardised by the non-member losses of its class, measured on a
  calibration half of the held-out set that is then left out of the evaluation (class-dependent
  thresholds, Song and Mittal 2021).

A third attack reads the store instead of querying the model (:func:`store_audit`): an attacker
with the store's file (and its key) asks whether a candidate example's record is in it, scoring
the candidate by its distance to the nearest record of its label.

Members are the examples behind the store's records (the app's raw examples; with a private
store the records themselves are noised and are not what an attacker would test), non-members
held-out examples of the same distribution. An AUC of 0.5 and a TPR of 0.01 at 1% FPR are
chance.

Example:
    >>> import numpy as np
    >>> round(roc_auc(np.array([3.0, 2.0]), np.array([1.0, 0.0])), 2)
    1.0
    >>> round(roc_auc(np.array([1.0, 0.0]), np.array([1.0, 0.0])), 2)
    0.5
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import rankdata

from edge_sleep.errors import InputError

if TYPE_CHECKING:
    from edge_sleep.runtime import EdgeSleep

__all__ = ["AttackResult", "AuditReport", "audit", "example_losses", "roc_auc", "store_audit", "tpr_at_fpr"]


def roc_auc(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> float:
    """Area under the ROC curve of "member if score > t": the chance that a random member
    outscores a random non-member, ties counting half (the Mann-Whitney U statistic)."""
    m, n = len(member_scores), len(nonmember_scores)
    if m == 0 or n == 0:
        raise InputError(f"roc_auc got {m} member and {n} non-member scores; expected at least one of each.")
    ranks = rankdata(np.concatenate([member_scores, nonmember_scores]))
    return float((ranks[:m].sum() - m * (m + 1) / 2) / (m * n))


def tpr_at_fpr(member_scores: np.ndarray, nonmember_scores: np.ndarray, fpr: float = 0.01) -> float:
    """The fraction of members flagged at the lowest threshold that flags at most ``fpr`` of the
    non-members (strictly greater scores are flagged)."""
    if not 0 < fpr < 1:
        raise InputError(f"fpr={fpr}; expected 0 < fpr < 1")
    neg = np.sort(np.asarray(nonmember_scores, dtype=np.float64))[::-1]
    allowed = int(np.floor(fpr * len(neg)))  # non-members that may score above the threshold
    threshold = neg[allowed] if allowed < len(neg) else -np.inf
    return float(np.mean(np.asarray(member_scores) > threshold))


def example_losses(es: EdgeSleep, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 1024) -> np.ndarray:
    """Per-example cross-entropy of the runtime's model (eval mode) on ``(x, y)``."""
    logits = es.logits(x, batch_size=batch_size)
    return F.cross_entropy(logits.float(), y.to(logits.device), reduction="none").cpu().numpy()


@dataclass(frozen=True)
class AttackResult:
    """One attack's outcome.

    Attributes:
        attack: ``"loss"`` or ``"calibrated"``; calibration: how the calibrated one was
            calibrated (``"reference model"`` or ``"per-class"``), else ``None``.
        auc: ROC AUC; tpr_at_1pct_fpr: true-positive rate at 1% false positives.
        members, nonmembers: how many examples of each were scored.
    """

    attack: str
    auc: float
    tpr_at_1pct_fpr: float
    members: int
    nonmembers: int
    calibration: str | None = None


@dataclass(frozen=True)
class AuditReport:
    """What :func:`audit` found: one :class:`AttackResult` per attack, and the mean losses."""

    attacks: tuple[AttackResult, ...]
    member_loss: float
    nonmember_loss: float

    def worst(self) -> AttackResult:
        """The attack with the highest AUC."""
        return max(self.attacks, key=lambda a: a.auc)

    def to_dict(self) -> dict[str, Any]:
        return {"attacks": [dataclasses.asdict(a) for a in self.attacks],
                "member_loss": self.member_loss, "nonmember_loss": self.nonmember_loss,
                "mia_auc": self.worst().auc, "tpr_at_1pct_fpr": max(a.tpr_at_1pct_fpr for a in self.attacks)}

    def text(self) -> str:
        lines = [f"membership inference: mean loss {self.member_loss:.4f} on members, "
                 f"{self.nonmember_loss:.4f} on non-members"]
        for a in self.attacks:
            name = a.attack + (f" ({a.calibration})" if a.calibration else "")
            lines.append(f"  {name:<32s} AUC {a.auc:.3f}   TPR at 1% FPR {a.tpr_at_1pct_fpr:.3f}   "
                         f"({a.members} members, {a.nonmembers} non-members)")
        w = self.worst()
        verdict = ("indistinguishable from chance" if w.auc <= 0.55 else
                   "a weak signal" if w.auc <= 0.6 else "members are exposed")
        lines.append(f"  worst AUC {w.auc:.3f}: {verdict} (0.5 is chance)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.text()


def _class_calibrated(losses: np.ndarray, labels: np.ndarray, ref_losses: np.ndarray,
                      ref_labels: np.ndarray) -> np.ndarray:
    """``-(loss - mean_c) / std_c`` with the class statistics of ``ref``; a class missing there
    falls back to all of ``ref``."""
    mu_all, sd_all = float(ref_losses.mean()), float(ref_losses.std()) + 1e-12
    out = np.empty_like(losses, dtype=np.float64)
    for c in np.unique(labels):
        ref = ref_losses[ref_labels == c]
        mu, sd = (float(ref.mean()), float(ref.std()) + 1e-12) if len(ref) >= 2 else (mu_all, sd_all)
        sel = labels == c
        out[sel] = -(losses[sel] - mu) / sd
    return out


def _check_pair(name: str, x: Any, y: Any) -> None:
    if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
        raise InputError(f"audit {name} got {type(x).__name__}, {type(y).__name__}; expected two tensors (x, y).")
    if y.ndim != 1 or x.shape[0] != y.shape[0] or x.shape[0] < 2:
        raise InputError(f"audit {name} got x {tuple(x.shape)} and y {tuple(y.shape)}; expected (N, ...) and (N,) "
                         "with N >= 2. Fix: pass one label per example.")


def audit(
    es: EdgeSleep,
    members: tuple[torch.Tensor, torch.Tensor],
    nonmembers: tuple[torch.Tensor, torch.Tensor],
    *,
    reference: EdgeSleep | None = None,
    seed: int = 0,
) -> AuditReport:
    """Run the loss-threshold attack and the calibrated attack against ``es``'s model.

    Args:
        es: the runtime after sleep (the model an attacker could query).
        members: ``(x, y)``, the examples behind the store's records.
        nonmembers: ``(x, y)``, held-out examples of the same distribution (at least 4; more
            makes the TPR at 1% FPR meaningful: 1,000 or more).
        reference: a runtime trained the same way whose store did not keep ``members``; without
            it, the calibrated attack uses per-class statistics from half of ``nonmembers``.
        seed: which half of ``nonmembers`` calibrates (without ``reference``).

    Raises:
        InputError: malformed or too few examples.
    """
    _check_pair("members", *members)
    _check_pair("nonmembers", *nonmembers)
    xm, ym = members
    xn, yn = nonmembers
    if reference is None and xn.shape[0] < 4:
        raise InputError(f"audit got {xn.shape[0]} non-members; expected at least 4 (half calibrate the "
                         "per-class attack). Fix: pass more held-out examples, or a reference model.")
    lm, ln = example_losses(es, xm, ym), example_losses(es, xn, yn)
    results = [AttackResult("loss", roc_auc(-lm, -ln), tpr_at_fpr(-lm, -ln), len(lm), len(ln))]
    if reference is not None:
        sm = example_losses(reference, xm, ym) - lm
        sn = example_losses(reference, xn, yn) - ln
        results.append(AttackResult("calibrated", roc_auc(sm, sn), tpr_at_fpr(sm, sn), len(sm), len(sn),
                                    "reference model"))
    else:
        order = np.random.default_rng(seed).permutation(len(ln))
        cal, ev = order[: len(ln) // 2], order[len(ln) // 2:]
        ymn, ynn = ym.cpu().numpy(), yn.cpu().numpy()
        sm = _class_calibrated(lm, ymn, ln[cal], ynn[cal])
        sn = _class_calibrated(ln[ev], ynn[ev], ln[cal], ynn[cal])
        results.append(AttackResult("calibrated", roc_auc(sm, sn), tpr_at_fpr(sm, sn), len(sm), len(sn),
                                    "per-class"))
    return AuditReport(tuple(results), float(lm.mean()), float(ln.mean()))


def store_audit(
    records: tuple[torch.Tensor, torch.Tensor],
    members: tuple[torch.Tensor, torch.Tensor],
    nonmembers: tuple[torch.Tensor, torch.Tensor],
    *,
    max_norm: float | None = None,
) -> AttackResult:
    """Store-side membership inference: given the store's records (as the store decodes them,
    ``store.read(store.slots())``) and a candidate example, is the candidate's record there?

    Each candidate goes through what the store does to an example before noise: clipped to
    ``max_norm`` (the store's ``PrivacyConfig.max_norm``; ``None`` for a store without privacy)
    and through the store's int8 codec, members and non-members alike, so the codec's rounding
    cannot tell them apart. Its score is minus its distance to the nearest record of its label
    (labels stored as they are narrow the search; a record's noise widens the distance).

    Args:
        records: ``(x, y)`` of the store's records: latents ``(R, ...)`` and labels ``(R,)``.
        members: ``(x, y)``, the latents of the examples behind the records (the inputs, for a
            store without ``latent_layer``).
        nonmembers: ``(x, y)``, latents of held-out examples of the same distribution.
        max_norm: the clipping norm of the store's privacy, or ``None``.

    Returns:
        An :class:`AttackResult` named ``"store"``. A store without privacy gives its members away
        (AUC near 1); a private store's noise should bring it to 0.5.

    Raises:
        InputError: malformed examples, or records whose latents have another width.
    """
    from edge_sleep.privacy import clip_rows
    from edge_sleep.quant import dequantize_rows, quantize_rows

    _check_pair("records", *records)
    _check_pair("members", *members)
    _check_pair("nonmembers", *nonmembers)
    rx = records[0].reshape(records[0].shape[0], -1).float()
    ry = records[1]

    def scores(x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
        flat = x.reshape(x.shape[0], -1).float()
        if flat.shape[1] != rx.shape[1]:
            raise InputError(f"store_audit got candidates of {flat.shape[1]} values a row and records of "
                             f"{rx.shape[1]}; expected the same. Fix: pass the latents the store records.")
        if max_norm is not None:
            flat = clip_rows(flat, max_norm)
        flat = dequantize_rows(*quantize_rows(flat))
        out = np.full(flat.shape[0], -np.inf)
        for label in torch.unique(y).tolist():
            mine, theirs = (y == label).nonzero().flatten(), (ry == label).nonzero().flatten()
            if len(theirs):
                out[mine.numpy()] = -torch.cdist(flat[mine], rx[theirs]).min(dim=1).values.double().numpy()
        return out

    sm, sn = scores(*members), scores(*nonmembers)
    return AttackResult("store", roc_auc(sm, sn), tpr_at_fpr(sm, sn), len(sm), len(sn), "nearest record")
