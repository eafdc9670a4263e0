import pytest
import torch

# One thread is steadier than two on the 2-core development machine and in CI.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu need a CUDA GPU: skipped, saying so, where there is none (scripts/gpu-check
    runs exactly these with `-m gpu` on the GPU machine)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (scripts/gpu-check runs it on one)")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def tokenizer():
    """The offline byte tokenizer, one per test module (tests may set its padding side)."""
    from tiny_models import byte_tokenizer  # here: the tests that need no model load no model library

    return byte_tokenizer()


@pytest.fixture(scope="module")
def lora_folder(tmp_path_factory):
    """A diffusers LoRA for the tiny SD, one per test module."""
    from tiny_models import save_diffusers_lora

    return save_diffusers_lora(tmp_path_factory.mktemp("sd-lora"))
