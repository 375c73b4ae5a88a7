"""No public function reads a device tensor's values on the host by default (tkpy.validation).

On the CPU the test runs every public function under the policy CUDA gets by default
(TKPY_CHECK_VALUES=0) inside a TorchDispatchMode that fails on ``aten._local_scalar_dense``, what
``.item()``, ``int(t)`` and ``bool(t)`` dispatch to, with ``Tensor.tolist`` and ``Tensor.numpy``
(which read CPU memory without dispatching) refused as well. On a GPU the same calls run with the
default policy under ``torch.cuda.set_sync_debug_mode("error")``, which also catches a sync inside
the C++ bindings.

Not covered, by design: constructors and table builders that run once (LServeCache, HeadPattern,
riflex's frequency tables), and the transformers integration's padding-mask and position_ids
paths, which size the packed batch on the host exactly as transformers' flash_attention_2 does.
"""

import contextlib
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import tkpy
from tkpy import block_sparse, riflex
from tkpy.integrations.transformers import tkpy_attention_forward
from tkpy.lserve import LServeCache, LServeConfig, PageSelector, page_scores, select_pages, sparse_decode
from tkpy.rope import apply_rope_, apply_rope_3d_

from helpers import randn

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
BF16 = torch.bfloat16


class HostReadError(AssertionError):
    pass


# Ops whose result the host must wait for on CUDA: an output shape that depends on the values
# (boolean indexing dispatches to nonzero) or a Python bool.
SYNCING_OPS = {torch.ops.aten.nonzero.default, torch.ops.aten.masked_select.default, torch.ops.aten.equal.default,
               torch.ops.aten._unique2.default, torch.ops.aten.unique_consecutive.default,
               torch.ops.aten.unique_dim.default}
BOOLEAN_INDEXING = {torch.ops.aten.index.Tensor, torch.ops.aten.index_put_.default, torch.ops.aten.index_put.default}


class FailOnHostRead(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            raise HostReadError("a tensor's value was read on the host (.item(), int(), bool() or a Python if)")
        if func in SYNCING_OPS:
            raise HostReadError(f"{func} waits for the device on CUDA (its result's shape or value goes to the host)")
        if func in BOOLEAN_INDEXING and any(
                isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1] if i is not None):
            raise HostReadError(f"{func} with a boolean mask waits for the device on CUDA (the mask's nonzero)")
        if func is torch.ops.aten.repeat_interleave.Tensor and (kwargs or {}).get("output_size") is None:
            raise HostReadError("repeat_interleave without output_size reads the repeats on the host")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def no_host_reads(device, monkeypatch):
    if device == "cuda":
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(previous)
        return
    monkeypatch.setenv("TKPY_CHECK_VALUES", "0")  # the policy CUDA tensors get by default

    def refused(name):
        def read(self, *args, **kwargs):
            raise HostReadError(f"Tensor.{name}() read a tensor's values on the host")
        return read

    monkeypatch.setattr(torch.Tensor, "tolist", refused("tolist"))
    monkeypatch.setattr(torch.Tensor, "numpy", refused("numpy"))
    with FailOnHostRead():
        yield


# Each case builds its inputs (outside the guard) and returns the call to make under it.


def dense_attention(dev, gen):
    q, k, v = (randn((2, 70, h, 64), BF16, gen, dev) for h in (4, 2, 2))
    return lambda: tkpy.flash_attn_func(q, k, v, causal=True, window_size=(32, -1), return_attn_probs=True)


def varlen_attention(dev, gen):
    q, k, v = (randn((90, h, 64), BF16, gen, dev) for h in (4, 2, 2))
    cu = torch.tensor([0, 30, 30, 90], dtype=torch.int32, device=dev)
    return lambda: tkpy.flash_attn_varlen_func(q, k, v, cu, cu, 60, 60, causal=True, return_attn_probs=True)


def ultravico_attention(dev, gen):
    config = tkpy.UltraViCoConfig(tokens_per_frame=6, train_frames=3, beta=0.5, band_period=4, band_width=1,
                                  band_count=2, first_frame_mask=True, text_tokens=5)
    q, k, v = (randn((90, h, 64), BF16, gen, dev) for h in (4, 2, 2))
    cu = torch.tensor([0, 30, 30, 90], dtype=torch.int32, device=dev)

    def call():
        tkpy.ultravico_attn_func(q[None], k[None], v[None], config, return_attn_probs=True)
        tkpy.ultravico_attn_varlen_func(q, k, v, cu, cu, 60, 60, config)

    return call


