"""The panel matmul kernel (gpu_workers/model/panel_matmul.c): F.linear's results, batch invariance,
both tilings, and the CPU linears' choice between it and oneDNN."""

from __future__ import annotations

import ctypes

import pytest
import torch
import torch.nn.functional as F

from gpu_workers.model import cpu_matmul, layers, panel_matmul
from gpu_workers.model.c_build import build_library

kernels = panel_matmul.load()
pytestmark = pytest.mark.skipif(kernels is None, reason="no C compiler (or RYZ_CPU_MATMUL=onednn): no panel kernel")
# N not a multiple of 16 (a padded last panel, an odd panel out of a pair), K odd, M across the tiles
SHAPES = [(37, 19), (16, 1), (48, 576), (576, 96)]
ROWS = [1, 2, 5, 6, 7, 8, 9, 17, 64]


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x.double(), weight.double(), None if bias is None else bias.double()).float()


@pytest.mark.parametrize(("n", "k"), SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_equals_f_linear_up_to_rounding(n: int, k: int, bias: bool) -> None:
    assert kernels is not None
    gen = torch.Generator().manual_seed(n * k)
    weight, b = torch.randn(n, k, generator=gen), torch.randn(n, generator=gen) if bias else None
    packed = kernels.pack(weight)
    assert packed.shape == ((n + 15) // 16, k, 16)
    for m in ROWS:
        x = torch.randn(m, k, generator=gen)
        got = kernels.matmul(x, packed, n, b)
        torch.testing.assert_close(got, reference(x, weight, b), rtol=1e-5, atol=1e-5 * k ** 0.5)
    # rows of a wider tensor (a slice of a fused projection's output) and a leading batch dim
    wide = torch.randn(3, 5, k + 7, generator=gen)[..., 7:]
    torch.testing.assert_close(kernels.matmul(wide, packed, n, b), reference(wide, weight, b),
                               rtol=1e-5, atol=1e-5 * k ** 0.5)


@pytest.mark.parametrize("threads", [1, 2])
def test_a_row_s_result_does_not_depend_on_the_rows_beside_it(threads: int) -> None:
    """Every output is one in-order sum: the same bits alone, in any batch, at any thread count."""
    assert kernels is not None
    gen = torch.Generator().manual_seed(3)
    weight, bias = torch.randn(200, 300, generator=gen), torch.randn(200, generator=gen)
    packed = kernels.pack(weight)
    x = torch.randn(23, 300, generator=gen)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = torch.cat([kernels.matmul(x[i:i + 1], packed, 200, bias) for i in range(23)])
        torch.set_num_threads(threads)
        for m in (2, 7, 8, 9, 23):
            assert torch.equal(kernels.matmul(x[:m], packed, 200, bias), alone[:m]), m
        assert torch.equal(kernels.matmul(x[5:16], packed, 200, bias), alone[5:16])
    finally:
        torch.set_num_threads(before)


def test_the_avx2_tiling_gives_the_same_bits() -> None:
    """Built without AVX-512 the kernel tiles 6 rows by one panel (8 by two with it): the sums, and
    so the results, are the same."""
    try:
        lib = ctypes.CDLL(str(build_library(panel_matmul.SOURCE, (*panel_matmul.FLAGS, "-mno-avx512f"),
                                            stem="panel-avx2-test", depends=panel_matmul.DEPENDS)))
    except OSError as e:
        pytest.skip(f"cannot build without AVX-512 here: {e}")
    avx2 = panel_matmul.PanelKernels(lib)
    assert kernels is not None
    gen = torch.Generator().manual_seed(4)
    weight, bias = torch.randn(70, 129, generator=gen), torch.randn(70, generator=gen)
    packed = kernels.pack(weight)
    assert torch.equal(avx2.pack(weight), packed)
    for m in (1, 6, 7, 13, 40):
        x = torch.randn(m, 129, generator=gen)
        assert torch.equal(avx2.matmul(x, packed, 70, bias), kernels.matmul(x, packed, 70, bias)), m


def test_operands_it_would_misread_are_refused() -> None:
    assert kernels is not None
    packed = kernels.pack(torch.randn(20, 8))
    with pytest.raises(ValueError, match="x"):
        kernels.matmul(torch.randn(2, 9), packed, 20)
    with pytest.raises(ValueError, match="outputs"):
        kernels.matmul(torch.randn(2, 8), packed, 40)  # would read a panel past the end
    with pytest.raises(ValueError, match="bias"):
        kernels.matmul(torch.randn(2, 8), packed, 20, torch.randn(19))
    with pytest.raises(ValueError, match="fp32"):
        kernels.matmul(torch.randn(2, 8, dtype=torch.float64), packed, 20)
    with pytest.raises(ValueError, match="fp32"):
        kernels.pack(torch.randn(20, 8).bfloat16())


@pytest.mark.parametrize("backend", ["panel", "onednn"])
def test_a_packed_linear_keeps_its_results_and_counts_its_weights(monkeypatch: pytest.MonkeyPatch,
                                                                   backend: str) -> None:
    if backend == "onednn":
        if not cpu_matmul.onednn_available():
            pytest.skip("this torch has no oneDNN linear")
        monkeypatch.setattr(panel_matmul, "load", lambda: None)  # as with RYZ_CPU_MATMUL=onednn
    gen = torch.Generator().manual_seed(5)
    layer = layers.ColumnParallelLinear(600, 1000, bias=True, tp=layers.TPContext(), dtype=torch.float32)
    for p in layer.parameters():
        p.data.copy_(torch.randn(p.shape, generator=gen))
    x = torch.randn(3, 600, generator=gen)
    expected = reference(x, layer.weight.data, layer.bias.data)
    assert layer.pack()
    assert layer.weight.numel() == 0 and layer.packed is not None
    assert (layer.packed.layout is torch.strided) == (backend == "panel")
    assert layer.packed_weights() == 1000 * 600
    assert layer.packed_bytes() >= 4 * 1000 * 600
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-4)


def test_the_onednn_setting_turns_the_kernel_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RYZ_CPU_MATMUL", "onednn")
    panel_matmul.load.cache_clear()
    try:
        assert panel_matmul.load() is None
    finally:
        monkeypatch.delenv("RYZ_CPU_MATMUL")
        panel_matmul.load.cache_clear()
    assert panel_matmul.load() is not None


def _child_matmul(conn: object, x: torch.Tensor, packed: torch.Tensor) -> None:
    torch.set_num_threads(2)
    assert kernels is not None
    conn.send(kernels.matmul(x, packed, 100).tolist())  # type: ignore[attr-defined]


def test_a_forked_child_starts_its_own_pool_threads() -> None:
    """The pool's threads do not survive fork(): a forked child's matmuls must still finish, with the
    parent's results (the caller claims chunks itself, and work_pool.h resets the pool's lock and
    thread count in the child)."""
    import multiprocessing

    assert kernels is not None
    gen = torch.Generator().manual_seed(6)
    packed = kernels.pack(torch.randn(100, 64, generator=gen))
    x = torch.randn(3, 64, generator=gen)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        expected = kernels.matmul(x, packed, 100)  # the parent's pool has started
    finally:
        torch.set_num_threads(before)
    ctx = multiprocessing.get_context("fork")
    here, there = ctx.Pipe()
    child = ctx.Process(target=_child_matmul, args=(there, x, packed))
    child.start()
    try:
        assert here.poll(60), "the child's matmul did not finish"
        assert torch.equal(torch.tensor(here.recv()), expected)
    finally:
        child.join(10)
        if child.is_alive():
            child.kill()


def test_two_calling_threads_at_once_get_their_own_results() -> None:
    """ctypes lets go of the GIL: a second Python thread multiplying while the first holds the pool
    runs its chunks alone instead of mixing its job into the first's. (A race: on a loaded 2-core
    host the two calls seldom overlap, and this passed against the pool without its caller lock too;
    it catches the mix-up only when they do. test_tensor_parallel.py, whose ranks are threads of one
    process, failed 2 runs of 3 without the lock and passes with it.)"""
    import threading

    assert kernels is not None
    gen = torch.Generator().manual_seed(7)
    weights = [torch.randn(300, 1024, generator=gen) for _ in range(2)]
    packed = [kernels.pack(w) for w in weights]
    xs = [torch.randn(16, 1024, generator=gen) for _ in range(2)]
    expected = [kernels.matmul(x, p, 300) for x, p in zip(xs, packed)]
    wrong: list[int] = []

    def work(i: int) -> None:
        for _ in range(300):
            if not torch.equal(kernels.matmul(xs[i], packed[i], 300), expected[i]):  # type: ignore[union-attr]
                wrong.append(i)

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        torch.set_num_threads(before)
    assert not wrong


def test_misaligned_panels_are_refused() -> None:
    """The kernel loads each k's 16 weights as one 64-byte-aligned vector: panels at another offset
    (a contiguous view 4 bytes into a buffer) crashed the process; they are refused."""
    assert kernels is not None
    packed = kernels.pack(torch.randn(100, 300))
    shifted = torch.empty(packed.numel() + 1)[1:].view(packed.shape)
    shifted.copy_(packed)
    assert shifted.is_contiguous() and shifted.data_ptr() % 64
    with pytest.raises(ValueError, match="aligned"):
        kernels.matmul(torch.randn(9, 300), shifted, 100)


def test_zero_inputs_give_the_bias() -> None:
    """K = 0 (an MLP of no intermediate features): each output is its bias, as F.linear's; the row
    block size divided by K and the process died of SIGFPE."""
    assert kernels is not None
    gen = torch.Generator().manual_seed(8)
    t, hidden = 3, 32
    context, stream = torch.randn(t, hidden, generator=gen), torch.randn(t, hidden, generator=gen)
    wo = panel_matmul.panels_linear(kernels.pack(torch.randn(hidden, hidden, generator=gen)), hidden, hidden, None)
    post_w, bd = torch.randn(hidden, generator=gen), torch.randn(hidden)
    wgu = panel_matmul.panels_linear(kernels.pack(torch.empty(0, hidden)), hidden, 0, None)
    wd = panel_matmul.panels_linear(kernels.pack(torch.empty(hidden, 0)), 0, hidden, bd)
    mlp_stream, out = torch.empty(t, hidden), torch.empty(t, hidden)
    kernels.decoder_mlp(context, stream, wo, post_w, 1e-6, False, wgu, wd, mlp_stream, out)
    assert torch.equal(out, bd.expand(t, hidden))


def test_every_header_the_source_includes_keys_the_build() -> None:
    """A library is rebuilt when a file in its cache key changes: panel_matmul.c's headers must all be
    there, or an edit to layer_ops.h leaves the fused path on the old row operations (and off the
    bits of layer_kernels.c, rebuilt with the new ones)."""
    import re

    included = set(re.findall(r'#include "([^"]+)"', panel_matmul.SOURCE.read_text()))
    assert included == {d.name for d in panel_matmul.DEPENDS}
