"""What the runtime needs from a Hugging Face ``config.json``, validated once, before anything is
allocated.

Llama 2/3/3.1, Qwen2/2.5 and Mistral share one decoder; they differ only in the fields kept here
(qkv bias, sliding window, RoPE scaling, tied embeddings).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..errors import ArgumentError
from ..validation import positive_as_float32
from .files import read_json_object, resolve_inside

__all__ = ["ARCHITECTURES", "HEAD_DIMS", "ModelConfig", "SIZE_LIMITS", "rope_cos_sin", "rope_inv_freq"]

# architecture -> (q/k/v projections carry a bias, o projection carries a bias), before
# Llama's optional ``attention_bias`` flag, which adds both.
ARCHITECTURES = {
    "LlamaForCausalLM": (False, False),
    "MistralForCausalLM": (False, False),
    "Qwen2ForCausalLM": (True, False),
}
# "freq_factors": each inverse frequency divided by its own factor, as a GGUF file writes Llama 3.1's
# scaling (a rope_freqs tensor).
ROPE_TYPES = ("default", "linear", "llama3", "freq_factors")
HEAD_DIMS = (64, 128, 256)  # tkpy's attention kernels
LAYER_TYPES = ("full_attention", "sliding_attention")
# Generous bounds on a model's sizes, checked before anything is built. Released models sit far
# inside them (Llama 3.1 405B: 126 layers, 128 query heads, hidden 16384, intermediate 53248;
# Gemma: a 256k vocabulary; Llama 4 Scout: 10M positions). A value outside is a corrupt or hostile
# file, which would otherwise build a million layers, or size tables past any memory, before a
# single weight is read.
SIZE_LIMITS = {  # ModelConfig field: (config.json key, largest value accepted)
    "vocab_size": ("vocab_size", 2**24),
    "hidden_size": ("hidden_size", 2**17),
    "intermediate_size": ("intermediate_size", 2**18),
    "num_layers": ("num_hidden_layers", 1024),
    "num_heads": ("num_attention_heads", 1024),
    "num_kv_heads": ("num_key_value_heads", 1024),
    "max_position_embeddings": ("max_position_embeddings", 2**24),
}
MAX_POSITIONS = SIZE_LIMITS["max_position_embeddings"][1]
_REQUIRED = object()


def _shown(value) -> str:
    """A value for an error message, cut short: a hostile file may hold a million-element list."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(where: str, value, low: int, high: int) -> int:
    if not _is_int(value) or not low <= value <= high:
        raise ArgumentError(f"{where} must be an integer in [{low}, {high}], got {_shown(value)}")
    return value


def _check_positive(where: str, value) -> float:
    if not positive_as_float32(value):
        raise ArgumentError(f"{where} must be a finite number > 0 (as a float32), got {_shown(value)}")
    return float(value)


def _eos_ids(where: str, value) -> tuple:
    """None, an id or a list of ids -> a tuple of ids."""
    ids = [] if value is None else value if isinstance(value, (list, tuple)) else [value]
    if not all(_is_int(i) and i >= 0 for i in ids):
        raise ArgumentError(f"{where} must be a token id >= 0 or a list of them, got {_shown(value)}")
    return tuple(ids)


