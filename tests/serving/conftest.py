"""Fixtures of the `glm4v serve` tests; the helpers are in serve_helpers.py."""
import pytest
from serve_helpers import Demo


@pytest.fixture(scope="session")
def demo() -> Demo:
    """The bundled demo checkpoint and its tokenizer, loaded once."""
    return Demo()
