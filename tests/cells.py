"""MindSpore networks the tests export as real per-rank slices, with numpy references."""

from __future__ import annotations

import numpy as np
import mindspore
from mindspore import Parameter, Tensor, nn, ops


class MatMulNeg(nn.Cell):
    """The seed network: y = -(x @ w)."""

    def __init__(self, weight: np.ndarray):
        super().__init__()
        self.weight = Parameter(Tensor(np.ascontiguousarray(weight)))
        self.matmul = ops.MatMul()

    def construct(self, x):
        return -self.matmul(x, self.weight)


class MLPShard(nn.Cell):
    """One rank of a row-parallel two-layer MLP: relu(x @ w1 + b1) @ w2 + b2.

    w1 and b1 hold this rank's hidden columns, w2 the matching rows; the ranks'
    outputs summed give the full MLP (b2 lives on one rank only).
    """

    def __init__(self, w1, b1, w2, b2):
        super().__init__()
        self.w1 = Parameter(Tensor(np.ascontiguousarray(w1)), name="w1")
        self.b1 = Parameter(Tensor(np.ascontiguousarray(b1)), name="b1")
        self.w2 = Parameter(Tensor(np.ascontiguousarray(w2)), name="w2")
        self.b2 = Parameter(Tensor(np.ascontiguousarray(b2)), name="b2")
        self.matmul = ops.MatMul()
        self.relu = ops.ReLU()

    def construct(self, x):
        return self.matmul(self.relu(self.matmul(x, self.w1) + self.b1), self.w2) + self.b2


