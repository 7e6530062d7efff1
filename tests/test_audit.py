"""Membership inference (edge_sleep.audit, `edge-sleep audit`) and where each example went (offer/slots)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_sleep import EdgeSleep, PrivacyConfig, SleepConfig, StoreConfig, WakeConfig
from edge_sleep.audit import audit, roc_auc, tpr_at_fpr
from edge_sleep.cli import main
from edge_sleep.errors import InputError
from edge_sleep.store import ReplayStore
from tests.conftest import small_mlp


def test_auc_is_one_for_separated_scores_zero_reversed_and_half_for_ties() -> None:
    assert roc_auc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0
    assert roc_auc(np.array([0.0, 1.0]), np.array([2.0, 3.0])) == 0.0
    assert roc_auc(np.ones(5), np.ones(7)) == 0.5
    # one of the four member/non-member pairs is ordered the wrong way
    assert roc_auc(np.array([1.0, 3.0]), np.array([0.0, 2.0])) == 0.75
    with pytest.raises(InputError, match="at least one of each"):
        roc_auc(np.array([]), np.array([1.0]))


def test_tpr_at_fpr_uses_the_threshold_that_flags_at_most_that_many_nonmembers() -> None:
    nonmembers = np.arange(100, dtype=float)  # 1% FPR: only the top non-member (99) may be flagged
    members = np.array([98.5, 99.5, 100.0, 50.0])
    assert tpr_at_fpr(members, nonmembers, 0.01) == 0.75  # threshold 98 flags 99 alone; 50 stays below
    assert tpr_at_fpr(members, nonmembers, 0.5) == 1.0  # threshold 49 flags 50 non-members and every member
    assert tpr_at_fpr(members, nonmembers, 0.001) == 0.5  # no non-member may be flagged: above 99 only
    with pytest.raises(InputError, match="fpr"):
        tpr_at_fpr(members, nonmembers, 1.5)


def _runtime(tmp_path: Path, name: str, **kw: object) -> EdgeSleep:
    return EdgeSleep(small_mlp(8, 64, 4), store=tmp_path / f"{name}.db", seed=0,
                     wake=WakeConfig(train="all", lr=0.3, replay_batch=0), **kw)  # type: ignore[arg-type]


def test_an_overfit_model_exposes_its_members_and_an_untrained_one_does_not(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 8, generator=g)
    y = torch.randint(0, 4, (400,), generator=g)  # random labels: only memorising fits them
    members, nonmembers = (x[:40], y[:40]), (x[40:], y[40:])
    fresh = _runtime(tmp_path, "fresh")
    chance = audit(fresh, members, nonmembers, seed=0)
    assert all(abs(a.auc - 0.5) < 0.2 for a in chance.attacks), chance.text()
    fit = _runtime(tmp_path, "fit")
    for _ in range(300):
        fit.learn(*members)
    exposed = audit(fit, members, nonmembers, seed=0)
    assert exposed.member_loss < exposed.nonmember_loss
    assert all(a.auc > 0.9 for a in exposed.attacks), exposed.text()
    assert "members are exposed" in exposed.text()
    # with a reference trained the same way on other examples the calibration is by difficulty
    ref = _runtime(tmp_path, "ref")
    for _ in range(300):
        ref.learn(x[40:80], y[40:80])
    calibrated = audit(fit, members, (x[80:], y[80:]), reference=ref)
    # (weaker than the plain attack here: random labels make the reference's own losses noise;
    # a sign error in the calibration would put it below 0.5)
    assert calibrated.attacks[1].calibration == "reference model" and calibrated.attacks[1].auc > 0.6
    for es in (fresh, fit, ref):
        es.store.close()


def test_audit_rejects_malformed_examples(tmp_path: Path) -> None:
    es = _runtime(tmp_path, "bad")
    x, y = torch.randn(10, 8), torch.randint(0, 4, (10,))
    with pytest.raises(InputError, match="one label per example"):
        audit(es, (x, y[:5]), (x, y))
    with pytest.raises(InputError, match="at least 4"):
        audit(es, (x, y), (x[:3], y[:3]))
    es.store.close()


def test_offer_says_which_slot_each_row_went_to_and_learn_reports_it(tmp_path: Path) -> None:
    store = ReplayStore(tmp_path / "s.db", StoreConfig(capacity_records=3), seed=0)
    x = torch.rand(5, 4)
    where = store.offer(x, torch.arange(5) % 2)
    assert where.shape == (5,) and sorted(where[where >= 0].tolist()) == [0, 1, 2]
    for row, slot in enumerate(where.tolist()):
        if slot >= 0:  # the record in that slot is that row (int8: within a quantization step)
            assert torch.allclose(store.read(np.array([slot])).x[0], x[row], atol=1 / 127)
    store.close()
    es = _runtime(tmp_path, "slots", store_config=StoreConfig(capacity_records=8))
    stats = es.learn(torch.randn(6, 8), torch.arange(6) % 4)
    assert stats.slots == (0, 1, 2, 3, 4, 5) and stats.stored == 6
    es.store.close()


def test_cli_audit_attacks_a_saved_runtime_and_refuses_a_noised_store_without_members(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = "tests.conftest:small_mlp"  # 8 -> 16 -> 3
    g = torch.Generator().manual_seed(1)
    es = EdgeSleep(small_mlp(), store=tmp_path / "r.db", store_config=StoreConfig(capacity_records=30), seed=0,
                   wake=WakeConfig(train="all", lr=0.2, replay_batch=0), sleep=SleepConfig(min_steps=20))
    for _ in range(3):
        es.learn(torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g))
    es.sleep()
    es.save(tmp_path / "ckpt")
    es.store.close()
    heldout = tmp_path / "heldout.pt"
    torch.save({"x": torch.randn(50, 8, generator=g), "y": torch.randint(0, 3, (50,), generator=g)}, heldout)
    assert main(["audit", str(tmp_path / "ckpt"), "--model", spec, "--heldout", str(heldout),
                 "--json", str(tmp_path / "audit.json")]) == 0
    out = capsys.readouterr().out
    assert "TPR at 1% FPR" in out and "30 members" in out
    report = json.loads((tmp_path / "audit.json").read_text())
    assert {a["attack"] for a in report["attacks"]} == {"loss", "calibrated"}
    assert 0.0 <= report["mia_auc"] <= 1.0

    bad = tmp_path / "bad.pt"
    torch.save([1, 2, 3], bad)
    assert main(["audit", str(tmp_path / "ckpt"), "--model", spec, "--heldout", str(bad)]) == 2
    assert "expected {'x': tensor, 'y': tensor}" in capsys.readouterr().err

    private = EdgeSleep(small_mlp(), store=tmp_path / "p.db", seed=0, wake=WakeConfig(train="all", replay_batch=0),
                        privacy=PrivacyConfig(epsilon=8.0, max_norm=3.0, noise_seed=0))
    with pytest.warns(UserWarning):
        private.learn(torch.randn(16, 8), torch.randint(0, 3, (16,)))
    private.save(tmp_path / "pckpt")
    private.store.close()
    assert main(["audit", str(tmp_path / "pckpt"), "--model", spec, "--heldout", str(heldout)]) == 2
    err = capsys.readouterr().err
    assert "16 noised" in err and "pass --members FILE" in err
    members = tmp_path / "members.pt"
    torch.save((torch.randn(16, 8), torch.randint(0, 3, (16,))), members)
    assert main(["audit", str(tmp_path / "pckpt"), "--model", spec, "--heldout", str(heldout),
                 "--members", str(members)]) == 0


@pytest.mark.parametrize("epsilon", [None, 8.0])
def test_the_store_side_attack_finds_plain_records_and_not_private_ones(tmp_path: Path, epsilon: float | None) -> None:
    """Issue 20, item 9: with the store's file an attacker asks whether a candidate's record is in it."""
    from edge_sleep.audit import store_audit
    from edge_sleep.privacy import privatize

    g = torch.Generator().manual_seed(0)
    x = torch.rand(400, 64, generator=g)
    y = torch.randint(0, 4, (400,), generator=g)
    members, nonmembers = (x[:200], y[:200]), (x[200:], y[200:])
    store = ReplayStore(tmp_path / "r.db", StoreConfig(capacity_records=200), seed=0)
    max_norm = None
    latents = members[0]
    if epsilon is not None:
        config = PrivacyConfig(epsilon=epsilon, max_norm=4.0)
        with pytest.warns(UserWarning, match="repeatable"):
            latents, _, _ = privatize(members[0], members[1], config, 4, torch.Generator().manual_seed(1))
        max_norm = 4.0
    store.append(latents, members[1])
    stored = store.read(store.slots())
    result = store_audit((stored.x, stored.y), members, nonmembers, max_norm=max_norm)
    store.close()
    assert result.attack == "store" and result.members == result.nonmembers == 200
    if epsilon is None:  # every member's record is its own int8 copy
        assert result.auc > 0.99 and result.tpr_at_1pct_fpr > 0.9
    else:  # noise of about 34x the record's norm: nothing to find (sd of a null AUC here is about 0.03)
        assert 0.38 < result.auc < 0.62
    with pytest.raises(InputError, match="store_audit got candidates of 3 values"):
        store_audit((stored.x, stored.y), (torch.rand(2, 3), torch.zeros(2, dtype=torch.long)), nonmembers)
