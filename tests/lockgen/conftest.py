"""pytest fixtures for the lockgen tests: the real matrix and fake machines."""

from __future__ import annotations

import pytest
from lockgen_fakes import fake_machine

from lockgen.matrix import load_matrix


@pytest.fixture(scope="session")
def matrix():
    return load_matrix()


@pytest.fixture
def machine(tmp_path):
    def make(**kw):
        return fake_machine(tmp_path, **kw)

    return make
