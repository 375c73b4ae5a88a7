"""tkpy.runtime.LLM on the CPU against transformers' eager models.

Small random Llama, Qwen2 and Mistral models (GQA, tied and untied embeddings, Llama-3.1 RoPE
scaling, qkv bias, a sliding window) are saved with ``save_pretrained`` in several shards, next to
a byte-level ``tokenizer.json`` built with ``tokenizers``, and loaded by the runtime.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

transformers = pytest.importorskip("transformers")

import tkpy  # noqa: E402
from tkpy import ArgumentError  # noqa: E402
from tkpy._data import duo_attention_pattern  # noqa: E402
from tkpy.runtime import LLM, LServeConfig  # noqa: E402
from tkpy.runtime.request import Request  # noqa: E402
from helpers import generate_recording_decode_logits  # noqa: E402

VOCAB = 256 + 2

# name -> (transformers class names, config overrides)
MODELS = {
    "llama-untied": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": False}),
    "llama31-tied": ("LlamaConfig", "LlamaForCausalLM", {
        "tie_word_embeddings": True, "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 256}}),
    "qwen2-tied": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}),
    "qwen2-untied": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": False}),
    "mistral-window": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 24}),
}


def byte_tokenizer() -> Tokenizer:
    """256 byte tokens and two specials, no merges: any text encodes, nothing is downloaded."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tokenizer.add_special_tokens(["<s>", "</s>"])
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def make_checkpoint(folder: Path, name: str):
    config_cls, model_cls, overrides = MODELS[name]
    config = getattr(transformers, config_cls)(
        hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=64, vocab_size=VOCAB, max_position_embeddings=1024, bos_token_id=None, eos_token_id=None,
        pad_token_id=None, attn_implementation="eager", **overrides)
    torch.manual_seed(sorted(MODELS).index(name))
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            # transformers' init (std 0.02) gives nearly uniform attention, under which a wrong
            # position, mask or cache page would barely move the logits: sharpen it.
            layer.self_attn.q_proj.weight *= 4
            layer.self_attn.k_proj.weight *= 4
            if config_cls == "Qwen2Config":  # transformers initialises biases to zero: make them matter
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    torch.nn.init.normal_(proj.bias, std=0.5)
    model.save_pretrained(folder, max_shard_size="400KB")
    byte_tokenizer().save(str(folder / "tokenizer.json"))
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    return {name: (root / name, make_checkpoint(root / name, name)) for name in MODELS}


def prompt(length: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def transformers_fp16_error(model, ids) -> float:
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0]
        half = type(model)(model.config).eval()
        half.load_state_dict(model.state_dict())
        return (half.half()(torch.tensor([ids])).logits[0].float() - ref).abs().max().item()


def tolerance(model, ids) -> float:
    """The runtime computes in fp16 (tkpy's attention takes fp16/bf16), so its logits cannot be
    closer to the float32 model than transformers' own fp16 model is. Allow twice that error plus
    one fp16 ulp at these logits' scale (2^-10 near 1-2): a wrong RoPE, bias or mask is off by 0.1+."""
    return 2 * transformers_fp16_error(model, ids) + 1e-3


