"""Global batches on 8 simulated CPU devices: each example once, sharded along the mesh's batch axes.

jax fixes its device count when it starts, and other tests in this process already started it with one device,
so the check runs in a subprocess with XLA_FLAGS set.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from tests.runs import device_env

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCRIPT = textwrap.dedent(
    """
    import sys
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from contextblip_jax.data import imagecode, pipeline

    root = sys.argv[1]
    assert jax.device_count() == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    sharding = NamedSharding(mesh, P(("data", "fsdp")))
    config = pipeline.DataConfig(root=root, image_size=8, max_text_length=8, batch_size=8)

    def check(local):
        batch = pipeline.make_global_batch(local, sharding)
        for name, value in batch.items():
            assert value.shape == local[name].shape and value.sharding == sharding, name
            np.testing.assert_array_equal(np.asarray(value), local[name])
            slices = {}
            for shard in value.addressable_shards:
                rows = shard.index[0]
                assert rows.stop - rows.start == 2 and all(i == slice(None) for i in shard.index[1:]), shard.index
                np.testing.assert_array_equal(np.asarray(shard.data), local[name][rows])
                slices.setdefault((rows.start, rows.stop), set()).add(shard.device.id)
            # 4 batch shards (data x fsdp) covering the batch once, each held by the 2 `tensor` replicas
            assert sorted(slices) == [(0, 2), (2, 4), (4, 6), (6, 8)] and all(len(d) == 2 for d in slices.values())
        return np.asarray(batch["example_id"]).tolist()

    seen = [i for local in pipeline.imagecode_dataset(config, "valid", train=False) for i in check(local)]
    n = len(imagecode.read_split(root, "valid"))
    assert sorted(i for i in seen if i >= 0) == list(range(n)) and len(seen) % 8 == 0, seen
    iterator = iter(pipeline.imagecode_dataset(config, "train", train=True))
    for _ in range(2):
        ids = check(next(iterator))
        assert len(set(ids)) == 8, ids
    print("checked", len(seen), "evaluation slots")
    """
)


def test_global_batch_on_eight_devices_holds_each_example_once(generated_root):
    env = device_env(8)
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, generated_root], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "checked" in result.stdout
