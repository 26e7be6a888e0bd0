"""MindSpore's own runtime as a backend: a signature's later runs go straight to its
compiled graph (spmdinfer.backends.mindspore._Graph), with the cell's own results."""

from __future__ import annotations

import numpy as np
import pytest

from spmdinfer.backends import Placement, open_session
from spmdinfer.errors import BackendError


class CountingCell:
    """A GraphCell that counts the calls made through it."""

    def __init__(self, cell):
        self.cell = cell
        self.calls = 0

    def __call__(self, *tensors):
        self.calls += 1
        return self.cell(*tensors)

    def __getattr__(self, name):
        return getattr(self.cell, name)


def session(path, **options):
    opened = open_session("mindspore", path, Placement("cpu", None, 0, 1), options)
    opened._graph._cell = counting = CountingCell(opened._graph._cell)
    return opened, counting


def batches():
    rng = np.random.default_rng(9)
    for rows in (5, 5, 3, 5, 3):  # two signatures, each met again
        yield [rng.standard_normal((rows, 4)).astype(np.float32),
               rng.integers(-50, 50, (rows, 3)).astype(np.int32)]


def test_later_runs_of_a_signature_skip_the_cell_with_its_results(multi_io_slices):
    """Three outputs of mixed dtypes, batches of two sizes: the cell runs once per size (it
    compiles), every later batch runs the compiled graph directly, and every output is the
    cell's own, bit for bit, in the cell's order and dtypes. Without the direct run
    (`direct_run = false`) every batch goes through the cell."""
    template, weight = multi_io_slices
    path = template.with_name(template.name.format(rank=1))
    direct, through_direct = session(path)
    plain, through_plain = session(path, direct_run=False)
    for arrays in batches():
        got, expected = direct.predict(arrays), plain.predict(arrays)
        assert [a.dtype for a in got] == [np.float32, np.int32, np.int32]
        for a, b in zip(got, expected):
            assert a.dtype == b.dtype and np.array_equal(a, b)
        x, k = arrays
        np.testing.assert_allclose(got[0], x @ weight[:, 2:4], rtol=1e-5, atol=1e-5)
        assert np.array_equal(got[1], k + 1) and np.array_equal(got[2], k * 2)
    assert through_direct.calls == 2
    assert through_plain.calls == 5


@pytest.mark.parametrize("options, message", [
    ({"direct_run": "yes"}, "[backend.mindspore] direct_run: expected true or false, got 'yes'"),
    ({"threads": 2}, "[backend.mindspore] threads: unknown option; valid options: direct_run"),
])
def test_bad_options_are_named(multi_io_slices, options, message):
    template, _ = multi_io_slices
    with pytest.raises(BackendError) as raised:
        open_session("mindspore", template.with_name(template.name.format(rank=0)),
                     Placement("cpu", None, 0, 1), options)
    assert str(raised.value) == message