@pytest.mark.parametrize("name", sorted(MODELS))
def test_prefill_logits_match_transformers(checkpoints, name):
    folder, model = checkpoints[name]
    ids = prompt(70, 1)  # longer than a 64-token page and than Mistral's window
    llm = LLM(folder, device="cpu", dtype=torch.float16, max_seq_len=256, progress=False)
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0]
    error = (llm.prefill_logits(ids) - expected).abs().max().item()
    assert error <= tolerance(model, ids), (error, tolerance(model, ids))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_greedy_decode_matches_transformers(checkpoints, name):
    folder, model = checkpoints[name]
    ids = prompt(56, 2)  # 16 steps cross the first page boundary (64 tokens)
    llm = LLM(folder, device="cpu", dtype=torch.float16, max_seq_len=128, progress=False)
    ours, decode_logits = generate_recording_decode_logits(llm, ids, 16)
    assert ours.finish_reason == "length"

    # Every decode step's logits, against transformers on the same tokens (teacher forcing).
    full = ids + ours.token_ids
    with torch.no_grad():
        expected = model(torch.tensor([full])).logits[0, len(ids):len(full) - 1]
    tol = tolerance(model, full)
    error = (decode_logits - expected).abs().max().item()
    assert error <= tol, (error, tol)

    # Greedy tokens: where transformers' best token leads by more than twice our logit error,
    # ours must pick it too; past the first closer call the two may part ways legitimately.
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, output_scores=True,
                             return_dict_in_generate=True, pad_token_id=0)
    top2 = torch.stack(ref.scores)[:, 0].topk(2, dim=-1).values
    margins = (top2[:, 0] - top2[:, 1]).tolist()
    decided = next((i for i, m in enumerate(margins) if m <= 2 * tol), len(margins))
    assert decided >= 3, f"margins {margins} leave too few decided steps to compare ({decided})"
    assert ours.token_ids[:decided] == ref.sequences[0, len(ids):len(ids) + decided].tolist()


@pytest.fixture(scope="module")
def llama(checkpoints):
    return checkpoints["llama-untied"][0]


def test_batched_generation_equals_each_alone(llama):
    prompts = [prompt(5, 3), prompt(70, 4), prompt(130, 5)]
    llm = LLM(llama, device="cpu", dtype=torch.float16, max_batch_size=2, max_seq_len=192, progress=False)
    # A stop id that ends the first prompt early: with max_batch_size=2 the third prompt then
    # waits, and is prefilled while the second is still decoding.
    stop = llm.generate(prompts[0], max_new_tokens=10)[0].token_ids[3]
    alone = [llm.generate(p, max_new_tokens=10, stop=stop)[0].token_ids for p in prompts]
    assert len(alone[0]) < len(alone[1]), alone
    together = [g.token_ids for g in llm.generate(prompts, max_new_tokens=10, stop=stop)]
    assert together == alone


def test_pages_are_freed_when_each_sequence_ends(llama):
    llm = LLM(llama, device="cpu", dtype=torch.float16, max_batch_size=2, max_seq_len=192, progress=False)
    pages, slots = llm.paging.pages, llm.paging.slots
    total = pages.num_free
    first = llm.generate(prompt(10, 6), max_new_tokens=1)[0].token_ids[0]
    assert pages.num_free == total
    freed = []
    free = pages.free
    pages.free = lambda ids: (freed.append((len(ids), llm.timing.decode_tokens)), free(ids))
    # The first prompt stops at its first token (a stop id), the second runs 20 tokens (2 pages).
    out = llm.generate([prompt(10, 6), prompt(100, 7)], max_new_tokens=20, stop=first)
    assert [g.finish_reason for g in out] == ["stop", "length"] and out[0].token_ids == [first]
    assert freed == [(1, 0), (2, 19)]  # right after the prefill, then after 19 decode steps
    assert pages.num_free == total and slots.num_free == slots.count - 1


def test_stop_string_and_text(llama):
    llm = LLM(llama, device="cpu", dtype=torch.float16, max_seq_len=128, progress=False)
    full = llm.generate("hello", max_new_tokens=8)[0]
    assert full.text == byte_tokenizer().decode(full.token_ids)
    stop = full.text[3:5]
    cut = llm.generate("hello", max_new_tokens=8, stop=[stop])[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.find(stop)]
    # A stop id ends it while a stop string is pending: the text is then the whole decoding.
    by_id = llm.generate("hello", max_new_tokens=8, stop=["never seen", full.token_ids[0]])[0]
    assert by_id.finish_reason == "stop" and by_id.token_ids == full.token_ids[:1]
    assert by_id.text == byte_tokenizer().decode(full.token_ids[:1])


