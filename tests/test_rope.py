"""apply_rope_ and apply_rope_3d_ against python/tkpy/reference.py (float64), on CPU and GPU."""

import pytest
import torch

import tkpy
from tkpy import reference, riflex
from tkpy.rope import apply_rope_, apply_rope_3d_

from helpers import REL_TOL, randn, rel_err

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def padded(shape, dtype, gen, device, pad):
    """A random [..., D] tensor living inside a NaN-filled [..., D + pad] buffer.

    pad=0 gives a contiguous tensor; pad=8 keeps 16-byte alignment; pad=1 forces the element-wise
    path. Returns (view, buffer) so the test can check that nothing outside the view was written.
    """
    buf = torch.full((*shape[:-1], shape[-1] + pad), float("nan"), dtype=dtype, device=device)
    view = buf[..., : shape[-1]]
    view.copy_(randn(shape, dtype, gen, device))
    return view, buf


def assert_padding_untouched(buf, width):
    assert torch.isnan(buf[..., width:]).all(), "the op wrote outside q/k"


def check_close(out, ref, dtype):
    err = rel_err(out, ref)
    assert err < REL_TOL[dtype], f"relative error {err:.3g} >= {REL_TOL[dtype]:.1g}"


# (batch, seqlen, q heads, k heads, head_dim, rotary_dim); batch None means q is [T, H, D].
SHAPES = [
    (2, 17, 4, 2, 64, 64),
    (1, 33, 8, 1, 128, 128),
    (3, 5, 2, 2, 96, 24),  # partial rotary whose half (12) is not a whole 16-byte vector
    (1, 1, 1, 1, 256, 128),
    (None, 23, 3, 3, 64, 32),
]


