"""Greedy decoding's bf16 screen of the LM head (gpu_workers/model/greedy_head.py): its tokens are the
fp32 head's argmax, near-ties and exact ties included, on every build of the kernel; where it cannot
tell, it says so; the engine takes it for greedy steps only, with the same tokens."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest
import torch

from gpu_workers.engine import EngineRequest
from gpu_workers.model import greedy_head, panel_matmul
from gpu_workers.model.c_build import build_library
from gpu_workers.sampling_params import SamplingParams
from tests.gpu_workers.reference import save_hf_model
from tests.gpu_workers.test_llm_engine import engine_for, generate, greedy_requests, prompts_of

kernels = panel_matmul.load()
pytestmark = pytest.mark.skipif(kernels is None, reason="no C compiler (or RYZ_CPU_MATMUL=onednn): no panel kernel")


def _build(*flags: str) -> panel_matmul.PanelKernels | None:
    try:
        lib = ctypes.CDLL(str(build_library(panel_matmul.SOURCE, (*panel_matmul.FLAGS, *flags),
                                            stem="panel-screen-test", depends=panel_matmul.DEPENDS)))
    except OSError:
        return None
    return panel_matmul.PanelKernels(lib)


def _builds() -> list[panel_matmul.PanelKernels]:
    """This machine's build, and those without AVX512-BF16 and without AVX-512 where they differ."""
    assert kernels is not None
    found = [kernels]
    for flags in (("-mno-avx512bf16",), ("-mno-avx512f",)):
        other = _build(*flags)
        if other is not None:
            found.append(other)
    return found


