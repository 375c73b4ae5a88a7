"""GGUF checkpoints (llama.cpp's one-file format): the config, the weights, the tokenizer and the chat
template of a Llama, Qwen2 or Mistral model, read with the ``gguf`` package.

Quantised tensors are dequantised by ``gguf`` one at a time, as each is copied into the model in
its dtype. llama.cpp's converter reorders the rows of a Llama model's q and k projections (its
RoPE pairs adjacent channels, Hugging Face's pairs the two halves of a head); they are put back.
The tokenizer is rebuilt from the file's vocabulary by transformers' GGUF converter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from ..errors import ArgumentError
from .chat import ChatTemplate
from .config import ModelConfig

__all__ = ["ARCHITECTURES", "QUANT_TYPES", "GGUFCheckpoint"]

# GGUF general.architecture -> the Hugging Face architecture it runs as. llama.cpp writes Mistral
# models as "llama".
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# Tensor types read: the float ones and the quantisations gguf dequantises and llama.cpp's
# releases use (legacy and K-quants).
QUANT_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_LAYER_NAMES = {  # blk.{i}.<name> -> model.layers.{i}.<name>
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
ROPE_FREQS = "rope_freqs.weight"  # Llama 3.1's per-frequency divisors, written as a tensor
# Tokens that end a turn, which llama.cpp also stops at when the file's ids do not name them (an
# older Llama 3 instruct conversion names only <|end_of_text|> as EOS).
END_OF_TURN = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>")


def hf_name(name: str) -> Optional[str]:
    """A GGUF tensor name as Hugging Face names it; None for a name no supported model has."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES \
            and parts[3] in ("weight", "bias"):
        return f"model.layers.{int(parts[1])}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    return None


