"""apply_rope and apply_rope_3d, the out-of-place RoPE with a backward, on CPU and GPU.

Outputs and gradients are compared with python/tkpy/reference.py run in float64 under autograd.
The ops take no float64, so torch.autograd.gradcheck cannot run; instead the fp32 gradient is checked
to be the forward's exact transpose, <rope(x), g> = <x, rope_backward(g)>.
"""

import operator

import pytest
import torch
from torch._dynamo.testing import AotEagerAndRecordGraphs

from tkpy import reference, riflex
from tkpy.rope import apply_rope, apply_rope_3d

from helpers import API_REFUSALS, REL_TOL, randn, rel_err

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# (batch, seqlen, q heads, k heads, head_dim, rotary_dim); batch None means q is [T, H, D] (varlen).
SHAPES = [
    (2, 17, 4, 2, 64, 64),
    (1, 33, 8, 1, 128, 128),
    (3, 5, 2, 2, 96, 24),  # partial rotary whose half (12) is not a whole 16-byte vector
    (None, 23, 3, 3, 64, 32),
    (None, 7, 2, 1, 256, 128),
]


def shape_of(batch, seqlen, heads, dim):
    return (seqlen, heads, dim) if batch is None else (batch, seqlen, heads, dim)


def check_close(out, ref, dtype, what):
    err = rel_err(out.detach().cpu(), ref)
    assert err < REL_TOL[dtype], f"{what}: relative error {err:.3g} >= {REL_TOL[dtype]:.1g}"


def random_tables(rows, pairs, gen, device, dtype=torch.float32):
    angles = randn((rows, pairs), torch.float32, gen) * 3
    return angles.cos().to(device, dtype), angles.sin().to(device, dtype)


