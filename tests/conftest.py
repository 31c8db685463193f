"""Fixtures any test module can ask for (`pytestmark = pytest.mark.usefixtures("one_thread")`)."""
from __future__ import annotations

import pytest
import torch

from megatron_tlt.parallel import destroy_parallel


@pytest.fixture
def one_thread():
    """Tiny matmuls on one thread (several only fight over the shared cores); parallel state torn down after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    destroy_parallel()
    torch.set_num_threads(threads)
