"""tkpy.runtime against hostile input (issue 17): a bad config.json, index, shard, argument or flag
is refused with an error naming the key, the file or the argument, before anything is allocated;
nothing outside the model folder is read; nothing hangs.

The checkpoints are tiny Llama-3.1-shaped folders written here: config.json, a byte tokenizer, and
fresh random weights in two safetensors shards with their index.
"""

import json
import math
import os
import re
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from tkpy import ArgumentError
from tkpy.lserve import HeadPattern
from tkpy.runtime import LLM, LServeConfig, ModelConfig, cli, engine, loader
from tkpy.runtime.config import SIZE_LIMITS
from tkpy.runtime.loader import byte_tokenizer, random_weights
from tkpy.runtime.paging import PageAllocator
from tkpy.runtime.request import sample

INDEX = "model.safetensors.index.json"
LLAMA = {
    "architectures": ["LlamaForCausalLM"], "vocab_size": 258, "hidden_size": 128, "intermediate_size": 256,
    "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 64,
    "rms_norm_eps": 1e-5, "max_position_embeddings": 512, "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 128},
    "tie_word_embeddings": False, "eos_token_id": 257,
}
MISTRAL = {**{k: v for k, v in LLAMA.items() if k != "rope_scaling"}, "architectures": ["MistralForCausalLM"],
           "sliding_window": 32}


def write_checkpoint(folder: Path, rng: torch.Generator) -> Path:
    """config.json, tokenizer.json and fresh random weights, split at random between two shards
    that the index maps."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(LLAMA))
    byte_tokenizer().save(str(folder / "tokenizer.json"))
    seed = int(torch.randint(0, 2**31, (), generator=rng))
    tensors = {name: t for _, name, t in random_weights(ModelConfig.from_dict(LLAMA), seed)}
    names = sorted(tensors)
    order = torch.randperm(len(names), generator=rng).tolist()
    shards = {"model-00001-of-00002.safetensors": [names[i] for i in order[:len(names) // 2]],
              "model-00002-of-00002.safetensors": [names[i] for i in order[len(names) // 2:]]}
    for shard, shard_names in shards.items():
        save_file({n: tensors[n] for n in shard_names}, str(folder / shard))
    weight_map = {n: shard for shard, shard_names in shards.items() for n in shard_names}
    (folder / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def load(folder: Path) -> LLM:
    return LLM(folder, device="cpu", dtype=torch.float16, max_seq_len=128, progress=False)


def index_of(folder: Path) -> dict:
    return json.loads((folder / INDEX).read_text())


def write_index(folder: Path, index: dict) -> None:
    (folder / INDEX).write_text(json.dumps(index))


@pytest.fixture
def model(tmp_path, rng) -> Path:
    return write_checkpoint(tmp_path / "model", rng)


@pytest.fixture
def opened(monkeypatch) -> list:
    """Every path the loader hands to safetensors."""
    paths = []
    real = loader.safe_open

    def recording(path, *args, **kwargs):
        paths.append(Path(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(loader, "safe_open", recording)
    return paths


def test_the_checkpoint_written_here_loads_and_reads_only_its_own_shards(model, opened):
    llm = load(model)
    assert sorted(p.name for p in opened) == sorted(set(index_of(model)["weight_map"].values()))
    out = llm.generate([1, 2, 3], max_new_tokens=3)[0]
    assert len(out.token_ids) <= 3 and all(0 <= t < 258 for t in out.token_ids)


# ---- config.json: every value checked, by type and bound, naming the key and the file ----------

def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_positive(v) -> bool:
    """> 0 and finite once rounded to float32, what the model computes with."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return False
    try:
        with np.errstate(over="ignore", under="ignore"):
            rounded = float(np.float32(float(v)))
    except OverflowError:  # an integer beyond any float
        return False
    return math.isfinite(rounded) and rounded > 0


def limit(key: str) -> int:
    return next(most for json_key, most in SIZE_LIMITS.values() if json_key == key)


