"""LLaMA in PyTorch: a pre-norm decoder-only transformer.

Architecture from Touvron et al. 2023 (LLaMA, section 2.2): pre-normalization with RMSNorm (Zhang &
Sennrich 2019), SwiGLU feed-forward (Shazeer 2020), rotary position embeddings (Su et al. 2021,
RoFormer, eq. 34), and grouped-query attention (Ainslie et al. 2023). Parameter names are Meta's
reference names (`layers.{i}.attention.wq.weight`, ...), so one checkpoint loads into every volume.

Shape legend, used in every comment below:
    B batch, T time (tokens in this call), S cached + new tokens, D model dim, H query heads,
    Hkv key/value heads, hd head dim, F FFN hidden width, V vocabulary.

The same forward serves training (whole sequences, causal mask) and cached inference: pass a
`KVCache` and the absolute position `start_pos` of the first token, and attention reads the keys and
values of all earlier tokens from the cache. Volume 3 builds its engine on these modules.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from shared.config import ModelConfig

# ---------------------------------------------------------------------------------------------
# RoPE layout.
#
# RoPE rotates each 2-D pair of a query/key head vector by an angle proportional to the token's
# position: pair i of a head of size hd turns by  pos * theta^(-2i/hd),  i = 0 .. hd/2 - 1.
# Which two coordinates form "pair i" is a layout choice, and checkpoints depend on it:
#
#   * interleaved (Meta's reference, used here): pair i = (x[2i], x[2i+1]). Meta writes it as a
#     complex multiply on view_as_complex(x.reshape(..., hd/2, 2)).
#   * half-split (Hugging Face's `rotate_half`): pair i = (x[i], x[i + hd/2]).
#
# The two are the same model up to a fixed permutation of the rows of wq and wk within each head
# (see `vol2_torch/hf.py`, `permute_for_half_split`), which is exactly what Hugging Face's
# conversion script applies. tests/test_vol2_model.py checks that the half-split layout with
# permuted wq/wk gives identical logits.
# ---------------------------------------------------------------------------------------------


def precompute_rope(head_dim: int, max_seq_len: int, theta: float = 10000.0,
                    device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for RoPE (RoFormer eq. 34), float32, each of shape (max_seq_len, hd/2)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64, device=device), inv_freq)
    return angles.cos().float(), angles.sin().float()  # (S, hd/2) each


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of `x` (B, T, nh, hd) by the angles in cos/sin (T, hd/2).

    out[2i]   = x[2i] cos - x[2i+1] sin
    out[2i+1] = x[2i] sin + x[2i+1] cos
    which is pair i read as the complex number x[2i] + j x[2i+1], times e^(j angle): Meta's
    formulation, one complex multiply forward and one backward instead of ~6 real elementwise ops
    each way. Computed in float32 (float64 for float64 inputs) and returned in x's dtype.
    """
    B, T, nh, hd = x.shape
    ct = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    xc = torch.view_as_complex(x.to(ct).reshape(B, T, nh, hd // 2, 2))  # (B, T, nh, hd/2) complex
    rot = torch.complex(cos.to(ct), sin.to(ct))[None, :, None, :]  # (1, T, 1, hd/2) = e^(j angle)
    return torch.view_as_real(xc * rot).reshape(B, T, nh, hd).to(x.dtype)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight  (Zhang & Sennrich 2019, eq. 4), computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight.to(x.dtype)


class KVCache:
    """A contiguous key/value cache for batch B, one preallocated buffer per layer.

    k[layer], v[layer]: (B, max_seq_len, Hkv, hd). `update` writes the new keys/values at positions
    [start_pos, start_pos + T) and returns views of everything up to the end of the write. Volume 3
    replaces this with a paged cache; this one is the simple reference.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_seq_len: int | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.max_seq_len = max_seq_len or config.max_seq_len
        shape = (config.n_layers, batch_size, self.max_seq_len, config.n_kv_heads, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    def update(self, layer: int, start_pos: int, k: torch.Tensor, v: torch.Tensor):
        T = k.shape[1]
        if start_pos + T > self.max_seq_len:
            raise ValueError(f"KV cache holds {self.max_seq_len} positions; writing {start_pos}..{start_pos + T}")
        self.k[layer, :, start_pos:start_pos + T] = k
        self.v[layer, :, start_pos:start_pos + T] = v
        return self.k[layer, :, :start_pos + T], self.v[layer, :, :start_pos + T]  # (B, S, Hkv, hd)


class Attention(nn.Module):
    """Causal multi-head attention with grouped-query heads and RoPE."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.n_rep = config.n_rep
        D, hd = config.dim, config.head_dim
        self.wq = nn.Linear(D, self.n_heads * hd, bias=False)
        self.wk = nn.Linear(D, self.n_kv_heads * hd, bias=False)
        self.wv = nn.Linear(D, self.n_kv_heads * hd, bias=False)
        self.wo = nn.Linear(self.n_heads * hd, D, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start_pos: int = 0,
                kv_cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        H, Hkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        # One GEMM for q, k and v and one RoPE call for q and k: fewer, larger kernels (measured with
        # `make vol2-bench`: a few percent on an idle 2-core CPU, more when other processes compete
        # for the cores). The weights stay three Parameters under Meta's names; concatenating them
        # costs a copy of (H + 2 Hkv) hd x D floats per call.
        w_qkv = torch.cat((self.wq.weight, self.wk.weight, self.wv.weight))  # ((H + 2 Hkv) hd, D)
        qkv = F.linear(x, w_qkv)  # (B, T, (H + 2 Hkv) hd)
        qk = apply_rope(qkv[..., :(H + Hkv) * hd].view(B, T, H + Hkv, hd), cos, sin)  # (B, T, H + Hkv, hd)
        q, k = qk.split((H, Hkv), dim=2)  # (B, T, H, hd), (B, T, Hkv, hd)
        v = qkv[..., (H + Hkv) * hd:].view(B, T, Hkv, hd)  # (B, T, Hkv, hd)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, start_pos, k, v)  # (B, S, Hkv, hd)
        S = k.shape[1]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh, T|S, hd)
        # GQA: each KV head serves n_rep consecutive query heads (query head h reads KV head h // n_rep).
        # SDPA's enable_gqa does that without materialising n_rep copies of k and v.
        gqa = {"enable_gqa": True} if self.n_rep > 1 else {}
        if S == T:  # no cached prefix: the plain causal mask
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa)
        elif T == 1:  # one new token attends to everything cached
            out = F.scaled_dot_product_attention(q, k, v, **gqa)
        else:  # a chunk after a cached prefix: query i sits at absolute position start_pos + i
            allowed = torch.arange(S, device=x.device)[None, :] <= (
                start_pos + torch.arange(T, device=x.device)[:, None])  # (T, S)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, **gqa)
        out = out.transpose(1, 2).reshape(B, T, H * hd)  # (B, T, H*hd)
        return self.wo(out)  # (B, T, D)


class FeedForward(nn.Module):
    """SwiGLU: w2( silu(w1 x) * w3 x )  (Shazeer 2020, eq. 6). w1 gate, w3 up, w2 down."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.hidden_dim, bias=False)
        self.w2 = nn.Linear(config.hidden_dim, config.dim, bias=False)
        self.w3 = nn.Linear(config.dim, config.hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # (B, T, F) -> (B, T, D)


class TransformerBlock(nn.Module):
    """Pre-norm block: h = x + Attn(RMSNorm(x)); out = h + FFN(RMSNorm(h))."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config, layer_idx)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x, cos, sin, start_pos=0, kv_cache=None):
        h = x + self.attention(self.attention_norm(x), cos, sin, start_pos, kv_cache)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """The whole LLaMA: embedding, `n_layers` blocks, final RMSNorm, LM head.

    With `config.tie_embeddings` the LM head multiplies by `tok_embeddings.weight` itself (one
    Parameter, so the gradients of both uses add up) and there is no `output.weight`.

    Init (documented, as GPT-2 / nanoGPT): every Linear and the embedding ~ N(0, 0.02^2); the two
    projections that write into the residual stream (wo, w2) ~ N(0, (0.02 / sqrt(2 n_layers))^2), so
    the residual's variance does not grow with depth (Radford et al. 2019, section 2.3); norms = 1.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = None if config.tie_embeddings else nn.Linear(config.dim, config.vocab_size, bias=False)
        cos, sin = precompute_rope(config.head_dim, config.max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)  # (max_seq_len, hd/2)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
                p.normal_(0.0, std / math.sqrt(2 * self.config.n_layers))
            else:
                p.normal_(0.0, std)

    @property
    def output_weight(self) -> torch.Tensor:
        """The LM head matrix (V, D): `tok_embeddings.weight` itself when tied."""
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    def forward(self, tokens: torch.Tensor, *, start_pos: int = 0,
                kv_cache: KVCache | None = None) -> torch.Tensor:
        """Logits for every position.

        Args:
            tokens: (B, T) int64 token ids.
            start_pos: absolute position of tokens[:, 0]; nonzero only with a KV cache.
            kv_cache: when given, keys/values of earlier positions are read from it and this call's
                are written into it.
        Returns:
            logits (B, T, V), in the autocast dtype if autocast is on, else float32.
        Raises:
            ValueError: if start_pos + T exceeds config.max_seq_len (RoPE tables end there), or if
                start_pos > 0 without a cache.
        """
        B, T = tokens.shape
        if start_pos + T > self.config.max_seq_len:
            raise ValueError(f"sequence of {start_pos + T} tokens exceeds max_seq_len={self.config.max_seq_len}")
        if start_pos and kv_cache is None:
            raise ValueError("start_pos > 0 needs a kv_cache holding the earlier positions")
        cos = self.rope_cos[start_pos:start_pos + T]  # (T, hd/2)
        sin = self.rope_sin[start_pos:start_pos + T]
        x = self.tok_embeddings(tokens)  # (B, T, D)
        for layer in self.layers:
            x = layer(x, cos, sin, start_pos, kv_cache)
        x = self.norm(x)
        return F.linear(x, self.output_weight.to(x.dtype))  # (B, T, V)

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy in nats over all positions; targets == -1 are ignored."""
        logits = self(tokens)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1)

    # --- accounting ----------------------------------------------------------------------------

    def num_params(self, include_embeddings: bool = True) -> int:
        """Parameters actually held by the module (tied weights counted once)."""
        n = sum(p.numel() for p in self.parameters())
        if not include_embeddings:
            n -= self.tok_embeddings.weight.numel() + (0 if self.output is None else self.output.weight.numel())
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 N + 12 L D T (Kaplan et al. 2020 / PaLM appendix B).

        N counts the matmul parameters, i.e. the non-embedding parameters plus the LM head (the
        embedding lookup is not a matmul). The second term is attention's QK^T and AV over a
        context of T, forward and backward, without the causal halving.
        """
        c = self.config
        n_matmul = self.num_params(include_embeddings=False) + c.vocab_size * c.dim
        return 6 * n_matmul + 12 * c.n_layers * c.dim * seq_len
