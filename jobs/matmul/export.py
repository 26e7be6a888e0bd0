"""Export the seed's MatMul + Neg network as 8 column slices, and a small input file.

The network is the one in MindSpore Serving's distributed example: y = -(x @ W)
with W of shape (96, 16) filled with 0.5. Rank r holds columns 2r..2r+1 of W,
so the 8 slices concatenated along the last axis give the full (N, 16) output,
and an all-ones row gives -48 everywhere.

    python jobs/matmul/export.py     # writes model/device{0..7}/matmul.mindir and inputs.h5
"""

from pathlib import Path

import h5py
import mindspore
import numpy as np
from mindspore import Parameter, Tensor, nn, ops

HERE = Path(__file__).resolve().parent
RANKS = 8
WEIGHT_SHAPE = (96, 16)
ROWS = 1000


class Net(nn.Cell):
    """MatMul followed by Neg, as in the seed."""

    def __init__(self, weight: np.ndarray):
        super().__init__()
        self.matmul_weight = Parameter(Tensor(weight))
        self.matmul = ops.MatMul()
        self.neg = ops.Neg()

    def construct(self, x):
        return self.neg(self.matmul(x, self.matmul_weight))


def export_slices(model: Path, names: list[str]) -> None:
    """Write model/device{rank}/NAME.mindir for every rank and name: rank r's column slice of
    the seed's Net (W of 0.5)."""
    weight = np.full(WEIGHT_SHAPE, 0.5, dtype=np.float32)
    columns = WEIGHT_SHAPE[1] // RANKS
    for rank in range(RANKS):
        folder = model / f"device{rank}"
        folder.mkdir(parents=True, exist_ok=True)
        part = np.ascontiguousarray(weight[:, rank * columns:(rank + 1) * columns])
        for name in names:
            # A free batch dimension, so every batch size (and the short last batch) runs as is.
            mindspore.export(Net(part), Tensor(shape=[None, WEIGHT_SHAPE[0]], dtype=mindspore.float32),
                             file_name=str(folder / name), file_format="MINDIR")


def main() -> None:
    export_slices(HERE / "model", ["matmul"])
    with h5py.File(HERE / "inputs.h5", "w") as f:
        f.create_dataset("features", data=np.ones((ROWS, WEIGHT_SHAPE[0]), dtype=np.float32),
                         chunks=(128, WEIGHT_SHAPE[0]), compression="gzip")


if __name__ == "__main__":
    main()