# key -> (base config, which values are valid there). Null means "absent": fine for the optional
# keys, refused as missing for the others.
SPEC = {
    "num_hidden_layers": (LLAMA, lambda v: is_int(v) and 1 <= v <= limit("num_hidden_layers")),
    "num_attention_heads": (LLAMA, lambda v: is_int(v) and 1 <= v <= limit("num_attention_heads")),
    "num_key_value_heads": (LLAMA, lambda v: v is None or (is_int(v) and v in (1, 2))),  # divides 2 heads
    "head_dim": (LLAMA, lambda v: v is None or (is_int(v) and v in (64, 128, 256))),  # derived: 128 / 2
    "vocab_size": (LLAMA, lambda v: is_int(v) and 1 <= v <= limit("vocab_size")),
    "hidden_size": (LLAMA, lambda v: is_int(v) and 1 <= v <= limit("hidden_size")),
    "intermediate_size": (LLAMA, lambda v: is_int(v) and 1 <= v <= limit("intermediate_size")),
    "max_position_embeddings": (LLAMA, lambda v: is_int(v) and 1 <= v <= limit("max_position_embeddings")),
    "rms_norm_eps": (LLAMA, lambda v: v is None or is_positive(v)),
    "rope_theta": (LLAMA, lambda v: v is None or is_positive(v)),
    "rope_scaling.factor": (LLAMA, is_positive),
    "rope_scaling.low_freq_factor": (LLAMA, lambda v: is_positive(v) and v < 4.0),
    "rope_scaling.high_freq_factor": (LLAMA, lambda v: is_positive(v) and v > 1.0),
    "rope_scaling.original_max_position_embeddings": (LLAMA, lambda v: is_int(v) and 1 <= v <= 2**24),
    "sliding_window": (MISTRAL, lambda v: v is None or (is_int(v) and 1 <= v <= 2**24)),
}
# Wrong for every key above: zero, negative, non-finite, strings, booleans, containers; then huge
# numbers, wrong for the integer keys (and 10**400 for every key: no float holds it).
ALWAYS_BAD = [0, -1, -5, -(2**40), math.nan, math.inf, -math.inf, "64", "1e-5", True, False, [], [64], {"a": 1}]
HUGE = [2**40, 10**30, 10**400]


def mutated(key: str, value) -> dict:
    base, _ = SPEC[key]
    raw = json.loads(json.dumps(base))
    parent, _, leaf = key.rpartition(".")
    (raw[parent] if parent else raw)[leaf] = value
    return raw


def check_config(folder: Path, key: str, value) -> None:
    """Write config.json with ``key`` set to ``value``; it must load iff the spec allows the value,
    and otherwise be refused naming the key and the file."""
    (folder / "config.json").write_text(json.dumps(mutated(key, value)))
    valid = SPEC[key][1](value)
    try:
        config = ModelConfig.from_folder(folder)
    except ArgumentError as e:
        assert not valid, f"{key}={value!r} refused: {e}"
        assert key in str(e) and str(folder / "config.json") in str(e), str(e)
    else:
        assert valid, f"{key}={value!r} accepted"
        assert config.num_layers <= limit("num_hidden_layers") and config.vocab_size <= limit("vocab_size")


@pytest.mark.parametrize("value", ALWAYS_BAD + HUGE + [None], ids=lambda v: repr(v)[:20])
@pytest.mark.parametrize("key", sorted(SPEC))
def test_config_value_grid_loads_iff_valid(tmp_path, key, value):
    check_config(tmp_path, key, value)


# Anything JSON can carry, and the integers at the bounds.
JSON_VALUES = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True)
               | st.sampled_from([1, 2, 63, 64, 128, 256, 1024, 1025, 2**17, 2**17 + 1, 2**24, 2**24 + 1])
               | st.text(max_size=4) | st.lists(st.integers(), max_size=2)
               | st.dictionaries(st.text(max_size=2), st.integers(), max_size=1))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(sorted(SPEC)), value=JSON_VALUES)
def test_any_config_value_loads_iff_valid_else_names_key_and_file(tmp_path, key, value):
    check_config(tmp_path, key, value)


