import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # the shared zoo helpers in tests/zoo.py


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of small tensors: on a few shared cores a thread pool's synchronisation
    costs more than the work (measured: efficientnet_b0's timm check 2.2 s with 1 thread, 9-12 s with 2 while
    another job runs; the property tests 3.6x slower with 2 threads). Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
