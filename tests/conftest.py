import os

import pytest
import torch

# Parallel test workers share two cores: one thread each keeps them from fighting.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

SHARED_CIFAR10 = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cifar10")


@pytest.fixture
def shared_cifar10():
    path = os.path.abspath(SHARED_CIFAR10)
    if not os.path.exists(os.path.join(path, "train.npz")):
        pytest.skip("../shared/data/cifar10 is not present")
    return path
