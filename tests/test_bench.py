"""The P-MNIST runner on a tiny stream: the JSON interface and the replay-step accounting."""

from __future__ import annotations

import json
from pathlib import Path

from edge_sleep.bench.pmnist import main


def test_pmnist_writes_the_documented_json(tmp_path: Path) -> None:
    out = tmp_path / "pmnist.json"
    payload = main(["--tasks", "2", "--train-per-task", "256", "--seeds", "0", "--workers", "1",
                    "--methods", "naive", "ewc", "derpp", "derpp_eq", "ssr", "ssr_prune", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(payload))
    assert data["tasks"] == 2 and data["buffer"] == 500 and data["seeds"] == [0]
    methods = data["methods"]
    assert set(methods) == {"naive", "ewc", "derpp", "derpp_eq", "ssr", "ssr_prune"}
    for row in methods.values():
        for key in ("avg_acc", "avg_acc_std", "bwt", "wall_s", "replay_steps", "sparsity"):
            assert key in row
        assert 0.0 <= row["avg_acc"] <= 1.0
    steps_per_task = 2  # 256 images at batch 128
    assert methods["naive"]["replay_steps"] == 0
    assert methods["derpp"]["replay_steps"] == 2 * steps_per_task - 1  # the store is empty at step 1
    # equal replay compute: DER++'s buffer-only steps bring it to SSR's count
    assert methods["derpp_eq"]["replay_steps"] == methods["ssr"]["replay_steps"]
    assert methods["ssr"]["sparsity"] == 0 and methods["ssr_prune"]["sparsity"] > 0
    assert out.with_suffix(".png").stat().st_size > 10_000
