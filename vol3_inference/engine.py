"""The inference engine: LLaMA's forward over a ragged batch of sequences, reading a paged KV cache.

Prefill and decode. Serving a prompt has two phases. *Prefill* runs the whole prompt (T tokens) through
the model at once: every weight matrix is multiplied by T rows, so it is compute-bound. *Decode* then
produces one token per step: every weight is read from memory to multiply a single row, so at batch 1
it is memory-bound (or, for small models on a CPU, bound by per-op overhead). Batching decode steps of
many sequences multiplies each weight by many rows for one read, which is where serving throughput
comes from (see `scheduler.py`).

One forward serves both. `Engine.forward(chunks)` takes any mix of work items `Chunk(seq, tokens,
start_pos)`: a decode step is a chunk of one token, a prefill a chunk of many (a long prompt may be
split into several chunks over several steps). All tokens are flattened into one (N, D) matrix for
the linear layers; attention is the only op that needs to know which sequence a row belongs to:
decode rows go through one batched paged-attention call, each prefill chunk through causal attention
over its own cached prefix.

Where the op backend offers it (`ops.CpuOps.fused_step`, the C kernels on an x86 CPU), the whole step
runs instead as one C call, `cpu_kernels.FusedStep`: the same math, op for op, without returning to
Python between ops, and batch-invariant (a row's logits do not depend on the other rows). The op-by-op
path below stays as the reference and the fallback (`Engine(fused=False)` forces it). On CUDA with
the `triton` backend, decode-only steps replay instead from CUDA graphs, one per batch-size bucket
(`cuda_graphs.py`): the same ops, launched by one call.

Weights are held as plain tensors under fused names: wqkv = [wq; wk; wv] (one matmul instead of three)
and w13 = [w1; w3] (gate and up). Fusing changes nothing numerically per output element.

`generate_naive` is the reference the engine is tested against: it reruns the Volume 2 `Transformer`
on the whole sequence for every new token.

Shape legend: N tokens in the step, B sequences, T chunk length, D model dim, H query heads,
Hkv KV heads, hd head dim, F FFN hidden width, V vocabulary.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from shared.config import ModelConfig
from vol2_torch.model import precompute_rope
from vol3_inference.cuda_graphs import DecodeGraphs
from vol3_inference.kv_cache import PagedKVCache
from vol3_inference.ops import get_ops
from vol3_inference.quant import Int8Weight, quantize_int8
from vol3_inference.sampling import SamplingParams, make_generator, sample_token

Weight = torch.Tensor | Int8Weight
DECODE_GROUPS = 3  # most batched decode-attention calls per layer (see Engine._step)
DECODE_GROUP_MIN = 8  # fewest sequences worth a call of their own


def gemv_layout(w: torch.Tensor) -> torch.Tensor:
    """A float weight (out, in) as the decode matmul reads it fastest on this CPU: for float32, the
    same values stored column-major (`w.t()` is contiguous), else unchanged (row-major).

    `F.linear(x, w)` computes x @ w.t(); with w.t() contiguous, MKL's sgemm streams the (in, out)
    matrix row by row. Measured by `python -m bench.probes layout` (docs/vol3-notes.md, "Weight layout"):
    faster for fp32 at every batch size timed, most at one row (about 1.4x for the large preset's matrices
    coming from DRAM); for bfloat16 the same layout was about 7x slower, so it stays row-major.
    The shape, and every result, are unchanged; only the strides differ.
    """
    return w.t().contiguous().t() if w.dtype == torch.float32 else w.contiguous()


@dataclass
class LayerWeights:
    attention_norm: torch.Tensor  # (D,)
    wqkv: Weight  # ((H + 2 Hkv) hd, D)
    wo: Weight  # (D, H hd)
    ffn_norm: torch.Tensor  # (D,)
    w13: Weight  # (2F, D): rows [0, F) gate (w1), [F, 2F) up (w3)
    w2: Weight  # (D, F)


@dataclass
class ModelWeights:
    """The model's weights, fused and cast for inference. `output` is the LM head (V, D); with tied
    embeddings it is the same object as `tok_embeddings`."""

    config: ModelConfig
    tok_embeddings: Weight  # (V, D)
    layers: list[LayerWeights]
    norm: torch.Tensor  # (D,)
    output: Weight  # (V, D)
    dtype: torch.dtype
    quant: str | None = None
    quant_max_error: float = 0.0

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], config: ModelConfig,
                        dtype: torch.dtype = torch.float32) -> ModelWeights:
        """From Meta-named tensors (a Volume 2 `state_dict()` or checkpoint); `output.weight` may be
        absent when embeddings are tied."""
        def get(name):
            return state[name].detach().to(dtype).contiguous()

        def mat(*names):  # a linear weight (out, in), rows of several stacked, in the decode layout
            return gemv_layout(torch.cat([get(n) for n in names]))

        layers = []
        for i in range(config.n_layers):
            p = f"layers.{i}."
            layers.append(LayerWeights(
                attention_norm=get(p + "attention_norm.weight"),
                wqkv=mat(*(p + f"attention.{n}.weight" for n in ("wq", "wk", "wv"))),
                wo=mat(p + "attention.wo.weight"),
                ffn_norm=get(p + "ffn_norm.weight"),
                w13=mat(p + "feed_forward.w1.weight", p + "feed_forward.w3.weight"),
                w2=mat(p + "feed_forward.w2.weight")))
        if config.tie_embeddings:  # one matrix: the LM head's layout (the lookup reads rows of it anyway)
            emb = out = mat("tok_embeddings.weight")
        else:  # the lookup reads rows: keep them contiguous
            emb, out = get("tok_embeddings.weight"), mat("output.weight")
        return cls(config, emb, layers, get("norm.weight"), out, dtype)

    @classmethod
    def from_model(cls, model, dtype: torch.dtype | None = None) -> ModelWeights:
        """From a Volume 2 `Transformer` (weights are copied; the model is left as it is)."""
        dtype = dtype or next(model.parameters()).dtype
        return cls.from_state_dict(model.state_dict(), model.config, dtype)

    def quantize(self, lm_head: bool = True, route: str = "w8a16") -> ModelWeights:
        """A copy with every linear weight int8 (per-channel absmax, see quant.py), multiplied by
        `route` (`quant.INT8_ROUTES`); norms stay float.

        With `lm_head`, the LM head is quantized too, and with tied embeddings the embedding lookup
        reads the same int8 rows (row r of the LM head is token r's embedding, and its scale is that
        row's scale). `quant_max_error` records the largest |W - q s| over all quantized weights.
        """
        errs = []

        def q(w):
            qw, err = quantize_int8(w, route)
            errs.append(err)
            return qw

        layers = [LayerWeights(L.attention_norm, q(L.wqkv), q(L.wo), L.ffn_norm, q(L.w13), q(L.w2))
                  for L in self.layers]
        emb, out = self.tok_embeddings, self.output
        if lm_head:
            out = q(out)
            emb = out if self.config.tie_embeddings else emb
        return ModelWeights(self.config, emb, layers, self.norm, out, self.dtype,
                            quant="int8" + ("" if lm_head else "-body"), quant_max_error=max(errs))

    @property
    def device(self) -> torch.device:
        return self.norm.device

    def to(self, device: torch.device | str) -> ModelWeights:
        """The same weights on `device` (a copy unless they are there already); the engine runs where
        its weights are. Tied embeddings stay one tensor."""
        device = torch.device(device)
        here = self.device
        if device.type == here.type and device.index in (None, here.index):  # "cuda" is "cuda:0" here
            return self
        return self._map(lambda w: (Int8Weight(w.q.to(device), w.scale.to(device), w.route)
                                    if isinstance(w, Int8Weight) else w.to(device)))

    def with_int8_route(self, route: str) -> ModelWeights:
        """These weights with every int8 matrix multiplied by `route` instead (the tensors are shared,
        not copied): what the bench uses to compare routes on one model.
        Raises ValueError for an unknown route."""
        return self._map(lambda w: Int8Weight(w.q, w.scale, route) if isinstance(w, Int8Weight) else w)

    @property
    def int8_route(self) -> str | None:
        """The route of the int8 matrices (None if there are none)."""
        return next((w.route for w in self._linears() if isinstance(w, Int8Weight)), None)

    def _map(self, fn) -> ModelWeights:
        """A ModelWeights with fn(w) for every weight, once per distinct tensor (tied ones stay tied)."""
        done: dict[int, Weight] = {}

        def mv(w):
            if id(w) not in done:
                done[id(w)] = fn(w)
            return done[id(w)]

        layers = [LayerWeights(*(mv(getattr(L, f)) for f in ("attention_norm", "wqkv", "wo", "ffn_norm", "w13", "w2")))
                  for L in self.layers]
        return ModelWeights(self.config, mv(self.tok_embeddings), layers, mv(self.norm), mv(self.output),
                            self.dtype, self.quant, self.quant_max_error)

    def _linears(self) -> list:
        """The matrices the linear layers read: every layer's wqkv, wo, w13, w2, then the LM head."""
        return [w for L in self.layers for w in (L.wqkv, L.wo, L.w13, L.w2)] + [self.output]

    def linear_bytes(self) -> int:
        """Bytes of the weights the linear layers read (per-layer matrices and the LM head)."""
        return sum(w.nbytes() if isinstance(w, Int8Weight) else w.numel() * w.element_size() for w in self._linears())

    def linear_params(self) -> int:
        """Weights in the linear layers (per-layer matrices and the LM head): a multiply-add each per row."""
        return sum(math.prod(w.shape) for w in self._linears())

    def total_bytes(self) -> int:
        def nb(w):
            return w.nbytes() if isinstance(w, Int8Weight) else w.numel() * w.element_size()
        seen, total = set(), 0
        for w in [self.tok_embeddings, self.output, self.norm] + [
                w for L in self.layers for w in (L.attention_norm, L.wqkv, L.wo, L.ffn_norm, L.w13, L.w2)]:
            if id(w) not in seen:
                seen.add(id(w))
                total += nb(w)
        return total


@dataclass
class Chunk:
    """Work for one sequence in one step: `tokens` at absolute positions start_pos, start_pos+1, ..."""

    seq: Hashable
    tokens: Sequence[int]
    start_pos: int


class Engine:
    """Runs `ModelWeights` over chunks of many sequences, with a `PagedKVCache`.

    Args:
        weights: the model; the engine, its cache and every tensor it makes live on its device.
        n_blocks / block_size: cache geometry; default room for 4 full-length sequences.
        backend: op set from `ops.BACKENDS` ("torch", "cpu", "triton"), or "auto" (`ops.get_ops`).
        fused: run each step as one call where the backend has a fused step (`ops.CpuOps.fused_step`:
            the C kernels, float32 or int8 weights); False: always op by op.
        cuda_graphs: replay decode-only steps from CUDA graphs (`cuda_graphs.DecodeGraphs`); None
            (default): wherever they can run (CUDA, the triton backend). Raises ValueError if True
            where they cannot.
    """

    def __init__(self, weights: ModelWeights, n_blocks: int | None = None, block_size: int = 16,
                 backend: str = "auto", fused: bool = True, cuda_graphs: bool | None = None):
        c = weights.config
        self.weights, self.config = weights, c
        self.device = weights.device
        self.ops = get_ops(backend, self.device)
        self.backend = self.ops.name
        n_blocks = n_blocks or 4 * -(-c.max_seq_len // block_size)
        self.cache = PagedKVCache(c, n_blocks, block_size, dtype=weights.dtype, device=self.device)
        self._layer_caches = list(zip(self.cache.k.unbind(0), self.cache.v.unbind(0), strict=True))  # views, made once
        cos, sin = precompute_rope(c.head_dim, c.max_seq_len, c.rope_theta)  # (max_seq_len, hd/2) each
        real = weights.dtype if weights.dtype in (torch.float32, torch.float64) else torch.float32
        self.rope_freqs = torch.complex(cos.to(real), sin.to(real)).to(self.device)  # cos + i sin, (max_seq_len, hd/2)
        self.fused = self.ops.fused_step(weights, self.cache.k, self.cache.v, self.rope_freqs) if fused else None
        if cuda_graphs is None:
            cuda_graphs = DecodeGraphs.problem(self) is None
        self.graphs = DecodeGraphs(self) if cuda_graphs else None
        self._ids = itertools.count()

    # --- the forward ---------------------------------------------------------------------------

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        e = self.weights.tok_embeddings
        if isinstance(e, Int8Weight):
            return e.q[tokens].to(self.weights.dtype) * e.scale[tokens, None].to(self.weights.dtype)
        return e[tokens]  # (N, D)

    def forward(self, chunks: Sequence[Chunk], all_logits: bool = False) -> list[torch.Tensor]:
        """Run one step: append every chunk's tokens to its sequence's cache and return logits.

        Each chunk's `start_pos` must equal the number of tokens its sequence has cached, and a
        sequence may appear once per step. Returns, per chunk in the given order, the logits of its
        last token (V,) or, with `all_logits`, of all its tokens (T, V), in the weights' dtype.
        Raises:
            OutOfBlocks: the cache cannot hold the new tokens (nothing is changed).
            ValueError: a start_pos that does not match the cache, a repeated sequence, an empty
                chunk, positions past max_seq_len, or token ids outside the vocabulary.
        """
        return self._step(chunks, True) if all_logits else list(self._step(chunks, False).unbind(0))

    def forward_last(self, chunks: Sequence[Chunk]) -> torch.Tensor:
        """`forward` as one matrix: the logits of each chunk's last token (len(chunks), V), row i for
        chunks[i]. What the scheduler takes, once per step: no tensor per row. Raises as `forward`."""
        return self._step(chunks, False)

    @torch.inference_mode()
    def _step(self, chunks: Sequence[Chunk], all_logits: bool) -> torch.Tensor | list[torch.Tensor]:
        """Check the chunks, then run the step fused (one C call) where the engine has a fused step,
        else op by op (the reference path, any backend and device). Both append to the cache through
        `BlockManager.append_many`, which raises OutOfBlocks changing nothing."""
        lists = self._check(chunks)
        if self.fused is not None and chunks:
            return self._step_fused(chunks, all_logits, *lists)
        if self.graphs is not None and chunks and self.graphs.takes(len(chunks)) and all(map(self._is_decode, chunks)):
            return self._step_graph(chunks, all_logits, *lists)
        return self._step_ops(chunks, all_logits)

    def _check(self, chunks: Sequence[Chunk]) -> tuple[list, list[int], list[int], list[int]]:
        """(sequences, sizes, start positions, end positions) of the chunks, checked a list at a time
        (this runs for every row of every step); only if something is wrong, chunk by chunk to say
        which and what (`_refuse`)."""
        c, mgr = self.config, self.cache.manager
        seqs = [ch.seq for ch in chunks]
        sizes = [len(ch.tokens) for ch in chunks]
        starts = [ch.start_pos for ch in chunks]
        ends = [a + n for a, n in zip(starts, sizes, strict=True)]
        if (len(set(seqs)) != len(seqs) or 0 in sizes or starts != [mgr.lengths.get(s, 0) for s in seqs]
                or (chunks and (max(ends) > c.max_seq_len
                                or min(map(min, (ch.tokens for ch in chunks))) < 0
                                or max(map(max, (ch.tokens for ch in chunks))) >= c.vocab_size))):
            self._refuse(chunks)
        return seqs, sizes, starts, ends

    def _step_fused(self, chunks: Sequence[Chunk], all_logits: bool, seqs: list, sizes: list[int],
                    starts: list[int], ends: list[int]) -> torch.Tensor | list[torch.Tensor]:
        """The whole step in one C call (cpu_kernels.FusedStep), rows in the caller's chunk order (the
        C step reads each row's own blocks, whatever the order); the lists are `_check`'s."""
        mgr = self.cache.manager
        bounds = list(itertools.accumulate(sizes, initial=0))
        tokens = list(itertools.chain.from_iterable(ch.tokens for ch in chunks))
        positions = list(itertools.chain.from_iterable(map(range, starts, ends)))
        slots = mgr.append_many(seqs, sizes)
        row_seq = list(itertools.chain.from_iterable(itertools.repeat(j, n) for j, n in enumerate(sizes)))
        # int64 index tensors through NumPy, which converts Python lists faster than torch.tensor does
        tok, pos, slot, seq = torch.from_numpy(np.array([tokens, positions, slots, row_seq], dtype=np.int64)).unbind(0)
        N = len(tokens)
        out_rows = np.arange(N, dtype=np.int64) if all_logits else np.array(bounds[1:], dtype=np.int64) - 1
        logits = self.fused(tok, pos, slot, seq, self._tables(chunks), torch.from_numpy(out_rows),
                            checked=True)  # the engine's own int64 tensors: the kernel checks the ranges
        return [logits[a:b] for a, b in itertools.pairwise(bounds)] if all_logits else logits

    def _step_graph(self, chunks: Sequence[Chunk], all_logits: bool, seqs: list, sizes: list[int],
                    starts: list[int], ends: list[int]) -> torch.Tensor | list[torch.Tensor]:
        """A decode-only step replayed from a CUDA graph (`cuda_graphs.DecodeGraphs`), rows in the
        caller's chunk order (each row reads its own blocks); the lists are `_check`'s."""
        mgr = self.cache.manager
        slots = mgr.append_many(seqs, sizes)
        logits = self.graphs.run([ch.tokens[0] for ch in chunks], starts, slots, [mgr.tables[s] for s in seqs])
        logits = logits.clone()  # (B, V): the graph's buffer is overwritten by the next step
        return list(logits.split(1)) if all_logits else logits

    def _step_ops(self, chunks: Sequence[Chunk], all_logits: bool) -> torch.Tensor | list[torch.Tensor]:
        """The step op by op through `self.ops`: decode chunks first, shortest context first
        (contiguous rows for batched attention), then prefill chunks."""
        ops, mgr, dev = self.ops, self.cache.manager, self.device
        order = sorted(range(len(chunks)), key=lambda i: (not self._is_decode(chunks[i]), chunks[i].start_pos))
        chunks = [chunks[i] for i in order]
        n_dec = sum(self._is_decode(ch) for ch in chunks)
        bounds = list(itertools.accumulate((len(ch.tokens) for ch in chunks), initial=0))
        last = np.empty(len(chunks), dtype=np.int64)  # the caller's chunk i ends at row last[i]
        last[order] = bounds[1:]
        last -= 1
        tokens = list(itertools.chain.from_iterable(ch.tokens for ch in chunks))
        positions = list(itertools.chain.from_iterable(range(ch.start_pos, ch.start_pos + len(ch.tokens)) for ch in chunks))
        slots = mgr.append_many([ch.seq for ch in chunks], [len(ch.tokens) for ch in chunks])
        tok, pos, slot = torch.tensor([tokens, positions, slots], dtype=torch.long, device=dev)  # one upload
        # The reference's batched decode attention pads every sequence to the longest one in its call.
        # Mixing short and long contexts (what continuous batching does) would waste up to half of that
        # work, so the decode rows, sorted by length, go in up to DECODE_GROUPS calls of similar
        # lengths. A backend that reads each sequence's own blocks in place (`pads_decode = False`,
        # the C kernel) takes them all in one call.
        dec_groups = []  # (first row, end row, block tables (b, width), context lengths (b,))
        n_groups = min(DECODE_GROUPS if ops.pads_decode else 1, -(-n_dec // DECODE_GROUP_MIN))
        for g in range(n_groups):
            r0, r1 = g * n_dec // n_groups, (g + 1) * n_dec // n_groups
            dec_groups.append((r0, r1, self._tables(chunks[r0:r1]),
                               torch.tensor([ch.start_pos + 1 for ch in chunks[r0:r1]], dtype=torch.long, device=dev)))
        prefills, row = [], n_dec  # (first row, T, start_pos, block table)
        for ch in chunks[n_dec:]:
            prefills.append((row, len(ch.tokens), ch.start_pos, self.cache.block_table(ch.seq)))
            row += len(ch.tokens)

        last_rows = None if all_logits else torch.from_numpy(last).to(dev)  # uploaded before the layers keep a GPU busy
        def attend(q, k, v, kc, vc):  # (N, H, hd) each layer: decode groups and prefill chunks
            if not prefills and n_groups == 1:
                return ops.decode_attention(q, kc, vc, dec_groups[0][2], dec_groups[0][3])
            attn = torch.empty_like(q)
            for r0, r1, tables, lens in dec_groups:
                attn[r0:r1] = ops.decode_attention(q[r0:r1], kc, vc, tables, lens)
            for r, T, start, table in prefills:
                attn[r:r + T] = ops.prefill_attention(q[r:r + T], kc, vc, table, start, k[r:r + T], v[r:r + T])
            return attn

        h = self._layers(ops, self._embed(tok), pos, slot, attend)  # (N, D), final-normed

        if all_logits:
            logits = ops.linear(h, self.weights.output)  # (N, V)
            return self._unsort([logits[a:b] for a, b in itertools.pairwise(bounds)], order)
        return ops.linear(h[last_rows], self.weights.output)  # (B, V), in the caller's chunk order

    def _layers(self, ops, x: torch.Tensor, pos: torch.Tensor, slot: torch.Tensor, attend) -> torch.Tensor:
        """Every layer over the step's rows x (N, D) at positions pos and cache slots slot (N,),
        through `ops`; `attend(q, k, v, k_cache, v_cache)` -> (N, H, hd) is the step's attention
        (the caller knows which rows decode and which prefill). Returns the final-normed (N, D).
        The one layer loop of the op-by-op step and of the CUDA-graph step (`cuda_graphs`)."""
        c, layers = self.config, self.weights.layers
        H, Hkv, hd = c.n_heads, c.n_kv_heads, c.head_dim
        # each residual add and the norm after it are one op (a backend may fuse them): the FFN's
        # add goes with the next layer's attention norm, the last layer's with the final norm
        norms = [L.attention_norm for L in layers[1:]] + [self.weights.norm]
        h = ops.rmsnorm(x, layers[0].attention_norm if layers else self.weights.norm, c.norm_eps)
        for li, L in enumerate(layers):
            kc, vc = self._layer_caches[li]  # (NB, bs, Hkv, hd) each
            qkv = ops.linear(h, L.wqkv)  # (N, (H + 2 Hkv) hd)
            q, k, v = ops.rope_qkv_cache(qkv, self.rope_freqs, pos, slot, kc, vc, H, Hkv)  # k, v now cached
            attn = attend(q, k, v, kc, vc)  # (N, H, hd)
            x, h = ops.add_rmsnorm(x, ops.linear(attn.reshape(-1, H * hd), L.wo), L.ffn_norm, c.norm_eps)  # (N, D)
            # (N, 2F) -> (N, F) -> (N, D); h: the next layer's attention norm, or the final norm
            x, h = ops.add_rmsnorm(x, ops.linear(ops.swiglu(ops.linear(h, L.w13)), L.w2), norms[li], c.norm_eps)
        return h

    def _refuse(self, chunks: Sequence[Chunk]) -> None:
        """Raise ValueError for the first chunk that `_step` cannot run, saying why."""
        c, seen = self.config, set()
        for ch in chunks:
            if ch.seq in seen:
                raise ValueError("a sequence appears twice in one step")
            seen.add(ch.seq)
            if len(ch.tokens) == 0:
                raise ValueError(f"sequence {ch.seq!r}: empty chunk")
            if self.cache.length(ch.seq) != ch.start_pos:
                raise ValueError(f"sequence {ch.seq!r}: start_pos {ch.start_pos} but "
                                 f"{self.cache.length(ch.seq)} tokens are cached")
            if ch.start_pos + len(ch.tokens) > c.max_seq_len:
                raise ValueError(f"sequence {ch.seq!r}: {ch.start_pos + len(ch.tokens)} tokens exceed "
                                 f"max_seq_len={c.max_seq_len}")
            if min(ch.tokens) < 0 or max(ch.tokens) >= c.vocab_size:  # on a GPU a bad id is a device assert
                raise ValueError(f"sequence {ch.seq!r}: token ids must be in [0, {c.vocab_size})")
        raise AssertionError("_refuse found nothing wrong")

    def _tables(self, chunks: Sequence[Chunk]) -> torch.Tensor:
        """The chunks' sequences' block tables (B, width) int64, padded with block 0, on the engine's device."""
        tables = [self.cache.manager.tables[ch.seq] for ch in chunks]
        width = max(map(len, tables))
        return torch.from_numpy(np.array([t + [0] * (width - len(t)) for t in tables], dtype=np.int64)).to(self.device)

    @staticmethod
    def _unsort(outs: list[torch.Tensor], order: list[int]) -> list[torch.Tensor]:
        """Results in the caller's chunk order (`_step` ran them in `order`)."""
        result: list[torch.Tensor] = [None] * len(order)  # type: ignore[list-item]
        for j, i in enumerate(order):
            result[i] = outs[j]
        return result

    @staticmethod
    def _is_decode(ch: Chunk) -> bool:
        return len(ch.tokens) == 1 and ch.start_pos > 0

    def release(self, seq: Hashable) -> None:
        """Free a sequence's cache blocks (it finished, or is preempted)."""
        self.cache.manager.release(seq)

    # --- one request at a time -----------------------------------------------------------------

    def prefill(self, seq: Hashable, prompt: Sequence[int], chunk_size: int | None = None,
                all_logits: bool = False) -> torch.Tensor:
        """Prefill `prompt` for a new sequence, in chunks of `chunk_size` tokens (default: at once).

        Returns the last token's logits (V,), or with `all_logits` every position's (T, V).
        """
        chunk_size = chunk_size or len(prompt)
        outs = []
        for s in range(0, len(prompt), chunk_size):
            outs.append(self.forward([Chunk(seq, prompt[s:s + chunk_size], s)], all_logits)[0])
        return torch.cat(outs) if all_logits else outs[-1]

    def generate(self, prompt: Sequence[int], params: SamplingParams | None = None,
                 chunk_size: int | None = None, eos_id: int | None = None) -> list[int]:
        """Prefill then decode one request; returns the new token ids (stop token included).

        Stops after `params.max_tokens`, at a stop token (or `eos_id` unless ignore_eos) or when the
        context is full. Stop strings need a tokenizer: use `scheduler.LLM`.
        """
        params = params or SamplingParams()
        if not prompt:
            raise ValueError("prompt is empty")
        if len(prompt) >= self.config.max_seq_len:
            raise ValueError(f"prompt of {len(prompt)} tokens leaves no room in max_seq_len={self.config.max_seq_len}")
        seq = ("generate", next(self._ids))
        gen = make_generator(params.seed)
        stops = set(params.stop_token_ids) | ({eos_id} if eos_id is not None and not params.ignore_eos else set())
        seen = list(prompt)
        out: list[int] = []
        try:
            logits = self.prefill(seq, list(prompt), chunk_size)
            while True:
                tok = sample_token(logits, params, gen, torch.tensor(seen) if params.repetition_penalty != 1 else None)
                out.append(tok)
                seen.append(tok)
                if tok in stops or len(out) >= params.max_tokens or len(seen) >= self.config.max_seq_len:
                    return out
                logits = self.forward([Chunk(seq, [tok], len(seen) - 1)])[0]
        finally:
            self.release(seq)


def tune_allocator(threshold: int = 32 * 2**20) -> bool:
    """Make glibc keep freed buffers of up to `threshold` bytes (max 32 MiB) for reuse.

    A decode step allocates megabytes of temporaries per layer (the gathered K/V blocks, attention
    scores). By default glibc serves such sizes with fresh mmap()s and unmaps them on free, so every
    step pays page faults to zero-fill new pages; under memory pressure that cost rivaled the matmuls
    (measured: continuous batching 1.6x faster with this on, see the chapter). Raising the mmap and
    trim thresholds keeps the pages in the heap. Process-wide, so it is called by the command-line
    entry points, not on import. Returns False where it does not apply (not glibc).
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 4 * threshold))


@torch.inference_mode()
def generate_naive(model, prompt: Sequence[int], max_new_tokens: int,
                   params: SamplingParams | None = None, eos_id: int | None = None) -> list[int]:
    """The reference: rerun the Volume 2 `Transformer` over the whole sequence for every new token.

    O(S^2) work per sequence instead of the cache's O(S); kept as the baseline every engine variant is
    tested against. Same sampling and stopping rules as `Engine.generate`.
    """
    params = params or SamplingParams(max_tokens=max_new_tokens)
    gen = make_generator(params.seed)
    stops = set(params.stop_token_ids) | ({eos_id} if eos_id is not None and not params.ignore_eos else set())
    seq = list(prompt)
    out: list[int] = []
    while len(out) < max_new_tokens:
        logits = model(torch.tensor([seq], device=next(model.parameters()).device))[0, -1]  # (V,)
        tok = sample_token(logits, params, gen, torch.tensor(seq) if params.repetition_penalty != 1 else None)
        out.append(tok)
        seq.append(tok)
        if tok in stops or len(seq) >= model.config.max_seq_len:
            break
    return out