def test_sampling_is_seeded_and_top_p_tiny_is_greedy(llama):
    llm = LLM(llama, device="cpu", dtype=torch.float16, max_seq_len=128, progress=False)
    greedy = llm.generate("abc", max_new_tokens=6)[0].token_ids
    a, b, c = (llm.generate("abc", max_new_tokens=6, temperature=1.0, seed=s)[0].token_ids for s in (1, 1, 2))
    assert a == b and a != c
    assert llm.generate("abc", max_new_tokens=6, temperature=1.0, top_p=1e-6, seed=3)[0].token_ids == greedy


def write_pattern(path: Path, layers: int, kv_heads: int) -> Path:
    gates = np.random.default_rng(0).uniform(size=(layers, kv_heads))
    path.write_text("\n".join("\t".join(f"{g:.6f}" for g in row) for row in gates) + "\n")
    return path


def test_lserve_with_budget_at_least_context_equals_dense(llama, tmp_path):
    # Half the kv heads streaming; windows and budget cover the whole 300-token context, so LServe
    # must reproduce dense attention through its own paths (streaming prefill kernel, rings, page
    # stats and selection, sparse_decode).
    pattern = write_pattern(tmp_path / "pattern.tsv", 2, 2)
    lserve = LServeConfig(static_sparsity=0.5, pattern=str(pattern), sink=128, local=256, prefill_sink=64,
                          prefill_local=256, token_budget=512, reuse_interval=2)
    ids = prompt(290, 8)
    dense = LLM(llama, device="cpu", dtype=torch.float16, max_seq_len=320, progress=False)
    sparse = LLM(llama, device="cpu", dtype=torch.float16, max_seq_len=320, lserve=lserve, progress=False)
    assert any(sparse.runner.backend.has_streaming)
    torch.testing.assert_close(sparse.prefill_logits(ids), dense.prefill_logits(ids), atol=2e-3, rtol=0)
    sparse_out, sparse_logits = generate_recording_decode_logits(sparse, ids, 16)
    dense_out, dense_logits = generate_recording_decode_logits(dense, ids, 16)
    # The same fp16 math through other kernels: only fp32 accumulation order differs.
    torch.testing.assert_close(sparse_logits, dense_logits, atol=2e-3, rtol=0)
    assert sparse_out.token_ids == dense_out.token_ids


def test_lserve_small_windows_and_budget_change_the_output(llama, tmp_path):
    # The counterpart: with a 64-token budget and 128 tokens of window on a 290-token context the
    # sparse paths really drop keys.
    pattern = write_pattern(tmp_path / "pattern.tsv", 2, 2)
    lserve = LServeConfig(static_sparsity=0.5, pattern=str(pattern), sink=64, local=64, prefill_sink=32,
                          prefill_local=32, token_budget=64)
    ids = prompt(290, 8)
    dense = LLM(llama, device="cpu", dtype=torch.float16, max_seq_len=320, progress=False)
    sparse = LLM(llama, device="cpu", dtype=torch.float16, max_seq_len=320, lserve=lserve, progress=False)
    assert (sparse.prefill_logits(ids) - dense.prefill_logits(ids)).abs().max() > 1e-2
    # Decode with 3 of 5 pages selected per head, reselected every 4 steps across a page boundary.
    out = sparse.generate(ids, max_new_tokens=16)[0]
    assert len(out.token_ids) == 16 and sparse.paging.pages.num_free == sparse.paging.pages.count - 1


def test_lserve_pattern_of_another_model_is_refused(llama):
    try:
        real = duo_attention_pattern("Meta-Llama-3.1-8B-Instruct")
    except FileNotFoundError as absent:  # its message names the path and TKPY_SHARED_DATA
        pytest.skip(str(absent))
    with pytest.raises(ValueError, match="does not fit the model's 2 layers x 2 kv heads"):
        LLM(llama, device="cpu", dtype=torch.float16, max_seq_len=128, lserve=LServeConfig(pattern=str(real)),
            progress=False)


def break_missing_tensor(folder):
    shard = sorted(folder.glob("*.safetensors"))[-1]
    tensors = load_file(shard)
    name = sorted(tensors)[0]
    del tensors[name]
    save_file(tensors, shard)
    return name


