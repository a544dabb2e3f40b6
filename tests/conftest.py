import logging
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

torch.set_num_threads(2)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def forewarn_logs():
    """What the ``forewarn`` loggers log, caught on the logger itself: an earlier test's CLI run
    sets the logging up with no propagation, so caplog may see nothing."""
    logger, handler = logging.getLogger("forewarn"), _Records()
    level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    yield handler.records
    logger.removeHandler(handler)
    logger.setLevel(level)


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