def sparse_inputs(dev, gen):
    q, k, v = (randn((300, 4, 64), BF16, gen, dev) for _ in range(3))
    cu = torch.tensor([0, 140, 300], dtype=torch.int32, device=dev)
    return q, k, v, cu


def block_sparse_attention(dev, gen):
    q, k, v, cu = sparse_inputs(dev, gen)
    types = torch.tensor([1, 0, -1, 1], dtype=torch.int32, device=dev)
    info = torch.tensor([1, 1] * 4, dtype=torch.int32, device=dev)
    mask = torch.rand((2, 2, 2, 2), generator=gen).lt(0.6).to(dev)
    return lambda: tkpy.block_sparse_attn_func(q, k, v, cu, cu, types, info, mask, 160, 160, 0.0, is_causal=True,
                                               return_attn_probs=True)


def streaming_attention(dev, gen):
    q, k, v, cu = sparse_inputs(dev, gen)
    types = torch.tensor([-1, 0, -1, 0], dtype=torch.int32, device=dev)
    blocks = torch.tensor([1, 1] * 4, dtype=torch.int32, device=dev)
    tokens = torch.tensor([16, 64] * 4, dtype=torch.int32, device=dev)

    def call():
        tkpy.block_streaming_attn_func(q, k, v, cu, cu, types, blocks, 160, 160, 0.0)
        tkpy.token_streaming_attn_func(q, k, v, cu, cu, types, tokens, 160, 160, return_attn_probs=True)

    return call


def kvcache_decode(dev, gen):
    q = randn((2, 1, 4, 64), BF16, gen, dev)
    k_cache, v_cache = (randn((8, 16, 2, 64), BF16, gen, dev) for _ in range(2))
    k, v = (randn((2, 1, 2, 64), BF16, gen, dev) for _ in range(2))
    block_table = torch.randperm(8, generator=gen)[:6].view(2, 3).int().to(dev)
    seqlens = torch.tensor([20, 33], dtype=torch.int32, device=dev)
    angles = torch.rand((64, 16), generator=gen) * math.pi
    cos, sin = angles.cos().to(dev), angles.sin().to(dev)
    return lambda: tkpy.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cos, sin, cache_seqlens=seqlens,
                                                block_table=block_table, causal=True, return_softmax_lse=True)


def lserve_step(dev, gen):
    config = LServeConfig(sink=64, local=128, token_budget=128)
    cache = LServeCache(8, 2, [False, True], 64, BF16, config, device=dev)
    block_table = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32, device=dev)
    slots = torch.tensor([1, 0], dtype=torch.int32, device=dev)
    prompt = [randn((2, 100, 2, 64), BF16, gen, dev) for _ in range(2)]
    cache.append(*prompt, block_table, cache.ring_table(slots), torch.zeros(2, dtype=torch.int32, device=dev))
    k, v = (randn((2, 1, 2, 64), BF16, gen, dev) for _ in range(2))
    q = randn((2, 1, 4, 64), BF16, gen, dev)
    before = torch.tensor([100, 100], dtype=torch.int32, device=dev)
    selector = PageSelector(token_budget=128, reuse_interval=2)

    def call():
        ring_table = cache.ring_table(slots)
        cache.append(k, v, block_table, ring_table, before)
        lens = before + 1
        page_scores(q, cache.stats, block_table, lens)
        selection = select_pages(q, cache.stats, block_table, lens, 128)
        sparse_decode(q, cache, block_table, ring_table, lens, selection, return_softmax_lse=True)
        sparse_decode(q, cache, block_table, ring_table, lens, selector(0, q, cache.stats, block_table, lens))

    return call


def rope(dev, gen):
    q = randn((2, 12, 4, 64), BF16, gen, dev)
    k = randn((2, 12, 2, 64), BF16, gen, dev)
    angles = torch.rand((32, 32), generator=gen) * math.pi
    cos, sin = angles.cos().to(dev), angles.sin().to(dev)
    positions = torch.randint(0, 32, (2, 12), generator=gen).to(dev)
    grid = (2, 3, 4)
    freqs = [f.to(dev) for f in riflex.rope_3d_freqs(riflex.axis_split("wan", 128), grid, L_test=2)]
    x = randn((1, 24, 2, 128), BF16, gen, dev)

    def call():
        apply_rope_(q, k, cos, sin, positions)
        apply_rope_3d_(x, None, grid, *freqs)

    return call


def matmul(dev, gen):
    a, b = randn((32, 48), BF16, gen, dev), randn((48, 16), BF16, gen, dev)
    return lambda: tkpy.gemm(a, b)


