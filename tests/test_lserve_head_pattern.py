"""tkpy.lserve.HeadPattern on the released DuoAttention patterns and on bad pattern files."""

import numpy as np
import pytest
import torch

from tkpy._data import duo_attention_pattern
from tkpy.lserve import HeadPattern

# The files only know KV heads; these three models all have 32 query heads per layer.
MODELS = ["Meta-Llama-3.1-8B-Instruct", "Llama-3-8B-Instruct-Gradient-1048k", "Mistral-7B-Instruct-v0.2"]
NUM_QUERY_HEADS = 32


@pytest.fixture(params=MODELS)
def pattern_file(request):
    try:
        return duo_attention_pattern(request.param)
    except FileNotFoundError as absent:  # its message names the path and TKPY_SHARED_DATA
        pytest.skip(str(absent))


def raw_gates(path):
    """The gates as DuoAttention's loader sees them: np.loadtxt, clipped to [0, 1]."""
    return np.clip(np.loadtxt(path, delimiter="\t", ndmin=2), 0.0, 1.0)


def expected_streaming(gates, static_sparsity, seed):
    """DESIGN.md §5 written out: seeded noise in [0, 1e-6), global quantile, gate >= it is dense."""
    noisy = gates + np.random.default_rng(seed).uniform(0.0, 1e-6, size=gates.shape)
    return ~(noisy >= np.quantile(noisy, static_sparsity))


def test_shape_comes_from_the_file(pattern_file):
    pattern = HeadPattern.load(pattern_file, NUM_QUERY_HEADS)
    assert (pattern.num_layers, pattern.num_kv_heads) == raw_gates(pattern_file).shape == (32, 8)
    assert pattern.streaming_mask.dtype == np.bool_
    assert not pattern.streaming_mask.flags.writeable


@pytest.mark.parametrize("static_sparsity", [0.0, 0.25, 0.5, 0.75])
def test_achieved_sparsity_is_within_one_head(pattern_file, static_sparsity):
    pattern = HeadPattern.load(pattern_file, NUM_QUERY_HEADS, static_sparsity=static_sparsity)
    num_heads = pattern.num_layers * pattern.num_kv_heads
    assert abs(pattern.sparsity - static_sparsity) <= 1 / num_heads
    assert pattern.sparsity == pattern.streaming_mask.sum() / num_heads


