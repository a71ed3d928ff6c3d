"""One process of a 2-process run that checkpoints steps 1 and 2, then restores (`test_restore_failures.py`):
`python -m tests.checkpoints.two_processes WORKDIR HOST:PORT damaged|storage PROCESS_ID`. Process 1 cannot read
step 2 (as damage, or as a lasting storage failure; process 0 reads it fine); each process prints a JSON line of
the step it restored, or of its error."""

from __future__ import annotations

import json
import sys

import jax

from contextblip_jax.checkpoints import run_state
from contextblip_jax.checkpoints.run_state import RunCheckpoints
from contextblip_jax.storage import CheckpointError
from tests.checkpoints.test_run_state import abstract, iterator, state

FAILURES = {
    "damaged": ValueError("DATA_LOSS: Error reading chunk"),
    "storage": ValueError("UNAVAILABLE: HTTP response code: 503"),
}


def main(workdir: str, coordinator: str, unreadable: str, process_id: int) -> None:
    jax.distributed.initialize(coordinator, num_processes=2, process_id=process_id)
    run_state.READ_RETRY_DELAYS_S = (0.01,)
    mesh = jax.sharding.Mesh(jax.devices(), ("data",))
    everywhere = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    writing, data = RunCheckpoints(workdir), iterator()
    for step in (1, 2):
        next(data)
        writing.save(step, jax.device_put(state(float(step)), everywhere), data)
    writing.close()

    real = RunCheckpoints.restore

    def restore(self, step, abstract_state, data):
        if process_id == 1 and step == 2:
            raise FAILURES[unreadable]
        return real(self, step, abstract_state, data)

    RunCheckpoints.restore = restore
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=everywhere), abstract())
    checkpoints = RunCheckpoints(workdir)
    try:
        step, restored, _ = checkpoints.restore_latest(target, iterator())
        values = jax.device_get(restored.trainable["head.proj.kernel"].addressable_data(0)).tolist()
        print(json.dumps({"restored": step, "values": values}))
    except CheckpointError as error:
        print(json.dumps({"error": f"{type(error).__name__}: {error}"}))
    finally:
        checkpoints.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