def break_wrong_shape(folder):
    shard = sorted(folder.glob("*.safetensors"))[0]
    tensors = load_file(shard)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name][:-1].contiguous()
    save_file(tensors, shard)
    return f"{name}: expected shape"


def break_architecture(folder):
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (folder / "config.json").write_text(json.dumps(config))
    return "unknown architecture 'GPT2LMHeadModel'"


def break_config_field(folder):
    config = json.loads((folder / "config.json").read_text())
    del config["hidden_size"]
    (folder / "config.json").write_text(json.dumps(config))
    return "missing 'hidden_size'"


def break_missing_shard(folder):
    shard = sorted(folder.glob("*.safetensors"))[1]
    shard.unlink()
    return f"missing: \\['{shard.name}'\\]"


def break_tokenizer(folder):
    (folder / "tokenizer.json").unlink()
    return "no tokenizer.json"


@pytest.mark.parametrize(("breakage", "error"), [
    (break_missing_tensor, ValueError), (break_wrong_shape, ValueError), (break_architecture, ValueError),
    (break_config_field, ValueError), (break_missing_shard, FileNotFoundError), (break_tokenizer, FileNotFoundError),
])
def test_malformed_checkpoint_errors_name_the_problem(llama, tmp_path, breakage, error):
    folder = tmp_path / "broken"
    shutil.copytree(llama, folder)
    message = breakage(folder)
    with pytest.raises(error, match=message):
        LLM(folder, device="cpu", dtype=torch.float16, max_seq_len=128, progress=False)


def test_requests_beyond_the_cache_and_bad_dtypes_are_refused(llama):
    llm = LLM(llama, device="cpu", dtype=torch.float16, max_seq_len=64, progress=False)
    with pytest.raises(ValueError, match="exceeds max_seq_len=64"):
        llm.generate(prompt(60, 9), max_new_tokens=8)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 258\)"):
        llm.generate([1, 2, 999], max_new_tokens=1)
    with pytest.raises(ValueError, match="dtype must be torch.bfloat16 or torch.float16"):
        LLM(llama, device="cpu", dtype=torch.float32, progress=False)


def test_tiny_random_is_deterministic():
    a, b = (LLM("tiny-random", device="cpu", max_seq_len=64, progress=False) for _ in range(2))
    assert a.generate("tkpy", max_new_tokens=4)[0].token_ids == b.generate("tkpy", max_new_tokens=4)[0].token_ids
    torch.testing.assert_close(a.prefill_logits([1, 2, 3]), b.prefill_logits([1, 2, 3]), atol=0, rtol=0)