@pytest.mark.parametrize("static_sparsity", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("seed", [0, 7])
def test_threshold_rule(pattern_file, static_sparsity, seed):
    gates = raw_gates(pattern_file)
    pattern = HeadPattern.load(pattern_file, NUM_QUERY_HEADS, static_sparsity=static_sparsity, seed=seed)
    np.testing.assert_array_equal(pattern.streaming_mask, expected_streaming(gates, static_sparsity, seed))

    # Whatever the noise below 1e-6, the quantile moves by less than 1e-6, so gates clear of it
    # by that much are decided by the raw values alone.
    threshold = np.quantile(gates, static_sparsity)
    assert not pattern.streaming_mask[gates > threshold + 1e-6].any()
    assert pattern.streaming_mask[gates + 1e-6 < threshold].all()


def test_same_seed_same_pattern_and_ties_keep_the_count(pattern_file):
    first = HeadPattern.load(pattern_file, NUM_QUERY_HEADS, static_sparsity=0.75, seed=3)
    again = HeadPattern.load(pattern_file, NUM_QUERY_HEADS, static_sparsity=0.75, seed=3)
    np.testing.assert_array_equal(first.streaming_mask, again.streaming_mask)
    # Every file has ties at 1.0 (and at 0.0 after clipping); a seed only decides among them.
    counts = {HeadPattern.load(pattern_file, NUM_QUERY_HEADS, static_sparsity=0.9, seed=s).sparsity for s in range(5)}
    assert len(counts) == 1


def test_sparsity_edges(pattern_file):
    none = HeadPattern.load(pattern_file, NUM_QUERY_HEADS, static_sparsity=0.0)
    assert none.sparsity == 0.0 and (none.head_mask_type(0) == 0).all()
    # 1.0 is DuoAttention's "every head streaming", not "all but the maximum gate".
    every = HeadPattern.load(pattern_file, NUM_QUERY_HEADS, static_sparsity=1.0)
    assert every.sparsity == 1.0
    assert all((every.head_mask_type(layer) == -1).all() for layer in range(every.num_layers))


@pytest.mark.parametrize("num_query_heads", [8, 32, 64])
def test_head_mask_type_repeats_over_gqa_groups(pattern_file, num_query_heads):
    pattern = HeadPattern.load(pattern_file, num_query_heads)
    group = num_query_heads // pattern.num_kv_heads
    for layer in range(pattern.num_layers):
        types = pattern.head_mask_type(layer)
        assert types.dtype == torch.int32 and types.shape == (num_query_heads,)
        for h in range(num_query_heads):
            assert types[h] == (-1 if pattern.streaming_mask[layer, h // group] else 0)


@pytest.mark.parametrize(
    "sink,local,exact,pair",
    [(128, 8192, True, (128, 8192)), (4, 1000, True, (4, 1000)), (128, 8192, False, (1, 64)), (0, 256, False, (0, 2))],
)
def test_streaming_info_pairs(pattern_file, sink, local, exact, pair):
    pattern = HeadPattern.load(pattern_file, NUM_QUERY_HEADS, sink=sink, local=local, exact_streaming=exact)
    info = pattern.streaming_info(pattern.num_layers - 1)
    assert info.dtype == torch.int32 and info.shape == (2 * NUM_QUERY_HEADS,)
    assert info.view(NUM_QUERY_HEADS, 2).tolist() == [list(pair)] * NUM_QUERY_HEADS


def test_defaults_are_the_prefill_window(pattern_file):
    pattern = HeadPattern.load(pattern_file, NUM_QUERY_HEADS)
    assert (pattern.sink, pattern.local, pattern.exact_streaming) == (128, 8192, True)
    assert pattern.sparsity == 0.5


def test_gates_just_outside_the_range_are_clipped(tmp_path):
    path = tmp_path / "p.tsv"
    path.write_text("-2e-4\t0.5\n1.0002\t0.0\n")
    pattern = HeadPattern.load(path, 2, static_sparsity=0.5)
    assert pattern.streaming_mask.tolist() == [[True, False], [False, True]]


@pytest.mark.parametrize(
    "text,match",
    [
        ("0.1\t0.2\n0.3\n", r"p\.tsv:2: expected 2 tab-separated gates"),
        ("0.1\t1.5\n", r"p\.tsv:1: column 2: gate '1.5' is not in \[0, 1\]"),
        ("0.1\t-0.01\n", r"p\.tsv:1: column 2: gate '-0.01' is not in \[0, 1\]"),
        ("0.1\t0.2\nnan\t0.2\n", r"p\.tsv:2: column 1: gate 'nan' is not in \[0, 1\]"),
        ("0.1\tinf\n", r"p\.tsv:1: column 2: gate 'inf' is not in \[0, 1\]"),
        ("0.1\tabc\n", r"p\.tsv:1: column 2: 'abc' is not a number"),
        ("\n\n", r"p\.tsv: no gate rows"),
    ],
)
def test_bad_files(tmp_path, text, match):
    path = tmp_path / "p.tsv"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        HeadPattern.load(path, 2)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_query_heads=12), "multiple of num_kv_heads=8"),
        (dict(num_query_heads=0), "multiple of num_kv_heads=8"),
        (dict(sink=100, exact_streaming=False), "multiples of 128"),
        (dict(local=1000, exact_streaming=False), "multiples of 128"),
        (dict(local=0), "local >= 1"),
        (dict(static_sparsity=-0.1), r"static_sparsity must be in \[0, 1\]"),
        (dict(static_sparsity=1.1), r"static_sparsity must be in \[0, 1\]"),
        (dict(static_sparsity=float("nan")), r"static_sparsity must be in \[0, 1\]"),
    ],
)
def test_bad_arguments(pattern_file, kwargs, match):
    kwargs = {"num_query_heads": NUM_QUERY_HEADS, **kwargs}
    with pytest.raises(ValueError, match=match):
        HeadPattern.load(pattern_file, **kwargs)


def test_direct_construction_and_layer_range():
    pattern = HeadPattern(np.array([[True, False]]), num_query_heads=4)
    assert pattern.head_mask_type(0).tolist() == [-1, -1, 0, 0]
    assert pattern.sparsity == 0.5
    with pytest.raises(ValueError, match=r"layer must be in \[0, 1\), got 1"):
        pattern.head_mask_type(1)
    with pytest.raises(ValueError, match=r"expected a non-empty bool \[num_layers, num_kv_heads\] array"):
        HeadPattern(np.array([[0.3, 0.9]]), num_query_heads=4)
