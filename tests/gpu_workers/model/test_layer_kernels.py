"""The layer kernels (gpu_workers/model/layer_kernels.c) against the torch forms they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gpu_workers.model import layer_kernels
from gpu_workers.model.layers import GemmaRMSNorm, RMSNorm
from gpu_workers.model.rope import apply_rotary

kernels = layer_kernels.load()
pytestmark = pytest.mark.skipif(kernels is None, reason="no C compiler: the layer kernels are not built")
ROWS = [1, 2, 7, 31, 32, 33, 70]  # across PARALLEL_ROWS (32), where rows go to threads


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request: pytest.FixtureRequest) -> object:
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("norm_class", [RMSNorm, GemmaRMSNorm])
@pytest.mark.parametrize("rows", ROWS)
def test_rms_norm_equals_the_torch_form(norm_class: type[RMSNorm], rows: int, threads: int) -> None:
    torch.manual_seed(rows)
    norm = norm_class(576, eps=1e-5, dtype=torch.float32)
    norm.weight.data.normal_()
    x, residual = torch.randn(rows, 576) * 3, torch.randn(rows, 576)
    assert kernels is not None
    out = kernels.rms_norm(x, norm.weight, norm.eps, offset=norm.offset)
    # only the sum of squares is ordered differently: a few ulps
    torch.testing.assert_close(out, norm.norm(x), rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(norm(x), out, rtol=0, atol=0)  # forward takes the kernel for fp32
    normed, summed = norm.add_forward(x, residual)
    assert torch.equal(summed, x + residual)  # one rounding, as torch's add
    torch.testing.assert_close(normed, norm.norm(x + residual), rtol=2e-6, atol=1e-6)


def test_add_forward_leaves_its_inputs_alone_and_checks_shapes() -> None:
    norm = RMSNorm(64, eps=1e-6, dtype=torch.float32)
    x, residual = torch.randn(3, 64), torch.randn(3, 64)
    before = (x.clone(), residual.clone())
    norm.add_forward(x, residual)
    assert torch.equal(x, before[0]) and torch.equal(residual, before[1])
    assert kernels is not None
    with pytest.raises(ValueError, match="residual"):
        kernels.fused_add_rms_norm(x, residual[:2], norm.weight, 1e-6, offset=False)


@pytest.mark.parametrize("rows", ROWS)
def test_rotary_equals_the_torch_form_bit_for_bit_on_a_strided_qkv_slice(rows: int, threads: int) -> None:
    torch.manual_seed(rows)
    h, hkv, d = 9, 3, 64
    qkv = torch.randn(rows, (h + 2 * hkv) * d)
    qk = qkv[:, : (h + hkv) * d].view(rows, h + hkv, d)  # rows (h + 2 hkv) d apart, as the model slices it
    angles = torch.rand(rows, 1, d // 2) * 100
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = qk.chunk(2, dim=-1)
    expected = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    assert kernels is not None
    assert torch.equal(kernels.rotary_embedding(qk, cos, sin), expected)
    assert torch.equal(apply_rotary(qk, cos, sin), expected)


def test_a_non_contiguous_head_layout_is_copied_first() -> None:
    x = torch.randn(4, 64, 5).transpose(1, 2)  # [4, 5, 64], heads not 64 apart
    angles = torch.rand(4, 1, 32)
    assert kernels is not None
    out = kernels.rotary_embedding(x, angles.cos(), angles.sin())
    assert torch.equal(out, kernels.rotary_embedding(x.contiguous(), angles.cos(), angles.sin()))


@pytest.mark.parametrize("rows", ROWS)
def test_silu_and_mul_equals_the_torch_form(rows: int, threads: int) -> None:
    gate_up = torch.randn(rows, 2 * 1536) * 4
    gate, up = gate_up.chunk(2, dim=-1)
    assert kernels is not None
    torch.testing.assert_close(kernels.silu_and_mul(gate_up), F.silu(gate) * up, rtol=1e-6, atol=1e-7)


def test_only_fp32_cpu_tensors_in_eager_mode_take_the_kernels() -> None:
    assert layer_kernels.enabled(torch.zeros(2)) is kernels
    assert layer_kernels.enabled(torch.zeros(2, dtype=torch.bfloat16)) is None
    norm = RMSNorm(64, eps=1e-6, dtype=torch.bfloat16)
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    assert torch.equal(norm(x), norm.norm(x))

    @torch.compile(backend="eager", fullgraph=True)  # a graph break (the ctypes call) would raise
    def compiled(t: torch.Tensor) -> bool:
        return layer_kernels.enabled(t) is None

    assert compiled(torch.zeros(2))


def test_the_switch_turns_them_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RYZ_LAYER_KERNELS", "0")
    layer_kernels.load.cache_clear()
    try:
        assert layer_kernels.enabled(torch.zeros(2)) is None
    finally:
        monkeypatch.delenv("RYZ_LAYER_KERNELS")
        layer_kernels.load.cache_clear()
    assert layer_kernels.enabled(torch.zeros(2)) is not None
