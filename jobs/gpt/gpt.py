"""A tiny GPT-like model, its tensor-parallel split and a whole-model reference (numpy).

One transformer block (pre-norm attention with a KV cache, then an MLP) between a token and
position embedding and a vocabulary projection; greedy decoding. Split over RANKS ranks as
Megatron splits it: each rank holds HEADS / RANKS attention heads (the query, key and value
columns of its heads, the rows of the output projection that read them), the matching
columns of the MLP's first layer and rows of its second, and VOCAB / RANKS columns of the
vocabulary projection. Inside each rank's graph an AllReduce sums the two row-split
projections and an AllGather joins the vocabulary columns, so every rank computes the same
next token (export.py builds the graphs).

The program is two graphs, as the GPT-3 case of MindSpore Serving's pipeline runs it:
- init(prompt): fills the rank's KV cache with the keys and values of the prompt's first
  PROMPT - 1 tokens; returns (token = the prompt's last token, k_cache, v_cache, pos).
- step(token, k_cache, v_cache, pos): puts the token's key and value at `pos` in the cache,
  attends to positions 0..pos, returns (next token, k_cache, v_cache, pos + 1).
Running step NEW times after init generates NEW tokens per prompt. `generate` is the same
computation on the whole, unsplit weights.
"""

from __future__ import annotations

import numpy as np

VOCAB = 64
WIDTH = 32       # model width
HEADS = 4
HEAD = WIDTH // HEADS
HIDDEN = 64      # the MLP's hidden width
PROMPT = 8       # tokens per prompt
NEW = 8          # tokens generated per prompt (the step graph's repeats)
CACHE = 16       # positions in the KV cache: PROMPT + NEW - 1, rounded up
RANKS = 2
EOS = 6          # the token that ends a prompt's generation (job.toml's until)
SEED = 15


def weights(seed: int = SEED) -> dict[str, np.ndarray]:
    """The whole model's weights, float32."""
    rng = np.random.default_rng(seed)

    def normal(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    return {
        "embed": normal(VOCAB, WIDTH),
        "position": normal(CACHE, WIDTH, scale=0.5),
        "wq": normal(WIDTH, WIDTH, scale=WIDTH ** -0.5),
        "wk": normal(WIDTH, WIDTH, scale=WIDTH ** -0.5),
        "wv": normal(WIDTH, WIDTH, scale=WIDTH ** -0.5),
        "wo": normal(WIDTH, WIDTH, scale=WIDTH ** -0.5),
        "w1": normal(WIDTH, HIDDEN, scale=WIDTH ** -0.5),
        "b1": normal(HIDDEN, scale=0.1),
        "w2": normal(HIDDEN, WIDTH, scale=HIDDEN ** -0.5),
        "unembed": normal(WIDTH, VOCAB, scale=WIDTH ** -0.5),
    }


def shard(whole: dict[str, np.ndarray], rank: int, ranks: int = RANKS) -> dict[str, np.ndarray]:
    """Rank `rank`'s part of the weights (see the module's docstring)."""
    assert HEADS % ranks == HIDDEN % ranks == VOCAB % ranks == 0, ranks

    def columns(w):
        part = w.shape[-1] // ranks
        return np.ascontiguousarray(w[..., rank * part:(rank + 1) * part])

    def rows(w):
        part = w.shape[0] // ranks
        return np.ascontiguousarray(w[rank * part:(rank + 1) * part])

    split = {"wq": columns, "wk": columns, "wv": columns, "wo": rows, "w1": columns,
             "b1": columns, "w2": rows, "unembed": columns}
    return {name: split[name](w) if name in split else w for name, w in whole.items()}


def norm(x: np.ndarray) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + 1e-5)


def generate(prompts: np.ndarray, w: dict[str, np.ndarray] | None = None, new: int = NEW,
             eos: int = EOS) -> tuple[np.ndarray, np.ndarray]:
    """Greedy decoding of `new` tokens after each prompt with the whole model: (tokens
    (rows, new) int32, length (rows,) int32), every token after a row's first `eos` being
    `eos` and its length the count up to and including it (`new` if it never comes), as
    the job's `collect` and `until` write them."""
    w = weights() if w is None else w
    rows, prompt = prompts.shape
    h = norm(w["embed"][prompts[:, :-1]] + w["position"][:prompt - 1])
    k, v = split_heads(h @ w["wk"]), split_heads(h @ w["wv"])      # (rows, heads, prompt - 1, head)
    tokens = np.zeros((rows, new), np.int32)
    token = prompts[:, -1]
    for i in range(new):
        pos = prompt - 1 + i
        x = w["embed"][token] + w["position"][pos]                  # (rows, width)
        h = norm(x)
        q = split_heads(h[:, None] @ w["wq"])                       # (rows, heads, 1, head)
        k = np.concatenate([k, split_heads(h[:, None] @ w["wk"])], axis=2)
        v = np.concatenate([v, split_heads(h[:, None] @ w["wv"])], axis=2)
        scores = q @ k.transpose(0, 1, 3, 2) / np.float32(np.sqrt(HEAD))
        p = np.exp(scores - scores.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        attended = (p @ v).transpose(0, 2, 1, 3).reshape(rows, WIDTH)
        h = x + attended @ w["wo"]
        h = h + np.maximum(norm(h) @ w["w1"] + w["b1"], 0) @ w["w2"]
        token = (norm(h) @ w["unembed"]).argmax(-1).astype(np.int32)
        tokens[:, i] = token
    hit = tokens == eos
    length = np.where(hit.any(1), hit.argmax(1) + 1, new).astype(np.int32)
    tokens[np.arange(new)[None, :] >= length[:, None]] = eos
    return tokens, length


def split_heads(x: np.ndarray) -> np.ndarray:
    """(rows, positions, heads * head) -> (rows, heads, positions, head)."""
    rows, positions, _ = x.shape
    return x.reshape(rows, positions, -1, HEAD).transpose(0, 2, 1, 3)
