"""A thin model runtime on tkpy's ops: Llama-family generation with paged KV and LServe sparsity.

::

    from tkpy.runtime import LLM
    llm = LLM("path/to/Meta-Llama-3.1-8B-Instruct")          # a .gguf file, or LLM("tiny-random")
    out = llm.generate(["The capital of France is", "1, 2, 3,"], max_new_tokens=32)
    print(out[0].text, llm.timing.summary())
    llm.chat([{"role": "user", "content": "What is 2+2?"}])

Files, top down:

- ``engine.py``: :class:`LLM`, loading, the KV cache's size, the step loop (schedule, run,
  sample), generate and chat;
- ``scheduler.py``: requests in, batches out (admission, prefill or decode, release, abort);
- ``model_runner.py``: a batch of requests -> one forward pass -> logits;
- ``graphs.py``: CUDA graphs of a decode step, one per batch size;
- ``attention.py``: the attention backend (the KV caches, each step's batch metadata, each
  layer's dense or LServe attention);
- ``paging.py``: the pages and ring slot of each request, block tables;
- ``model.py``: the decoder; ``config.py``: config.json; ``loader.py``: where a model comes from
  (safetensors and tokenizer, a GGUF file through ``gguf_file.py``, random weights);
  ``chat.py``: chat templates; ``files.py``: the checkpoint folder as a trust boundary (names
  resolved inside it, JSON parsed naming the file); ``request.py``: a request, when it stops, its
  result, its text as it grows, sampling;
- ``resources.py``: the device argument, and the memory the KV cache may take;
- ``cli.py``: ``python -m tkpy generate`` and ``serve``; ``server.py``: the OpenAI-compatible
  HTTP server (one engine thread owns the scheduler); ``dit.py``: the video-DiT attention block.
"""

from importlib import import_module

__all__ = ["LLM", "Generation", "LServeConfig", "ModelConfig", "TINY_RANDOM", "Timing"]

_HOMES = {"LLM": ".engine", "Generation": ".engine", "Timing": ".engine", "ModelConfig": ".config",
          "TINY_RANDOM": ".loader", "LServeConfig": "..lserve"}


def __getattr__(name: str):
    # Imported on first use: the LLM side needs safetensors, tokenizers and tqdm, which the other
    # modules of this package (e.g. the video-DiT block) must not require.
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_HOMES[name], __name__), name)
