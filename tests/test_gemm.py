"""tkpy.gemm against python/tkpy/reference.py (float64) on CPU and GPU, and its input checks."""

import pytest
import torch

import tkpy
from tkpy import reference

from helpers import REL_TOL, assert_bad_calls_survive, poison_cuda_allocator, randn, rel_err

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def operands(m, n, k, dtype, trans_b, gen, device):
    a = randn((m, k), dtype, gen, device)
    b = randn((n, k) if trans_b else (k, n), dtype, gen, device)
    return a, b


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("m,n,k", [(8, 8, 8), (128, 256, 64), (136, 264, 72), (200, 8, 520), (64, 512, 192)])
def test_gemm_matches_reference(device, dtype, trans_b, m, n, k, rng):
    a, b = operands(m, n, k, dtype, trans_b, rng, device)
    if device == "cuda":
        poison_cuda_allocator()
    out = tkpy.gemm(a, b, trans_b=trans_b)
    assert out.shape == (m, n) and out.dtype == dtype and out.device == a.device
    err = rel_err(out.cpu(), reference.matmul(a.cpu(), b.cpu(), trans_b))
    assert err < REL_TOL[dtype], f"relative error {err:.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("m,n,k", [(1000, 1032, 520), (2048, 2048, 2048), (4104, 4104, 264)])
def test_gemm_cuda_large_and_tails(trans_b, m, n, k, rng):
    a, b = operands(m, n, k, torch.bfloat16, trans_b, rng, "cuda")
    poison_cuda_allocator()
    out = tkpy.gemm(a, b, trans_b=trans_b)
    expected = (a.double() @ (b.double().T if trans_b else b.double())).cpu()
    err = rel_err(out.cpu(), expected)
    assert err < REL_TOL[torch.bfloat16], f"relative error {err:.3g}"


@pytest.mark.gpu
@pytest.mark.sanitizer
def test_gemm_cuda_small_for_sanitizer(rng):
    a, b = operands(136, 264, 72, torch.bfloat16, False, rng, "cuda")
    out = tkpy.gemm(a, b)
    assert rel_err(out.cpu(), reference.matmul(a.cpu(), b.cpu())) < REL_TOL[torch.bfloat16]


@pytest.mark.gpu
def test_gemm_cuda_deterministic_and_graph_capturable(rng):
    a, b = operands(512, 768, 320, torch.bfloat16, True, rng, "cuda")
    first = tkpy.gemm(a, b, trans_b=True)
    assert torch.equal(first, tkpy.gemm(a, b, trans_b=True))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = tkpy.gemm(a, b, trans_b=True)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, first)


@pytest.mark.parametrize("device", DEVICES)
def test_gemm_empty_k_gives_zeros(device):
    a = torch.empty(16, 0, dtype=torch.bfloat16, device=device)
    b = torch.empty(0, 24, dtype=torch.bfloat16, device=device)
    out = tkpy.gemm(a, b)
    assert out.shape == (16, 24) and not out.float().abs().any()


BAD_CALLS = [
    ("tkpy.gemm(a.float(), b.float())", "bfloat16 or float16, got Float"),
    ("tkpy.gemm(a, b.half())", "of one dtype"),
    ("tkpy.gemm(a, b[:, :12])", "multiples of 8"),
    ("tkpy.gemm(a[:, :16], b)", "K differ"),
    ("tkpy.gemm(a, b, trans_b=True)", "K differ"),
    ("tkpy.gemm(a[0], b)", "2-D"),
    ("tkpy.gemm(a.t(), b[:16])", "contiguous last dim"),
    ("tkpy.gemm(torch.empty(8, 1000, dtype=torch.bfloat16)[:, 4:36], b)", "16-byte aligned start"),
    ("tkpy.gemm(a, b.to('meta'))", "device"),
]


@pytest.mark.parametrize("code,message", BAD_CALLS, ids=[c for c, _ in BAD_CALLS])
def test_gemm_bad_input_raises_clear_error(code, message):
    a = torch.randn(24, 32).bfloat16()
    b = torch.randn(32, 40).bfloat16()
    with pytest.raises(tkpy.ArgumentError, match=message):
        eval(code, {"tkpy": tkpy, "torch": torch, "a": a, "b": b})


def test_gemm_bad_input_never_crashes_the_process():
    setup = "import torch, tkpy\na = torch.randn(24, 32).bfloat16(); b = torch.randn(32, 40).bfloat16()"
    assert_bad_calls_survive(setup, [code for code, _ in BAD_CALLS])
