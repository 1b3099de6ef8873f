import os
import sys

import numpy as np
import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(TESTS, "fixtures")
sys.path.insert(0, TESTS)  # golden_checks, hf_reference


@pytest.fixture(autouse=True)
def _restore_isa():
    """Tests that force an ISA must not leak it into the next test."""
    import glm4rt

    before = glm4rt.cpu_isa()
    yield
    glm4rt.set_isa(before)


def fixture_dir(name: str) -> str:
    return os.path.join(FIXTURES, name)


def golden(name: str):
    return np.load(os.path.join(FIXTURES, name, "golden.npz"))
