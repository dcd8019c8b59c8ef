"""Fixtures shared by the test modules."""
import pytest
import torch


@pytest.fixture
def one_thread():
    """Many tiny steps: one intra-op thread is faster, and far faster on a busy shared machine (two
    threads on an oversubscribed CPU made the learning test 8× slower). A module asks for it with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The generator tests' tiny models in the real formats (tests/util.py: generator_world)."""
    from .util import generator_world
    return generator_world(tmp_path_factory.mktemp("world"))
