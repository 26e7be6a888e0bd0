"""Export the seed's two-graph pipeline as 8 column slices of two graphs each, and its input.

MindSpore Serving's pipeline_distributed example: `matmul_0.mindir` and `matmul_1.mindir` per
device, both the MatMul + Neg network y = -(x @ W) with W of shape (96, 16) filled with 0.5.
(The seed's export builds its second model from the first network again, which is why its
`z` is -48 for all-ones input; the same weight is exported here.) Rank r holds columns
2r..2r+1 of W in both graphs; `inputs.h5` holds `x` and `y`, 256 all-ones rows each, as the
seed's client sends.

    python jobs/pipeline/export.py   # writes model/device{0..7}/matmul_{0,1}.mindir, inputs.h5
"""

import sys
from pathlib import Path

import h5py
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "matmul"))
from export import WEIGHT_SHAPE, export_slices  # noqa: E402  (jobs/matmul/export.py)

ROWS = 256


def main() -> None:
    export_slices(HERE / "model", ["matmul_0", "matmul_1"])
    with h5py.File(HERE / "inputs.h5", "w") as f:
        for name in ("x", "y"):
            f.create_dataset(name, data=np.ones((ROWS, WEIGHT_SHAPE[0]), dtype=np.float32))


if __name__ == "__main__":
    main()
