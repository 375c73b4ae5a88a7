"""Fill a :class:`~tkpy.runtime.model.Transformer` from a Hugging Face checkpoint folder (sharded
safetensors straight into the parameters), or with seeded random weights (``tiny-random`` and
benchmarks)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from tqdm.auto import tqdm

from .config import ModelConfig
from .model import Transformer

__all__ = [
    "TINY_RANDOM", "byte_tokenizer", "checkpoint_layout", "fill_weights", "load_tokenizer", "load_weights",
    "random_weights", "tiny_random_config",
]

TINY_RANDOM = "tiny-random"
# Tensors that some checkpoints carry and the runtime recomputes instead.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def checkpoint_layout(model: Transformer) -> dict[str, torch.Tensor]:
    """Each checkpoint tensor name -> where it goes: a parameter, or the rows of a fused one
    (q/k/v into ``qkv``, gate/up into ``gate_up``)."""
    config = model.config
    layout = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm.weight}
    if model.lm_head is not None:
        layout["lm_head.weight"] = model.lm_head.weight
    for i, layer in enumerate(model.layers):
        prefix = f"model.layers.{i}."
        attn, inter = layer.attn, config.intermediate_size
        qkv_rows = {"q_proj": (0, attn.q_size), "k_proj": (attn.q_size, attn.kv_size),
                    "v_proj": (attn.q_size + attn.kv_size, attn.kv_size)}
        for name, (start, rows) in qkv_rows.items():
            layout[f"{prefix}self_attn.{name}.weight"] = attn.qkv.weight[start:start + rows]
            if attn.qkv.bias is not None:
                layout[f"{prefix}self_attn.{name}.bias"] = attn.qkv.bias[start:start + rows]
        layout[f"{prefix}self_attn.o_proj.weight"] = attn.o.weight
        if attn.o.bias is not None:
            layout[f"{prefix}self_attn.o_proj.bias"] = attn.o.bias
        layout[f"{prefix}mlp.gate_proj.weight"] = layer.mlp.gate_up.weight[:inter]
        layout[f"{prefix}mlp.up_proj.weight"] = layer.mlp.gate_up.weight[inter:]
        layout[f"{prefix}mlp.down_proj.weight"] = layer.mlp.down.weight
        layout[f"{prefix}input_layernorm.weight"] = layer.input_norm.weight
        layout[f"{prefix}post_attention_layernorm.weight"] = layer.post_attn_norm.weight
    return layout


def _shards(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{folder}: {index.name} lists shards that are missing: {missing}")
        return [folder / n for n in names]
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"{folder}: no *.safetensors weights (expected model.safetensors or sharded files)")
    return shards


def load_weights(model: Transformer, folder: Path, progress: bool = True) -> None:
    """Read every shard of the checkpoint into the model (see :func:`fill_weights`)."""

    def tensors():
        for shard in tqdm(_shards(folder), desc="loading shards", unit="shard", disable=not progress):
            with safe_open(str(shard), framework="pt") as f:
                for name in f.keys():
                    yield shard.name, name, f.get_tensor(name)

    fill_weights(model, tensors(), str(folder))


@torch.no_grad()
def fill_weights(model: Transformer, tensors: Iterable[tuple[str, str, torch.Tensor]], source: str) -> None:
    """Copy each ``(where, name, tensor)`` into its place, converting the dtype; raise naming the
    tensor for a wrong shape, an unexpected name or a missing tensor."""
    layout = checkpoint_layout(model)
    tied = model.lm_head is None
    loaded = set()
    for where, name, tensor in tensors:
        if name.endswith(_IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
            continue  # tied checkpoints may still store the (identical) head
        if name not in layout:
            raise ValueError(f"{where}: unexpected tensor {name!r} for {model.config.architecture} "
                             f"with {model.config.num_layers} layers")
        target = layout[name]
        if tensor.shape != target.shape:
            raise ValueError(f"{where}: {name}: expected shape {tuple(target.shape)} from config.json, "
                             f"got {tuple(tensor.shape)}")
        target.copy_(tensor)
        loaded.add(name)
    missing = sorted(set(layout) - loaded)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(f"{source}: checkpoint is missing {len(missing)} tensors: {shown}")


def load_tokenizer(folder: Path) -> Tokenizer:
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no tokenizer.json (the runtime reads tokenizers' fast-tokenizer file)")
    return Tokenizer.from_file(str(path))


def byte_tokenizer() -> Tokenizer:
    """A byte-level tokenizer built in memory (no download): 256 byte tokens, then ``<s>`` (added
    in front of every text) and ``</s>``. Ids past those decode to nothing."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tokenizer.add_special_tokens(["<s>", "</s>"])
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BYTE_BOS)])
    return tokenizer


BYTE_BOS, BYTE_EOS = 256, 257


def tiny_random_config() -> ModelConfig:
    """Llama 3.1's layout (GQA, llama3 RoPE scaling, tied embeddings) at a size any CPU runs."""
    return ModelConfig.from_dict({
        "architectures": ["LlamaForCausalLM"], "vocab_size": BYTE_EOS + 1, "hidden_size": 256,
        "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 64, "rms_norm_eps": 1e-5, "max_position_embeddings": 16384, "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 2048},
        "tie_word_embeddings": True,
    }, eos_token_id=BYTE_EOS)


def random_weights(config: ModelConfig, seed: int = 0, device="cpu") -> Iterable[tuple[str, str, torch.Tensor]]:
    """Seeded weights in checkpoint naming for :func:`fill_weights`: N(0, 0.02) as transformers
    initialises, norms at 1. Drawn on ``device``: the CPU gives the same model everywhere, a GPU
    draws an 8B model in seconds."""
    generator = torch.Generator(device).manual_seed(seed)
    with torch.device("meta"):
        shapes = {name: t.shape for name, t in checkpoint_layout(Transformer(config, 1)).items()}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            yield "random", name, torch.ones(shape, device=device)
        else:
            yield "random", name, torch.randn(shape, generator=generator, device=device) * 0.02
