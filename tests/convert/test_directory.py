"""A converted folder reads back whole, or is refused naming the folder and what failed."""

from __future__ import annotations

import numpy as np
import pytest

from contextblip_jax.convert import read_contextblip
from contextblip_jax.convert.directory import CONFIG_FILE, PARAMS_DIR, is_converted, read_converted, write_converted
from contextblip_jax.models.config import BlipConfig
from contextblip_jax.storage import DamagedCheckpointError


@pytest.fixture
def converted(tmp_path):
    folder = tmp_path / "converted"
    params = {"blip.vision.cls_token": np.arange(8.0, dtype=np.float32).reshape(1, 1, 8)}
    write_converted(
        str(folder), config_json=BlipConfig().to_json(), params=params,
        metadata={"dtype": "float32", "model": "blip"}, tokenizer_dir=None,
    )  # fmt: skip
    config, read, _ = read_converted(str(folder))
    assert config == BlipConfig()
    np.testing.assert_array_equal(read["blip.vision.cls_token"], params["blip.vision.cls_token"])
    return folder


def truncate_arrays(folder) -> None:
    files = [p for p in (folder / PARAMS_DIR).glob("**/d/*") if p.is_file()]
    assert files
    for path in files:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    "damage",
    [truncate_arrays, lambda folder: (folder / CONFIG_FILE).write_text('{"vision": ')],
    ids=["truncated arrays", "garbled config"],
)
def test_a_damaged_converted_folder_is_refused_naming_it(converted, damage):
    damage(converted)
    with pytest.raises(DamagedCheckpointError, match=f"{converted}.*convert them again"):
        read_converted(str(converted))


def test_a_converted_folder_on_cloud_storage_reads_as_the_local_one(converted, gcs):
    """What `--config.init=gs://...` reads: the folder copied to a bucket as it would be with `gcloud storage cp`."""
    import fsspec

    url = gcs.url("weights/converted")
    fsspec.filesystem("gs").put(str(converted), url.removeprefix("gs://"), recursive=True)
    assert is_converted(url)
    local_config, local_params = read_contextblip(str(converted))
    config, params = read_contextblip(url)
    assert config == local_config and params.keys() == local_params.keys() and params
    for name, value in local_params.items():
        np.testing.assert_array_equal(params[name], value)