def test_cli_generate_with_lserve(tmp_path):
    pattern = write_pattern(tmp_path / "tiny.tsv", 4, 2)
    proc = subprocess.run(
        [sys.executable, "-m", "tkpy", "generate", "--model", "tiny-random", "--prompt", "Hello", "--prompt", "tkpy",
         "--max-new-tokens", "4", "--lserve-pattern", str(pattern), "--lserve-sparsity", "0.5",
         "--lserve-budget", "64"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "random weights" in proc.stderr  # the progress bar
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("prefill: 11 prompt tokens in ") and "tokens/s); decode: 6 tokens in " in last, last


@torch.inference_mode()
def decode_in_lockstep(llms: list, prompts: list, steps: int) -> list:
    """Prefill the prompts on every LLM, then decode, feeding all of them the first one's greedy
    tokens; the last request leaves halfway (a smaller batch). Returns each LLM's logits, per step."""
    batches = [[Request(list(p), len(p), steps + 1) for p in prompts] for _ in llms]
    for llm, batch in zip(llms, batches):
        for request in batch:
            llm.paging.reserve(request)
    logits = [[] for _ in llms]
    for step in range(steps):
        if step == steps // 2:
            for llm, batch in zip(llms, batches):
                llm.paging.release(batch.pop())
                llm.runner.batch_changed()
        outputs = [llm.runner.decode(batch) if step else llm.runner.prefill(batch) for llm, batch in zip(llms, batches)]
        for ours, out in zip(logits, outputs):
            ours.append(out.clone())
        for token, *requests in zip(outputs[0].argmax(-1).tolist(), *batches):
            for request in requests:
                request.tokens.append(token)
    return logits


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["dense", "lserve"])
def test_cuda_graph_decode_equals_eager(mode, tmp_path):
    if not tkpy.cuda_compiled():
        pytest.skip("tkpy was built without CUDA kernels")
    # With LServe, reuse_interval 2 replays both graphs of a batch size (selection recomputed, reused).
    lserve = None if mode == "dense" else LServeConfig(
        static_sparsity=0.5, pattern=str(write_pattern(tmp_path / "tiny.tsv", 4, 2)), sink=64, local=64,
        prefill_sink=64, prefill_local=128, token_budget=128, reuse_interval=2)
    eager, graphed = (LLM("tiny-random", device="cuda", dtype=torch.float16, lserve=lserve, max_batch_size=3,
                          max_seq_len=256, cuda_graphs=graphs, progress=False) for graphs in (False, True))
    assert eager.runner.graphs is None and graphed.runner.graphs is not None
    prompts = [prompt(70, 30), prompt(150, 31), prompt(5, 32)]
    for step, (ours, theirs) in enumerate(zip(*decode_in_lockstep([graphed, eager], prompts, 16))):
        torch.testing.assert_close(ours, theirs, atol=2e-3, rtol=0, msg=lambda m: f"step {step}: {m}")
    assert set(graphed.runner.graphs.graphs) == ({(3, True), (2, True)} if lserve is None else
                                                 {(3, True), (3, False), (2, True), (2, False)})


# ---- the KV cache's size -------------------------------------------------------------------------

TINY_PAGE_BYTES = 2 * 64 * 64 * 2 * 4 * 2  # k and v, 64 tokens, head_dim 64, fp16, 4 layers, 2 kv heads


def test_kv_cache_memory_in_bytes_buys_whole_pages():
    llm = LLM("tiny-random", device="cpu", dtype=torch.float16, max_seq_len=128,
              kv_cache_memory=11 * TINY_PAGE_BYTES + 5, progress=False)
    # 10 pages for sequences and the scratch page that padding rows write into.
    assert (llm.kv_cache_tokens, llm.kv_cache_bytes, llm.max_batch_size) == (640, 11 * TINY_PAGE_BYTES, 8)
    assert llm.paging.pages.count == 11
    caches = llm.runner.backend.caches
    assert sum(t.numel() * t.element_size() for c in caches for t in (c.k, c.v, c.k_ring, c.v_ring)) == 11 * TINY_PAGE_BYTES


def test_kv_cache_is_capped_at_what_the_batch_can_use():
    llm = LLM("tiny-random", device="cpu", dtype=torch.float16, max_seq_len=128, max_batch_size=2,
              kv_cache_memory=2**30, progress=False)
    assert llm.kv_cache_tokens == 2 * 128 and llm.kv_cache_bytes == 5 * TINY_PAGE_BYTES


def test_default_kv_cache_is_a_share_of_the_free_memory(monkeypatch):
    from tkpy.runtime import resources

    sizes = {}
    for free in (2**40, 140_000_000, 125_000_000):  # bytes; a step's activations are ~110 MB here
        monkeypatch.setattr(resources, "free_memory_bytes", lambda device, free=free: free)
        llm = LLM("tiny-random", device="cpu", dtype=torch.float16, max_seq_len=1024, progress=False)
        assert llm.kv_cache_bytes <= resources.DEFAULT_SHARE["cpu"] * free
        sizes[free] = llm.kv_cache_tokens
    # Plenty of memory: max_batch_size (8) sequences of max_seq_len; less memory, fewer tokens.
    assert sizes[2**40] == 8 * 1024 and sizes[2**40] > sizes[140_000_000] > sizes[125_000_000] >= 1024, sizes
    # No room at all: said with the numbers, not as a cache of 0 bytes.
    monkeypatch.setattr(resources, "free_memory_bytes", lambda device: 1000)
    with pytest.raises(ArgumentError, match=r"cpu has 9.31e-07 GiB free, and the model .* and a step's activations "
                                            r"\(about .* GiB, less with a smaller max_seq_len\) need more"):
        LLM("tiny-random", device="cpu", dtype=torch.float16, max_seq_len=1024, progress=False)


def test_requests_wait_for_pages_and_still_answer_as_alone():
    """A pool of two full sequences and a batch of four: the other two wait for pages."""
    prompts = [prompt(100, 20 + i) for i in range(4)]
    small = LLM("tiny-random", device="cpu", dtype=torch.float16, max_seq_len=128, max_batch_size=4,
                kv_cache_memory=5 * TINY_PAGE_BYTES, progress=False)
    seen = []
    step = small.step
    small.step = lambda scheduler: (seen.append(len(scheduler.waiting)), step(scheduler))[1]
    together = small.generate(prompts, max_new_tokens=28)
    alone = [small.generate(p, max_new_tokens=28)[0] for p in prompts]
    assert [g.token_ids for g in together] == [g.token_ids for g in alone]
    assert seen[:2] == [4, 2] and small.kv_cache_tokens == 256  # after the first prefill, two wait


# ---- the step loop: per-request sampling, abort, prefill admission --------------------------------

@pytest.fixture(scope="module")
def tiny_fp16():
    return LLM("tiny-random", device="cpu", dtype=torch.float16, max_seq_len=128, max_batch_size=4, progress=False)


def test_each_row_samples_as_its_request_says(tiny_fp16):
    """Greedy, seeded nucleus and seeded plain sampling in one batch: each as if alone."""
    llm, prompts = tiny_fp16, [prompt(20 + i, 30 + i) for i in range(3)]

    def requests():
        return [llm.make_request(prompts[0], 12, llm.sampling()),
                llm.make_request(prompts[1], 12, llm.sampling(1.0, 0.9, seed=5)),
                llm.make_request(prompts[2], 12, llm.sampling(0.7, seed=6))]
    together = llm.run(requests())
    assert together == [llm.run([r])[0] for r in requests()]
    assert together[1] != llm.run([llm.make_request(prompts[1], 12, llm.sampling(1.0, 0.9, seed=7))])[0]


def test_abort_takes_a_request_out_and_gives_back_its_pages(tiny_fp16):
    llm = tiny_fp16
    free = llm.paging.pages.num_free
    scheduler = llm.new_scheduler()
    kept, aborted, waiting = (llm.make_request(prompt(70, 40 + i), 20) for i in range(3))
    scheduler.max_batch_size = 2  # the third waits
    for request in (kept, aborted, waiting):
        scheduler.add(request)
    llm.step(scheduler)  # prefill of two
    llm.step(scheduler)  # a decode step
    llm.abort(scheduler, aborted)
    llm.abort(scheduler, waiting)
    assert (aborted.finish_reason, waiting.finish_reason, aborted.pages) == ("abort", "abort", [])
    assert scheduler.running == [kept] and not scheduler.waiting
    while not scheduler.done:
        llm.step(scheduler)
    assert llm.paging.pages.num_free == free
    assert kept.generated == llm.generate(kept.tokens[:kept.prompt_len], max_new_tokens=20)[0].token_ids


def test_a_prefill_step_packs_prompts_up_to_max_prefill_tokens(tiny_fp16):
    from tkpy.runtime.scheduler import Scheduler

    llm = tiny_fp16
    scheduler = Scheduler(llm.paging, 4, max_prefill_tokens=50)
    requests = [llm.make_request(prompt(n, 50 + n), 4) for n in (20, 25, 60, 10)]
    for request in requests:
        scheduler.add(request)
    steps = []
    while scheduler.waiting:
        batch, is_prefill = scheduler.schedule()
        steps.append([requests.index(r) for r in batch])
    # 20 + 25 fit in 50; 60 alone (the first of a step is always admitted); then 10.
    assert steps == [[0, 1], [2], [3]]
    for request in requests:
        llm.abort(scheduler, request)
