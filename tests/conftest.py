import os
from pathlib import Path

import pytest
import torch

# The tests run from a checkout whichever tkpy they import (`make test-cpu-only` installs one aside,
# where tkpy cannot find ../shared itself): point it at the checkout's sibling shared data unless
# the caller named a folder.
_SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
if not os.environ.get("TKPY_SHARED_DATA") and _SHARED_DATA.is_dir():
    os.environ["TKPY_SHARED_DATA"] = str(_SHARED_DATA)


def pytest_collection_modifyitems(config, items):
    # The attention kernel choice is CUDA's: CPU items run once, under the default.
    cpu_duplicates = [item for item in items
                      if getattr(item, "callspec", None) is not None
                      and item.callspec.params.get("attention_kernel", "pipelined") != "pipelined"
                      and item.get_closest_marker("gpu") is None]
    if cpu_duplicates:
        config.hook.pytest_deselected(items=cpu_duplicates)
        items[:] = [item for item in items if item not in cpu_duplicates]
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none visible)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng():
    """A generator with a fresh seed per test, printed so a failure can be replayed."""
    seed = torch.seed() % 2**31
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)


@pytest.fixture(params=["pipelined", "baseline"])
def attention_kernel(request):
    """Runs a test's CUDA attention calls on each Hopper forward kernel (tkpy.use_attention_kernel);
    modules opt in with pytestmark = pytest.mark.usefixtures("attention_kernel")."""
    import tkpy

    with tkpy.use_attention_kernel(request.param):
        yield request.param


@pytest.fixture(scope="session")
def smollm2():
    """``smollm2(dtype)``: SmolLM2-135M-Instruct from its GGUF file on the CPU (max_seq_len 512), one
    model per dtype for the whole session: loading dequantises 135M weights."""
    from helpers import smollm2_gguf
    from tkpy.runtime import LLM

    models = {}

    def get(dtype):
        if dtype not in models:
            models[dtype] = LLM(str(smollm2_gguf()), device="cpu", dtype=dtype, max_seq_len=512, progress=False)
        return models[dtype]
    return get
