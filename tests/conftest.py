import pytest

from tests.helpers import kill_started


@pytest.fixture(autouse=True)
def kill_leftovers():
    """Whatever a test started dies with it, even when the test fails or times out."""
    yield
    kill_started()
