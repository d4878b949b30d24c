import os

import pytest
import torch

# Parallel test workers share two cores: one thread each keeps them from fighting.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"  # also what `fit` and the commands tests start take
    torch.set_num_threads(1)

SHARED_CIFAR10 = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cifar10")


@pytest.fixture
def shared_cifar10():
    path = os.path.abspath(SHARED_CIFAR10)
    if not os.path.exists(os.path.join(path, "train.npz")):
        pytest.skip("../shared/data/cifar10 is not present")
    return path


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A finished one-epoch digits ResNet-8 teacher, trained once per test module that asks."""
    from erde.config.schema import load_config
    from erde.train.engine import fit

    run = tmp_path_factory.mktemp("runs") / "teacher"
    overrides = ["model.name=resnet8", "train.epochs=1", "train.warmup_epochs=0"]
    fit(load_config("digits-teacher", overrides), run, progress=False)
    return run


# The longest modules, longest first (`pytest -n 2 --durations=0`, summed per module): run first,
# so that the workers (`--dist worksteal`, pyproject.toml) end on short tests, not on one of these.
# A stale list costs minutes, never a result: only the order changes.
LONGEST_FIRST = [
    "test_readme.py", "test_jobs.py", "test_faults.py", "test_method_plugins.py",
    "test_reliability.py", "test_deploy.py", "test_fuzz_study_files.py", "test_errors.py",
    "test_reproduce.py", "test_plugins.py",
]  # fmt: skip


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a module stays whole