def mlp_weights(inputs: int, hidden: int, outputs: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((inputs, hidden)) / np.sqrt(inputs)
    b1 = rng.standard_normal(hidden)
    w2 = rng.standard_normal((hidden, outputs)) / np.sqrt(hidden)
    b2 = rng.standard_normal(outputs)
    return tuple(w.astype(np.float32) for w in (w1, b1, w2, b2))


def mlp_reference(x, w1, b1, w2, b2):
    return np.maximum(x @ w1 + b1, 0) @ w2 + b2


def mlp_shards(w1, b1, w2, b2, ranks: int):
    """The `ranks` row-parallel shards of the MLP."""
    cols = w1.shape[1] // ranks
    return [MLPShard(w1[:, r * cols:(r + 1) * cols], b1[r * cols:(r + 1) * cols],
                     w2[r * cols:(r + 1) * cols], b2 if r == 0 else np.zeros_like(b2))
            for r in range(ranks)]


class MultiIO(nn.Cell):
    """Two inputs (x float32 (N, 4), k int32 (N, 3)), three outputs of mixed dtypes.

    scores = x @ w          float32, a column slice per rank   (concat:-1)
    shifted = k + 1         int32, the same on every rank      (rank0)
    part = k * (rank + 1)   int32, a share per rank            (sum)
    """

    def __init__(self, weight: np.ndarray, rank: int):
        super().__init__()
        self.weight = Parameter(Tensor(np.ascontiguousarray(weight)), name="w")
        self.factor = rank + 1
        self.matmul = ops.MatMul()

    def construct(self, x, k):
        return self.matmul(x, self.weight), k + 1, k * self.factor


class FixedBatchOnly(nn.Cell):
    """y = -(x @ w) through a reshape to a fixed batch: predict fails for any other batch size."""

    def __init__(self, weight: np.ndarray, batch: int):
        super().__init__()
        self.weight = Parameter(Tensor(np.ascontiguousarray(weight)))
        self.matmul = ops.MatMul()
        self.shape = (batch, weight.shape[0])

    def construct(self, x):
        return -self.matmul(ops.reshape(x, self.shape), self.weight)


class Dense(nn.Cell):
    """y = x @ w, optionally through a ReLU: one stage of a pipelined MLP."""

    def __init__(self, weight: np.ndarray, relu: bool = False):
        super().__init__()
        self.weight = Parameter(Tensor(np.ascontiguousarray(weight)), name="w")
        self.matmul = ops.MatMul()
        self.relu = relu

    def construct(self, x):
        y = self.matmul(x, self.weight)
        return ops.relu(y) if self.relu else y


class InitGraph(nn.Cell):
    """The init graph of a two-graph program: h = x @ a."""

    def __init__(self, a: np.ndarray):
        super().__init__()
        self.a = Parameter(Tensor(np.ascontiguousarray(a)), name="a")
        self.matmul = ops.MatMul()

    def construct(self, x):
        return self.matmul(x, self.a)


class StepGraph(nn.Cell):
    """The step graph: h' = 0.5 * h + x[:, :4], fed its own output back."""

    def construct(self, h, x):
        return 0.5 * h + x[:, :4]


class ZeroColumn(nn.Cell):
    """The start of a counting loop: h = 0, one column per row."""

    def construct(self, x):
        return x[:, :1] * 0


class CountTo(nn.Cell):
    """One repeat of a counting loop: h' = h + 1, and stop = 1 once h' reaches the row's
    limit x[:, 0] (a generation step: a token per repeat, then an end token)."""

    def construct(self, h, x):
        h = h + 1
        return h, ops.cast(h >= x[:, :1], mindspore.int32)


class Constant(nn.Cell):
    """A graph with no inputs (a later stage in graph handoff): returns a fixed (B, m) tensor."""

    def __init__(self, value: np.ndarray):
        super().__init__()
        self.value = Parameter(Tensor(np.ascontiguousarray(value)), name="value")

    def construct(self):
        return self.value * 1.0


class AllGatherMatMul(nn.Cell):
    """One rank of the seed's MatMul with its communication inside the graph: every rank
    computes its columns of y = -(x @ w) and an AllGather (along axis 0, so through a
    transpose) gives every rank the whole (N, columns * ranks) output."""

    def __init__(self, weight: np.ndarray, batch: int | None = None):
        super().__init__()
        self.weight = Parameter(Tensor(np.ascontiguousarray(weight)), name="w")
        self.matmul = ops.MatMul()
        self.gather = ops.AllGather()
        self.shape = None if batch is None else (batch, weight.shape[0])

    def construct(self, x):
        if self.shape is not None:
            x = ops.reshape(x, self.shape)  # a graph made for one batch size only
        y = -self.matmul(x, self.weight)
        return ops.transpose(self.gather(ops.transpose(y, (1, 0))), (1, 0))


class AllReduceMLP(nn.Cell):
    """One rank of a Megatron MLP: the first layer split by columns, the second by rows,
    and an AllReduce (sum) inside the graph, so every rank returns the whole output."""

    def __init__(self, w1, b1, w2, b2):
        super().__init__()
        self.local = MLPShard(w1, b1, w2, b2)
        self.reduce = ops.AllReduce()

    def construct(self, x):
        return self.reduce(self.local(x))


class SendStage(nn.Cell):
    """Stage 0 of a pipeline whose handoff is inside the graph: h = x @ w, sent to rank 1."""

    def __init__(self, weight: np.ndarray):
        super().__init__()
        self.weight = Parameter(Tensor(np.ascontiguousarray(weight)), name="w")
        self.matmul = ops.MatMul()
        self.send = ops.Send(sr_tag=0, dest_rank=1)

    def construct(self, x):
        h = self.matmul(x, self.weight)
        return ops.depend(h, self.send(h))


class ReceiveStage(nn.Cell):
    """Stage 1: receives h (batch, columns) from rank 0 and returns h @ w."""

    def __init__(self, weight: np.ndarray, batch: int):
        super().__init__()
        self.weight = Parameter(Tensor(np.ascontiguousarray(weight)), name="w")
        self.matmul = ops.MatMul()
        self.receive = ops.Receive(sr_tag=0, src_rank=0, shape=[batch, weight.shape[0]],
                                   dtype=mindspore.float32)

    def construct(self):
        return self.matmul(self.receive(), self.weight)