def unpermute_rope_rows(rows: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's reordering of a q or k projection (weight or bias): within each head, its
    row order ``(pair, half)`` goes back to Hugging Face's ``(half, pair)``."""
    shape = rows.shape
    return rows.reshape(heads, shape[0] // heads // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


class GGUFCheckpoint:
    """One ``.gguf`` file, opened (memory-mapped) and checked for what tkpy runs."""

    def __init__(self, path: Path):
        try:
            import gguf
        except ImportError:
            raise ImportError("LLM: a .gguf checkpoint needs the gguf package: pip install 'tkpy[gguf]'") from None
        self.path = Path(path)
        try:
            self.reader = gguf.GGUFReader(str(self.path))
        except Exception as e:  # gguf raises ValueError, struct.error, IndexError... for a damaged file
            raise ArgumentError(f"{self.path}: not a readable GGUF file: {type(e).__name__}: {e}") from None
        self.architecture = self._value("general.architecture")
        if self.architecture not in ARCHITECTURES:
            raise NotImplementedError(f"{self.path}: GGUF architecture {self.architecture!r} is not supported; "
                                      f"tkpy.runtime reads {sorted(ARCHITECTURES)}")
        for tensor in self.reader.tensors:
            if tensor.tensor_type.name not in QUANT_TYPES:
                raise NotImplementedError(f"{self.path}: tensor {tensor.name} is {tensor.tensor_type.name}, which tkpy "
                                          f"does not dequantise; it reads {', '.join(QUANT_TYPES)}")
        self.tensor_names = {tensor.name for tensor in self.reader.tensors}
        self.weight_names = sorted(self.tensor_names - {ROPE_FREQS})

    def _value(self, key: str, default=None):
        field = self.reader.get_field(key)
        if field is None:
            if default is None:
                raise ArgumentError(f"{self.path}: missing metadata {key!r}")
            return default
        try:
            return field.contents()
        except Exception as e:
            raise ArgumentError(f"{self.path}: metadata {key!r} does not read: {e}") from None

    def config(self) -> ModelConfig:
        """The model's shapes from the file's metadata, checked as config.json would be."""
        arch, value = self.architecture, self._value
        heads = value(f"{arch}.attention.head_count")
        hidden = value(f"{arch}.embedding_length")
        head_dim = value(f"{arch}.attention.key_length", hidden // heads if isinstance(heads, int) and heads else 0)
        if value(f"{arch}.attention.value_length", head_dim) != head_dim:
            raise NotImplementedError(f"{self.path}: value heads of another size than key heads are not supported")
        if value(f"{arch}.rope.dimension_count", head_dim) != head_dim:
            raise NotImplementedError(f"{self.path}: RoPE on part of a head ({arch}.rope.dimension_count) is not "
                                      f"supported")
        tokens = self.reader.get_field("tokenizer.ggml.tokens")
        raw = {
            "architectures": [ARCHITECTURES[arch]],
            "vocab_size": value(f"{arch}.vocab_size", len(tokens.data) if tokens is not None else None),
            "hidden_size": hidden, "intermediate_size": value(f"{arch}.feed_forward_length"),
            "num_hidden_layers": value(f"{arch}.block_count"), "num_attention_heads": heads,
            "num_key_value_heads": value(f"{arch}.attention.head_count_kv", heads), "head_dim": head_dim,
            "rms_norm_eps": value(f"{arch}.attention.layer_norm_rms_epsilon"),
            "max_position_embeddings": value(f"{arch}.context_length"),
            "rope_theta": value(f"{arch}.rope.freq_base", 10000.0),
            "rope_scaling": self._rope_scaling(),
            "tie_word_embeddings": "output.weight" not in self.tensor_names,
            "attention_bias": arch == "llama" and "blk.0.attn_q.bias" in self.tensor_names,
        }
        if value(f"{arch}.attention.sliding_window", 0):
            raise NotImplementedError(f"{self.path}: a sliding window in a GGUF file is not supported")
        # llama.cpp ends a generation at the end-of-sequence, end-of-turn and end-of-message tokens.
        eos = {self._value(f"tokenizer.ggml.{kind}_token_id", -1) for kind in ("eos", "eot", "eom")}
        if tokens is not None:
            eos |= {i for i, text in enumerate(self._value("tokenizer.ggml.tokens")) if text in END_OF_TURN}
        return ModelConfig.from_dict(raw, sorted(i for i in eos if isinstance(i, int) and i >= 0), source=str(self.path))

    def _rope_scaling(self) -> Optional[dict]:
        arch = self.architecture
        kind = self._value(f"{arch}.rope.scaling.type", "none")
        legacy = self._value(f"{arch}.rope.scale_linear", 1.0)  # older conversions' linear factor
        if kind == "none" and legacy != 1.0:
            return {"rope_type": "linear", "factor": legacy}
        if ROPE_FREQS in self.tensor_names:
            if kind not in ("none", "linear") or self._value(f"{arch}.rope.scaling.factor", 1.0) != 1.0:
                raise NotImplementedError(f"{self.path}: {ROPE_FREQS} together with {kind} RoPE scaling")
            tensor = next(t for t in self.reader.tensors if t.name == ROPE_FREQS)
            return {"rope_type": "freq_factors", "freq_factors": self._dequantized(tensor).tolist()}
        if kind == "none":
            return None
        if kind != "linear":
            raise NotImplementedError(f"{self.path}: {kind} RoPE scaling is not supported (none, linear, or "
                                      f"Llama 3.1's {ROPE_FREQS})")
        return {"rope_type": "linear", "factor": self._value(f"{arch}.rope.scaling.factor")}

    def _dequantized(self, tensor) -> np.ndarray:
        from gguf.quants import dequantize

        # GGUF lists dimensions innermost first; numpy's shape is the reverse.
        return dequantize(tensor.data, tensor.tensor_type).reshape(tuple(int(n) for n in reversed(tensor.shape)))

    def tensors(self, config: ModelConfig) -> Iterator[tuple[str, str, torch.Tensor]]:
        """``(where, Hugging Face name, float32 tensor)`` for :func:`~tkpy.runtime.loader.fill_weights`."""
        for tensor in self.reader.tensors:
            if tensor.name == ROPE_FREQS:
                continue  # in the config
            name = hf_name(tensor.name)
            if name is None:
                raise ArgumentError(f"{self.path}: tensor {tensor.name!r} has no place in a {self.architecture} model")
            where, rows = f"{self.path}: {tensor.name}", self._dequantized(tensor)
            heads = {"q_proj": config.num_heads, "k_proj": config.num_kv_heads}.get(name.split(".")[-2])
            if self.architecture == "llama" and heads is not None:
                if rows.shape[0] != heads * config.head_dim:
                    raise ArgumentError(f"{where}: expected {heads * config.head_dim} rows ({heads} heads of "
                                        f"{config.head_dim}), got shape {rows.shape}")
                rows = unpermute_rope_rows(rows, heads)
            # F32 rows view the file's read-only map: copied; dequantised ones are fresh arrays.
            yield where, name, torch.from_numpy(rows if rows.flags.writeable else rows.copy())

    def tokenizer(self):
        """``(tokenizers.Tokenizer, ChatTemplate or None)`` from the file's vocabulary, built by
        transformers' GGUF tokenizer converter."""
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise ImportError("LLM: the tokenizer of a .gguf checkpoint is rebuilt by transformers: "
                              "pip install 'tkpy[gguf]'") from None
        try:
            fast = AutoTokenizer.from_pretrained(str(self.path.parent), gguf_file=self.path.name)
        except Exception as e:  # transformers raises many kinds for a vocabulary it cannot convert
            raise ArgumentError(f"{self.path}: the tokenizer does not convert: {type(e).__name__}: {e}") from None
        template = self.reader.get_field("tokenizer.chat_template")
        chat = None
        if template is not None:
            special = {key: text for key in ("bos_token", "eos_token", "unk_token", "pad_token")
                       if isinstance(text := getattr(fast, key, None), str)}
            chat = ChatTemplate(self._value("tokenizer.chat_template"), special, f"{self.path}: tokenizer.chat_template")
        return fast.backend_tokenizer, chat
