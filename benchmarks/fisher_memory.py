"""Peak memory and speed of the night's Fisher estimate, chunked against unchunked, on a 100M+ model.

``python benchmarks/fisher_memory.py``

A random-weight LLaMA-style sequence classifier built from a ``transformers`` config (12 layers,
hidden 768, vocabulary 32,000: about 110 million parameters), the night's replay loss (cross
entropy on the stored label plus the distillation term on stored logits), the same samples for
every path (8 sequences of 64 tokens). Each path runs in its own child process:

- ``unchunked``: per-sample gradients of every parameter for the whole batch at once
  (:func:`edge_sleep.fisher.fisher_sums` with ``chunk = N``, ``groups = 1``: ``torch.func``
  ``vmap`` of ``grad``), the textbook per-sample path;
- ``chunked``: :func:`edge_sleep.fisher.fisher_sums_streamed`, one sample at a time, each
  tensor's gradient squared into its sum as backward produces it and dropped, and the C heap's
  free pages returned to the system after each (``release_memory=True``, the default);
- ``chunked_keep`` (a control): the same without returning free pages (``release_memory=False``):
  what the release buys in peak memory and costs in time;
- ``loop`` (a control): one plain backward per sample, every gradient kept until the sample ends
  (:func:`edge_sleep.fisher.fisher_sums_loop`).

Peak memory is measured, not estimated (:class:`edge_sleep.memory.ResidentPeak`, as the night's
report does): Linux resets a process's resident high-water mark when 5 is written to
``/proc/self/clear_refs``; the peak after the estimate minus the resident set before it is what
the estimate added at its worst moment. Each child first runs its path once on a
single 4-token sample, so that loading the path's code and starting thread pools (tens of MB of
library pages touched for the first time) are not counted as the estimate's memory. The resident
set also counts what the C libraries allocate beside the tensors for the full-size shapes; a
second chunked child warmed up on one full-size sample instead gives ``chunked_peak_warm_mb``,
which can undercount (memory the allocator kept from the warm-up is reused unseen): the true
figure lies between the two. Every path fills a model-sized float32
accumulator of Fisher sums (reported as ``fisher_sums_mb``); the chunked path's is allocated before
the measurement starts and the others allocate theirs inside it, so theirs is subtracted: the
peaks are the extra memory over the loaded model and its Fisher accumulator. (On CPU there are no
allocator statistics to read; the resident set counts everything.) ``chunk_bound_mb`` is the
largest single parameter's bytes plus one sample's activations (the bytes autograd saves for
backward in one forward, counted with ``saved_tensors_hooks``).

``night_copies_mb`` accounts (from the sizes) for every copy a night of the runtime keeps: the
Fisher sums, the weights it restores if the night goes non-finite, and the wake anchor's Fisher and
reference, which persist between nights, are model-sized; Phase 1's gradients are not (each weight
takes its SGD step as soon as backward has its gradient, which is then dropped: at most the largest
tensor's).

Writes ``benchmarks/results/fisher_memory.json``. Takes about 2 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edge_sleep.bench.provenance import provenance

RESULTS = Path(__file__).resolve().parent / "results" / "fisher_memory.json"
N, SEQ, CLASSES = 8, 64, 10
MB = 2**20


def build_model() -> nn.Module:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=SEQ,
                         num_labels=CLASSES, pad_token_id=0)
    return LlamaForSequenceClassification(config).eval()


def samples() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randint(1, 32000, (N, SEQ), generator=g)
    y = torch.randint(0, CLASSES, (N,), generator=g)
    t = torch.randn(N, CLASSES, generator=g)
    return x, y, t


def loss_fn(logits: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
    from edge_sleep.sleep import replay_loss

    return replay_loss(logits, y, t, 1.0, 0.5)


def activation_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> int:
    """Bytes autograd saves for backward in one sample's forward (each storage once, parameters not)."""
    from edge_sleep.memory import saved_activation_bytes
    from edge_sleep.modelio import logits_of

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return saved_activation_bytes(lambda: loss_fn(logits_of(model(x[:1])), y[:1], t[:1]), params)