def random_freqs(lengths, dims, gen, device):
    """Complex64 per-axis tables of random angles, [L, d/2] for each (L, d)."""
    return [torch.polar(torch.ones(length, d // 2), randn((length, d // 2), torch.float32, gen) * 3).to(device)
            for length, d in zip(lengths, dims)]


def run_with_grads(fn, inputs, grads):
    """fn's outputs on leaf copies of ``inputs`` and the gradients ``grads`` give those leaves."""
    leaves = [x.clone().requires_grad_() for x in inputs]
    outs = [o for o in fn(*leaves) if o is not None]
    torch.autograd.backward(outs, grads)
    return outs, [leaf.grad for leaf in leaves]


def oracle(fn, inputs, grads):
    """The same through the float64 reference on the CPU: float64 autograd is the expected gradient."""
    leaves = [x.detach().cpu().double().requires_grad_() for x in inputs]
    outs = fn(*leaves)
    torch.autograd.backward(outs, [g.cpu().double() for g in grads])
    return [o.detach() for o in outs], [leaf.grad for leaf in leaves]


def check_against_oracle(fn, ref_fn, inputs, dtype, gen):
    """Outputs and gradients of fn against ref_fn's, with fresh random output gradients; the inputs
    must come back unchanged. Returns the output gradients and fn's input gradients."""
    before = [x.clone() for x in inputs]
    grads = [randn(o.shape, o.dtype, gen, o.device) for o in fn(*inputs) if o is not None]
    outs, got = run_with_grads(fn, inputs, grads)
    ref_outs, ref_grads = oracle(ref_fn, inputs, grads)
    for i, (out, ref) in enumerate(zip(outs, ref_outs)):
        assert out.dtype == dtype and out.shape == ref.shape
        check_close(out, ref, dtype, f"output {i}")
    for i, (grad, ref) in enumerate(zip(got, ref_grads)):
        check_close(grad, ref, dtype, f"gradient of input {i}")
    for x, x_before in zip(inputs, before):
        assert torch.equal(x, x_before), "an input changed"
    return grads, got


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_rope_and_its_gradient_match_reference(device, dtype, interleaved, shape, rng):
    batch, seqlen, hq, hk, dim, rotary = shape
    q = randn(shape_of(batch, seqlen, hq, dim), dtype, rng, device)
    k = randn(shape_of(batch, seqlen, hk, dim), dtype, rng, device)
    cos, sin = random_tables(seqlen + 5, rotary // 2, rng, device)

    grads, got = check_against_oracle(
        lambda q, k: apply_rope(q, k, cos, sin, interleaved=interleaved),
        lambda q, k: (reference.rope(q, cos.cpu(), sin.cpu(), interleaved=interleaved),
                      reference.rope(k, cos.cpu(), sin.cpu(), interleaved=interleaved)),
        [q, k], dtype, rng)

    for grad_in, grad_out in zip(got, grads):
        assert torch.equal(grad_in[..., rotary:], grad_out[..., rotary:]), "dims past rotary_dim: gradient changed"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("positions_kind", ["shared_repeated_int64", "per_batch_int32", "varlen_repeated_int32"])
@pytest.mark.parametrize("table_dtype", ["fp32", "same"])
def test_rope_gradient_with_positions(device, dtype, positions_kind, table_dtype, rng):
    """Repeated positions send several tokens through one table row: each gets its own gradient."""
    batch, seqlen, dim, rows = 3, 19, 64, 40
    varlen = positions_kind.startswith("varlen")
    q = randn(shape_of(None if varlen else batch, seqlen, 4, dim), dtype, rng, device)
    k = randn(shape_of(None if varlen else batch, seqlen, 2, dim), dtype, rng, device)
    cos, sin = random_tables(rows, dim // 2, rng, device, torch.float32 if table_dtype == "fp32" else dtype)
    positions = {
        # 19 positions drawn from 6 rows: some must repeat.
        "shared_repeated_int64": torch.randint(0, 6, (seqlen,), generator=rng),
        "per_batch_int32": torch.randint(0, rows, (batch, seqlen), generator=rng, dtype=torch.int32),
        "varlen_repeated_int32": torch.randint(0, 6, (seqlen,), generator=rng, dtype=torch.int32),
    }[positions_kind].to(device)

    check_against_oracle(
        lambda q, k: apply_rope(q, k, cos, sin, positions, interleaved=True),
        lambda q, k: (reference.rope(q, cos.cpu(), sin.cpu(), positions.cpu(), interleaved=True),
                      reference.rope(k, cos.cpu(), sin.cpu(), positions.cpu(), interleaved=True)),
        [q, k], dtype, rng)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_without_k(device, dtype, rng):
    q = randn((2, 11, 3, 64), dtype, rng, device)
    cos, sin = random_tables(11, 32, rng, device)
    assert apply_rope(q, None, cos, sin)[1] is None

    check_against_oracle(lambda q: apply_rope(q, None, cos, sin), lambda q: (reference.rope(q, cos.cpu(), sin.cpu()),),
                         [q], dtype, rng)


@pytest.mark.parametrize("device", DEVICES)
def test_rope_of_fused_qkv_views_and_of_one_tensor_as_q_and_k(device, rng):
    """q and k sliced out of one qkv projection, and one tensor passed as both q and k (which the
    in-place op refuses): the gradients add up in the tensor they share."""
    dtype, heads, dim = torch.bfloat16, 4, 64
    qkv = randn((2, 9, 3 * heads, dim), dtype, rng, device)
    cos, sin = random_tables(9, 16, rng, device)  # partial rotary

    def split_and_rotate(rope, qkv):
        q, k, v = qkv[:, :, :heads], qkv[:, :, heads : 2 * heads], qkv[:, :, 2 * heads :]
        return (*rope(q, k), v * 1)

    check_against_oracle(
        lambda qkv: split_and_rotate(lambda q, k: apply_rope(q, k, cos, sin), qkv),
        lambda qkv: split_and_rotate(lambda q, k: (reference.rope(q, cos.cpu(), sin.cpu()),
                                                   reference.rope(k, cos.cpu(), sin.cpu())), qkv),
        [qkv], dtype, rng)
    x = qkv[:, :, :heads]
    check_against_oracle(lambda x: apply_rope(x, x, cos, sin),
                         lambda x: (reference.rope(x, cos.cpu(), sin.cpu()),) * 2, [x], dtype, rng)


# (split model, split head_dim, q head_dim, grid, tables): q's head_dim larger than the split's
# leaves its last dims unrotated; "real" tables are float32 [L, d/2, 2] with rows to spare.
CASES_3D = [
    ("cogvideox", 64, 64, (3, 5, 7), "riflex"),
    ("hunyuanvideo", 128, 128, (2, 3, 5), "riflex"),
    ("wan", 128, 128, (5, 1, 3), "riflex"),
    ("cogvideox", 64, 96, (3, 1, 5), "random"),
    ("wan", 64, 128, (1, 3, 3), "random_real"),
]


def tables_3d(model, split_dim, grid, kind, gen, device):
    """(complex tables for the reference, the tables the op gets)."""
    split = riflex.axis_split(model, split_dim)
    if kind == "riflex":
        freqs = [f.to(device) for f in riflex.rope_3d_freqs(split, grid, mode="fine_tuned")]
        return freqs, freqs
    lengths = [n + 2 for n in grid] if kind == "random_real" else grid
    freqs = random_freqs(lengths, (split.t, split.h, split.w), gen, device)
    if kind == "random_real":
        return freqs, [torch.view_as_real(f).contiguous() for f in freqs]
    return freqs, freqs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("model,split_dim,head_dim,grid,tables", CASES_3D)
@pytest.mark.parametrize("with_k", [True, False])
def test_rope_3d_and_its_gradient_match_reference(device, dtype, model, split_dim, head_dim, grid, tables, with_k,
                                                  rng):
    seqlen = grid[0] * grid[1] * grid[2]
    freqs, op_tables = tables_3d(model, split_dim, grid, tables, rng, device)
    ref_freqs = [f.cpu() for f in freqs]
    inputs = [randn((2, seqlen, 3, head_dim), dtype, rng, device)]
    if with_k:
        inputs.append(randn((2, seqlen, 1, head_dim), dtype, rng, device))

    grads, got = check_against_oracle(
        lambda q, k=None: apply_rope_3d(q, k, grid, *op_tables),
        lambda *xs: tuple(reference.rope_3d(x, grid, *ref_freqs) for x in xs),
        inputs, dtype, rng)

    for grad_in, grad_out in zip(got, grads):
        assert torch.equal(grad_in[..., split_dim:], grad_out[..., split_dim:]), "dims past the tables changed"


def transpose_case(name, gen, device):
    """(f, x): a linear map of fp32 x whose gradient must be its transpose."""
    q = randn((2, 17, 3, 64), torch.float32, gen, device)
    cos, sin = random_tables(24, 24, gen, device)  # partial rotary
    positions = torch.randint(0, 24, (2, 17), generator=gen).to(device)
    grid = (3, 1, 5)
    freqs = random_freqs(grid, (24, 20, 20), gen, device)
    video = randn((1, 15, 2, 64), torch.float32, gen, device)
    return {
        "neox": (lambda x: apply_rope(x, None, cos, sin)[0], q),
        "interleaved_positions": (lambda x: apply_rope(x, None, cos, sin, positions, interleaved=True)[0], q),
        "3d": (lambda x: apply_rope_3d(x, None, grid, *freqs)[0], video),
    }[name]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["neox", "interleaved_positions", "3d"])
def test_gradient_is_the_transpose_of_the_rotation(device, case, rng):
    """<f(x), g> = <x, f'(x)ᵀ g> in fp32. A backward by +θ instead of −θ misses by about
    ‖x‖‖g‖/√n (1e-2 here), fp32 rounding by about 1e-9 ‖x‖‖g‖."""
    f, x = transpose_case(case, rng, device)
    g = randn(x.shape, torch.float32, rng, device)
    x = x.clone().requires_grad_()
    y = f(x)
    (grad,) = torch.autograd.grad(y, x, g)
    lhs = (y.detach().double() * g.double()).sum()
    rhs = (x.detach().double() * grad.double()).sum()
    scale = x.detach().double().norm() * g.double().norm()
    assert abs(lhs - rhs) <= 1e-6 * scale, f"<f(x), g> = {lhs.item():.9g} but <x, f'ᵀg> = {rhs.item():.9g}"


@pytest.mark.parametrize("device", DEVICES)
def test_backward_is_differentiable(device, rng):
    """The backward is the op itself (rotation by −θ), so it has a gradient: d<x̄, h>/dg = rope(h)."""
    x = randn((2, 9, 2, 64), torch.float32, rng, device).requires_grad_()
    g = randn(x.shape, torch.float32, rng, device).requires_grad_()
    h = randn(x.shape, torch.float32, rng, device)
    cos, sin = random_tables(9, 32, rng, device)
    y, _ = apply_rope(x, None, cos, sin, interleaved=True)
    (x_bar,) = torch.autograd.grad(y, x, g, create_graph=True)
    (g_bar,) = torch.autograd.grad(x_bar, g, h)
    check_close(g_bar, reference.rope(h.cpu(), cos.cpu(), sin.cpu(), interleaved=True), torch.float32,
                "gradient of the backward")


def rope_1d_case(gen, device):
    q = randn((2, 9, 4, 64), torch.bfloat16, gen, device)
    k = randn((2, 9, 2, 64), torch.bfloat16, gen, device)
    # cos/sin outside the graph: inductor's own cos may differ from ATen's in the last bit.
    cos, sin = random_tables(16, 32, gen, device)
    positions = torch.randint(0, 16, (2, 9), generator=gen).to(device)

    def fn(q, k):
        q, k = apply_rope(q * 1.5, k, cos, sin, positions, interleaved=True)
        return q + 1, k

    return fn, [q, k]


def rope_3d_case(gen, device):
    grid = (3, 2, 5)
    freqs = [torch.view_as_real(f).to(device) for f in riflex.rope_3d_freqs(riflex.axis_split("wan", 128), grid)]
    q = randn((1, 30, 2, 128), torch.float16, gen, device)

    def fn(q):
        q, _ = apply_rope_3d(q, None, grid, *freqs)
        return (q * 2,)

    return fn, [q]


COMPILE_CASES = {"rope": rope_1d_case, "rope_3d": rope_3d_case}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", sorted(COMPILE_CASES))
def test_compiles_fullgraph_forward_and_backward(device, case, rng):
    torch._dynamo.reset()
    fn, inputs = COMPILE_CASES[case](rng, device)
    grads = [randn(o.shape, o.dtype, rng, device) for o in fn(*inputs)]
    eager, eager_grads = run_with_grads(fn, inputs, grads)
    compiled, compiled_grads = run_with_grads(torch.compile(fn, fullgraph=True), inputs, grads)
    for c, e in zip(compiled + compiled_grads, eager + eager_grads):
        torch.testing.assert_close(c, e, rtol=0, atol=0)


@pytest.mark.parametrize("op", ["rope", "rope_3d"])
def test_compiled_backward_is_one_call_of_the_op(op, rng):
    """The gradients of q and k go straight into one call of the same op (by −θ): besides it, the
    backward only negates table entries, never touching the gradients with aten math."""
    torch._dynamo.reset()
    q, k = randn((1, 6, 2, 64), torch.float32, rng), randn((1, 6, 1, 64), torch.float32, rng)
    cos, sin = random_tables(8, 32, rng, "cpu")
    freqs = random_freqs((3, 1, 2), (16, 24, 24), rng, "cpu")
    fn = {"rope": lambda q, k: apply_rope(q, k, cos, sin),
          "rope_3d": lambda q, k: apply_rope_3d(q, k, (3, 1, 2), *freqs)}[op]
    backend = AotEagerAndRecordGraphs()
    run_with_grads(torch.compile(fn, fullgraph=True, backend=backend), [q, k],
                   [randn(q.shape, q.dtype, rng), randn(k.shape, k.dtype, rng)])
    (backward,) = backend.bw_graphs
    calls = [node for node in backward.graph.nodes if node.op == "call_function"]
    rope_calls = [node for node in calls if node.target is getattr(torch.ops.tkpy, op).default]
    assert len(rope_calls) == 1, backward.code
    gradients = rope_calls[0].args[:2]
    assert all(arg.op == "placeholder" and arg.name.startswith("tangents") for arg in gradients), backward.code
    table_prep = {torch.ops.aten.neg.default, torch.ops.aten.stack.default, torch.ops.aten.select.int,
                  torch.ops.aten.slice.Tensor, operator.getitem}
    assert {node.target for node in calls} - {rope_calls[0].target} <= table_prep, backward.code


@pytest.mark.parametrize("table", ["cos", "sin", "freqs_t", "freqs_w"])
def test_a_table_requiring_grad_is_refused_not_silently_given_none(table, rng):
    q = randn((1, 8, 2, 64), torch.float32, rng).requires_grad_()
    cos, sin = random_tables(8, 32, rng, "cpu")
    freqs = random_freqs((2, 2, 2), (16, 24, 24), rng, "cpu")
    args = {"cos": cos, "sin": sin, "freqs_t": freqs[0], "freqs_w": torch.view_as_real(freqs[2])}
    args[table] = args[table].clone().requires_grad_()

    def call():
        if table in ("cos", "sin"):
            return apply_rope(q, None, args["cos"], args["sin"])
        return apply_rope_3d(q, None, (2, 2, 2), args["freqs_t"], freqs[1], args["freqs_w"])

    with pytest.raises(API_REFUSALS, match=f"{table} requires grad.*no gradient"):
        call()
    with torch.no_grad():  # nothing to differentiate: accepted
        assert not torch.equal(call()[0], q)


@pytest.mark.parametrize("which", ["q", "k"])
def test_in_place_ops_refuse_a_tensor_that_autograd_records(which, rng):
    """apply_rope_ / apply_rope_3d_ record no backward: with grad enabled on q or k they refuse,
    rather than let a gradient pass unrotated; under no_grad they rotate as before."""
    from tkpy.rope import apply_rope_, apply_rope_3d_

    q, k = randn((1, 8, 2, 64), torch.float32, rng), randn((1, 8, 2, 64), torch.float32, rng)
    (q if which == "q" else k).requires_grad_()
    cos, sin = random_tables(8, 32, rng, "cpu")
    freqs = random_freqs((2, 2, 2), (16, 24, 24), rng, "cpu")
    with pytest.raises(API_REFUSALS, match=f"apply_rope_: {which} requires grad.*apply_rope "):
        apply_rope_(q, k, cos, sin)
    with pytest.raises(API_REFUSALS, match=f"apply_rope_3d_: {which} requires grad.*apply_rope_3d "):
        apply_rope_3d_(q, k, (2, 2, 2), *freqs)
    with torch.no_grad():
        expected = reference.rope(q, cos, sin)
        apply_rope_(q, k, cos, sin)
    assert rel_err(q, expected) < REL_TOL[torch.float32]


def test_video_dit_attention_trains_through_its_rope(rng):
    """VideoDiTAttention (and the diffusers processor, through the same Rope3D) rotates copies
    while autograd records: q's and k's gradients go through the rotation's transpose."""
    from tkpy.runtime.dit import Rope3D

    grid = (2, 2, 2)
    freqs = riflex.rope_3d_freqs(riflex.axis_split("cogvideox", 64), grid)
    q = randn((1, 8, 2, 64), torch.float32, rng).requires_grad_()
    k = randn((1, 8, 2, 64), torch.float32, rng).requires_grad_()
    grads = [randn(q.shape, q.dtype, rng), randn(k.shape, k.dtype, rng)]
    rotated = Rope3D(grid, *freqs).rotate(q * 1, k * 1)
    torch.autograd.backward(rotated, grads)
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    torch.autograd.backward([reference.rope_3d(q64, grid, *freqs), reference.rope_3d(k64, grid, *freqs)],
                            [g.double() for g in grads])
    assert rel_err(q.grad, q64.grad) < REL_TOL[torch.float32] and rel_err(k.grad, k64.grad) < REL_TOL[torch.float32]


# Each case runs with: torch, q [2, 8, 4, 64] bf16, k [2, 8, 2, 64] bf16, cos/sin [16, 32] fp32,
# freqs (complex 3D tables for grid (2, 2, 2), CogVideoX split of head dim 64), and the two functions.
BAD_CALLS = [
    ("apply_rope(q.long(), None, cos, sin)", "q to be bfloat16, float16 or float32, got Long"),
    ("apply_rope(q, k.half(), cos, sin)", "k to have q's dtype"),
    ("apply_rope(None, k, cos, sin)", "q must be a Tensor"),
    ("apply_rope(q, None, cos, sin, interleaved=1)", "interleaved must be a bool"),
    ("apply_rope(q, None, cos.double(), sin.double())", "cos to be float32 or q's dtype"),
    ("apply_rope(q, None, cos, sin, torch.arange(7))", r"positions of shape \[S\] or \[B, S\]"),
    ("apply_rope(q, None, cos, sin, torch.tensor([0, 1, 2, 3, 4, 5, 6, 16]))", r"positions in \[0, 16\)"),
    ("apply_rope(q, None, cos[:7], sin[:7])", "seqlen 8 exceeds the 7 rows"),
    ("apply_rope_3d(q, k, (1, 2, 2), *freqs)", r"must hold q.s seqlen 8 tokens"),
    ("apply_rope_3d(q, k, (2, 2.0, 2), *freqs)", r"grid_thw\[1\] must be an int"),
    ("apply_rope_3d(q, k, (8, 1, 1), *freqs)", "freqs_t has 2 rows but the grid needs 8"),
    ("apply_rope_3d(q, k, (2, 2, 2), 'not a tensor', freqs[1], freqs[2])", "freqs_t must be a Tensor"),
]


@pytest.mark.parametrize("code,message", BAD_CALLS, ids=[c[0][:60] for c in BAD_CALLS])
def test_bad_input_gets_the_in_place_ops_errors(code, message):
    env = {"torch": torch, "apply_rope": apply_rope, "apply_rope_3d": apply_rope_3d,
           "q": torch.randn(2, 8, 4, 64).bfloat16().requires_grad_(), "k": torch.randn(2, 8, 2, 64).bfloat16(),
           "cos": torch.randn(16, 32).cos(), "sin": torch.randn(16, 32).sin(),
           "freqs": riflex.rope_3d_freqs(riflex.axis_split("cogvideox", 64), (2, 2, 2))}
    with pytest.raises(API_REFUSALS, match=message):
        exec(code, env)


@pytest.mark.gpu
def test_forward_and_backward_never_sync_on_cuda(rng):
    q = randn((2, 12, 4, 64), torch.bfloat16, rng, "cuda").requires_grad_()
    k = randn((2, 12, 2, 64), torch.bfloat16, rng, "cuda").requires_grad_()
    cos, sin = random_tables(32, 32, rng, "cuda")
    positions = torch.randint(0, 32, (2, 12), generator=rng).cuda()
    grid = (2, 3, 4)
    freqs = [f.cuda() for f in riflex.rope_3d_freqs(riflex.axis_split("wan", 128), grid, L_test=2)]
    x = randn((1, 24, 2, 128), torch.bfloat16, rng, "cuda").requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        q_rot, k_rot = apply_rope(q, k, cos, sin, positions)
        (x_rot, _) = apply_rope_3d(x, None, grid, *freqs)
        torch.autograd.backward([q_rot, k_rot, x_rot], [torch.ones_like(q_rot), k_rot.detach(), x_rot.detach()])
    finally:
        torch.cuda.set_sync_debug_mode("default")
