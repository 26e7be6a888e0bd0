"""Export the seed's MatMul + Neg network as 8 slices whose graphs communicate: each rank
computes its 2 columns of y = -(x @ W) and an AllGather inside the graph gives every rank
the whole (N, 16) output, as MindSpore's distributed export writes slices.

MindSpore builds collective ops only in a process that has joined a MindSpore cluster, so
this runs under MPI, one process per rank, and joins one (spmdinfer.cluster.join_world
starts the scheduler and sets MindSpore's variables, as `spmdinfer run` does):

    mpiexec -n 8 python jobs/matmul_allgather/export.py   # model/device{0..7}/matmul.mindir, inputs.h5
"""

from pathlib import Path

import numpy as np

from spmdinfer.cluster import join_world

HERE = Path(__file__).resolve().parent
WEIGHT_SHAPE = (96, 16)
ROWS = 1000


def main() -> None:
    rank, ranks = join_world("cpu")
    import h5py
    import mindspore
    from mindspore import Parameter, Tensor, nn, ops

    class Net(nn.Cell):
        """This rank's columns of -(x @ W), gathered from every rank (AllGather joins along
        axis 0, so the columns travel transposed)."""

        def __init__(self, weight: np.ndarray):
            super().__init__()
            self.matmul_weight = Parameter(Tensor(weight))
            self.matmul = ops.MatMul()
            self.neg = ops.Neg()
            self.gather = ops.AllGather()

        def construct(self, x):
            y = self.neg(self.matmul(x, self.matmul_weight))
            return ops.transpose(self.gather(ops.transpose(y, (1, 0))), (1, 0))

    weight = np.full(WEIGHT_SHAPE, 0.5, dtype=np.float32)
    columns = WEIGHT_SHAPE[1] // ranks
    folder = HERE / "model" / f"device{rank}"
    folder.mkdir(parents=True, exist_ok=True)
    shard = Net(np.ascontiguousarray(weight[:, rank * columns:(rank + 1) * columns]))
    # A free batch dimension, so every batch size (and the short last batch) runs as is.
    mindspore.export(shard, Tensor(shape=[None, WEIGHT_SHAPE[0]], dtype=mindspore.float32),
                     file_name=str(folder / "matmul"), file_format="MINDIR")
    if rank == 0:
        with h5py.File(HERE / "inputs.h5", "w") as f:
            f.create_dataset("features", data=np.ones((ROWS, WEIGHT_SHAPE[0]), dtype=np.float32),
                             chunks=(128, WEIGHT_SHAPE[0]), compression="gzip")


if __name__ == "__main__":
    main()