def _head(vocab: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """A head with near-equal rows (a row and a copy nudged by one ulp or two), exact duplicates (ties) and
    rows of every scale."""
    w = torch.randn(vocab, k, generator=gen) * torch.logspace(-2, 0.5, vocab)[torch.randperm(vocab, generator=gen), None]
    w[7] = w[3]  # an exact tie: the lowest id wins
    w[11] = torch.nextafter(w[5], torch.full_like(w[5], 10.0))  # a near-tie, below bf16's resolution
    w[vocab - 1] = w[5] * (1 + 2**-20)
    return w


@pytest.mark.parametrize("build", range(3))
def test_the_tokens_are_the_fp32_heads_argmax(build: int) -> None:
    builds = _builds()
    if build >= len(builds):
        pytest.skip("that build is this machine's own here")
    k_ = builds[build]
    gen = torch.Generator().manual_seed(build)
    vocab, k = 1000, 96
    weight = _head(vocab, k, gen)
    packed = k_.pack(weight)
    head = greedy_head.GreedyHead(weight, packed, k_)
    told = 0
    for trial in range(60):
        m = 1 + trial % greedy_head.MAX_ROWS
        x = torch.randn(m, k, generator=gen) * (10.0 ** (trial % 5 - 2))
        for row, target in enumerate((3, 5, 11)[: m]):  # rows aimed at the ties: their logits lead
            x[row] = weight[target] * 50 + torch.randn(k, generator=gen) * 1e-3
        got = head.tokens(x)
        want = k_.matmul(x, packed, vocab).argmax(dim=1)
        if got is not None:
            told += 1
            assert torch.equal(got, want), (trial, got, want)
    assert told >= 50  # it tells nearly always (a row with more than MAX_CANDIDATES candidates: the full head)


@pytest.mark.parametrize("build", range(3))
def test_a_row_that_bf16_rounding_demotes_still_wins(build: int) -> None:
    """Row 11's fp32 logit beats row 5's, but in bf16 row 11 rounds down where row 5 rounds up: the
    screen ranks 5 first, and only the bound keeps 11 a candidate."""
    builds = _builds()
    if build >= len(builds):
        pytest.skip("that build is this machine's own here")
    k_ = builds[build]
    k, ulp = 64, 2.0**-7  # bf16's spacing at 1.0
    weight = torch.randn(300, k, generator=torch.Generator().manual_seed(5)) * 0.01
    weight[5] = weight[11] = 1.0
    weight[11, : k // 2] += 0.49 * ulp  # rounds down to 1.0 in bf16
    weight[5, k // 2 :] += 0.51 * ulp  # rounds up to 1.0 + ulp
    x = torch.cat([torch.full((k // 2,), 1.125), torch.ones(k // 2)])[None]  # bf16 values: not rounded
    packed = k_.pack(weight)
    full = k_.matmul(x, packed, 300)
    screen = greedy_head.ScreenKernels(k_)
    screened = screen.bf16_screen(x, screen.panels(packed), 300)
    assert full[0].argmax() == 11 and screened[0].argmax() == 5  # the trap is set
    got = greedy_head.GreedyHead(weight, packed, k_).tokens(x)
    assert got is not None and got.tolist() == [11]


@pytest.mark.parametrize("build", range(3))
def test_weights_too_small_for_bf16_still_count(build: int) -> None:
    """A weight that is a denormal in bf16 is read as zero by vdpbf16ps: the bound counts that loss
    (row 0's fp32 logit 2^-30 leads row 1's 2^-31, and the screen sees row 0 at zero)."""
    builds = _builds()
    if build >= len(builds):
        pytest.skip("that build is this machine's own here")
    k_ = builds[build]
    weight = torch.zeros(2, 2)
    weight[0, 1], weight[1, 0] = 2.0**-130, 2.0**-126
    x = torch.tensor([[2.0**95, 2.0**100]])
    packed = k_.pack(weight)
    assert k_.matmul(x, packed, 2)[0].tolist() == [2.0**-30, 2.0**-31]
    got = greedy_head.GreedyHead(weight, packed, k_).tokens(x)
    assert got is not None and got.tolist() == [0]


def test_the_units_computed_alone_have_the_bits_of_the_whole_matmul() -> None:
    assert kernels is not None
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(333, 80, generator=gen)
    packed = kernels.pack(weight)
    for m in (1, 3, 8, 9):
        x = torch.randn(m, 80, generator=gen)
        full = kernels.matmul(x, packed, 333)
        units = torch.tensor([0, 4, (333 - 1) // kernels.unit_outputs], dtype=torch.int64)
        out = torch.full((m, 333), float("nan"))
        kernels.matmul_units(x, packed, 333, units, out)
        for u in units.tolist():
            cols = slice(u * kernels.unit_outputs, min(333, (u + 1) * kernels.unit_outputs))
            assert torch.equal(out[:, cols], full[:, cols]), (m, u)
        assert torch.isnan(out[:, kernels.unit_outputs : 2 * kernels.unit_outputs]).all()  # the others left alone


def test_where_it_cannot_tell_it_says_so() -> None:
    assert kernels is not None
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(500, 64, generator=gen)
    head = greedy_head.GreedyHead(weight, kernels.pack(weight), kernels)
    x = torch.randn(1, 64, generator=gen)
    assert head.tokens(x) is not None
    assert head.tokens(torch.full((1, 64), float("nan"))) is None
    assert head.tokens(x.expand(greedy_head.MAX_ROWS + 1, 64).contiguous()) is None  # a large batch: the full head
    flat = torch.ones(500, 64)  # every logit equal: every id a candidate
    assert greedy_head.GreedyHead(flat, kernels.pack(flat), kernels).tokens(x) is None
    inf = weight.clone()
    inf[3, 3] = float("inf")
    with pytest.raises(ValueError, match="finite"):
        greedy_head.GreedyHead(inf, kernels.pack(inf), kernels)
    odd = torch.randn(40, 63, generator=gen)
    with pytest.raises(ValueError, match="pairs"):
        greedy_head.GreedyHead(odd, kernels.pack(odd), kernels)
    assert greedy_head.build(odd, kernels.pack(odd)) is None  # the full head serves it


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_hf_model(tmp_path_factory.mktemp("llama-greedy"), family="llama")


def test_the_engine_screens_greedy_steps_only_and_keeps_their_tokens(llama_dir: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = greedy_head.GreedyHead.tokens

    def counted(self: greedy_head.GreedyHead, x: torch.Tensor) -> torch.Tensor | None:
        calls.append(x.shape[0])
        return real(self, x)

    monkeypatch.setattr(greedy_head.GreedyHead, "tokens", counted)
    prompts = prompts_of([5, 17, 9])
    screened = generate(engine_for(llama_dir), greedy_requests(prompts))
    assert calls  # the screen ran
    monkeypatch.setenv("RYZ_GREEDY_SCREEN", "0")
    calls.clear()
    full = generate(engine_for(llama_dir), greedy_requests(prompts))
    assert not calls and screened == full
    monkeypatch.delenv("RYZ_GREEDY_SCREEN")
    engine = engine_for(llama_dir)
    sampled = SamplingParams(max_tokens=6, temperature=0.8, seed=1)
    with_logprobs = SamplingParams(max_tokens=6, temperature=0.0, logprobs=True, top_logprobs=2)
    out = generate(engine, [EngineRequest("s", prompts[0], sampled), EngineRequest("l", prompts[1], with_logprobs)])
    assert not calls and all(len(tokens) == 6 for tokens in out.values())  # a full-logits step
