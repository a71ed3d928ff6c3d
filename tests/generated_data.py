"""Generated ImageCoDe-layout folders shared by the data and input tests (small: a few sets of 32 px images)."""

from __future__ import annotations

import pytest

from contextblip_jax.data import synthetic

SMALL = {"num_train_sets": 8, "num_valid_sets": 4, "num_test_sets": 3, "image_size": 32}


@pytest.fixture(scope="session")
def generated(tmp_path_factory) -> tuple[str, dict[str, dict[str, int]]]:
    """(root, the counts the generator reports). Read-only: tests that damage data copy it first."""
    root = str(tmp_path_factory.mktemp("imagecode"))
    return root, synthetic.generate(root, seed=3, **SMALL)


@pytest.fixture(scope="session")
def generated_root(generated) -> str:
    return generated[0]
