"""PEFT interop (a PEFT model taken as it is, adapters PEFT loads) and the Trainer callback."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from edge_sleep import EdgeSleep, SleepConfig, WakeConfig
from edge_sleep.errors import ConfigError, InputError

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _bert(num_labels: int = 3, seed: int = 0) -> torch.nn.Module:
    cfg = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, num_labels=num_labels, max_position_embeddings=16,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(cfg)


def _gpt2(seed: int = 0) -> torch.nn.Module:
    cfg = transformers.GPT2Config(vocab_size=40, n_embd=16, n_layer=1, n_head=2, n_positions=16, num_labels=3,
                                  pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(seed)
    return transformers.GPT2ForSequenceClassification(cfg)


def _batch(n: int = 8, length: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 40, (n, length), generator=g), torch.randint(0, 3, (n,), generator=g)


def _day(es: EdgeSleep, steps: int = 6) -> None:
    for i in range(steps):
        es.learn(*_batch(seed=10 + i))


def _reloaded(kind: type, tmp: Path, es: EdgeSleep) -> torch.nn.Module:
    es.save_base(tmp / "base")
    es.save_adapters(tmp / "adapters", base_model_name_or_path=str(tmp / "base"))
    base = kind.from_pretrained(str(tmp / "base"))
    return peft.PeftModel.from_pretrained(base, str(tmp / "adapters")).eval()


@pytest.mark.parametrize("make, kind", [(_bert, "BertForSequenceClassification"),
                                        (_gpt2, "GPT2ForSequenceClassification")])
def test_adapters_and_base_load_in_peft_and_compute_what_the_runtime_computes(make, kind, tmp_path: Path) -> None:
    es = EdgeSleep(make(), wake=WakeConfig(train="adapters", lr=0.05), sleep=SleepConfig(min_steps=4), seed=0)
    _day(es)
    assert es.sleep().completed  # the night merges the day into the base: the base is no longer the pretrained one
    _day(es)  # and a new day's adapters on top
    x, _ = _batch(seed=99)
    loaded = _reloaded(getattr(transformers, kind), tmp_path, es)
    with torch.no_grad():
        assert torch.allclose(loaded(x).logits, es.logits(x), atol=1e-5)
    config = (tmp_path / "adapters" / "adapter_config.json").read_text()
    assert '"peft_type": "LORA"' in config and ('"fan_in_fan_out": true' in config) == (kind.startswith("GPT2"))


def test_a_peft_model_is_taken_as_it_is(tmp_path: Path) -> None:
    pm = peft.get_peft_model(_bert(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                      modules_to_save=["classifier"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)  # adapters that already learned something
    x, _ = _batch(seed=5)
    pm.eval()
    with torch.no_grad():
        before = pm(x).logits
    es = EdgeSleep(pm, wake=WakeConfig(train="adapters", lr=0.05), sleep=SleepConfig(min_steps=4))
    assert torch.allclose(es.logits(x), before, atol=1e-6)  # the same function, PEFT's A, B and scale
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or ".modules_to_save." in n for n in trainable)
    assert any(".modules_to_save." in n for n in trainable)  # PEFT's trained head stays trainable
    assert not any(".original_module." in n for n in es._sleep_params)
    _day(es)
    es.sleep()
    _day(es, 2)
    loaded = _reloaded(transformers.BertForSequenceClassification, tmp_path, es)
    with torch.no_grad():
        assert torch.allclose(loaded(x).logits, es.logits(x), atol=1e-5)


def test_what_peft_cannot_be_taken_is_refused_before_anything_changes() -> None:
    pm = peft.get_peft_model(_bert(), peft.LoraConfig(r=4, target_modules=["query"], use_dora=True))
    with pytest.raises(ConfigError, match="DoRA"):
        EdgeSleep(pm, wake=WakeConfig(train="adapters"))
    pm = peft.get_peft_model(_bert(), peft.LoraConfig(r=4, target_modules=["query"]))
    with pytest.raises(ConfigError, match=r"train='adapters'.*merge_and_unload"):
        EdgeSleep(pm, wake=WakeConfig(train="all"))
    layer = pm.base_model.model.bert.encoder.layer[0].attention.self.query
    assert type(layer).__module__.startswith("peft.")  # untouched


def test_save_adapters_refuses_a_model_without_adapters_and_pruned_weights(tmp_path: Path) -> None:
    es = EdgeSleep(_bert(), wake=WakeConfig(train="all"))
    with pytest.raises(ConfigError, match="no LoRA adapters"):
        es.save_adapters(tmp_path / "a")
    es = EdgeSleep(_bert(), wake=WakeConfig(train="adapters"), sleep=SleepConfig(min_steps=4, prune_frac=0.05))
    _day(es)
    es.sleep()
    with pytest.raises(ConfigError, match="pruned"):
        es.save_adapters(tmp_path / "a")
    assert not (tmp_path / "a").exists()


# ------------------------------------------------------------------ the Trainer
def _trainer(es: EdgeSleep, callback: object, tmp: Path, epochs: int = 2, n: int = 32) -> object:
    from edge_sleep.integrations.transformers import PadMasked  # noqa: F401  (the model the runtime holds)

    x, y = _batch(n=n, seed=3)
    x[:, -2:] = 0  # padding at the end of every row
    data = [{"input_ids": x[i], "labels": y[i]} for i in range(n)]
    args = transformers.TrainingArguments(output_dir=str(tmp / "out"), num_train_epochs=epochs,
                                          per_device_train_batch_size=8, learning_rate=1e-2, report_to=[],
                                          save_strategy="no", logging_strategy="no", use_cpu=True,
                                          disable_tqdm=True, seed=0)
    return transformers.Trainer(model=es.model, args=args, train_dataset=data, callbacks=[callback])


def test_the_callback_stores_the_batches_anchors_the_day_and_sleeps_each_epoch(tmp_path: Path) -> None:
    from edge_sleep.integrations.transformers import EdgeSleepCallback, PadMasked

    es = EdgeSleep(PadMasked(_bert(), pad_token_id=0), wake=WakeConfig(train="adapters", anchor_lambda=10.0),
                   sleep=SleepConfig(min_steps=4), seed=0)
    base = es.model.model.bert.encoder.layer[0].attention.self.query.weight.detach().clone()
    penalties: list[float] = []

    class Watched(EdgeSleepCallback):
        def on_pre_optimizer_step(self, *args: object, **kwargs: object) -> None:
            penalties.append(float(es.anchor_penalty(1e-2)))
            super().on_pre_optimizer_step(*args, **kwargs)  # type: ignore[arg-type]

    cb = Watched(es, stream="day one")
    _trainer(es, cb, tmp_path).train()
    assert cb.stored == len(es.store) == len(es.store.stream_slots("day one")) > 0
    assert [r.completed for r in cb.reports] == [True, True]  # a night after each epoch
    assert not torch.equal(es.model.model.bert.encoder.layer[0].attention.self.query.weight, base)
    assert penalties[:4] == [0.0] * 4 and max(penalties[4:]) > 0  # the anchor weighs on the second day only
    assert cb._hook is None  # the capture hook is gone after training


def test_a_night_the_trainer_stops_is_resumed_by_the_next(tmp_path: Path) -> None:
    from edge_sleep.integrations.transformers import EdgeSleepCallback, PadMasked

    es = EdgeSleep(PadMasked(_bert(), 0), wake=WakeConfig(train="adapters"),
                   sleep=SleepConfig(min_steps=8, check_every=2))
    calls = iter([True] + [False] * 1000)
    cb = EdgeSleepCallback(es, should_stop=lambda: next(calls))
    _trainer(es, cb, tmp_path).train()
    assert [r.completed for r in cb.reports] == [False, True]
    assert cb.reports[1].steps > 0


def test_the_callback_refuses_another_model_and_batches_without_labels(tmp_path: Path) -> None:
    from edge_sleep.integrations.transformers import EdgeSleepCallback, PadMasked

    es = EdgeSleep(PadMasked(_bert(), 0), wake=WakeConfig(train="adapters"))
    other = EdgeSleep(PadMasked(_bert(), 0), wake=WakeConfig(train="adapters"))
    with pytest.raises(ConfigError, match="not runtime.model"):
        _trainer(other, EdgeSleepCallback(es), tmp_path).train()
    with pytest.raises(InputError, match="'targets'"):
        _trainer(es, EdgeSleepCallback(es, label_key="targets"), tmp_path).train()
    with pytest.raises(ConfigError, match="sleep_every=0"):
        EdgeSleepCallback(es, sleep_every=0)
    with pytest.raises(ConfigError, match="pad_token_id"):
        PadMasked(_bert(), -1)


def test_remember_stores_without_a_step_and_checks_its_logits() -> None:
    es = EdgeSleep(_bert(), wake=WakeConfig(train="adapters"))
    x, y = _batch()
    weights = [p.detach().clone() for p in es.model.parameters()]
    assert es.remember(x, y, stream="s") == 8 and len(es.store) == 8
    assert all(torch.equal(a, b) for a, b in zip(weights, es.model.parameters()))
    assert es.wake_steps_since_sleep == 1
    with pytest.raises(InputError, match=r"expected a float tensor of shape \(8, 3\)"):
        es.remember(x, y, logits=torch.zeros(8, 2))
    with pytest.raises(InputError, match="NaN or inf"):
        es.remember(x, y, logits=torch.full((8, 3), float("nan")))
    assert len(es.store) == 8 and es.wake_steps_since_sleep == 1


def test_the_trainers_stop_signal_raised_during_a_night_stops_it(tmp_path: Path) -> None:
    from edge_sleep.integrations.transformers import EdgeSleepCallback, PadMasked

    es = EdgeSleep(PadMasked(_bert(), 0), wake=WakeConfig(train="adapters"),
                   sleep=SleepConfig(min_steps=8, check_every=2))
    cb = EdgeSleepCallback(es)
    trainer = _trainer(es, cb, tmp_path)
    # a handler that tells the Trainer to stop while the first night runs (as a SIGTERM handler would)
    cb.should_stop = lambda: bool(setattr(trainer.control, "should_training_stop", True))
    trainer.train()
    assert [r.completed for r in cb.reports] == [False]  # the night stopped, and training with it
    assert es.sleep_state is not None  # the next sleep() resumes it


def test_the_integrations_page_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    import re

    monkeypatch.chdir(tmp_path)
    page = Path(__file__).resolve().parents[1] / "docs" / "integrations.md"
    block = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)[0]
    namespace: dict[str, object] = {}
    exec(compile(block, str(page), "exec"), namespace)
    out = capsys.readouterr().out
    assert re.search(r"tweets: \d+ records stored, a night of \d+ steps", out)
    assert re.search(r"reviews: \d+ records stored, a night of \d+ steps", out)
    assert "PEFT reproduces the runtime: True" in out
    es = namespace["es"]
    assert len(es.store.stream_slots("tweets")) > 0 and len(es.store.stream_slots("reviews")) > 0  # type: ignore[attr-defined]


def test_a_runtime_around_a_peft_model_saves_and_loads(tmp_path: Path) -> None:
    def fresh() -> torch.nn.Module:
        return peft.get_peft_model(_bert(), peft.LoraConfig(r=4, target_modules=["query", "value"],
                                                            modules_to_save=["classifier"]))

    es = EdgeSleep(fresh(), wake=WakeConfig(train="adapters", lr=0.05), sleep=SleepConfig(min_steps=4),
                   store=tmp_path / "replay.db")
    _day(es)
    es.sleep()
    _day(es, 2)
    es.save(tmp_path / "ckpt")
    x, _ = _batch(seed=7)
    before, records = es.logits(x), len(es.store)
    again = EdgeSleep.load(tmp_path / "ckpt", fresh())  # the store moves to the new runtime
    assert torch.equal(again.logits(x), before) and len(again.store) == records


def test_token_ids_outside_the_vocabulary_or_rows_past_the_positions_are_refused() -> None:
    es = EdgeSleep(_bert(), wake=WakeConfig(train="adapters"))
    assert (es.vocab_size, es.max_length) == (40, 16)
    x, y = _batch()
    with pytest.raises(InputError, match=r"token id 40; .* must be in \[0, 39\]"):
        es.learn(torch.cat([x[:, :-1], torch.full((8, 1), 40)], dim=1), y)
    with pytest.raises(InputError, match="rows of 17 tokens; this model has 16 positions.*max_length=16"):
        es.learn(torch.randint(1, 40, (8, 17)), y)
    assert len(es.store) == 0 and es.num_classes is None  # nothing learned, stored or probed
    es.learn(x, y)  # the same runtime learns a good batch
    assert len(es.store) == 8


def test_a_night_that_consolidates_the_adapted_layers_leaves_the_rest_as_handed_over() -> None:
    es = EdgeSleep(_bert(), wake=WakeConfig(train="adapters", lr=0.05),
                   sleep=SleepConfig(min_steps=4, consolidate="adapted"))
    base = es.base_parameters
    assert "bert.encoder.layer.0.attention.self.query.weight" in base and "classifier.bias" in base
    assert not any("embeddings" in n or "LayerNorm" in n for n in base)  # the day never changes them
    embeddings = es.model.bert.embeddings.word_embeddings.weight.detach().clone()
    query = es.model.bert.encoder.layer[0].attention.self.query.weight.detach().clone()
    _day(es)
    assert es.sleep().completed
    assert torch.equal(es.model.bert.embeddings.word_embeddings.weight, embeddings)
    assert not torch.equal(es.model.bert.encoder.layer[0].attention.self.query.weight, query)
    assert set(es.anchor.fisher) <= set(base) and es.anchor.fisher
    # PEFT's targets and its trained head, nothing else
    pm = peft.get_peft_model(_bert(), peft.LoraConfig(r=4, target_modules=["query", "value"],
                                                      modules_to_save=["classifier"]))
    es = EdgeSleep(pm, wake=WakeConfig(train="adapters"), sleep=SleepConfig(consolidate="adapted"))
    assert {n.rsplit(".", 2)[-2] if "modules_to_save" not in n else "head" for n in es.base_parameters} == {
        "query", "value", "head"}
    with pytest.raises(ConfigError, match="consolidate='adapted'.*WakeConfig\\(train='adapters'\\)"):
        EdgeSleep(_bert(), wake=WakeConfig(train="all"), sleep=SleepConfig(consolidate="adapted"))
    with pytest.raises(ConfigError, match="consolidate='some'"):
        SleepConfig(consolidate="some")  # type: ignore[arg-type]
