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


def test_operands_the_kernels_cannot_read_take_the_torch_forms() -> None:
    """The kernels read raw fp32 memory: a bf16 weight, residual or cos/sin (the torch forms promote
    them), a cos/sin broadcast over the tokens, or an input that needs its gradient must never reach
    them as such (before: values ~1e37, reads past the end of the buffers, a silently dropped grad_fn)."""
    norm = RMSNorm(64, eps=1e-6, dtype=torch.bfloat16)
    norm.weight.data.normal_()
    x = torch.randn(3, 64)
    torch.testing.assert_close(norm(x), norm.norm(x), rtol=0, atol=0)
    fp32 = RMSNorm(64, eps=1e-6, dtype=torch.float32)
    residual = torch.randn(3, 64).bfloat16()
    normed, summed = fp32.add_forward(x, residual)
    assert torch.equal(summed, x + residual)
    torch.testing.assert_close(normed, fp32.norm(x + residual), rtol=2e-6, atol=1e-6)

    qk = torch.randn(5, 4, 64)
    angles = torch.rand(5, 1, 32) * 100
    x1, x2 = qk.chunk(2, dim=-1)
    for cos, sin in [(angles.cos().bfloat16(), angles.sin().bfloat16()), (angles[:1].cos(), angles[:1].sin())]:
        expected = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        assert torch.equal(apply_rotary(qk, cos, sin), expected)

    leaf = torch.randn(3, 64, requires_grad=True)
    assert fp32(leaf).grad_fn is not None
    assert fp32.add_forward(leaf, x)[0].grad_fn is not None


def test_shapes_the_torch_forms_refuse_raise_instead_of_reading_past_the_weight() -> None:
    assert kernels is not None
    with pytest.raises(ValueError, match="weight"):
        kernels.rms_norm(torch.randn(3, 64), torch.ones(32), 1e-6, offset=False)
    with pytest.raises(ValueError, match="weight"):
        kernels.fused_add_rms_norm(torch.randn(3, 64), torch.randn(3, 64), torch.ones(32), 1e-6, offset=False)
    with pytest.raises(ValueError, match="cos"):
        kernels.rotary_embedding(torch.randn(5, 4, 64), torch.ones(5, 1, 16), torch.ones(5, 1, 16))
    assert kernels.rms_norm(torch.empty(3, 0), torch.ones(0), 1e-6, offset=False).shape == (3, 0)


@pytest.mark.parametrize("shape", [(2, 3, 2 * 96), (0, 2 * 96), (4, 2 * 5)])
def test_silu_and_mul_keeps_leading_dims(shape: tuple[int, ...]) -> None:
    """[..., 2 I] -> [..., I], as ``act(gate) * up`` of the chunks (before: a 3-D input came back [2, 1])."""
    gate_up = torch.randn(*shape)
    gate, up = gate_up.chunk(2, dim=-1)
    assert kernels is not None
    got = kernels.silu_and_mul(gate_up)
    assert got.shape == gate.shape
    torch.testing.assert_close(got, F.silu(gate) * up, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("n", [4096, 8192])
def test_rms_norm_of_wide_rows_stays_within_a_few_ulps(n: int) -> None:
    """Llama-8B/70B hidden sizes: within 4e-7 of the float64 norm, as torch's pairwise sums are
    (a plain fp32 running sum of 8192 squares drifted to ~1.3e-6)."""
    torch.manual_seed(n)
    norm = RMSNorm(n, eps=1e-6, dtype=torch.float32)
    norm.weight.data.normal_()
    x = torch.randn(16, n) * 5
    x64 = x.double()
    want = norm.weight.double() * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6)
    for got in (norm(x), norm.add_forward(x, torch.zeros_like(x))[0]):
        assert ((got.double() - want).abs() / want.abs().clamp(min=1e-3)).max() < 4e-7
