"""A thin model runtime on tkpy's ops: Llama-family generation with paged KV and LServe sparsity.

::

    from tkpy.runtime import LLM
    llm = LLM("path/to/Meta-Llama-3.1-8B-Instruct")          # or LLM("tiny-random")
    out = llm.generate(["The capital of France is", "1, 2, 3,"], max_new_tokens=32)
    print(out[0].text, llm.timing.decode_tokens_per_s)

Files: ``config.py`` (config.json), ``loader.py`` (safetensors, tokenizer, random weights),
``model.py`` (the decoder), ``kv_cache.py`` (pages and attention), ``graphs.py`` (CUDA graphs of
the decode step), ``request.py`` (a request, its result, sampling), ``llm.py`` (batching), ``cli.py`` (``python -m tkpy generate``).
"""

from importlib import import_module

__all__ = ["LLM", "Generation", "LServeConfig", "ModelConfig", "TINY_RANDOM", "Timing"]

_HOMES = {"LLM": ".llm", "Generation": ".llm", "Timing": ".llm", "ModelConfig": ".config",
          "TINY_RANDOM": ".loader", "LServeConfig": "..lserve"}


def __getattr__(name: str):
    # Imported on first use: the LLM side needs safetensors, tokenizers and tqdm, which the other
    # modules of this package (e.g. the video-DiT block) must not require.
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_HOMES[name], __name__), name)