def mutate(key: str, value):
    def apply(raw):
        raw[key] = value
        return raw
    return apply


@pytest.mark.parametrize(("change", "named", "error"), [
    (mutate("architectures", [["LlamaForCausalLM"]]), "architectures", ArgumentError),
    (mutate("architectures", "LlamaForCausalLM"), "architectures", ArgumentError),
    (mutate("attention_bias", "false"), "attention_bias", ArgumentError),
    (mutate("tie_word_embeddings", 1), "tie_word_embeddings", ArgumentError),
    (mutate("mlp_bias", [True]), "mlp_bias", ArgumentError),
    (mutate("num_key_value_heads", 0), "num_key_value_heads", ArgumentError),
    (mutate("rope_scaling", [8.0]), "rope_scaling", ArgumentError),
    (mutate("rope_scaling", {"rope_type": "yarn", "factor": 4.0}), "rope_scaling.rope_type", NotImplementedError),
    (mutate("rope_parameters", {"rope_type": "default", "rope_theta": -1.0}), "rope_parameters.rope_theta",
     ArgumentError),
    (mutate("eos_token_id", "</s>"), "eos_token_id", ArgumentError),
    (mutate("eos_token_id", [257, -1]), "eos_token_id", ArgumentError),
])
def test_other_config_keys_are_typed(tmp_path, change, named, error):
    (tmp_path / "config.json").write_text(json.dumps(change(json.loads(json.dumps(LLAMA)))))
    with pytest.raises(error) as refused:
        ModelConfig.from_folder(tmp_path)
    assert named in str(refused.value) and str(tmp_path / "config.json") in str(refused.value)


def test_num_key_value_heads_zero_is_refused_not_taken_as_the_query_heads(tmp_path):
    check_config(tmp_path, "num_key_value_heads", 0)
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA, "num_key_value_heads": 3, "num_attention_heads": 4}))
    with pytest.raises(ArgumentError, match=r"num_attention_heads=4 must be a multiple of num_key_value_heads=3"):
        ModelConfig.from_folder(tmp_path)


def test_mistral_negative_sliding_window_names_the_key(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**MISTRAL, "sliding_window": -5}))
    with pytest.raises(ArgumentError, match=r"config\.json: sliding_window must be an integer in \[1, "):
        ModelConfig.from_folder(tmp_path)


def test_qwen2_layer_types_must_cover_every_layer(tmp_path):
    config = {**LLAMA, "architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True, "sliding_window": 16,
              "layer_types": ["sliding_attention"]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArgumentError, match="layer_types must list"):
        ModelConfig.from_folder(tmp_path)


@pytest.mark.parametrize("layers", [2**40, 10**6, 1025])
def test_huge_num_hidden_layers_is_refused_before_a_layer_is_built(model, monkeypatch, layers):
    def no_model(*args, **kwargs):
        raise AssertionError("a Transformer was built")

    monkeypatch.setattr(engine, "Transformer", no_model)
    (model / "config.json").write_text(json.dumps({**LLAMA, "num_hidden_layers": layers}))
    message = f"{model / 'config.json'}: num_hidden_layers must be an integer"
    with pytest.raises(ArgumentError, match=re.escape(message)):
        load(model)


def test_model_config_built_directly_is_held_to_the_same_bounds():
    config = ModelConfig.from_dict(LLAMA)
    fields = {name: getattr(config, name) for name in config.__slots__}
    with pytest.raises(ArgumentError, match="ModelConfig: num_layers"):
        ModelConfig(**{**fields, "num_layers": 10**9, "window_left": (-1,) * 3})
    with pytest.raises(ArgumentError, match="ModelConfig: rms_norm_eps"):
        ModelConfig(**{**fields, "rms_norm_eps": math.nan})


# ---- files that do not parse name themselves ---------------------------------------------------

@pytest.mark.parametrize("content", [b"{bad", b"\xff\xfe{}", b"[1, 2]", b"[" * 100_000, b'{"a": ' + b"9" * 5000 + b"}"],
                         ids=["syntax", "not-utf8", "array", "deep", "long-int"])