class _Fields:
    """Typed reads of one JSON object's values; each refusal names the file and the key. A null
    value counts as absent, as transformers reads it."""

    def __init__(self, raw: dict, source: str, prefix: str = ""):
        self.raw, self.source, self.prefix = raw, source, prefix

    def where(self, key: str) -> str:
        return f"{self.source}: {self.prefix}{key}"

    def get(self, key: str, default=_REQUIRED):
        value = self.raw.get(key)
        if value is None:
            if default is _REQUIRED:
                raise ArgumentError(f"{self.source}: missing {self.prefix + key!r}")
            return default
        return value

    def int(self, key: str, low: int, high: int, default=_REQUIRED) -> int:
        return _check_int(self.where(key), self.get(key, default), low, high)

    def positive(self, key: str, default=_REQUIRED) -> float:  # finite and > 0 as a float32
        return _check_positive(self.where(key), self.get(key, default))

    def flag(self, key: str) -> bool:
        value = self.get(key, False)
        if not isinstance(value, bool):
            raise ArgumentError(f"{self.where(key)} must be true or false, got {_shown(value)}")
        return value


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
        # from_dict has checked all of this against config.json's keys; a ModelConfig built
        # directly (benchmarks, LLM(ModelConfig)) is held to the same bounds.
        if self.architecture not in ARCHITECTURES:
            raise ArgumentError(f"ModelConfig: unknown architecture {_shown(self.architecture)}; "
                                f"tkpy.runtime runs {sorted(ARCHITECTURES)}")
        for name, (_, most) in SIZE_LIMITS.items():
            _check_int(f"ModelConfig: {name}", getattr(self, name), 1, most)
        if self.num_heads % self.num_kv_heads:
            raise ArgumentError(f"ModelConfig: num_heads={self.num_heads} must be a multiple of "
                                f"num_kv_heads={self.num_kv_heads}")
        if self.head_dim not in HEAD_DIMS:
            raise ArgumentError(f"ModelConfig: head_dim must be 64, 128 or 256 (tkpy's attention kernels), "
                                f"got {_shown(self.head_dim)}")
        _check_positive("ModelConfig: rms_norm_eps", self.rms_norm_eps)
        _check_positive("ModelConfig: rope_theta", self.rope_theta)
        if self.rope_type not in ROPE_TYPES:
            raise NotImplementedError(f"ModelConfig: rope_type {_shown(self.rope_type)} is not supported; "
                                      f"supported: {ROPE_TYPES}")
        factors = dict(self.rope_params).get("freq_factors")
        if self.rope_type == "freq_factors" and (not isinstance(factors, tuple) or len(factors) != self.head_dim // 2):
            raise ArgumentError(f"ModelConfig: freq_factors must hold head_dim / 2 = {self.head_dim // 2} factors, "
                                f"got {_shown(factors)}")
        if len(self.window_left) != self.num_layers or not all(_is_int(w) and w >= -1 for w in self.window_left):
            raise ArgumentError(f"ModelConfig: window_left must hold {self.num_layers} integers >= -1, "
                                f"got {_shown(self.window_left)}")
        _eos_ids("ModelConfig: eos_token_ids", list(self.eos_token_ids))

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_folder(cls, folder: Path) -> "ModelConfig":
        """Read ``config.json`` (and ``generation_config.json`` for the end-of-sequence ids, which
        Llama 3 instruct checkpoints list only there)."""
        path = resolve_inside(folder, "config.json", f"{folder}: config.json")
        if not path.is_file():
            raise FileNotFoundError(f"{folder}: no config.json (expected a Hugging Face checkpoint folder)")
        raw = read_json_object(path)
        generation = resolve_inside(folder, "generation_config.json", f"{folder}: generation_config.json")
        eos = read_json_object(generation).get("eos_token_id") if generation.is_file() else None
        if eos is not None:
            eos = _eos_ids(f"{generation}: eos_token_id", eos)
        return cls.from_dict(raw, eos, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict, eos_token_id=None, source: str = "config.json") -> "ModelConfig":
        """Validate a parsed ``config.json`` (named ``source`` in errors) against the bounds in
        :data:`SIZE_LIMITS`, every value's type included. ``eos_token_id`` (an id or a list)
        replaces the file's own."""
        fields = _Fields(raw, source)
        archs = raw.get("architectures")
        if not isinstance(archs, list) or len(archs) != 1 or not isinstance(archs[0], str):
            raise ArgumentError(f"{source}: expected one name in 'architectures', got {_shown(archs)}")
        arch = archs[0]
        if arch not in ARCHITECTURES:
            raise ArgumentError(f"{source}: unknown architecture {arch!r}; tkpy.runtime runs {sorted(ARCHITECTURES)}")
        if fields.get("hidden_act", "silu") != "silu":
            raise NotImplementedError(f"{source}: hidden_act {_shown(raw['hidden_act'])} is not supported "
                                      f"(only 'silu')")
        if fields.flag("mlp_bias"):
            raise NotImplementedError(f"{source}: mlp_bias=true is not supported")
        qkv_bias, o_bias = ARCHITECTURES[arch]
        if fields.flag("attention_bias"):
            qkv_bias = o_bias = True

        sizes = {name: fields.int(key, 1, most) for name, (key, most) in SIZE_LIMITS.items() if name != "num_kv_heads"}
        num_heads = sizes["num_heads"]
        num_kv_heads = fields.int("num_key_value_heads", 1, num_heads, default=num_heads)
        if num_heads % num_kv_heads:
            raise ArgumentError(f"{source}: num_attention_heads={num_heads} must be a multiple of "
                                f"num_key_value_heads={num_kv_heads}")
        head_dim = fields.get("head_dim", sizes["hidden_size"] // num_heads)
        if not _is_int(head_dim) or head_dim not in HEAD_DIMS:
            derived = " (hidden_size / num_attention_heads)" if raw.get("head_dim") is None else ""
            raise ArgumentError(f"{source}: head_dim{derived} must be 64, 128 or 256 (tkpy's attention kernels), "
                                f"got {_shown(head_dim)}")
        eos = (_eos_ids("eos_token_id", eos_token_id) if eos_token_id is not None
               else _eos_ids(fields.where("eos_token_id"), raw.get("eos_token_id")))
        return cls(
            architecture=arch,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=fields.positive("rms_norm_eps", 1e-6),
            tie_word_embeddings=fields.flag("tie_word_embeddings"),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            **_rope(fields),
            window_left=_windows(arch, fields, sizes["num_layers"]),
            eos_token_ids=eos,
            **sizes,
        )


def _rope(fields: _Fields) -> dict:
    """RoPE's theta, type and scaling parameters. transformers 5 writes ``rope_parameters`` (theta
    inside); released checkpoints write ``rope_theta`` and ``rope_scaling``."""
    key = "rope_parameters" if fields.raw.get("rope_parameters") is not None else "rope_scaling"
    rope = fields.get(key, {})
    if not isinstance(rope, dict):
        raise ArgumentError(f"{fields.where(key)} must be an object, got {_shown(rope)}")
    scaling = _Fields(rope, fields.source, f"{key}.")
    if rope.get("rope_theta") is not None:
        theta = scaling.positive("rope_theta")
    else:
        theta = fields.positive("rope_theta", 10000.0)
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise NotImplementedError(f"{scaling.where('rope_type')} {_shown(rope_type)} is not supported; "
                                  f"supported: {ROPE_TYPES}")
    if scaling.positive("partial_rotary_factor", 1.0) != 1.0:
        raise NotImplementedError(f"{scaling.where('partial_rotary_factor')} != 1 is not supported")
    params = {}
    if rope_type in ("linear", "llama3"):
        params["factor"] = scaling.positive("factor")
    if rope_type == "llama3":
        params["low_freq_factor"] = scaling.positive("low_freq_factor")
        params["high_freq_factor"] = scaling.positive("high_freq_factor")
        # The band between the two is interpolated, dividing by their difference.
        if params["high_freq_factor"] <= params["low_freq_factor"]:
            raise ArgumentError(f"{scaling.where('high_freq_factor')}={params['high_freq_factor']} must be greater "
                                f"than {scaling.prefix}low_freq_factor={params['low_freq_factor']}")
        params["original_max_position_embeddings"] = scaling.int("original_max_position_embeddings", 1, MAX_POSITIONS)
    if rope_type == "freq_factors":
        factors = scaling.get("freq_factors")
        if not isinstance(factors, list):
            raise ArgumentError(f"{scaling.where('freq_factors')} must be a list of numbers, got {_shown(factors)}")
        params["freq_factors"] = tuple(_check_positive(scaling.where(f"freq_factors[{i}]"), f)
                                       for i, f in enumerate(factors))
    return {"rope_theta": theta, "rope_type": rope_type, "rope_params": tuple(sorted(params.items()))}


def _windows(arch: str, fields: _Fields, num_layers: int) -> tuple:
    """Per-layer left windows: Mistral's ``sliding_window`` covers every layer; Qwen2 slides only
    where ``layer_types`` (or its older ``use_sliding_window``/``max_window_layers``) says so."""
    qwen2 = arch == "Qwen2ForCausalLM"
    if fields.raw.get("sliding_window") is None or (qwen2 and not fields.flag("use_sliding_window")):
        return (-1,) * num_layers
    window = fields.int("sliding_window", 1, MAX_POSITIONS)
    layer_types = fields.get("layer_types", None)
    if layer_types is not None:
        if not isinstance(layer_types, list) or len(layer_types) != num_layers \
                or not all(isinstance(t, str) and t in LAYER_TYPES for t in layer_types):
            raise ArgumentError(f"{fields.where('layer_types')} must list one of {LAYER_TYPES} for each of the "
                                f"{num_layers} layers, got {_shown(layer_types)}")
        sliding = [t == "sliding_attention" for t in layer_types]
    elif qwen2:
        first = fields.int("max_window_layers", 0, SIZE_LIMITS["num_layers"][1], default=0)
        sliding = [i >= first for i in range(num_layers)]
    else:
        sliding = [True] * num_layers
    if arch == "LlamaForCausalLM" and any(sliding):
        raise NotImplementedError(f"{fields.source}: a Llama model with a sliding window is not supported")
    # transformers masks key j for query i iff j <= i - sliding_window: the query sees itself and
    # the sliding_window - 1 tokens before it.
    return tuple(window - 1 if s else -1 for s in sliding)


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
    if config.rope_type == "freq_factors":
        return inv_freq / torch.tensor(params["freq_factors"], dtype=torch.float32)
    return inv_freq


def rope_cos_sin(config: ModelConfig, max_positions: int, device: Optional[torch.device] = None):
    """float32 ``[max_positions, head_dim / 2]`` cos and sin tables for :func:`tkpy.rope.apply_rope_`."""
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), rope_inv_freq(config))
    return angles.cos().to(device), angles.sin().to(device)
