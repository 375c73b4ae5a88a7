"""tkpy.integrations.transformers: attn_implementation="tkpy" against "eager" on tiny random models.

Both implementations run the same bfloat16 weights on the CPU, so the logits differ by bf16
rounding: eager rounds its probabilities to bf16 before multiplying by V, tkpy accumulates in
another order, and every later bf16 op of the model compounds the difference. On these models
``‖tkpy − eager‖ / ‖eager‖`` is about 6e-3, as is SDPA's own distance to eager, and the bf16 models
are that far from a float32 run too. The bound, 2e-2, leaves room for other inputs, and a wrong
mask still lands far outside it: ignoring one row's padding moves the logits by about 60%
(``test_a_wrong_mask_is_far_outside_the_tolerance``).
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM  # noqa: E402
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask  # noqa: E402
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # noqa: E402

from tkpy.integrations.transformers import NAME, register, tkpy_attention_forward  # noqa: E402

REL_TOL = 2e-2
VOCAB = 256
# GQA: 4 query heads share 2 kv heads; head_dim 64; hidden 256.
SHAPES = dict(
    vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=64, max_position_embeddings=256,
)


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm())


@pytest.fixture(scope="module")
def llama():
    register()
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**SHAPES)).to(torch.bfloat16).eval()


@pytest.fixture(scope="module")
def mistral():
    register()
    torch.manual_seed(0)
    return MistralForCausalLM(MistralConfig(**SHAPES, sliding_window=8)).to(torch.bfloat16).eval()


def _logits(model, implementation: str, **inputs) -> torch.Tensor:
    model.set_attn_implementation(implementation)
    with torch.no_grad():
        return model(**inputs).logits.float()


def _tokens(batch: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seqlen), generator=torch.Generator().manual_seed(seed))


def _padding_mask(lengths, seqlen: int, side: str) -> torch.Tensor:
    """int64 ``[B, seqlen]``: 1 on each row's ``lengths[b]`` real tokens, padded on ``side``."""
    positions = torch.arange(seqlen)
    real = torch.tensor(lengths)[:, None]
    mask = positions >= seqlen - real if side == "left" else positions < real
    return mask.long()


def test_register_is_idempotent():
    assert register() == NAME
    sizes = len(ALL_ATTENTION_FUNCTIONS), len(ALL_MASK_ATTENTION_FUNCTIONS)
    assert register() == NAME
    assert (len(ALL_ATTENTION_FUNCTIONS), len(ALL_MASK_ATTENTION_FUNCTIONS)) == sizes
    assert ALL_ATTENTION_FUNCTIONS[NAME] is tkpy_attention_forward
    assert ALL_MASK_ATTENTION_FUNCTIONS[NAME] is flash_attention_mask


@pytest.mark.parametrize("batch, seqlen", [(1, 1), (2, 37), (3, 64)])
def test_logits_match_eager_without_padding(llama, batch, seqlen):
    ids = _tokens(batch, seqlen)
    err = _rel_err(_logits(llama, NAME, input_ids=ids), _logits(llama, "eager", input_ids=ids))
    assert err < REL_TOL


@pytest.mark.parametrize("side", ["left", "right"])
def test_logits_match_eager_with_padding(llama, side):
    seqlen = 29
    ids = _tokens(3, seqlen)
    mask = _padding_mask([29, 17, 5], seqlen, side)
    ours = _logits(llama, NAME, input_ids=ids, attention_mask=mask)
    theirs = _logits(llama, "eager", input_ids=ids, attention_mask=mask)
    real = mask.bool()  # padded positions are undefined in both
    assert _rel_err(ours[real], theirs[real]) < REL_TOL


@pytest.mark.parametrize("padded", [False, True])
def test_decode_steps_with_cache_match_eager(llama, padded):
    """Prefill into a DynamicCache, then two one-token steps: queries that are the keys' last rows."""
    prompt, steps = 21, 2
    ids = _tokens(2, prompt + steps, seed=1)
    lengths = [prompt, 9] if padded else [prompt, prompt]
    mask = _padding_mask(lengths, prompt, "left")
    logits = {}
    for implementation in (NAME, "eager"):
        llama.set_attn_implementation(implementation)
        cache = transformers.DynamicCache(config=llama.config)
        with torch.no_grad():
            out = [llama(input_ids=ids[:, :prompt], attention_mask=mask, past_key_values=cache).logits[:, -1]]
            for step in range(steps):
                step_mask = torch.cat([mask, torch.ones(2, step + 1, dtype=mask.dtype)], dim=1)
                token = ids[:, prompt + step : prompt + step + 1]
                out.append(llama(input_ids=token, attention_mask=step_mask, past_key_values=cache).logits[:, -1])
        logits[implementation] = torch.stack(out).float()
    assert _rel_err(logits[NAME], logits["eager"]) < REL_TOL


