"""Where a model comes from (:func:`open_model`): a Hugging Face checkpoint folder (sharded safetensors
straight into the parameters), a GGUF file, or seeded random weights (``tiny-random`` and
benchmarks); with its tokenizer and chat template."""

from __future__ import annotations

from os import PathLike
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple, Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from tqdm.auto import tqdm

from ..errors import ArgumentError
from .chat import TINY_CHAT_TEMPLATE, ChatTemplate, folder_chat_template
from .config import ModelConfig
from .files import read_json_object, resolve_inside
from .model import Transformer

__all__ = [
    "TINY_RANDOM", "ModelSource", "Shard", "byte_tokenizer", "checkpoint_layout", "checkpoint_shards", "fill_weights",
    "load_tokenizer", "load_weights", "open_model", "random_weights", "tiny_random_config",
]

TINY_RANDOM = "tiny-random"
INDEX = "model.safetensors.index.json"
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


class Shard(NamedTuple):
    path: Path
    # The tensors the index assigns to this file; None for a checkpoint without an index.
    tensors: Optional[frozenset[str]]


def checkpoint_shards(folder: Path) -> list[Shard]:
    """The checkpoint's safetensors files, as ``model.safetensors.index.json`` maps tensors to them
    (else every ``*.safetensors`` file). Each must lie inside the folder (links followed)."""
    index = folder / INDEX
    if not index.is_file():
        paths = sorted(folder.glob("*.safetensors"))
        if not paths:
            raise FileNotFoundError(f"{folder}: no *.safetensors weights (expected model.safetensors or sharded files)")
        shards = [Shard(resolve_inside(folder, p.name, f"{folder}: {p.name}"), None) for p in paths]
        for shard in shards:  # a FIFO or a device named *.safetensors would block the reader
            if not shard.path.is_file():
                raise ArgumentError(f"{shard.path}: not a regular file")
        return shards
    weight_map = read_json_object(resolve_inside(folder, INDEX, f"{folder}: {INDEX}")).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ArgumentError(f"{index}: expected a non-empty object 'weight_map' (tensor name -> shard file), "
                            f"got {type(weight_map).__name__}")
    assigned: dict[Path, set[str]] = {}
    for tensor, shard in weight_map.items():
        path = resolve_inside(folder, shard, f"{index}: weight_map[{tensor!r}]")
        assigned.setdefault(path, set()).add(tensor)
    missing = sorted(p.name for p in assigned if not p.is_file())
    if missing:
        raise FileNotFoundError(f"{folder}: {INDEX} lists shards that are missing: {missing}")
    return [Shard(path, frozenset(tensors)) for path, tensors in sorted(assigned.items())]


def _read_shard(shard: Shard, folder: Path) -> Iterator[tuple[str, str, torch.Tensor]]:
    """Each tensor of one shard, after checking that it holds exactly what the index assigns it."""
    try:
        with safe_open(str(shard.path), framework="pt") as f:
            names = set(f.keys())
            if shard.tensors is not None and names != shard.tensors:
                stray, absent = sorted(names - shard.tensors), sorted(shard.tensors - names)
                if stray:
                    # A tensor the index places elsewhere (or nowhere) must not override that copy.
                    raise ArgumentError(f"{shard.path}: holds {stray[0]!r}, which {folder / INDEX} does not "
                                        f"assign to this file ({len(stray)} such tensors)")
                raise ArgumentError(f"{folder / INDEX}: assigns {absent[0]!r} to {shard.path.name}, which does "
                                    f"not hold it ({len(absent)} such tensors)")
            for name in sorted(names):
                yield str(shard.path), name, f.get_tensor(name)
    except SafetensorError as e:
        raise ArgumentError(f"{shard.path}: not a readable safetensors file: {e}") from None


def load_weights(model: Transformer, folder: Path, shards: list[Shard], progress: bool = True) -> None:
    """Read the checkpoint's shards (from :func:`checkpoint_shards`) into the model (see
    :func:`fill_weights`)."""

    def tensors():
        for shard in tqdm(shards, desc="loading shards", unit="shard", disable=not progress):
            yield from _read_shard(shard, folder)

    fill_weights(model, tensors(), str(folder))


