import pytest
import torch

# One thread is steadier than two on the 2-core development machine and in CI.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def tokenizer():
    """The offline byte tokenizer, one per test module (tests may set its padding side)."""
    from tiny_models import byte_tokenizer  # here: the tests that need no model load no model library

    return byte_tokenizer()