def test_packed_position_ids_attend_within_each_sequence(llama):
    """One row holding two sequences, position ids restarting at 0: each attends only to itself."""
    first, second = _tokens(1, 13, seed=2), _tokens(1, 20, seed=3)
    packed = torch.cat([first, second], dim=1)
    position_ids = torch.cat([torch.arange(13), torch.arange(20)])[None]
    ours = _logits(llama, NAME, input_ids=packed, position_ids=position_ids, use_cache=False)
    theirs = torch.cat([_logits(llama, "eager", input_ids=first), _logits(llama, "eager", input_ids=second)], dim=1)
    assert _rel_err(ours, theirs) < REL_TOL


@pytest.mark.parametrize("side", ["left", None])
def test_sliding_window_matches_eager(mistral, side):
    seqlen = 27  # over 3 windows of 8
    ids = _tokens(2, seqlen, seed=4)
    mask = None if side is None else _padding_mask([27, 14], seqlen, side)
    ours = _logits(mistral, NAME, input_ids=ids, attention_mask=mask)
    theirs = _logits(mistral, "eager", input_ids=ids, attention_mask=mask)
    real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    assert _rel_err(ours[real], theirs[real]) < REL_TOL


def test_sliding_window_with_a_gap_in_the_padding_is_refused(mistral):
    """Windows count positions and varlen counts real tokens; with a gap inside a row they differ."""
    mask = torch.ones(1, 12, dtype=torch.long)
    mask[0, 5] = 0
    with pytest.raises(NotImplementedError, match="sliding window with gaps"):
        _logits(mistral, NAME, input_ids=_tokens(1, 12), attention_mask=mask)


def test_a_wrong_mask_is_far_outside_the_tolerance(llama):
    """The tolerance can fail: ignoring the padding of one row moves its logits by far more."""
    seqlen = 29
    ids = _tokens(2, seqlen)
    mask = _padding_mask([29, 12], seqlen, "left")
    padded = _logits(llama, "eager", input_ids=ids, attention_mask=mask)
    unpadded = _logits(llama, "eager", input_ids=ids)
    real = mask.bool()
    assert _rel_err(unpadded[real], padded[real]) > 10 * REL_TOL


def test_custom_4d_mask_is_refused(llama):
    ids = _tokens(1, 8)
    mask = torch.ones(1, 1, 8, 8, dtype=torch.bool).tril()
    with pytest.raises(ValueError, match="2-D padding mask"):
        _logits(llama, NAME, input_ids=ids, attention_mask=mask)


def _direct_call(**kwargs):
    """The attention function as transformers calls it: [B, H, S, D] q, k, v."""
    q, k, v = (torch.randn(2, 2, 8, 64).bfloat16() for _ in range(3))
    return tkpy_attention_forward(torch.nn.Module(), q, k, v, kwargs.pop("attention_mask", None), **kwargs)


@pytest.mark.parametrize(("kwargs", "named"), [
    ({"sliding_window": 0}, "sliding_window must be an int >= 1"),
    ({"sliding_window": -5}, "sliding_window must be an int >= 1"),
    ({"attention_mask": torch.full((2, 8), 0.5)}, "attention_mask torch.float32"),
    ({"attention_mask": torch.ones(3, 8, dtype=torch.bool)}, r"\[batch=2, kv_len\]"),
    ({"cu_seq_lens_q": torch.tensor([0, 8], dtype=torch.int32)}, "packed sequences need all of"),
], ids=["window_0", "window_negative", "float_mask", "mask_batch", "cu_q_alone"])
def test_arguments_transformers_would_pass_wrongly_are_refused_by_name(kwargs, named):
    with pytest.raises(ValueError, match=named):
        _direct_call(**kwargs)


def test_float32_model_is_refused():
    register()
    model = LlamaForCausalLM(LlamaConfig(**SHAPES)).eval()
    model.set_attn_implementation(NAME)
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        model(input_ids=_tokens(1, 4))


def test_dropout_is_refused(llama):
    """In train mode the layers pass their dropout; tkpy is inference-only and says so."""
    llama.set_attn_implementation(NAME)
    llama.config.attention_dropout = 0.1
    for layer in llama.model.layers:
        layer.self_attn.attention_dropout = 0.1
    llama.train()
    try:
        with pytest.raises(NotImplementedError, match="dropout"), torch.no_grad():
            llama(input_ids=_tokens(1, 4))
    finally:
        llama.eval()
        for layer in llama.model.layers:
            layer.self_attn.attention_dropout = 0.0
        llama.config.attention_dropout = 0.0
