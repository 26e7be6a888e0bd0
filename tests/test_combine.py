"""Combiner: layouts agreed on the first batch, then each rank checks its own (no MPI here:
a one-rank group stands in for the first rank of a group)."""

import numpy as np
import pytest

from spmdinfer.combine import Combiner
from spmdinfer.errors import BackendError
from spmdinfer.spec import Combine


class OneRank:
    """The part of comm.Channel a Combiner uses, for a group of one."""

    rank, size, is_root = 0, 1, True

    def allgather_layouts(self, arrays):
        return [[(a.dtype, a.shape) for a in arrays]]

    def gather(self, array, shapes):
        assert shapes == [array.shape]
        return [array]


def combiner(mode="concat:-1"):
    return Combiner(OneRank(), [Combine.parse(mode, "test")], ["y"])


def test_later_batches_keep_the_first_layout():
    c = combiner()
    assert c.combine([np.ones((4, 3), np.float32)], 4)[0].shape == (4, 3)
    assert c.combine([np.ones((2, 3), np.float32)], 2)[0].shape == (2, 3)  # a ragged last batch


@pytest.mark.parametrize("mode", ["concat:-1", "sum", "rank0"])
@pytest.mark.parametrize("changed", [np.ones((4, 5), np.float32), np.ones((4, 3), np.float64),
                                     np.ones((4, 3, 1), np.float32), np.ones((3, 3), np.float32)])
def test_a_changed_layout_after_the_first_batch_is_refused(mode, changed):
    c = combiner(mode)
    c.combine([np.ones((4, 3), np.float32)], 4)
    with pytest.raises(BackendError, match=r"output y: rank 0 returned .* after float32 \(rows, 3\) "
                                           r"on the first batch"):
        c.combine([changed], 4)


def test_output_count_must_match_the_names():
    with pytest.raises(BackendError, match="returned 2 outputs"):
        combiner().combine([np.ones((1, 1)), np.ones((1, 1))], 1)
