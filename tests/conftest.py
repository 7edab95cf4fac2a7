import numpy as np
import pytest
import torch

from coevo.tasks.log import InteractionLog
from coevo.testing.fixtures import make_log

torch.set_num_threads(1)


@pytest.fixture
def small_log() -> InteractionLog:
    """Three users with 10, 12 and 20 interactions over 150 items."""
    rng = np.random.default_rng(0)
    sequences = {
        user: rng.choice(150, size=n, replace=False).tolist() for user, n in enumerate((10, 12, 20))
    }
    return make_log(sequences, 150, item_features=rng.integers(0, 2, (150, 4)).astype(np.float32))