@pytest.mark.parametrize("name", ["config.json", "generation_config.json", INDEX])
def test_unparsable_json_names_the_file(model, name, content):
    (model / name).write_bytes(content)
    with pytest.raises(ArgumentError, match=f"^{re.escape(str(model / name))}: "):
        load(model)


@pytest.mark.parametrize("index", [{"metadata": {}}, {"weight_map": []}, {"weight_map": {}},
                                   {"weight_map": {"model.norm.weight": 7}}], ids=repr)
def test_index_without_a_usable_weight_map_names_the_file(model, index, opened):
    write_index(model, index)
    with pytest.raises(ArgumentError) as refused:
        load(model)
    assert str(model / INDEX) in str(refused.value) and opened == []


def test_generation_config_eos_is_checked(model):
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, "two"]}))
    with pytest.raises(ArgumentError, match=re.escape(f"{model / 'generation_config.json'}: eos_token_id")):
        load(model)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_shard_names_the_file(model, rng, damage):
    shard = model / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    cut = int(torch.randint(9, len(data) - 1, (), generator=rng))
    shard.write_bytes({"truncate": data[:cut], "empty": b"",
                       "garbage": bytes(torch.randint(0, 256, (len(data),), generator=rng).tolist())}[damage])
    with pytest.raises(ArgumentError, match=f"^{re.escape(str(shard))}: not a readable safetensors file"):
        load(model)


def test_tokenizer_that_does_not_parse_names_the_file(model):
    (model / "tokenizer.json").write_text("{not json")
    with pytest.raises(ArgumentError, match=f"^{re.escape(str(model / 'tokenizer.json'))}: not a tokenizers file"):
        load(model)


# ---- the loader reads only the model folder, each tensor from the shard the index names --------

def move_shard_outside(model: Path, how: str) -> tuple[str, str]:
    """Move the second shard next to the model folder and point the index (or a link) at it; the
    weights there are valid, so only the boundary can refuse them. Returns a tensor it holds and
    what the index now says."""
    outside = model.parent / "outside.safetensors"
    (model / "model-00002-of-00002.safetensors").rename(outside)
    index = index_of(model)
    moved = [n for n, s in index["weight_map"].items() if s == "model-00002-of-00002.safetensors"]
    if how == "link":
        (model / "model-00002-of-00002.safetensors").symlink_to(outside)
        return moved[0], "model-00002-of-00002.safetensors"
    shard = "../outside.safetensors" if how == "dotdot" else str(outside)
    index["weight_map"].update({n: shard for n in moved})
    write_index(model, index)
    return moved[0], shard


@pytest.mark.parametrize("how", ["dotdot", "absolute", "link"])
def test_a_shard_outside_the_folder_is_refused_and_never_opened(model, opened, how):
    tensor, shard = move_shard_outside(model, how)
    with pytest.raises(ArgumentError) as refused:
        load(model)
    message = str(refused.value)
    assert str(model / INDEX) in message and repr(tensor) in message and repr(shard) in message, message
    assert opened == []


def test_a_linked_shard_without_an_index_is_refused_too(model, opened):
    move_shard_outside(model, "link")
    (model / INDEX).unlink()
    with pytest.raises(ArgumentError, match="leads outside the model folder"):
        load(model)
    assert opened == []


def test_a_linked_config_outside_the_folder_is_refused(model):
    (model.parent / "elsewhere.json").write_text(json.dumps(LLAMA))
    (model / "config.json").unlink()
    (model / "config.json").symlink_to(model.parent / "elsewhere.json")
    with pytest.raises(ArgumentError, match="config.json.*leads outside the model folder"):
        load(model)


def test_hub_cache_snapshot_links_into_its_blobs_load(tmp_path, rng, opened):
    # The Hugging Face hub cache keeps a snapshot's files as links into the repository's blobs/.
    source = write_checkpoint(tmp_path / "source", rng)
    repo = tmp_path / "models--org--tiny"
    snapshot, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for i, path in enumerate(sorted(source.iterdir())):
        path.rename(blobs / f"blob{i}")
        (snapshot / path.name).symlink_to(Path("../../blobs") / f"blob{i}")
    load(snapshot)
    assert len(opened) == 2 and all(p.resolve().parent == blobs.resolve() for p in opened)


