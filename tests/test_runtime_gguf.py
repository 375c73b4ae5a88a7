"""LLM("model.gguf"): GGUF files written here with the gguf package, the way llama.cpp's converter
writes them (its tensor names, q/k rows reordered for Llama, quantised), from small transformers
models; loaded by the runtime and compared with those models."""

import math

import numpy as np
import pytest
import torch
from tokenizers import pre_tokenizers

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from tkpy import ArgumentError  # noqa: E402
from tkpy.runtime import LLM  # noqa: E402

LAYER_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}
GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}
LLAMA31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 64}
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def gguf_name(name: str) -> str:
    if name in GLOBAL_NAMES:
        return GLOBAL_NAMES[name]
    _, _, layer, rest = name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{LAYER_NAMES[module]}.{kind}"


def llama_cpp_permute(rows: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's reordering of q/k rows: within a head, (half, pair) -> (pair, half)."""
    return rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def llama3_freq_factors(config) -> list[float]:
    """What llama.cpp's converter writes as rope_freqs for Llama 3.1's scaling."""
    scaling, dim = config.rope_parameters, config.head_dim
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    factors = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * scaling["rope_theta"] ** (i / dim)
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return factors


def quantized(rows: np.ndarray, qtype, rng: np.random.Generator) -> np.ndarray:
    """``rows`` in ``qtype``; K-quants (gguf does not quantise them) get random blocks with small
    scales instead, whatever they decode to."""
    if qtype.name.endswith("_K"):
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        data = rng.integers(0, 256, (rows.shape[0], rows.shape[1] // block * size), dtype=np.uint8)
        blocks = data.reshape(-1, size)
        scale = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
        # d (and dmin) are fp16: Q6_K and Q3_K keep d last, Q2_K keeps d and dmin last, the others first.
        spans = {"Q6_K": [size - 2], "Q3_K": [size - 2], "Q2_K": [size - 4, size - 2]}.get(qtype.name, [0, 2])
        for start in spans:
            blocks[:, start:start + 2] = scale
        return data
    return gguf.quants.quantize(rows, qtype)


def write_gguf(path, model, arch: str, qtype=None, chat_template=None, drop=(), extra=None, replace=None):
    """``model`` as llama.cpp writes it; 2-D tensors in ``qtype`` (None: F32). ``extra``: more
    metadata (ints as uint32, floats as float32); ``drop`` and ``replace``: tensors left out or
    written otherwise (by GGUF name). Returns what was stored per GGUF tensor name."""
    config, rng = model.config, np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(sorted(pre_tokenizers.ByteLevel.alphabet()) + ["<|im_start|>", "<|im_end|>"])
    writer.add_token_types([1] * 256 + [3, 3])
    writer.add_token_scores([0.0] * 258)
    writer.add_token_merges([])
    writer.add_bos_token_id(256)
    writer.add_eos_token_id(257)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    for key, value in (extra or {}).items():
        (writer.add_float32 if isinstance(value, float) else writer.add_uint32)(key, value)
    stored = {}
    if config.rope_parameters.get("rope_type") == "llama3":
        stored["rope_freqs.weight"] = np.array(llama3_freq_factors(config), dtype=np.float32)
    for name, tensor in model.state_dict().items():
        rows = tensor.float().numpy()
        if arch == "llama" and ".q_proj." in name:
            rows = llama_cpp_permute(rows, config.num_attention_heads)
        elif arch == "llama" and ".k_proj." in name:
            rows = llama_cpp_permute(rows, config.num_key_value_heads)
        stored[gguf_name(name)] = rows if qtype is None or rows.ndim == 1 else quantized(rows, qtype, rng)
    stored.update(replace or {})
    for name, data in stored.items():
        if name in drop:
            continue
        is_quantized = qtype is not None and data.dtype == np.uint8
        writer.add_tensor(name, data, raw_dtype=qtype if is_quantized else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


def make_model(kind: str):
    common = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64, vocab_size=258, max_position_embeddings=1024,
                  bos_token_id=None, eos_token_id=None, pad_token_id=None, attn_implementation="eager")
    if kind == "qwen2":
        config = transformers.Qwen2Config(tie_word_embeddings=True, **common)
        model_cls = transformers.Qwen2ForCausalLM
    else:
        config = transformers.LlamaConfig(tie_word_embeddings=kind == "llama31", rope_theta=500000.0,
                                          rope_scaling=LLAMA31 if kind == "llama31" else None,
                                          attention_bias=kind == "llama-bias", **common)
        model_cls = transformers.LlamaForCausalLM
    torch.manual_seed(7)
    model = model_cls(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:  # sharpen attention, and make Qwen2's biases matter
            layer.self_attn.q_proj.weight *= 4
            layer.self_attn.k_proj.weight *= 4
            if kind in ("qwen2", "llama-bias"):
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    torch.nn.init.normal_(proj.bias, std=0.5)
    return model


def load(path, **kwargs) -> LLM:
    return LLM(str(path), device="cpu", dtype=torch.float16, max_seq_len=256, progress=False, **kwargs)


@pytest.mark.parametrize("kind", ["llama", "llama31", "llama-bias", "qwen2"])
def test_gguf_logits_match_transformers(tmp_path, kind):
    """Names, the un-reordered q/k rows (and biases, reordered too in a Llama with attention bias),
    Qwen2's biases, tied heads, and Llama 3.1's scaling from rope_freqs: the logits of the
    transformers model the file was written from."""
    model = make_model(kind)
    path = tmp_path / f"{kind}.gguf"
    write_gguf(path, model, "qwen2" if kind == "qwen2" else "llama")
    llm = load(path)
    ids = torch.randint(0, 256, (150,), generator=torch.Generator().manual_seed(3)).tolist()
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0]
        half = type(model)(model.config).eval()
        half.load_state_dict(model.state_dict())
        own = (half.half()(torch.tensor([ids])).logits[0].float() - expected).abs().max().item()
    error = (llm.prefill_logits(ids) - expected).abs().max().item()
    assert error <= 2 * own + 1e-3, (error, own)
    assert llm.config.rope_type == ("freq_factors" if kind == "llama31" else "default")
    assert llm.config.eos_token_ids == (257,)


@pytest.mark.parametrize("qtype", ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K",
                                   "Q5_K", "Q6_K"])
def test_quantised_tensors_are_dequantised_into_place(tmp_path, qtype):
    qtype = gguf.GGMLQuantizationType[qtype]
    model, path = make_model("llama"), tmp_path / "q.gguf"
    stored = write_gguf(path, model, "llama", qtype)
    llm = load(path)
    config = model.config

    def expected(name, heads=None):
        data = stored[name]
        rows = gguf.quants.dequantize(data, qtype) if data.dtype == np.uint8 else data
        if heads is not None:  # undo the reordering, here by its definition
            rows = rows.reshape(heads, rows.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(rows.shape)
        return torch.from_numpy(np.ascontiguousarray(rows)).half()

    layer = llm.model.layers[1]
    q_size, kv_size = config.num_attention_heads * 64, config.num_key_value_heads * 64
    torch.testing.assert_close(layer.attn.qkv.weight[:q_size], expected("blk.1.attn_q.weight", 4), rtol=0, atol=0)
    torch.testing.assert_close(layer.attn.qkv.weight[q_size:q_size + kv_size], expected("blk.1.attn_k.weight", 2),
                               rtol=0, atol=0)
    torch.testing.assert_close(layer.mlp.gate_up.weight[512:], expected("blk.1.ffn_up.weight"), rtol=0, atol=0)
    torch.testing.assert_close(llm.model.embed.weight, expected("token_embd.weight"), rtol=0, atol=0)
    torch.testing.assert_close(llm.model.lm_head.weight, expected("output.weight"), rtol=0, atol=0)


def test_chat_template_comes_from_the_file(tmp_path):
    path = tmp_path / "chat.gguf"
    write_gguf(path, make_model("qwen2"), "qwen2", chat_template=CHATML)
    llm = load(path)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    specials = {"<|im_start|>": 256, "<|im_end|>": 257}
    expected = []
    for piece in text.replace("<|im_start|>", "\0<|im_start|>\0").replace("<|im_end|>", "\0<|im_end|>\0").split("\0"):
        expected += [specials[piece]] if piece in specials else llm.tokenizer.encode(piece, add_special_tokens=False).ids
    assert llm.chat_prompt(messages) == expected
    out = llm.chat(messages, max_new_tokens=5)[0]
    assert out == llm.generate([expected], max_new_tokens=5)[0]


def test_a_model_without_a_chat_template_says_so(tmp_path):
    path = tmp_path / "plain.gguf"
    write_gguf(path, make_model("qwen2"), "qwen2")
    with pytest.raises(ArgumentError, match="this model has no chat template"):
        load(path).chat([{"role": "user", "content": "Hi"}])


@pytest.mark.parametrize(("messages", "named"), [
    ([], "messages must be a non-empty list"), ("hi", "messages must be a non-empty list"),
    ([{"role": "robot", "content": "hi"}], r"messages\[0\].role"), ([{"role": "user", "content": 3}],
                                                                     r"messages\[0\].content"),
    ([{"role": "user", "content": "hi"}, "hi"], r"messages\[1\] must be an object"),
])
def test_bad_messages_are_named(tmp_path, messages, named):
    path = tmp_path / "chat.gguf"
    write_gguf(path, make_model("qwen2"), "qwen2", chat_template=CHATML)
    with pytest.raises(ArgumentError, match=named):
        load(path).chat_prompt(messages)


def test_unsupported_files_are_refused_naming_what(tmp_path):
    model = make_model("llama")
    cases = []
    path = tmp_path / "gemma.gguf"
    write_gguf(path, model, "gemma")
    cases.append((path, NotImplementedError, "GGUF architecture 'gemma' is not supported"))
    whole = tmp_path / "whole.gguf"
    write_gguf(whole, model, "llama")
    iq = tmp_path / "iq4.gguf"  # a tensor of a type tkpy does not read
    writer = gguf.GGUFWriter(str(iq), "llama")
    writer.add_block_count(2)
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.IQ4_NL]
    writer.add_tensor("token_embd.weight", np.zeros((258, 256 // block * size), dtype=np.uint8),
                      raw_dtype=gguf.GGMLQuantizationType.IQ4_NL)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    cases.append((iq, NotImplementedError, "tensor token_embd.weight is IQ4_NL, which tkpy does not dequantise"))
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(whole.read_bytes()[:1000])
    cases.append((truncated, ArgumentError, "not a readable GGUF file"))
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all" * 10)
    cases.append((garbage, ArgumentError, "not a readable GGUF file"))
    missing = tmp_path / "no-norm.gguf"
    write_gguf(missing, model, "llama", drop=("blk.0.attn_norm.weight",))
    cases.append((missing, ArgumentError, "missing 1 tensors: model.layers.0.input_layernorm.weight"))
    window = tmp_path / "window.gguf"
    write_gguf(window, model, "llama", extra={"llama.attention.sliding_window": 16})
    cases.append((window, NotImplementedError, "sliding window"))
    for path, error, message in cases:
        with pytest.raises(error, match=message):
            load(path)
    load(whole)  # the file the truncated one was cut from


def test_end_of_turn_ids_and_legacy_linear_rope_come_from_the_metadata(tmp_path):
    model, path = make_model("llama"), tmp_path / "meta.gguf"
    write_gguf(path, model, "llama", extra={"tokenizer.ggml.eot_token_id": 65, "tokenizer.ggml.eom_token_id": 66,
                                            "llama.rope.scale_linear": 4.0})
    config = load(path).config
    # eos (257) and the end-of-turn ids; <|im_end|> is 257 too, <|im_start|> (256) ends nothing.
    assert config.eos_token_ids == (65, 66, 257)
    assert (config.rope_type, dict(config.rope_params)) == ("linear", {"factor": 4.0})


def test_damaged_tensors_and_metadata_are_named(tmp_path):
    model = make_model("llama")
    path = tmp_path / "rows.gguf"
    short = model.model.layers[1].self_attn.q_proj.weight.detach().numpy()[:192]
    write_gguf(path, model, "llama", replace={"blk.1.attn_q.weight": short})
    with pytest.raises(ArgumentError, match=r"blk.1.attn_q.weight: expected 256 rows \(4 heads of 64\), got shape "
                                            r"\(192, 256\)"):
        load(path)
    path = tmp_path / "template.gguf"
    write_gguf(path, model, "llama", extra={"tokenizer.chat_template": 7})
    with pytest.raises(ArgumentError, match="tokenizer.chat_template: the chat template must be text, got int"):
        load(path)
