"""``cpu_matmul.linear``: oneDNN for large fp32 CPU weights, ``F.linear`` otherwise, same results."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gpu_workers.model import cpu_matmul, layers

BIG = (cpu_matmul.ONEDNN_MIN_WEIGHTS // 512, 512)  # [out, in]: just at the threshold


def spy_onednn(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    calls: list[tuple[int, ...]] = []
    real = cpu_matmul.onednn_linear

    def spy(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        calls.append(tuple(weight.shape))
        return real(x, weight, bias)

    monkeypatch.setattr(cpu_matmul, "onednn_linear", spy)
    return calls


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("shape", [(64, 512), (3, 7, 512), (0, 512)], ids=["2d", "3d", "empty"])
def test_large_fp32_weights_go_through_onednn_with_f_linear_results(
        monkeypatch: pytest.MonkeyPatch, bias: bool, shape: tuple[int, ...]) -> None:
    if not cpu_matmul.onednn_available():
        pytest.skip("this torch has no oneDNN linear")
    calls = spy_onednn(monkeypatch)
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(*BIG, generator=gen)
    b = torch.randn(BIG[0], generator=gen) if bias else None
    x = torch.randn(*shape, generator=gen)
    out = cpu_matmul.linear(x, weight, b)
    assert calls == [BIG]
    torch.testing.assert_close(out, F.linear(x, weight, b), rtol=1e-5, atol=1e-4)


def test_non_contiguous_inputs_and_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    if not cpu_matmul.onednn_available():
        pytest.skip("this torch has no oneDNN linear")
    calls = spy_onednn(monkeypatch)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(16, 1024, generator=gen)[:, ::2]  # strided rows
    weight = torch.randn(512, BIG[0], generator=gen).t()  # a transposed view
    out = cpu_matmul.linear(x, weight)
    assert calls == [tuple(weight.shape)]
    torch.testing.assert_close(out, F.linear(x, weight), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype,rows", [(torch.float32, BIG[0] // 2), (torch.bfloat16, BIG[0])],
                         ids=["small-fp32", "big-bf16"])
def test_small_or_non_fp32_weights_stay_on_f_linear(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype,
                                                    rows: int) -> None:
    calls = spy_onednn(monkeypatch)
    weight = torch.randn(rows, 512).to(dtype)
    x = torch.randn(4, 512).to(dtype)
    assert torch.equal(cpu_matmul.linear(x, weight), F.linear(x, weight))
    assert calls == []


def test_pack_swaps_the_weight_for_onednn_s_layout_with_the_same_results() -> None:
    if not cpu_matmul.onednn_available():
        pytest.skip("this torch has no oneDNN linear")
    gen = torch.Generator().manual_seed(2)
    big = layers.ColumnParallelLinear(512, BIG[0], bias=True, tp=layers.TPContext(), dtype=torch.float32)
    small = layers.ColumnParallelLinear(64, 64, bias=False, tp=layers.TPContext(), dtype=torch.float32)
    for layer in (big, small):
        for p in layer.parameters():
            p.data.copy_(torch.randn(p.shape, generator=gen))
    x_big, x_small = torch.randn(5, 512, generator=gen), torch.randn(5, 64, generator=gen)
    before = big(x_big), small(x_small)
    assert big.pack() and not big.pack()  # packed once
    assert not small.pack() and small.packed is None  # below the threshold: stays dense
    assert big.weight.numel() == 0 and big.packed_bytes() >= 4 * 512 * BIG[0]
    torch.testing.assert_close(big(x_big), before[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(small(x_small), before[1])
