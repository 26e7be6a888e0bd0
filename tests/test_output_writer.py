"""OutputWriter: batches written at their rows, in any order, by os.pwritev into early-allocated
chunks (uncompressed) or through h5py in slabs (compressed); compared with numpy here."""

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest

from spmdinfer.output import MAX_CHUNK_BYTES, OutputWriter
from spmdinfer.spec import OutputSpec


def spec(tmp_path, compression=""):
    return OutputSpec(file=tmp_path / "out.h5", datasets=(("y", "/deep/y"), ("k", "/k")),
                      compression=compression)


def batches(rows, batch, rng):
    y = rng.standard_normal((rows, 3, 5)).astype(np.float32)
    k = rng.integers(-9, 9, (rows,)).astype(np.int16)
    return y, k, [(s, [y[s:s + batch], k[s:s + batch]]) for s in range(0, rows, batch)]


@pytest.mark.parametrize("compression", ["", "gzip:1"])
@pytest.mark.parametrize("order", ["in order", "shuffled"])
def test_batches_land_at_their_rows(tmp_path, compression, order):
    rng = np.random.default_rng(3)
    y, k, parts = batches(1003, 64, rng)
    if order == "shuffled":
        parts = [parts[i] for i in rng.permutation(len(parts))]  # replicas finish in any order
    writer = OutputWriter(spec(tmp_path, compression), 1003, 64, {"job_text": "x"})
    for start, arrays in parts:
        writer.write(start, arrays)
    assert writer.direct == [compression == "", compression == ""]
    writer.finish({"complete": True})
    with h5py.File(tmp_path / "out.h5") as f:
        assert np.array_equal(f["deep/y"][()], y) and np.array_equal(f["k"][()], k)
        assert f["deep/y"].chunks == (64, 3, 5) and f["k"].dtype == np.int16
        assert f.attrs["complete"] and f.attrs["job_text"] == "x"
    assert not (tmp_path / "out.h5.partial").exists()


def test_provenance_is_in_the_file_before_the_first_batch(tmp_path):
    # Written when the file is created (rank 0's start-up), not by the writer's thread at the
    # first batch, where h5py held the GIL, and so every rank's loop, for as long.
    writer = OutputWriter(spec(tmp_path), 10, 5, {"job_text": "x", "rows": 10})
    writer._file.flush()
    read = subprocess.run([sys.executable, "-c", READ_ATTRS, str(writer.temp_path)],
                          capture_output=True, text=True, timeout=60)
    assert read.returncode == 0, read.stderr
    assert json.loads(read.stdout) == {"job_text": "x", "rows": 10}
    writer.discard()


def test_provenance_h5py_cannot_store_leaves_no_file(tmp_path):
    with pytest.raises(TypeError):
        OutputWriter(spec(tmp_path), 10, 5, {"job_text": "x", "odd": object()})
    assert list(tmp_path.iterdir()) == []


READ_ATTRS = """
import json, sys, h5py
with h5py.File(sys.argv[1], "r", locking=False) as f:
    print(json.dumps({k: v.item() if hasattr(v, "item") else v for k, v in f.attrs.items()}))
"""


def test_a_batch_bigger_than_a_chunk_spans_several(tmp_path):
    rows_per_chunk = MAX_CHUNK_BYTES // (4 * 3 * 5)
    rows = 2 * rows_per_chunk + 17
    rng = np.random.default_rng(4)
    y, k, parts = batches(rows, rows_per_chunk + 11, rng)  # batches straddle chunk boundaries
    writer = OutputWriter(spec(tmp_path), rows, rows_per_chunk + 11)
    for start, arrays in reversed(parts):
        writer.write(start, arrays)
    writer.finish({})
    with h5py.File(tmp_path / "out.h5") as f:
        assert f["deep/y"].chunks[0] == rows_per_chunk
        assert np.array_equal(f["deep/y"][()], y) and np.array_equal(f["k"][()], k)


def test_discard_removes_the_unfinished_file(tmp_path):
    writer = OutputWriter(spec(tmp_path), 10, 5)
    writer.write(0, [np.zeros((5, 3, 5), np.float32), np.zeros(5, np.int16)])
    writer.discard()
    writer.discard()  # twice is harmless
    assert not (tmp_path / "out.h5.partial").exists() and not (tmp_path / "out.h5").exists()


def test_zero_rows(tmp_path):
    writer = OutputWriter(spec(tmp_path), 0, 5)
    writer.write(0, [np.zeros((0, 3, 5), np.float32), np.zeros(0, np.int16)])
    writer.finish({"complete": True})
    with h5py.File(tmp_path / "out.h5") as f:
        assert f["deep/y"].shape == (0, 3, 5) and f["k"].shape == (0,)
