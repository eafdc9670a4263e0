import pytest
import torch

# One thread is steadier than two on the 2-core development machine and in CI.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
