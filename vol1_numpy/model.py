"""The whole LLaMA in NumPy: forward, hand-written backward, and the loss.

    tokens (B, T) -> embedding -> n_layers x block -> rmsnorm -> LM head -> logits (B, T, V)
    loss = mean cross-entropy(logits, targets)

Shape legend: B batch, T time, D model dim, H query heads, Hkv KV heads, hd head dim, F FFN hidden,
V vocabulary.

Parameters live in a plain dict keyed exactly like Volume 2's `state_dict` (Meta's names), so one
checkpoint loads into both volumes and every gradient can be compared by name:

    tok_embeddings.weight (V, D)                    layers.{i}.feed_forward.w1.weight (F, D)  gate
    layers.{i}.attention_norm.weight (D,)           layers.{i}.feed_forward.w3.weight (F, D)  up
    layers.{i}.attention.wq.weight (H*hd, D)        layers.{i}.feed_forward.w2.weight (D, F)  down
    layers.{i}.attention.wk.weight (Hkv*hd, D)      layers.{i}.ffn_norm.weight (D,)
    layers.{i}.attention.wv.weight (Hkv*hd, D)      norm.weight (D,)
    layers.{i}.attention.wo.weight (D, H*hd)        output.weight (V, D)  only when not tied

With `tie_embeddings` the LM head multiplies by `tok_embeddings.weight`, and since that one matrix is
used twice (lookup at the bottom, head at the top) its gradient is the *sum* of both uses.

Everything runs in the dtype of the parameters (float32 for training, float64 for gradient checks).
"""

from __future__ import annotations

import math

import numpy as np

from shared.config import ModelConfig
from vol1_numpy.block import BLOCK_PARAM_NAMES, block_backward, block_forward
from vol1_numpy.cross_entropy import cross_entropy_backward, cross_entropy_forward
from vol1_numpy.embedding import embedding_backward, embedding_forward
from vol1_numpy.linear import linear_backward, linear_forward
from vol1_numpy.rmsnorm import rmsnorm_backward, rmsnorm_forward
from vol1_numpy.rope import rope_tables


def param_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter name and shape, in Volume 2's `state_dict` order."""
    D, F, V, hd = config.dim, config.hidden_dim, config.vocab_size, config.head_dim
    H, Hkv = config.n_heads, config.n_kv_heads
    per_layer = {
        "attention_norm.weight": (D,),
        "attention.wq.weight": (H * hd, D),
        "attention.wk.weight": (Hkv * hd, D),
        "attention.wv.weight": (Hkv * hd, D),
        "attention.wo.weight": (D, H * hd),
        "ffn_norm.weight": (D,),
        "feed_forward.w1.weight": (F, D),
        "feed_forward.w2.weight": (D, F),
        "feed_forward.w3.weight": (F, D),
    }
    # vol2's module order: attention_norm, attention (wq wk wv wo), ffn_norm, feed_forward (w1 w2 w3)
    shapes = {"tok_embeddings.weight": (V, D)}
    for i in range(config.n_layers):
        shapes.update({f"layers.{i}.{name}": shape for name, shape in per_layer.items()})
    shapes["norm.weight"] = (D,)
    if not config.tie_embeddings:
        shapes["output.weight"] = (V, D)
    return shapes