def block_sparse_plan(dev, gen):
    types = torch.tensor([1, 0, 1], dtype=torch.int32, device=dev)
    mask = torch.rand((2, 2, 3, 3), generator=gen).lt(0.5).to(dev)
    lse = torch.randn((3, 50), generator=gen).to(dev)
    cu = torch.tensor([0, 20, 50], dtype=torch.int32, device=dev)

    def call():
        block_sparse.plan(types, mask)
        block_sparse.lse_per_sequence(lse, cu, 30)

    return call


def transformers_layer(dev, gen):
    module = torch.nn.Module()
    query, key, value = (randn((1, h, 40, 64), BF16, gen, dev) for h in (4, 2, 2))
    cu = torch.tensor([0, 15, 40], dtype=torch.int32, device=dev)

    def call():
        tkpy_attention_forward(module, query, key, value, None)
        tkpy_attention_forward(module, query, key, value, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=25,
                               max_length_k=25)

    return call


CASES = [dense_attention, varlen_attention, ultravico_attention, block_sparse_attention, streaming_attention, kvcache_decode, lserve_step,
         rope, matmul, block_sparse_plan, transformers_layer]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_public_functions_never_read_device_values(case, device, rng, monkeypatch):
    call = case(device, rng)
    with no_host_reads(device, monkeypatch):
        call()


def test_the_guard_catches_a_host_read(monkeypatch):
    """The guard itself: each way of reading a value is caught."""
    t = torch.arange(4)
    for read in (lambda: t.tolist(), lambda: int(t[1]), lambda: bool(t[0] > 1), lambda: t.max().item(),
                 lambda: t[t > 1], lambda: torch.equal(t, t), lambda: torch.repeat_interleave(t)):
        with pytest.raises(HostReadError), no_host_reads("cpu", monkeypatch):
            read()


def test_value_checks_follow_the_policy(monkeypatch):
    """Python's value checks read CPU tensors unless TKPY_CHECK_VALUES=0 (CUDA's default); the
    bindings always check CPU values, whose reads cost no sync."""
    cache = LServeCache(2, 2, [False, True], 64, BF16, LServeConfig(sink=64, local=64))
    slots = torch.tensor([2], dtype=torch.int32)
    monkeypatch.delenv("TKPY_CHECK_VALUES", raising=False)
    with pytest.raises(tkpy.ArgumentError, match=r"slots must be in \[0, 2\)"):
        cache.ring_table(slots)
    monkeypatch.setenv("TKPY_CHECK_VALUES", "0")
    assert cache.ring_table(slots)[0, 0] == 2 * cache.ring_pages  # not read: the decode kernel bounds it
    gen = torch.Generator().manual_seed(0)
    q, k, v = (randn((40, 2, 64), BF16, gen) for _ in range(3))
    bad = torch.tensor([0, 30, 25, 40], dtype=torch.int32)  # decreasing: a negative length
    with pytest.raises(tkpy.ArgumentError, match="cu_seqlens_q entry 1 gives a sequence of -5 tokens"):
        tkpy.flash_attn_varlen_func(q, k, v, bad, bad, 30, 30)


@pytest.mark.gpu
def test_cuda_values_are_checked_on_request_and_guarded_otherwise(monkeypatch):
    """TKPY_CHECK_VALUES=1 reads CUDA index tensors on the host and refuses bad values, as on the
    CPU. By default they are not read: the kernel clamps the bad sequence into the packed tensor
    and the intact sequences come out as with correct cu_seqlens."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (randn((40, 2, 64), BF16, gen, "cuda") for _ in range(3))
    bad = torch.tensor([0, 30, 25, 40], dtype=torch.int32, device="cuda")
    monkeypatch.setenv("TKPY_CHECK_VALUES", "1")
    with pytest.raises(tkpy.ArgumentError, match="cu_seqlens_q entry 1 gives a sequence of -5 tokens"):
        tkpy.flash_attn_varlen_func(q, k, v, bad, bad, 30, 30)
    monkeypatch.delenv("TKPY_CHECK_VALUES")
    out = tkpy.flash_attn_varlen_func(q, k, v, bad, bad, 30, 30)
    # Sequence 0 is intact; sequence 1 is empty once clamped; sequence 2 becomes tokens 25..40.
    good = torch.tensor([0, 30, 30, 40], dtype=torch.int32, device="cuda")
    expected = tkpy.flash_attn_varlen_func(q, k, v, good, good, 30, 30)
    torch.cuda.synchronize()
    assert torch.equal(out[:25], expected[:25])
    assert out.isfinite().all()
