import pytest
import torch


def pytest_collection_modifyitems(config, items):
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
