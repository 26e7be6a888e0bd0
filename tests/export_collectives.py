"""Export collective test slices, one per rank, under a real MindSpore CPU cluster.

    mpiexec -n N python -m tests.export_collectives FOLDER

Each rank joins one MindSpore cluster of N workers (spmdinfer.cluster.join_world, as a
user's export script would), builds its shard of each network and exports it as
FOLDER/<kind>{rank}.mindir:
  allgather: the seed's MatMul y = -(x @ W), W (96, 16) of 0.5, columns split over the ranks
  fixed:     the same with a graph fixed to batches of FIXED_BATCH rows
  failing:   the same, but rank 1's graph is fixed to FIXED_BATCH rows (it fails on a short batch
             while rank 0 waits for it inside the AllGather)
  allreduce: a Megatron MLP 16 -> 32 -> 8 with an AllReduce at the end (tests.cells.mlp_weights)
  stages:    (2 ranks) a pipeline whose stage 0 Sends to stage 1 inside the graph
"""

import sys
from pathlib import Path

import numpy as np

from spmdinfer.cluster import join_world

FIXED_BATCH = 32
SEED_WEIGHT = np.full((96, 16), 0.5, np.float32)


def main(folder: Path) -> None:
    rank, size = join_world("cpu")
    import mindspore

    from tests import cells
    from tests.conftest import dynamic

    columns = SEED_WEIGHT.shape[1] // size
    part = SEED_WEIGHT[:, rank * columns:(rank + 1) * columns] * (rank + 1)  # each rank its own
    fixed = mindspore.Tensor(np.zeros((FIXED_BATCH, 96), np.float32))
    nets = {
        "allgather": (cells.AllGatherMatMul(part), [dynamic(96)]),
        "fixed": (cells.AllGatherMatMul(part, FIXED_BATCH), [fixed]),
        "failing": (cells.AllGatherMatMul(part, FIXED_BATCH if rank == 1 else None),
                    [dynamic(96)]),
    }
    hidden = 32
    if hidden % size == 0:
        shard = cells.mlp_shards(*cells.mlp_weights(16, hidden, 8), ranks=size)[rank]
        nets["allreduce"] = (cells.AllReduceMLP(shard.w1.asnumpy(), shard.b1.asnumpy(),
                                                shard.w2.asnumpy(), shard.b2.asnumpy()),
                             [dynamic(16)])
    if size == 2:  # a two-stage pipeline handing off inside the graph (Send / Receive)
        nets["stages"] = ((cells.SendStage(np.ones((96, 8), np.float32)), [fixed]) if rank == 0
                          else (cells.ReceiveStage(np.ones((8, 4), np.float32), FIXED_BATCH), []))
    folder.mkdir(parents=True, exist_ok=True)
    for kind, (net, inputs) in nets.items():
        mindspore.export(net, *inputs, file_name=str(folder / f"{kind}{rank}"), file_format="MINDIR")


def seed_weight(size: int) -> np.ndarray:
    """The whole W the slices of a cluster of `size` hold (each rank's columns scaled by rank + 1)."""
    columns = SEED_WEIGHT.shape[1] // size
    return np.concatenate([SEED_WEIGHT[:, r * columns:(r + 1) * columns] * (r + 1)
                           for r in range(size)], axis=1)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
