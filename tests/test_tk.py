"""The tk tile library: its host index math on the CPU, and one self-test kernel per class of
primitives on the GPU (torch.ops.tkpy_selftest), each against a host reference."""

import pytest
import torch

import tkpy  # noqa: F401  (loads torch.ops.tkpy_selftest)
from tkpy import reference

from helpers import randn

selftest = torch.ops.tkpy_selftest


def swizzled_offset(row, col, rows, elem_bytes, swizzle):
    """HOPPER_NOTES §4, written out: column chunks of `swizzle`-byte rows, then 16-byte units
    XOR-ed by address bits 7.. (128B: bits 6:4 ^= 9:7; 64B: 5:4 ^= 8:7; 32B: 4 ^= 7)."""
    chunk_cols = swizzle // elem_bytes
    linear = (col // chunk_cols) * rows * swizzle + row * swizzle + (col % chunk_cols) * elem_bytes
    unit_bits = {128: 3, 64: 2, 32: 1}[swizzle]
    mask = (1 << unit_bits) - 1
    return linear ^ (((linear >> 7) & mask) << 4)


@pytest.mark.parametrize("swizzle", [32, 64, 128])
@pytest.mark.parametrize("elem_bytes,rows,cols", [(2, 64, 128), (2, 8, 64), (4, 16, 64)])
def test_shared_tile_layout(swizzle, elem_bytes, rows, cols):
    if (cols * elem_bytes) % swizzle:
        pytest.skip("row is not a whole number of swizzle widths")
    offsets = selftest.tk_tile_offsets(rows, cols, elem_bytes, swizzle)
    expected = torch.tensor([[swizzled_offset(r, c, rows, elem_bytes, swizzle) for c in range(cols)] for r in range(rows)])
    assert torch.equal(offsets, expected)
    # A bijection onto the tile's bytes: every element its own, element-aligned slot.
    assert torch.equal(offsets.flatten().sort().values, torch.arange(rows * cols) * elem_bytes)


def test_sw128_bf16_worked_example():
    """HOPPER_NOTES §4: bf16 [rows][64] SW128, element (r, c) at r*128 + (((c>>3)^(r&7))<<4) + (c&7)*2."""
    offsets = selftest.tk_tile_offsets(64, 64, 2, 128)
    for r in (0, 1, 7, 8, 13, 63):
        for c in (0, 7, 8, 33, 63):
            assert offsets[r, c] == r * 128 + (((c >> 3) ^ (r & 7)) << 4) + (c & 7) * 2


@pytest.mark.parametrize("tiles_m,tiles_n,group_m", [(1, 1, 8), (17, 5, 8), (8, 9, 8), (3, 40, 2), (33, 33, 1)])
def test_gemm_tile_order_is_a_banded_bijection(tiles_m, tiles_n, group_m):
    order = selftest.gemm_tile_order(tiles_m, tiles_n, group_m).tolist()
    assert sorted(map(tuple, order)) == [(m, n) for m in range(tiles_m) for n in range(tiles_n)]
    # Tasks fill one band of group_m tile rows completely before the next band starts.
    bands = [m // group_m for m, _ in order]
    assert bands == sorted(bands)


def test_selftest_index_ops_reject_bad_arguments():
    with pytest.raises(RuntimeError, match="swizzle must be 32, 64 or 128"):
        selftest.tk_tile_offsets(8, 64, 2, 16)
    with pytest.raises(RuntimeError, match="positive"):
        selftest.gemm_tile_order(0, 4, 8)


# ---- GPU: each primitive class against the host -------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("swizzle", [32, 64, 128])
@pytest.mark.parametrize("rows,cols,row,col", [(64, 128, 0, 0), (200, 384, 64, 128), (100, 136, 64, 64)])
def test_tma_roundtrip(swizzle, rows, cols, row, col, rng):
    """TMA load -> swizzled tile -> registers (x2) -> swizzled tile -> TMA store and store-add.
    A wrong swizzle formula scrambles the data; the partial tiles check zero-fill and clipping."""
    x = randn((rows, cols), torch.bfloat16, rng, "cuda")
    y = torch.full_like(x, float("nan"))
    z0 = randn((rows, cols), torch.bfloat16, rng, "cuda")
    z = z0.clone()
    selftest.tk_tma_roundtrip(x, y, z, swizzle, row, col)
    window = (slice(row, row + 64), slice(col, col + 128))
    expected_y = torch.full_like(x, float("nan"))
    expected_y[window] = 2 * x[window]
    assert torch.equal(y.isnan(), expected_y.isnan()), "TMA store wrote outside its tile or missed part of it"
    torch.testing.assert_close(y[window], expected_y[window], rtol=0, atol=0)
    expected_z = z0.clone()
    expected_z[window] = (z0[window].float() + 2 * x[window].float()).bfloat16()
    torch.testing.assert_close(z, expected_z, rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
@pytest.mark.sanitizer
@pytest.mark.parametrize("rows,cols", [(32, 64), (17, 30), (1, 2)])
def test_register_ops(rows, cols, rng):
    x = randn((rows, cols), torch.float32, rng, "cuda")
    row_max, row_sum, col_max, col_sum, y, z = selftest.tk_register_ops(x)
    tile = torch.zeros(32, 64, dtype=torch.float64)  # the kernel reads zeros outside x
    tile[:rows, :cols] = x.double().cpu()
    torch.testing.assert_close(row_max.cpu().double(), tile.amax(1), rtol=0, atol=0)
    torch.testing.assert_close(row_sum.cpu().double(), tile.sum(1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(col_max.cpu().double(), tile.amax(0), rtol=0, atol=0)
    torch.testing.assert_close(col_sum.cpu().double(), tile.sum(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y.cpu().double(), torch.exp2(tile - tile.amax(1, keepdim=True))[:rows, :cols], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(z.cpu().double(), (tile + tile.amax(0))[:rows, :cols], rtol=1e-6, atol=1e-6)


VARIANTS = {"ABt": 0, "AB": 1, "AtB": 2, "AtBt": 3, "reg_ABt": 4, "reg_AB": 5}


def wgmma_operands(variant, n, k, dtype, gen):
    a = randn((k, 64) if variant in ("AtB", "AtBt") else (64, k), dtype, gen, "cuda")
    b = randn((n, k) if variant in ("ABt", "AtBt", "reg_ABt") else (k, n), dtype, gen, "cuda")
    a_mk = a.T if variant in ("AtB", "AtBt") else a
    b_kn = b.T if variant in ("ABt", "AtBt", "reg_ABt") else b
    return a, b, reference.matmul(a_mk.cpu(), b_kn.cpu())


@pytest.mark.gpu
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("n", [16, 64, 128, 256])
def test_wgmma_bf16(variant, n, rng):
    a, b, expected = wgmma_operands(variant, n, 64, torch.bfloat16, rng)
    d = selftest.tk_wgmma(a, b, VARIANTS[variant])
    torch.testing.assert_close(d.cpu().double(), expected, rtol=1e-4, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["ABt", "AB"])
@pytest.mark.parametrize("dtype,k", [(torch.bfloat16, 128), (torch.float16, 64)])
def test_wgmma_two_chunks_and_fp16(variant, dtype, k, rng):
    a, b, expected = wgmma_operands(variant, 64, k, dtype, rng)
    d = selftest.tk_wgmma(a, b, VARIANTS[variant])
    torch.testing.assert_close(d.cpu().double(), expected, rtol=1e-4, atol=1e-3)