@torch.no_grad()
def fill_weights(model: Transformer, tensors: Iterable[tuple[str, str, torch.Tensor]], source: str) -> None:
    """Copy each ``(where, name, tensor)`` into its place, converting the floating-point dtype; raise
    naming the tensor for a wrong shape or dtype, an unexpected, repeated or missing tensor."""
    layout = checkpoint_layout(model)
    tied = model.lm_head is None
    loaded: dict[str, str] = {}  # name -> where it came from
    for where, name, tensor in tensors:
        if name.endswith(_IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
            continue  # tied checkpoints may still store the (identical) head
        if name not in layout:
            raise ArgumentError(f"{where}: unexpected tensor {name!r} for {model.config.architecture} "
                                f"with {model.config.num_layers} layers")
        if name in loaded:
            raise ArgumentError(f"{where}: tensor {name!r} appears a second time (first in {loaded[name]})")
        if not tensor.dtype.is_floating_point:
            raise ArgumentError(f"{where}: {name}: expected floating-point weights, got {tensor.dtype}")
        target = layout[name]
        if tensor.shape != target.shape:
            raise ArgumentError(f"{where}: {name}: expected shape {tuple(target.shape)} from the model's config, "
                                f"got {tuple(tensor.shape)}")
        target.copy_(tensor)
        loaded[name] = where
    missing = sorted(set(layout) - set(loaded))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ArgumentError(f"{source}: checkpoint is missing {len(missing)} tensors: {shown}")


def load_tokenizer(folder: Path) -> Tokenizer:
    path = resolve_inside(folder, "tokenizer.json", f"{folder}: tokenizer.json")
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no tokenizer.json (the runtime reads tokenizers' fast-tokenizer file)")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for a file it cannot parse
        raise ArgumentError(f"{path}: not a tokenizers file: {e}") from None


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


class ModelSource(NamedTuple):
    config: ModelConfig
    tokenizer: Tokenizer
    chat_template: Optional[ChatTemplate]
    fill: Callable[[Transformer, bool], None]  # (model on its device, progress bar) -> weights filled in


def _fill_random(config: ModelConfig, device) -> Callable[[Transformer, bool], None]:
    def fill(model: Transformer, progress: bool) -> None:
        weights = tqdm(random_weights(config, 0, device), desc="random weights", unit="tensor",
                       total=len(checkpoint_layout(model)), disable=not progress)
        fill_weights(model, weights, "random weights")
    return fill


def open_model(path: Union[str, PathLike, ModelConfig], device: torch.device) -> ModelSource:
    """Read what a model is before its weights: from a checkpoint folder, a ``.gguf`` file,
    ``"tiny-random"`` (when no folder has that name) or a :class:`ModelConfig` (random weights of
    that shape, drawn on ``device``)."""
    tiny_chat = ChatTemplate(TINY_CHAT_TEMPLATE, {"bos_token": "<s>", "eos_token": "</s>"}, "tiny-random")
    if isinstance(path, ModelConfig):
        return ModelSource(path, byte_tokenizer(), tiny_chat, _fill_random(path, device))
    location = Path(path)
    if str(path) == TINY_RANDOM and not location.exists():
        return ModelSource(tiny_random_config(), byte_tokenizer(), tiny_chat,
                           _fill_random(tiny_random_config(), "cpu"))
    if location.is_file() and location.suffix.lower() == ".gguf":
        from .gguf_file import GGUFCheckpoint

        checkpoint = GGUFCheckpoint(location)
        config = checkpoint.config()
        tokenizer, chat = checkpoint.tokenizer()

        def fill_gguf(model: Transformer, progress: bool) -> None:
            tensors = tqdm(checkpoint.tensors(config), desc="dequantising", unit="tensor",
                           total=len(checkpoint.weight_names), disable=not progress)
            fill_weights(model, tensors, str(location))
        return ModelSource(config, tokenizer, chat, fill_gguf)
    if not location.is_dir():
        raise FileNotFoundError(f"LLM: {path} is neither a checkpoint folder nor a .gguf file (nor {TINY_RANDOM!r})")
    config, tokenizer, chat = ModelConfig.from_folder(location), load_tokenizer(location), folder_chat_template(location)
    shards = checkpoint_shards(location)
    return ModelSource(config, tokenizer, chat, lambda model, progress: load_weights(model, location, shards, progress))
