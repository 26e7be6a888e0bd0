"""Export the tiny GPT (gpt.py) as 2 tensor-parallel slices of two graphs each, and prompts.

Rank r writes model/device{r}/init.mindir and step.mindir: its heads, MLP columns and
vocabulary columns, with an AllReduce after each row-split projection and an AllGather of
the logits inside the step graph. MindSpore builds collective ops only in a process that
has joined a MindSpore cluster, so this runs under MPI, one process per rank, and joins one
(spmdinfer.cluster.join_world, as `spmdinfer run` does):

    mpiexec -n 2 python jobs/gpt/export.py   # model/device{0,1}/{init,step}.mindir, prompts.h5

Both graphs take a free batch dimension, so every batch size (and the short last batch) runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from spmdinfer.cluster import join_world

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import gpt  # noqa: E402  (gpt.py, next to this file)

ROWS = 256
PROMPT_SEED = 1


def prompts(rows: int = ROWS, seed: int = PROMPT_SEED) -> np.ndarray:
    """The prompts scored: `rows` of gpt.PROMPT token ids, int32."""
    return np.random.default_rng(seed).integers(0, gpt.VOCAB, (rows, gpt.PROMPT)).astype(np.int32)


def cells(part: dict[str, np.ndarray], ranks: int):
    """(Init, Step): the two graphs of one rank, holding `part` (gpt.shard)."""
    import mindspore
    from mindspore import Parameter, Tensor, nn, ops

    heads = gpt.HEADS // ranks
    float32 = mindspore.float32

    def norm(x):
        centred = x - ops.mean(x, -1, True)
        return centred / ops.sqrt(ops.mean(centred * centred, -1, True) + 1e-5)

    def split(x, positions):
        """(rows, positions, heads * head) -> (rows, heads, positions, head)"""
        return ops.transpose(ops.reshape(x, (-1, positions, heads, gpt.HEAD)), (0, 2, 1, 3))

    class Weights(nn.Cell):
        def __init__(self, names):
            super().__init__()
            for name in names:
                setattr(self, name, Parameter(Tensor(part[name]), name=name))

    class Init(Weights):
        """init(prompt) -> (the prompt's last token, k_cache, v_cache, pos): the keys and
        values of the prompt's first PROMPT - 1 tokens, in cache slots 0..PROMPT - 2."""

        def __init__(self):
            super().__init__(["embed", "position", "wk", "wv"])
            self.prefix = gpt.PROMPT - 1

        def construct(self, prompt):
            prefix = prompt[:, :self.prefix]
            h = norm(ops.gather(self.embed, prefix, 0) + self.position[:self.prefix])
            padding = (0, 0, 0, gpt.CACHE - self.prefix)   # empty slots after the prefix
            k = ops.pad(split(ops.matmul(h, self.wk), self.prefix), padding)
            v = ops.pad(split(ops.matmul(h, self.wv), self.prefix), padding)
            token = prompt[:, self.prefix]
            return token, k, v, ops.zeros_like(token) + self.prefix

    class Step(Weights):
        """step(token, k_cache, v_cache, pos) -> (next token, k_cache, v_cache, pos + 1)."""

        def __init__(self):
            super().__init__(["embed", "position", "wq", "wk", "wv", "wo", "w1", "b1", "w2",
                              "unembed"])
            self.slots = Tensor(np.arange(gpt.CACHE, dtype=np.int32)[None, :])
            self.scale = Tensor(np.float32(np.sqrt(gpt.HEAD)))
            self.attention_sum = ops.AllReduce()
            self.mlp_sum = ops.AllReduce()
            self.vocabulary = ops.AllGather()   # joins along axis 0: the logits travel transposed

        def construct(self, token, k_cache, v_cache, pos):
            x = ops.gather(self.embed, token, 0) + ops.gather(self.position, pos, 0)
            h = norm(x)
            q = split(ops.matmul(h, self.wq), 1)                          # (rows, heads, 1, head)
            here = ops.cast(ops.equal(self.slots, ops.expand_dims(pos, 1)), float32)
            here = ops.reshape(here, (-1, 1, gpt.CACHE, 1))               # the slot at pos
            k = k_cache * (1 - here) + split(ops.matmul(h, self.wk), 1) * here
            v = v_cache * (1 - here) + split(ops.matmul(h, self.wv), 1) * here
            scores = ops.matmul(q, ops.transpose(k, (0, 1, 3, 2))) / self.scale
            seen = ops.cast(ops.less_equal(self.slots, ops.expand_dims(pos, 1)), float32)
            scores = scores + (1 - ops.reshape(seen, (-1, 1, 1, gpt.CACHE))) * -1e9
            attended = ops.matmul(ops.softmax(scores, -1), v)             # (rows, heads, 1, head)
            attended = ops.reshape(ops.transpose(attended, (0, 2, 1, 3)), (-1, heads * gpt.HEAD))
            h = x + self.attention_sum(ops.matmul(attended, self.wo))
            h = h + self.mlp_sum(ops.matmul(ops.relu(ops.matmul(norm(h), self.w1) + self.b1),
                                            self.w2))
            logits = ops.matmul(norm(h), self.unembed)                    # this rank's columns
            logits = ops.transpose(self.vocabulary(ops.transpose(logits, (1, 0))), (1, 0))
            return ops.cast(ops.argmax(logits, -1), mindspore.int32), k, v, pos + 1

    return Init(), Step()


def export(model: Path, rank: int, ranks: int, whole: dict[str, np.ndarray] | None = None) -> None:
    """Write model/device{rank}/init.mindir and step.mindir (in a joined cluster)."""
    import mindspore
    from mindspore import Tensor

    init, step = cells(gpt.shard(gpt.weights() if whole is None else whole, rank, ranks), ranks)
    folder = model / f"device{rank}"
    folder.mkdir(parents=True, exist_ok=True)
    cache = Tensor(shape=[None, gpt.HEADS // ranks, gpt.CACHE, gpt.HEAD], dtype=mindspore.float32)
    ids = Tensor(shape=[None], dtype=mindspore.int32)
    mindspore.export(init, Tensor(shape=[None, gpt.PROMPT], dtype=mindspore.int32),
                     file_name=str(folder / "init"), file_format="MINDIR")
    mindspore.export(step, ids, cache, cache, ids, file_name=str(folder / "step"),
                     file_format="MINDIR")


def main() -> None:
    rank, ranks = join_world("cpu")
    import h5py

    export(HERE / "model", rank, ranks)
    if rank == 0:
        with h5py.File(HERE / "prompts.h5", "w") as f:
            f.create_dataset("prompts", data=prompts())


if __name__ == "__main__":
    main()