def test_a_tensor_in_a_shard_the_index_does_not_name_is_refused(model, rng):
    index = index_of(model)
    first = "model-00001-of-00002.safetensors"
    name = sorted(n for n, s in index["weight_map"].items() if s == first)[0]
    # The same tensor, with other values, also in the shard read last: it must not silently win.
    second = model / "model-00002-of-00002.safetensors"
    tensors = load_file(second)
    tensors[name] = torch.randn(load_file(model / first)[name].shape, generator=rng)
    save_file(tensors, second)
    with pytest.raises(ArgumentError, match="^" + re.escape(f"{second}: holds '{name}', which {model / INDEX} does "
                                                            f"not assign")):
        load(model)


def test_a_tensor_the_index_assigns_to_a_shard_that_lacks_it_is_refused(model, rng):
    shard = model / "model-00001-of-00002.safetensors"
    tensors = load_file(shard)
    name = sorted(tensors)[int(torch.randint(0, len(tensors), (), generator=rng))]
    del tensors[name]
    save_file(tensors, shard)
    with pytest.raises(ArgumentError, match=re.escape(f"{model / INDEX}: assigns '{name}' to {shard.name}, which "
                                                      f"does not hold it")):
        load(model)


def test_a_tensor_in_two_shards_without_an_index_is_refused(model):
    (model / INDEX).unlink()
    first = load_file(model / "model-00001-of-00002.safetensors")
    name = sorted(first)[0]
    save_file({name: first[name]}, str(model / "model-00003-extra.safetensors"))
    with pytest.raises(ArgumentError, match=re.escape(f"'{name}' appears a second time")):
        load(model)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.uint8])
def test_non_floating_weights_are_refused(model, rng, dtype):
    shard = model / "model-00001-of-00002.safetensors"
    tensors = load_file(shard)
    name = sorted(tensors)[int(torch.randint(0, len(tensors), (), generator=rng))]
    tensors[name] = torch.randint(0, 2, tensors[name].shape, generator=rng).to(dtype)
    save_file(tensors, shard)
    with pytest.raises(ArgumentError, match="^" + re.escape(f"{shard}: {name}: expected floating-point weights, "
                                                            f"got {dtype}")):
        load(model)


# ---- sizes: refused before anything is allocated, and nothing is materialised per page ---------

@pytest.fixture
def nothing_allocated(monkeypatch):
    """Fail if LLM gets as far as loading weights or allocating the KV cache."""
    def refuse(*args, **kwargs):
        raise AssertionError("allocated before refusing")

    for module, name in ((loader, "load_weights"), (loader, "fill_weights"), (engine, "AttentionBackend")):
        monkeypatch.setattr(module, name, refuse)


def test_kv_cache_bytes_beyond_the_devices_memory_are_refused_before_allocation(nothing_allocated):
    with pytest.raises(ArgumentError, match=r"kv_cache_memory=1152921504606846976 bytes \(1\.07e\+09 GiB\) and "
                                            r"the model .* need more than the .* of memory cpu has"):
        LLM("tiny-random", device="cpu", kv_cache_memory=2**60, progress=False)


def test_a_kv_cache_smaller_than_one_sequence_is_refused_before_allocation(nothing_allocated):
    page = 2 * 64 * 64 * 2 * 4 * 2  # k and v, 64 tokens, head_dim 64, fp16, 4 layers, 2 kv heads
    with pytest.raises(ArgumentError, match=r"holds 64 tokens, fewer than one sequence of max_seq_len=256 "
                                            r"tokens .*lower max_seq_len"):
        LLM("tiny-random", device="cpu", dtype=torch.float16, max_seq_len=256, kv_cache_memory=3 * page - 1,
            progress=False)


