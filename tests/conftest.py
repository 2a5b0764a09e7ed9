"""Fixtures shared by several test modules."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_intra_op_thread():
    """Tiny tensors: extra intra-op threads only add overhead (on a shared, busy machine, a lot of
    it). One thread for the module's tests; the previous setting is restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
