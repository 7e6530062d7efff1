from __future__ import annotations

import pytest
import torch
from torch import nn

from edge_sleep.adapters import LoRALinear, attach_lora, lora_modules, merge_lora_
from tests.conftest import small_mlp


def test_attach_keeps_the_function_and_freezes_the_base() -> None:
    model = small_mlp()
    x = torch.randn(5, 8)
    before = model(x)
    names = attach_lora(model, rank=4)
    assert names == ["0", "2", "4"]
    torch.testing.assert_close(model(x), before)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}" for n in names for ab in "ab"}


def test_merge_folds_the_adapter_into_the_base() -> None:
    model = small_mlp()
    attach_lora(model, rank=4, alpha=8.0)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_b.normal_()
    x = torch.randn(5, 8)
    before = model(x)
    assert merge_lora_(model) == 3
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    assert all(m.lora_b.abs().sum() == 0 for m in lora_modules(model).values())


def test_hf_conv1d_is_adapted_with_its_transposed_layout() -> None:
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    conv = pytorch_utils.Conv1D(6, 4)  # nf=6 outputs, nx=4 inputs; weight (4, 6)
    x = torch.randn(3, 4)
    lora = LoRALinear(conv, rank=2, alpha=2.0)
    torch.testing.assert_close(lora(x), conv(x))
    assert lora.weight.shape == (6, 4)


def test_rejects_other_layers() -> None:
    with pytest.raises(TypeError, match="Conv2d"):
        LoRALinear(nn.Conv2d(1, 1, 1), rank=1, alpha=1.0)


@pytest.mark.export
@pytest.mark.slow
def test_xnnpack_delegates_the_lora_model_whole() -> None:
    xnn = pytest.importorskip("executorch.backends.xnnpack.partition.xnnpack_partitioner")
    from executorch.exir import to_edge_transform_and_lower

    model = small_mlp()
    attach_lora(model, rank=4)
    model.eval()
    ep = torch.export.export(model, (torch.randn(2, 8),))
    edge = to_edge_transform_and_lower(ep, partitioner=[xnn.XnnpackPartitioner()])
    graph = edge.exported_program().graph_module.graph
    delegates = [n for n in graph.nodes if n.op == "call_function" and "call_delegate" in str(n.target)]
    compute = [n for n in graph.nodes if n.op == "call_function" and any(
        k in str(n.target) for k in ("mm", "linear", "addmm", "relu"))]
    assert len(delegates) == 1 and not compute
