"""tkpy's argument errors: tkpy.ArgumentError is both a ValueError and a RuntimeError, whether the
Python API or a compiled op's binding refused the call, so code written for flash-attn or
Block-Sparse-Attention (which catch RuntimeError) and code that catches ValueError both see it.
Every public function's bad-input table (tests/helpers.API_REFUSALS) holds it to this too."""

import pytest
import torch

import tkpy
from tkpy import riflex, rope

from test_kvcache import SETUP as KVCACHE_SETUP


def test_argument_error_is_a_value_error_and_a_runtime_error():
    assert issubclass(tkpy.ArgumentError, ValueError) and issubclass(tkpy.ArgumentError, RuntimeError)
    assert "ArgumentError" in tkpy.__all__


def bf16(*shape):
    return torch.randn(*shape).bfloat16()


# (call, message): refused by the Python API, or (the "_in_the_op" cases) by the compiled op's binding
REFUSED = {
    "flash_attn_func_window": (lambda: tkpy.flash_attn_func(bf16(1, 8, 2, 64), bf16(1, 8, 2, 64), bf16(1, 8, 2, 64),
                                                            window_size=(-2, 0)), "window_size"),
    "flash_attn_func_head_dim_in_the_op": (lambda: tkpy.flash_attn_func(bf16(1, 8, 2, 96), bf16(1, 8, 2, 96),
                                                                        bf16(1, 8, 2, 96)), "head_dim 64, 128 or 256"),
    "block_sparse_exact_without_causal_in_the_op": (
        lambda: tkpy.block_sparse_attn_func(
            bf16(8, 2, 64), bf16(8, 2, 64), bf16(8, 2, 64), torch.tensor([0, 8], dtype=torch.int32),
            torch.tensor([0, 8], dtype=torch.int32), torch.tensor([-1, 0], dtype=torch.int32),
            torch.tensor([1, 1, 0, 0], dtype=torch.int32), None, 8, 8, 0.0, is_causal=False, exact_streaming=True),
        "exact_streaming=True requires is_causal=True"),
    "gemm_in_the_op": (lambda: tkpy.gemm(bf16(16, 32), bf16(24, 16)), "K differ"),
    "apply_rope_in_the_op": (lambda: rope.apply_rope_(bf16(1, 4, 2, 64), bf16(1, 4, 2, 64), torch.ones(4, 32),
                                                      torch.zeros(4, 16)), "cos and sin"),
    "riflex_identify_k": (lambda: riflex.identify_k(10000.0, 7, 20), "d must be a positive even number"),
}


@pytest.mark.parametrize("case", REFUSED)
@pytest.mark.parametrize("caught_as", [ValueError, RuntimeError], ids=["ValueError", "RuntimeError"])
def test_refused_calls_are_caught_as_either(case, caught_as):
    call, message = REFUSED[case]
    with pytest.raises(caught_as, match=message) as raised:
        call()
    assert isinstance(raised.value, tkpy.ArgumentError)


def test_flash_attn_kvcache_block_table_bounds_raise_a_runtime_error_naming_block_table():
    """flash-attn's test_flash_attn_kvcache_paged_block_table_bounds: cache_seqlens past the pages
    that block_table holds is a RuntimeError that mentions block_table."""
    env = {}
    exec(KVCACHE_SETUP, env)  # 2 sequences, 3 pages of 16 tokens each in block_table
    with pytest.raises(RuntimeError, match="block_table"):
        env["flash_attn_with_kvcache"](env["q"], env["kc"], env["vc"], cache_seqlens=49, block_table=env["bt"])


def test_the_raw_ops_raise_value_error_for_arguments():
    """torch.ops.tkpy.* report a refused argument as ValueError (c10::ValueError); only a failed
    launch is a RuntimeError."""
    with pytest.raises(ValueError, match="K differ") as raised:
        torch.ops.tkpy.gemm(bf16(16, 32), bf16(24, 16), False)
    assert not isinstance(raised.value, RuntimeError)