def init_params(config: ModelConfig, seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
    """Volume 2's documented init (not bit-identical: NumPy's generator is not torch's).

    Every matrix ~ N(0, 0.02^2), except the two that write into the residual stream (wo, w2) ~
    N(0, (0.02 / sqrt(2 n_layers))^2) (GPT-2, Radford et al. 2019, section 2.3); norm gains = 1.
    """
    rng = np.random.default_rng(seed)
    std, resid_std = 0.02, 0.02 / math.sqrt(2 * config.n_layers)
    params = {}
    for name, shape in param_shapes(config).items():
        if name.endswith("norm.weight"):
            params[name] = np.ones(shape, dtype=dtype)
        elif name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
            params[name] = (rng.standard_normal(shape) * resid_std).astype(dtype)
        else:
            params[name] = (rng.standard_normal(shape) * std).astype(dtype)
    return params


def check_params(params: dict[str, np.ndarray], config: ModelConfig) -> np.dtype:
    """Raise `ValueError` naming any missing, extra, mis-shaped or mixed-dtype parameter; return the dtype."""
    shapes = param_shapes(config)
    missing, extra = sorted(set(shapes) - set(params)), sorted(set(params) - set(shapes))
    if missing or extra:
        raise ValueError(f"parameters do not match the config: missing {missing}, unexpected {extra}")
    for name, shape in shapes.items():
        if params[name].shape != shape:
            raise ValueError(f"parameter {name} has shape {params[name].shape}, config needs {shape}")
    dtypes = {params[name].dtype for name in shapes}
    if len(dtypes) != 1 or not np.issubdtype(next(iter(dtypes)), np.floating):
        raise ValueError(f"parameters must share one float dtype, got {sorted(map(str, dtypes))}")
    return next(iter(dtypes))


def _layer(params: dict, i: int) -> dict:
    return {name: params[f"layers.{i}.{name}"] for name in BLOCK_PARAM_NAMES}


def model_forward(params: dict[str, np.ndarray], tokens: np.ndarray,
                  config: ModelConfig) -> tuple[np.ndarray, tuple]:
    """Logits for every position, and the cache for `model_backward`.

    Args:
        params: keyed as `param_shapes(config)`, all float32 or all float64.
        tokens: (B, T) integer ids, T <= config.max_seq_len.

    Returns:
        logits: (B, T, V) in the parameters' dtype; cache: every layer's cache.

    Raises:
        ValueError: a bad parameter dict, or T > max_seq_len (as in Volume 2).
    """
    dtype = check_params(params, config)
    B, T = tokens.shape
    if T > config.max_seq_len:
        raise ValueError(f"sequence of {T} tokens exceeds max_seq_len={config.max_seq_len}")
    cos, sin = rope_tables(config.head_dim, T, config.rope_theta, dtype)  # (T, hd/2) each
    x, c_emb = embedding_forward(tokens, params["tok_embeddings.weight"])  # (B, T, D)
    c_layers = []
    for i in range(config.n_layers):
        x, c = block_forward(x, _layer(params, i), cos, sin, config.n_heads, config.n_kv_heads,
                             config.norm_eps)  # (B, T, D)
        c_layers.append(c)
    x, c_norm = rmsnorm_forward(x, params["norm.weight"], config.norm_eps)  # (B, T, D)
    head = params["tok_embeddings.weight" if config.tie_embeddings else "output.weight"]
    logits, c_head = linear_forward(x, head)  # (B, T, V)
    return logits, (config, c_emb, c_layers, c_norm, c_head)


def model_backward(dlogits: np.ndarray, cache: tuple) -> dict[str, np.ndarray]:
    """Gradients of every parameter, keyed like the parameters.

    Args:
        dlogits: (B, T, V) gradient of the objective with respect to the logits.
        cache: from `model_forward`.

    Returns:
        grads: same keys and shapes as the parameters. With tied embeddings,
            grads["tok_embeddings.weight"] = (lookup's scatter-add) + (LM head's dW).
    """
    config, c_emb, c_layers, c_norm, c_head = cache
    grads = {}
    dx, dhead = linear_backward(dlogits, c_head)  # (B, T, D), (V, D)
    dx, grads["norm.weight"] = rmsnorm_backward(dx, c_norm)
    for i in reversed(range(config.n_layers)):
        dx, g = block_backward(dx, c_layers[i])
        grads.update({f"layers.{i}.{name}": gi for name, gi in g.items()})
    demb = embedding_backward(dx, c_emb)  # (V, D)
    if config.tie_embeddings:
        demb += dhead  # one matrix, two uses: the gradients add
    else:
        grads["output.weight"] = dhead
    grads["tok_embeddings.weight"] = demb
    return {name: grads[name] for name in param_shapes(config)}  # in parameter order


def loss_and_grads(params: dict[str, np.ndarray], tokens: np.ndarray, targets: np.ndarray,
                   config: ModelConfig, ignore_index: int = -1) -> tuple[float, dict[str, np.ndarray]]:
    """Mean next-token cross-entropy (nats) and its gradient for every parameter.

    Args:
        tokens, targets: (B, T) integer arrays; targets equal to `ignore_index` are skipped.

    Returns:
        (loss, grads), grads keyed like `params`.
    """
    logits, cache = model_forward(params, tokens, config)
    loss, c_ce = cross_entropy_forward(logits, targets, ignore_index)
    del logits  # the cross-entropy cache holds what backward needs
    return loss, model_backward(cross_entropy_backward(1.0, c_ce), cache)


def forward_loss(params: dict[str, np.ndarray], tokens: np.ndarray, targets: np.ndarray,
                 config: ModelConfig, ignore_index: int = -1) -> float:
    """The mean cross-entropy alone (evaluation; the forward cache is dropped)."""
    logits, _ = model_forward(params, tokens, config)
    return cross_entropy_forward(logits, targets, ignore_index)[0]


def cache_nbytes(cache, params: dict[str, np.ndarray]) -> dict[str, int]:
    """Bytes of activations a forward cache keeps alive for backward, by kind.

    Walks the cache; counts each distinct memory buffer once (a view counts as its base array) and
    skips the parameters, which caches reference but do not own. Returns {"total", "per layer" (the
    first block's), "attention probabilities" (all blocks)}. Per token and block, in numbers:
    6 D + 2 Hkv hd + 4 F + H T + 2 (see the chapter, "What the cache costs").
    """
    param_ids = {id(p) for p in params.values()}
    seen: set[int] = set()

    def owner(a: np.ndarray) -> np.ndarray:
        while isinstance(a.base, np.ndarray):
            a = a.base
        return a

    def walk(obj) -> int:
        if isinstance(obj, np.ndarray):
            o = owner(obj)
            if id(o) in seen or id(obj) in param_ids or id(o) in param_ids:
                return 0
            seen.add(id(o))
            return o.nbytes
        if isinstance(obj, (tuple, list)):
            return sum(walk(x) for x in obj)
        if isinstance(obj, dict):
            return sum(walk(x) for x in obj.values())
        return 0

    config, c_emb, c_layers, c_norm, c_head = cache
    sizes = {"per layer": walk(c_layers[0]) if c_layers else 0}
    seen.clear()
    sizes["attention probabilities"] = sum(walk(c[9][3]) for c in c_layers)  # c_att = (q, k, v, p)
    sizes["total"] = sizes["attention probabilities"] + walk(cache)
    return sizes


class Transformer:
    """A thin holder of (config, params) with the model's functions as methods.

    `Transformer(config, seed=0, dtype=np.float32)` draws `init_params`; pass `params=` to use given
    weights (e.g. Volume 2's, converted with `.numpy()`), which are checked against the config.
    """

    def __init__(self, config: ModelConfig, params: dict[str, np.ndarray] | None = None, *,
                 seed: int = 0, dtype=np.float32):
        self.config = config
        self.params = init_params(config, seed, dtype) if params is None else params
        self.dtype = check_params(self.params, config)

    def __call__(self, tokens: np.ndarray) -> np.ndarray:
        """logits (B, T, V)."""
        return model_forward(self.params, tokens, self.config)[0]

    def loss_and_grads(self, tokens: np.ndarray, targets: np.ndarray,
                       ignore_index: int = -1) -> tuple[float, dict[str, np.ndarray]]:
        return loss_and_grads(self.params, tokens, targets, self.config, ignore_index)

    def loss(self, tokens: np.ndarray, targets: np.ndarray, ignore_index: int = -1) -> float:
        return forward_loss(self.params, tokens, targets, self.config, ignore_index)
