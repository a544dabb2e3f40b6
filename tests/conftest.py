import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def data_dir():
    from monitor.datasets import data_dir as find
    try:
        return find()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def broker():
    from connectors.tansu import EmbeddedBroker
    with EmbeddedBroker() as b:
        yield b
