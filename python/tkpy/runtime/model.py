"""The Llama-family decoder (Llama 2/3/3.1, Qwen2/2.5, Mistral) on tkpy's attention and RoPE.

Tokens are always packed along one dimension, ``[T, hidden]``: a prefill's sequences one after
another, or a decode step's one token per sequence. Where the keys go and which keys a query sees
is the business of the :class:`~tkpy.runtime.attention.AttentionBackend` handed down with the
tokens, planned for the step (its metadata also holds each token's position).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..rope import apply_rope_
from .config import ModelConfig, rope_cos_sin
from .attention import AttentionBackend

__all__ = ["Transformer"]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In float32 and rounded before the weight, as transformers does: the logits then agree
        # with a transformers model of the same dtype up to the kernels' own rounding.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.heads, self.kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.q_size, self.kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        # q, k and v in one matmul: the loader writes the checkpoint's three matrices into its rows.
        self.qkv = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.qkv_bias)
        self.o = nn.Linear(self.q_size, config.hidden_size, bias=config.o_bias)

    def forward(self, x, cos, sin, backend: AttentionBackend) -> torch.Tensor:
        tokens = x.shape[0]
        q, k, v = self.qkv(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(tokens, self.heads, self.head_dim)  # [T, Hq, D]
        k = k.view(tokens, self.kv_heads, self.head_dim)  # [T, Hkv, D]
        v = v.view(tokens, self.kv_heads, self.head_dim)
        apply_rope_(q, k, cos, sin, backend.metadata.positions)
        out = backend.attention(self.layer, q, k, v)  # [T, Hq, D]
        return self.o(out.reshape(tokens, self.q_size))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_up = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config, layer)
        self.post_attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, backend: AttentionBackend) -> torch.Tensor:
        x = x + self.attn(self.input_norm(x), cos, sin, backend)
        return x + self.mlp(self.post_attn_norm(x))


class Transformer(nn.Module):
    """Build it on the meta device and then ``to_empty`` it: the loader fills every parameter, so
    initialising them first would be wasted work."""

    def __init__(self, config: ModelConfig, max_positions: int):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.max_positions = max_positions

    def rope_tables(self) -> None:
        """Fill the float32 cos/sin tables (kept out of the parameters: the checkpoint has none)."""
        self.cos, self.sin = rope_cos_sin(self.config, self.max_positions, self.embed.weight.device)

    def forward(self, tokens: torch.Tensor, backend: AttentionBackend) -> torch.Tensor:
        """tokens int64 ``[T]`` -> hidden states ``[T, hidden]`` after the final norm, attending
        through ``backend`` as its plan for the step says."""
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x, self.cos, self.sin, backend)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 ``[N, vocab]`` for hidden states ``[N, hidden]``."""
        weight = self.embed.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight).float()