def shape_of(batch, seqlen, heads, dim):
    return (seqlen, heads, dim) if batch is None else (batch, seqlen, heads, dim)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_rope_matches_reference(device, dtype, interleaved, shape, rng):
    batch, seqlen, hq, hk, dim, rotary = shape
    q = randn(shape_of(batch, seqlen, hq, dim), dtype, rng, device)
    k = randn(shape_of(batch, seqlen, hk, dim), dtype, rng, device)
    angles = randn((seqlen + 5, rotary // 2), torch.float32, rng) * 3
    cos, sin = angles.cos().to(device), angles.sin().to(device)
    q_ref = reference.rope(q.cpu(), cos.cpu(), sin.cpu(), interleaved=interleaved)
    k_ref = reference.rope(k.cpu(), cos.cpu(), sin.cpu(), interleaved=interleaved)
    q_in, k_in = q.clone(), k.clone()

    apply_rope_(q, k, cos, sin, interleaved=interleaved)

    check_close(q.cpu(), q_ref, dtype)
    check_close(k.cpu(), k_ref, dtype)
    assert torch.equal(q[..., rotary:], q_in[..., rotary:]), "dims past rotary_dim changed"
    assert torch.equal(k[..., rotary:], k_in[..., rotary:])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("positions_kind", ["none", "shared_int64", "per_batch_int32"])
@pytest.mark.parametrize("table_dtype", ["fp32", "same"])
@pytest.mark.parametrize("pad", [0, 8, 1])
def test_rope_positions_tables_and_layouts(device, positions_kind, table_dtype, pad, rng):
    dtype = torch.bfloat16
    batch, seqlen, hq, hk, dim = 3, 19, 4, 2, 128
    rows = 64
    q, q_buf = padded((batch, seqlen, hq, dim), dtype, rng, device, pad)
    k, k_buf = padded((batch, seqlen, hk, dim), dtype, rng, device, pad)
    angles = randn((rows, dim // 2), torch.float32, rng) * 4
    cos, sin = angles.cos(), angles.sin()
    if table_dtype == "same":
        cos, sin = cos.to(dtype), sin.to(dtype)
    positions = {
        "none": None,
        "shared_int64": torch.randperm(rows, generator=rng)[:seqlen],
        "per_batch_int32": torch.randint(0, rows, (batch, seqlen), generator=rng, dtype=torch.int32),
    }[positions_kind]
    q_ref = reference.rope(q.cpu(), cos, sin, positions)
    k_ref = reference.rope(k.cpu(), cos, sin, positions)

    apply_rope_(q, k, cos.to(device), sin.to(device), None if positions is None else positions.to(device))

    check_close(q.cpu(), q_ref, dtype)
    check_close(k.cpu(), k_ref, dtype)
    if pad:
        assert_padding_untouched(q_buf, dim)
        assert_padding_untouched(k_buf, dim)


@pytest.mark.parametrize("device", DEVICES)
def test_rope_without_k_and_fused_qkv_views(device, rng):
    """q and k as column slices of one fused qkv projection, and k=None."""
    dtype = torch.float16
    batch, seqlen, heads, dim = 2, 9, 4, 64
    qkv = randn((batch, seqlen, 3 * heads, dim), dtype, rng, device)
    q, k, v = qkv[:, :, :heads], qkv[:, :, heads : 2 * heads], qkv[:, :, 2 * heads :]
    v_before = v.clone()
    angles = randn((seqlen, dim // 2), torch.float32, rng)
    cos, sin = angles.cos().to(device), angles.sin().to(device)
    q_ref, k_ref = reference.rope(q.cpu(), cos.cpu(), sin.cpu()), reference.rope(k.cpu(), cos.cpu(), sin.cpu())

    apply_rope_(q, k, cos, sin)
    check_close(q.cpu(), q_ref, dtype)
    check_close(k.cpu(), k_ref, dtype)
    assert torch.equal(v, v_before)

    q_only = randn((batch, seqlen, heads, dim), dtype, rng, device)
    ref = reference.rope(q_only.cpu(), cos.cpu(), sin.cpu())
    apply_rope_(q_only, None, cos, sin)
    check_close(q_only.cpu(), ref, dtype)


# (model, head_dim, grid) with odd grid sizes.
GRIDS_3D = [
    ("cogvideox", 64, (3, 5, 7)),
    ("hunyuanvideo", 128, (2, 3, 5)),
    ("wan", 128, (5, 1, 3)),
    ("wan", 96, (1, 1, 1)),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("model,head_dim,grid", GRIDS_3D)
@pytest.mark.parametrize("riflex_mode", ["off", "fine_tuned"])
def test_rope_3d_matches_materialised_table(device, dtype, model, head_dim, grid, riflex_mode, rng):
    split = riflex.axis_split(model, head_dim)
    freqs = riflex.rope_3d_freqs(split, grid, mode=riflex_mode)
    batch, heads = 2, 3
    seqlen = grid[0] * grid[1] * grid[2]
    q, q_buf = padded((batch, seqlen, heads, head_dim), dtype, rng, device, 8)
    k = randn((batch, seqlen, 1, head_dim), dtype, rng, device)
    q_ref = reference.rope_3d(q.cpu(), grid, *freqs)
    k_ref = reference.rope_3d(k.cpu(), grid, *freqs)

    apply_rope_3d_(q, k, grid, *(f.to(device) for f in freqs))

    check_close(q.cpu(), q_ref, dtype)
    check_close(k.cpu(), k_ref, dtype)
    assert_padding_untouched(q_buf, head_dim)


@pytest.mark.parametrize("device", DEVICES)
def test_rope_3d_real_tables_and_longer_tables(device, rng):
    """Float32 (cos, sin) tables with more rows than the grid needs give the complex result."""
    split = riflex.axis_split("cogvideox", 64)
    grid = (2, 3, 4)
    freqs = riflex.rope_3d_freqs(split, (5, 6, 7))  # longer than grid on every axis
    q = randn((1, 24, 2, 64), torch.float32, rng, device)
    ref = reference.rope_3d(q.cpu(), grid, *freqs)
    real = [torch.view_as_real(f).contiguous().to(device) for f in freqs]
    apply_rope_3d_(q, None, grid, *real)
    check_close(q.cpu(), ref, torch.float32)


@pytest.mark.gpu
@pytest.mark.sanitizer
def test_rope_cuda_small_for_sanitizer(rng):
    q = randn((1, 7, 2, 64), torch.bfloat16, rng, "cuda")
    k = randn((1, 7, 1, 64), torch.bfloat16, rng, "cuda")
    angles = randn((7, 32), torch.float32, rng)
    q_ref = reference.rope(q.cpu(), angles.cos(), angles.sin())
    apply_rope_(q, k, angles.cos().cuda(), angles.sin().cuda())
    check_close(q.cpu(), q_ref, torch.bfloat16)
    split = riflex.axis_split("wan", 128)
    freqs = [f.cuda() for f in riflex.rope_3d_freqs(split, (3, 2, 3))]
    x = randn((1, 18, 1, 128), torch.bfloat16, rng, "cuda")
    x_ref = reference.rope_3d(x.cpu(), (3, 2, 3), *[f.cpu() for f in freqs])
    apply_rope_3d_(x, None, (3, 2, 3), *freqs)
    check_close(x.cpu(), x_ref, torch.bfloat16)


@pytest.mark.gpu
def test_rope_cuda_out_of_range_position_poisons_not_crashes(rng):
    q = randn((1, 4, 2, 64), torch.bfloat16, rng, "cuda")
    angles = randn((8, 32), torch.float32, rng)
    positions = torch.tensor([0, 1, 99, 2], device="cuda")
    apply_rope_(q, None, angles.cos().cuda(), angles.sin().cuda(), positions)
    torch.cuda.synchronize()
    assert torch.isnan(q[0, 2]).all()
    assert not torch.isnan(q[0, [0, 1, 3]]).any()


@pytest.mark.gpu
def test_rope_cuda_deterministic_and_graph_capturable(rng):
    q0 = randn((2, 300, 8, 128), torch.bfloat16, rng, "cuda")
    angles = randn((300, 64), torch.float32, rng)
    cos, sin = angles.cos().cuda(), angles.sin().cuda()
    runs = []
    for _ in range(2):
        q = q0.clone()
        apply_rope_(q, None, cos, sin)
        runs.append(q)
    assert torch.equal(runs[0], runs[1])

    q = q0.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        apply_rope_(q, None, cos, sin)
    q.copy_(q0)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(q, runs[0])


def test_build_reports_cuda_consistently():
    """A build with CUDA kernels registers a CUDA kernel for every op, and one without has none."""
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    for op in ("tkpy::apply_rope_", "tkpy::apply_rope_3d_", "tkpy::gemm", "tkpy::attention_forward",
               "tkpy::block_sparse_attention_forward", "tkpy::ultravico_attention_forward", "tkpy::decode_attention",
               "tkpy::kv_append_"):
        assert has(op, "CPU")
        assert has(op, "CUDA") == tkpy.cuda_compiled()
