"""What the runtime needs from a Hugging Face ``config.json``, validated once.

Llama 2/3/3.1, Qwen2/2.5 and Mistral share one decoder; they differ only in the fields kept here
(qkv bias, sliding window, RoPE scaling, tied embeddings).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

__all__ = ["ARCHITECTURES", "ModelConfig", "rope_cos_sin", "rope_inv_freq"]

# architecture -> (q/k/v projections carry a bias, o projection carries a bias), before
# Llama's optional ``attention_bias`` flag, which adds both.
ARCHITECTURES = {
    "LlamaForCausalLM": (False, False),
    "MistralForCausalLM": (False, False),
    "Qwen2ForCausalLM": (True, False),
}
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    rope_theta: float
    rope_type: str = "default"
    rope_params: tuple = ()  # sorted (key, value) pairs of the scaling parameters
    # Per layer: how many earlier tokens a query sees besides itself (flash-attn's window_size[0]),
    # -1 for full causal attention.
    window_left: tuple = ()
    eos_token_ids: tuple = ()

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"unknown architecture {self.architecture!r}; tkpy.runtime runs {sorted(ARCHITECTURES)}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"config: {name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"config: num_attention_heads={self.num_heads} must be a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )
        if self.head_dim not in (64, 128, 256):
            raise ValueError(f"config: head_dim must be 64, 128 or 256 (tkpy's attention kernels), got {self.head_dim}")
        if self.rope_type not in ROPE_TYPES:
            raise NotImplementedError(f"config: rope_type {self.rope_type!r} is not supported; supported: {ROPE_TYPES}")
        if len(self.window_left) != self.num_layers:
            raise ValueError(f"config: expected {self.num_layers} per-layer windows, got {len(self.window_left)}")

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_folder(cls, folder: Path) -> "ModelConfig":
        """Read ``config.json`` (and ``generation_config.json`` for the end-of-sequence ids, which
        Llama 3 instruct checkpoints list only there)."""
        path = folder / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{folder}: no config.json (expected a Hugging Face checkpoint folder)")
        raw = json.loads(path.read_text())
        generation = folder / "generation_config.json"
        eos = json.loads(generation.read_text()).get("eos_token_id") if generation.is_file() else None
        return cls.from_dict(raw, eos if eos is not None else raw.get("eos_token_id"))

    @classmethod
    def from_dict(cls, raw: dict, eos_token_id=None) -> "ModelConfig":
        archs = raw.get("architectures") or []
        if len(archs) != 1:
            raise ValueError(f"config.json: expected one entry in 'architectures', got {archs!r}")
        arch = archs[0]
        if arch not in ARCHITECTURES:
            raise ValueError(f"config.json: unknown architecture {arch!r}; tkpy.runtime runs {sorted(ARCHITECTURES)}")

        def need(key):
            if raw.get(key) is None:
                raise ValueError(f"config.json: missing {key!r} (needed for {arch})")
            return raw[key]

        if raw.get("hidden_act", "silu") != "silu":
            raise NotImplementedError(f"config.json: hidden_act {raw['hidden_act']!r} is not supported (only 'silu')")
        if raw.get("mlp_bias"):
            raise NotImplementedError("config.json: mlp_bias=true is not supported")
        qkv_bias, o_bias = ARCHITECTURES[arch]
        if raw.get("attention_bias"):
            qkv_bias = o_bias = True
        num_layers, num_heads = need("num_hidden_layers"), need("num_attention_heads")
        head_dim = raw.get("head_dim") or need("hidden_size") // num_heads
        # transformers 5 writes ``rope_parameters`` (theta inside); released checkpoints write
        # ``rope_theta`` and ``rope_scaling``.
        rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", None) or raw.get("rope_theta", 10000.0)
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))
        if rope.pop("partial_rotary_factor", 1.0) != 1.0:
            raise NotImplementedError("config.json: partial_rotary_factor != 1 is not supported")
        eos = eos_token_id if eos_token_id is not None else []
        return cls(
            architecture=arch,
            vocab_size=need("vocab_size"),
            hidden_size=need("hidden_size"),
            intermediate_size=need("intermediate_size"),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=raw.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            max_position_embeddings=need("max_position_embeddings"),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            rope_theta=float(theta),
            rope_type=rope_type,
            rope_params=tuple(sorted(rope.items())),
            window_left=_windows(arch, raw, num_layers),
            eos_token_ids=tuple(eos if isinstance(eos, list) else [eos]),
        )


def _windows(arch: str, raw: dict, num_layers: int) -> tuple:
    """Per-layer left windows: Mistral's ``sliding_window`` covers every layer; Qwen2 slides only
    where ``layer_types`` (or its older ``use_sliding_window``/``max_window_layers``) says so."""
    window = raw.get("sliding_window")
    if window is None or (arch == "Qwen2ForCausalLM" and not raw.get("use_sliding_window", False)):
        return (-1,) * num_layers
    if raw.get("layer_types"):
        sliding = [t == "sliding_attention" for t in raw["layer_types"]]
    elif arch == "Qwen2ForCausalLM":
        sliding = [i >= raw.get("max_window_layers", 0) for i in range(num_layers)]
    else:
        sliding = [True] * num_layers
    if arch == "LlamaForCausalLM" and any(sliding):
        raise NotImplementedError("config.json: a Llama model with a sliding window is not supported")
    # transformers masks key j for query i iff j <= i - sliding_window: the query sees itself and
    # the sliding_window - 1 tokens before it.
    return tuple(int(window) - 1 if s else -1 for s in sliding)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """float32 ``[head_dim / 2]`` inverse frequencies, as transformers computes them (the same
    float32 operations, so the angles agree bit for bit)."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    params = dict(config.rope_params)
    if config.rope_type == "linear":
        return inv_freq / params["factor"]
    if config.rope_type == "llama3":
        # Llama 3.1: long wavelengths are divided by ``factor``, short ones kept, and the band in
        # between interpolated smoothly.
        factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
        old_context = params["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_context / high) * ~(wavelen > old_context / low)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


def rope_cos_sin(config: ModelConfig, max_positions: int, device: Optional[torch.device] = None):
    """float32 ``[max_positions, head_dim / 2]`` cos and sin tables for :func:`tkpy.rope.apply_rope_`."""
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), rope_inv_freq(config))
    return angles.cos().to(device), angles.sin().to(device)