def child(path: str, warm: bool = False) -> None:
    from edge_sleep.fisher import fisher_sums, fisher_sums_loop, fisher_sums_streamed
    from edge_sleep.memory import ResidentPeak

    torch.set_num_threads(2)
    model = build_model()
    x, y, t = samples()
    names = [n for n, _ in model.named_parameters()]
    sums_bytes = sum(p.numel() * 4 for p in model.parameters())
    sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in model.named_parameters()} \
        if path.startswith("chunked") else None

    def estimate(xs: torch.Tensor, ys: torch.Tensor, ts: torch.Tensor) -> dict[str, torch.Tensor]:
        if path.startswith("chunked"):
            return fisher_sums_streamed(model, names, xs, ys, ts, loss_fn, sums=sums,
                                        release_memory=path == "chunked")
        if path == "unchunked":
            return fisher_sums(model, names, xs, ys, ts, loss_fn, chunk=xs.shape[0], groups=1)
        return fisher_sums_loop(model, names, xs, ys, ts, loss_fn)

    # warm up on one 4-token sample: the path's code and thread pools are loaded, its buffers tiny,
    # so the measurement below counts what the estimate allocates, not the library's first use
    estimate(x[:1] if warm else x[:1, :4], y[:1], t[:1])
    if sums is not None:
        for v in sums.values():
            v.zero_()
    with ResidentPeak() as measured:
        t0 = time.perf_counter()
        out = estimate(x, y, t)
        seconds = time.perf_counter() - t0
    if measured.extra_bytes is None:
        raise SystemExit("this benchmark reads Linux's /proc/self/status and /proc/self/clear_refs")
    peak = measured.extra_bytes - (0 if path.startswith("chunked") else sums_bytes)
    torch.save({n: v for n, v in out.items()}, f"/tmp/edge_sleep_fisher_{path}.pt")
    print(json.dumps({"peak_mb": peak / MB, "seconds": seconds, "samples_s": N / seconds}))


def run_child(path: str, warm: bool = False) -> dict[str, Any]:
    done = subprocess.run([sys.executable, __file__, "--child", path, *(["--warm"] if warm else [])],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the {path} child failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", choices=["chunked", "chunked_keep", "unchunked", "loop"], help=argparse.SUPPRESS)
    parser.add_argument("--warm", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.warm)
        return
    model = build_model()
    x, y, t = samples()
    params = sum(p.numel() for p in model.parameters())
    largest = max(p.numel() * 4 for p in model.parameters())
    act = activation_bytes(model, x, y, t)
    del model
    runs = {}
    for path in ("chunked", "chunked_keep", "unchunked", "loop"):
        runs[path] = run_child(path)
        print(f"{path:9s} peak {runs[path]['peak_mb']:8.1f} MB  {runs[path]['samples_s']:.2f} samples/s", flush=True)
    warm = run_child("chunked", warm=True)
    print(f"chunked, warm: peak {warm['peak_mb']:8.1f} MB", flush=True)
    a = torch.load("/tmp/edge_sleep_fisher_chunked.pt")
    b = torch.load("/tmp/edge_sleep_fisher_unchunked.pt")
    c = torch.load("/tmp/edge_sleep_fisher_loop.pt")
    diff = max(float((a[n] - b[n]).abs().max()) for n in a)
    diff_loop = max(float((a[n] - c[n]).abs().max()) for n in a)
    scale = max(float(b[n].abs().max()) for n in b)
    model_mb = params * 4 / MB
    result = {
        "params": params,
        "samples": N, "seq_len": SEQ,
        "largest_param_mb": largest / MB,
        "activations_mb": act / MB,
        "chunk_bound_mb": (largest + act) / MB,
        "chunked_peak_mb": runs["chunked"]["peak_mb"],
        "chunked_peak_warm_mb": warm["peak_mb"],
        "chunked_keep_peak_mb": runs["chunked_keep"]["peak_mb"],
        "chunked_keep_samples_s": runs["chunked_keep"]["samples_s"],
        "unchunked_peak_mb": runs["unchunked"]["peak_mb"],
        "loop_peak_mb": runs["loop"]["peak_mb"],
        "chunked_samples_s": runs["chunked"]["samples_s"],
        "unchunked_samples_s": runs["unchunked"]["samples_s"],
        "loop_samples_s": runs["loop"]["samples_s"],
        "max_abs_diff": diff,
        "max_abs_diff_vs_loop": diff_loop,
        "max_abs_fisher": scale,
        "fisher_sums_mb": model_mb,
        "night_copies_mb": {"fisher_sums": model_mb, "restore_weights": model_mb, "phase1_grads": largest / MB,
                            "anchor_fisher": model_mb, "anchor_reference": model_mb},
        "threads": 2,
    }
    result["targets"] = {
        "chunked_over_bound": result["chunked_peak_mb"] / result["chunk_bound_mb"],
        "unchunked_over_chunked": result["unchunked_peak_mb"] / result["chunked_peak_mb"],
        "unchunked_over_chunked_throughput": result["unchunked_samples_s"] / result["chunked_samples_s"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result.update(provenance())  # the commit the numbers describe
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