def test_huge_lserve_rings_are_refused_before_allocation(nothing_allocated):
    lserve = LServeConfig(local=2**30)  # the largest window LServeConfig takes
    with pytest.raises(ArgumentError, match=r"after \d+ bytes of LServe rings for 8 sequences \(sink=128 \+ "
                                            r"local=1073741824 tokens\)"):
        LLM("tiny-random", device="cpu", max_seq_len=256, lserve=lserve, progress=False)


@pytest.mark.parametrize(("kwargs", "named"), [
    ({"max_batch_size": 0}, "max_batch_size"), ({"max_batch_size": True}, "max_batch_size"),
    ({"max_batch_size": 2.0}, "max_batch_size"), ({"max_batch_size": "8"}, "max_batch_size"),
    ({"max_seq_len": 0}, "max_seq_len"), ({"max_seq_len": 10**9}, "max_seq_len"),
    ({"max_seq_len": 64.0}, "max_seq_len"),
    ({"device": "nonsense"}, "device"), ({"device": "cuda:99"}, "device"), ({"device": "meta"}, "device"),
    ({"device": "cpu:3"}, "device"), ({"device": 1.5}, "device"), ({"lserve": {"sink": 64}}, "lserve"),
    ({"kv_cache_memory": 0}, "kv_cache_memory"), ({"kv_cache_memory": -5}, "kv_cache_memory"),
    ({"kv_cache_memory": 0.0}, "kv_cache_memory"), ({"kv_cache_memory": 1.5}, "kv_cache_memory"),
    ({"kv_cache_memory": "1GB"}, "kv_cache_memory"), ({"kv_cache_memory": True}, "kv_cache_memory"),
    ({"kv_cache_memory": math.nan}, "kv_cache_memory"),
])
def test_bad_llm_arguments_name_themselves(nothing_allocated, kwargs, named):
    with pytest.raises(ArgumentError, match=named):
        LLM("tiny-random", **{"device": "cpu", "progress": False, **kwargs})


def test_cuda_without_a_device_is_refused():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    with pytest.raises(ArgumentError, match="device cuda"):
        LLM("tiny-random", device="cuda", progress=False)


class ListAllocator:
    """The free list PageAllocator used to build (one Python int per page), as the reference."""

    def __init__(self, count):
        self.free_ids = list(range(count - 1, 0, -1))

    def allocate(self, n):
        return [self.free_ids.pop() for _ in range(n)]

    def free(self, ids):
        self.free_ids.extend(reversed(ids))


def test_a_pool_of_any_size_costs_nothing_until_used():
    pages = PageAllocator(2**62)
    assert pages.num_free == 2**62 - 1 and pages.allocate(3) == [1, 2, 3]


@settings(max_examples=100, deadline=None)
@given(count=st.integers(1, 40), ops=st.lists(st.tuples(st.booleans(), st.integers(0, 12)), max_size=30))
def test_page_allocator_hands_out_what_the_free_list_did(count, ops):
    ours, reference, held = PageAllocator(count), ListAllocator(count), []
    for allocate, n in ops:
        if allocate:
            if n > len(reference.free_ids):
                with pytest.raises(RuntimeError, match="out of KV pages"):
                    ours.allocate(n)
                continue
            ids = ours.allocate(n)
            assert ids == reference.allocate(n)
            held.append(ids)
        elif held:
            ids = held.pop(n % len(held))
            ours.free(ids)
            reference.free(ids)
        assert ours.num_free == len(reference.free_ids)


# ---- sampling and prompts ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    return LLM("tiny-random", device="cpu", dtype=torch.float16, max_seq_len=64, progress=False)


