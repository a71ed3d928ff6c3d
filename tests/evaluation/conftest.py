"""The generated ImageCoDe folders of `tests/generated_data.py`, as fixtures of these tests."""

from tests.generated_data import generated, generated_root

__all__ = ["generated", "generated_root"]