@pytest.mark.parametrize(("kwargs", "named"), [
    ({"top_p": 0.0}, "top_p"), ({"top_p": -0.5}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_p": math.nan}, "top_p"),
    ({"top_p": True}, "top_p"), ({"top_p": "0.9"}, "top_p"),
    ({"temperature": -1.0}, "temperature"), ({"temperature": math.nan}, "temperature"),
    ({"temperature": math.inf}, "temperature"), ({"temperature": "1"}, "temperature"),
    ({"max_new_tokens": 0}, "max_new_tokens"), ({"max_new_tokens": 1.5}, "max_new_tokens"),
    ({"max_new_tokens": True}, "max_new_tokens"), ({"max_new_tokens": 2**40}, "max_new_tokens"),
    ({"seed": -1}, "seed"), ({"seed": 2**64}, "seed"), ({"seed": 1.5}, "seed"),
    ({"stop": ""}, "stop"), ({"stop": [None]}, "stop"), ({"stop": 1.5}, "stop"), ({"stop": -3}, "stop"),
    ({"prompts": [1.5]}, "prompt 0"), ({"prompts": ["ok", [1, "a"]]}, "prompt 1"), ({"prompts": 5}, "prompts"),
    ({"prompts": "bad \udcff bytes"}, "prompt 0 is not valid text"), ({"prompts": [[1, 2, 999]]}, "token ids"),
])
def test_bad_generate_arguments_are_refused_before_anything_runs(tiny, kwargs, named):
    free = tiny.paging.pages.num_free
    with pytest.raises(ArgumentError, match=named):
        tiny.generate(**{"prompts": "hi", "max_new_tokens": 4, **kwargs})
    assert tiny.paging.pages.num_free == free
    assert len(tiny.generate("hi", max_new_tokens=2)[0].token_ids) <= 2  # still serves


@pytest.mark.parametrize(("conversations", "named"), [
    ([{"role": "user", "content": "caf\udce9"}], "conversation 0 is not valid text"),
    ([[{"role": "user", "content": "hi"}], [{"role": "pirate", "content": "hi"}]], r"messages\[0\].role"),
    ([{"role": "user"}], r"messages\[0\].content"), ("hi", "expected a conversation"), ([[]], "non-empty list"),
])
def test_bad_chat_arguments_are_refused_before_anything_runs(tiny, conversations, named):
    free = tiny.paging.pages.num_free
    with pytest.raises(ArgumentError, match=named):
        tiny.chat(conversations, max_new_tokens=4)
    assert tiny.paging.pages.num_free == free


def test_sample_refuses_what_generate_refuses(rng):
    logits = torch.randn(2, 50, generator=rng)
    for temperature, top_p in ((1.0, 0.0), (1.0, math.nan), (-1.0, 1.0), (math.inf, 1.0)):
        with pytest.raises(ArgumentError):
            sample(logits, temperature, top_p, None)


@pytest.mark.parametrize("temperature", [1e-300, 1e-45])
def test_a_tiny_temperature_is_greedy_not_nan(rng, temperature):
    logits = torch.randn(8, 1000, generator=rng) * 10
    assert torch.equal(sample(logits, temperature, 0.9, rng), logits.argmax(-1))


# ---- head pattern files ------------------------------------------------------------------------

def test_a_non_utf8_head_pattern_names_the_file(tmp_path):
    path = tmp_path / "gates.tsv"
    path.write_bytes(b"0.5\t0.25\n\xff\xfe\t0.5\n")
    with pytest.raises(ArgumentError, match=f"^{re.escape(str(path))}: not UTF-8 text"):
        HeadPattern.load(path, 4)


def test_a_pattern_that_is_not_a_path_is_refused():
    with pytest.raises(TypeError, match="LServeConfig: pattern must be a path"):
        LServeConfig(pattern=7)


# ---- the command line: `error: ...` and exit 2, never a traceback ------------------------------

def run_cli(capsys, *args) -> tuple[int, str]:
    capsys.readouterr()  # what fixtures printed
    code = cli.generate(list(args))
    captured = capsys.readouterr()
    assert captured.out == ""
    return code, captured.err


def bad_config(model: Path) -> Path:
    (model / "config.json").write_text(json.dumps({**LLAMA, "num_hidden_layers": -3}))
    return model


def bad_index(model: Path) -> Path:
    move_shard_outside(model, "dotdot")
    return model


def bad_shard(model: Path) -> Path:
    (model / "model-00001-of-00002.safetensors").write_bytes(b"\x00" * 16)
    return model


@pytest.mark.parametrize("args", [
    ["--device", "nonsense"], ["--device", "cuda:99"], ["--lserve-local", str(2**40)],
    ["--prompt", "caf\udce9"], ["--top-p", "0"], ["--top-p", "nan"], ["--temperature", "-1"],
    ["--temperature", "inf"], ["--max-new-tokens", "0"], ["--max-seq-len", "0"], ["--lserve-sparsity", "nan"],
    ["--seed", "-1"], ["--lserve-sparsity", "0.5"], ["--lserve-budget", str(2**70)],
    ["--lserve-streaming-heads", "none", "--lserve-pattern", "x.tsv"], ["--max-batch-size", "0"],
    ["--kv-cache-memory", "1000"],
], ids=repr)
def test_cli_bad_flags_print_an_error_and_exit_2(capsys, args):
    code, err = run_cli(capsys, "--model", "tiny-random", "--prompt", "hi", *args)
    assert code == 2 and err.splitlines()[-1].startswith("error: ") and "Traceback" not in err, err


def test_cli_cuda_without_a_device(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    code, err = run_cli(capsys, "--model", "tiny-random", "--prompt", "hi", "--device", "cuda")
    assert code == 2 and err.startswith("error: ") and "device cuda" in err


@pytest.mark.parametrize(("breakage", "named"), [(bad_config, "num_hidden_layers"), (bad_index, INDEX),
                                                 (bad_shard, "not a readable safetensors file")])
def test_cli_bad_checkpoint_prints_an_error_and_exits_2(capsys, model, breakage, named):
    code, err = run_cli(capsys, "--model", str(breakage(model)), "--prompt", "hi", "--device", "cpu")
    last = err.splitlines()[-1]
    assert code == 2 and last.startswith("error: ") and named in last and "Traceback" not in err, err


def test_cli_chat_with_undecodable_text(capsys):
    code, err = run_cli(capsys, "--model", "tiny-random", "--user", "caf\udce9", "--device", "cpu")
    assert code == 2 and err.splitlines()[-1].startswith("error: ") and "is not valid text" in err, err


def test_cli_missing_folder(capsys, tmp_path):
    code, err = run_cli(capsys, "--model", str(tmp_path / "absent"), "--prompt", "hi")
    assert code == 2 and err.startswith("error: ") and "absent" in err


def test_cli_non_utf8_pattern(capsys, tmp_path):
    pattern = tmp_path / "gates.tsv"
    pattern.write_bytes(b"\xff\n")
    code, err = run_cli(capsys, "--model", "tiny-random", "--prompt", "hi", "--device", "cpu",
                        "--lserve-pattern", str(pattern))
    assert code == 2 and err.splitlines()[-1].startswith("error: ") and "not UTF-8" in err


@pytest.mark.parametrize("args", [["--dtype", "float32"], ["--max-new-tokens", "abc"], ["--no-such-flag"],
                                  ["--kv-cache-memory", "infGiB"], ["--kv-cache-memory", "2.5"],
                                  ["--lserve-streaming-heads", "random"]], ids=repr)
def test_cli_argparse_refusals_end_in_one_error_line(capsys, args):
    with pytest.raises(SystemExit) as exited:
        cli.generate(["--model", "tiny-random", "--prompt", "hi", *args])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.splitlines()[-1].startswith("error: ") and "Traceback" not in err, err


def test_a_fifo_named_like_a_shard_is_refused_without_blocking(model):
    """Opening a FIFO blocks until a writer comes; the loader must not open one."""
    (model / INDEX).unlink()
    os.mkfifo(model / "zz.safetensors")
    outcome = []

    def attempt():
        try:
            load(model)
        except ArgumentError as e:
            outcome.append(str(e))

    worker = threading.Thread(target=attempt, daemon=True)  # left blocked if the loader opens the FIFO
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "the loader blocked on a FIFO"
    assert outcome and "zz.safetensors: not a regular file" in outcome[0], outcome
