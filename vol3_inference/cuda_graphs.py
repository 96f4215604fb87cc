"""The engine's decode step as CUDA graphs, one per batch-size bucket.

Why. A decode step of a small model is some 10 kernel launches per layer on a few hundred numbers
each; an H100 runs each in microseconds, so the step is bound by the CPU launching them (Python,
PyTorch dispatch, Triton's launcher), not by the GPU. A CUDA graph records the step's launches once
and replays them with one call (NVIDIA, "CUDA Graphs", CUDA C Programming Guide section 3.2.8.7;
`torch.cuda.CUDAGraph`). nano-vllm and gpt-fast capture the decode step this way.

What a graph needs, and how the step gives it. A replay reruns the recorded kernels on the recorded
addresses with the recorded grid sizes, so every input lives in a static buffer that each step
overwrites in place, and the shapes are fixed per graph:

    the batch: rounded up to a bucket (`graph_buckets`: 1, 2, 4, 8, then multiples of 16, as
        nano-vllm). Padding rows decode token 0 at position 0 with slot -1, which the RoPE kernel
        does not store (`triton_kernels/rope_cache.py`), a context of 1 and block table row 0:
        they read the cache, never write it, and their logits are dropped;
    the block tables: (bucket, max_blocks) with max_blocks = ceil(max_seq_len / block size), padded
        with block 0 (never read past a context), so the attention kernel's grid is fixed too.

Every row of the bucket is rewritten every step, so a row that was live in an earlier, larger step
cannot write through a stale slot. Graphs are captured on first use of their bucket, sharing one
memory pool (they never run at the same time); if a capture fails, a warning says why and steps run
the same static-buffer code eagerly. Only decode-only steps replay; a step with a prefill chunk, or
more rows than the largest bucket, runs op by op as before.

`DecodeGraphs(engine, capture=False)` runs the same static-buffer step eagerly: how the CPU tests
check the bucketing, padding and buffer reuse (in Triton's interpreter), and the capture itself is
checked on CUDA.

Shape legend: n live rows, b bucket (b >= n), W max_blocks, V vocabulary.
"""

from __future__ import annotations

import numpy as np
import torch

from vol3_inference.cpu_kernels import warn_once


def graph_buckets(max_batch: int) -> list[int]:
    """Batch sizes with a graph: 1, 2, 4, 8, then every multiple of 16 up to max_batch (and
    max_batch itself). Raises ValueError for max_batch < 1."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch, 16))
    return sizes + [max_batch]


def _out_features(weight) -> int:
    """Rows of a float (out, in) weight or of an `Int8Weight`'s q."""
    return (weight.q if hasattr(weight, "q") else weight).shape[0]


def bucket_for(n: int, buckets: list[int]) -> int | None:
    """The smallest bucket that holds n rows, or None if none does."""
    return next((b for b in buckets if b >= n), None)


class DecodeGraphs:
    """Decode steps of `engine` through static buffers, replayed as CUDA graphs (`capture=True`,
    CUDA only) or run eagerly on the same buffers (`capture=False`, any device; for tests).

    Args:
        engine: an `Engine` whose backend reads each sequence's blocks in place (`pads_decode` False).
        max_batch: the largest batch that replays (default 64); larger steps run op by op.
        capture: record CUDA graphs (the engine's device must be CUDA).
    Raises ValueError saying why the engine cannot (see `problem`).
    """

    def __init__(self, engine, max_batch: int = 64, capture: bool = True):
        why = self.problem(engine, capture)
        if why is not None:
            raise ValueError(f"DecodeGraphs: {why}")
        self.engine, self.capture = engine, capture
        self.buckets = graph_buckets(max_batch)
        self.max_batch = max_batch
        self.max_blocks = -(-engine.config.max_seq_len // engine.cache.block_size)
        dev = engine.device
        # one static buffer each; a bucket's graph reads its first b rows
        self.ints = torch.zeros(4, max_batch, dtype=torch.long, device=dev)  # rows: token, position, slot, length
        self.tables = torch.zeros(max_batch, self.max_blocks, dtype=torch.long, device=dev)  # (B, W)
        self._host = np.zeros((4 + self.max_blocks, max_batch), dtype=np.int64)  # staging, one upload
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}  # bucket -> its logits buffer (b, V)
        self._pool = None
        self.failed: str | None = None  # why a capture failed; then every step runs eagerly

    @staticmethod
    def problem(engine, capture: bool = True) -> str | None:
        """Why `engine`'s decode step cannot run from static buffers, or None. It needs the triton
        backend's kernels: RoPE that skips slot -1 (padding rows), and decode attention that reads
        each row's blocks in place (a padded batch would be padded again). capture=True also needs
        CUDA. Then every op of the step must take the engine's tensors: each kernel's own check
        (`*_problem` in `triton_kernels/`) is asked about tensors of the step's shapes, dtypes and
        layouts (the decode kernel, for one, refuses a block size that is not a power of two), since
        the step runs its ops strict (`TritonOps.strict_ops`): a reference fallback raises."""
        if engine.backend != "triton" or engine.ops.pads_decode:
            return f"backend {engine.backend!r} lacks the triton RoPE and in-place decode attention kernels"
        if capture and engine.device.type != "cuda":
            return f"CUDA graphs need a CUDA device, not {engine.device}"
        return DecodeGraphs._op_problem(engine)

    @staticmethod
    def _op_problem(engine) -> str | None:
        """The first op of the decode step whose kernel refuses one-row stand-ins for its inputs."""
        from vol3_inference.quant import Int8Weight
        from vol3_inference.triton_kernels import decode_attention, int8_linear, rmsnorm, rope_cache, swiglu

        c, w, dev = engine.config, engine.weights, engine.device
        H, Hkv, hd = c.n_heads, c.n_kv_heads, c.head_dim
        dt = engine.cache.k.dtype
        kc, vc = engine._layer_caches[0]
        x = torch.zeros(1, c.dim, dtype=dt, device=dev)
        ints = torch.zeros(4, 1, dtype=torch.long, device=dev)  # token, position, slot, length rows
        tables = torch.zeros(1, -(-c.max_seq_len // kc.shape[1]), dtype=torch.long, device=dev)
        qkv = torch.zeros(1, (H + 2 * Hkv) * hd, dtype=dt, device=dev)
        q = qkv[:, :H * hd].view(1, H, hd)
        checks = [("rmsnorm", rmsnorm.rmsnorm_problem(x, norm, x))
                  for L in w.layers for norm in (L.attention_norm, L.ffn_norm)]
        checks += [("rmsnorm", rmsnorm.rmsnorm_problem(x, w.norm, x)),
                   ("rope_qkv_cache", rope_cache.rope_problem(qkv, engine.rope_freqs, ints[1], ints[2], kc, vc, H, Hkv)),
                   ("decode_attention", decode_attention.decode_problem(q, kc, vc, tables, ints[3]))]
        for L in w.layers:
            checks.append(("swiglu", swiglu.swiglu_problem(torch.zeros(1, _out_features(L.w13), dtype=dt, device=dev))))
        for W in [W for L in w.layers for W in (L.wqkv, L.wo, L.w13, L.w2)] + [w.output]:
            if isinstance(W, Int8Weight):
                xin = torch.zeros(1, W.q.shape[1], dtype=dt, device=dev)
                checks.append(("int8 linear", int8_linear.int8_linear_problem(xin, W)))
        for op, why in checks:
            if why is not None:
                return f"the {op} kernel refuses this engine's tensors: {why}"
        return None

    def takes(self, n_rows: int) -> bool:
        """Whether a decode step of n_rows sequences replays (block tables always fit: max_blocks
        covers max_seq_len)."""
        return n_rows <= self.max_batch

    def _fill(self, b: int, tokens: list[int], positions: list[int], slots: list[int],
              tables: list[list[int]]) -> None:
        """Write the step's inputs into the first b rows of the static buffers; rows past the live
        ones become padding (token 0, position 0, slot -1, length 1, table of block 0)."""
        n = len(tokens)
        h = self._host[:, :b]  # (4 + W, b) staging: ints then the tables, transposed
        h[:] = 0
        h[0, :n], h[1, :n], h[2, :n] = tokens, positions, slots
        h[2, n:] = -1
        h[3, :n] = [p + 1 for p in positions]
        h[3, n:] = 1
        for i, t in enumerate(tables):
            h[4:4 + len(t), i] = t
        staged = torch.from_numpy(h).to(self.ints.device)  # (4 + W, b), one upload
        self.ints[:, :b].copy_(staged[:4])
        self.tables[:b].copy_(staged[4:].t())

    def _body(self, b: int, strict: bool = True) -> torch.Tensor:
        """The decode step on the first b rows of the static buffers: the engine's op-by-op path for
        decode-only rows, the same ops in the same order. `strict` (captured, and in eager tests):
        an op whose kernel refuses its inputs raises `triton_ops.ReferenceFallback` instead of
        running the reference, which may sync with the host. Returns the logits (b, V)."""
        e = self.engine
        ops = e.ops.strict_ops() if strict else e.ops  # strict: a reference fallback raises
        tok, pos, slot, lens = self.ints[:, :b]  # (b,) each, views of the static buffer
        tables = self.tables[:b]  # (b, W)
        h = e._layers(ops, e._embed(tok), pos, slot,
                      lambda q, k, v, kc, vc: ops.decode_attention(q, kc, vc, tables, lens))  # (b, D)
        return ops.linear(h, e.weights.output)  # (b, V)

    def _capture(self, b: int) -> None:
        """Record bucket b's graph: an eager run first, on a side stream as PyTorch's CUDA-graph
        notes advise (Triton compiles its kernels there, cuBLAS makes its workspace; padding rows
        only, so the cache is not written), then the capture, into the shared pool."""
        self._fill(b, [], [], [], [])
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._body(b)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self.outputs[b] = self._body(b)
        self._pool = graph.pool()
        self.graphs[b] = graph

    def run(self, tokens: list[int], positions: list[int], slots: list[int],
            tables: list[list[int]]) -> torch.Tensor:
        """Logits (n, V) of one decode step: row i decodes tokens[i] at positions[i] (its context is
        positions[i] + 1 long, its new k and v go to slots[i]) with block table tables[i]. The caller
        (the engine) has checked the rows and appended them to the cache; `takes` must hold. The
        result is a view of a buffer the next step overwrites."""
        n = len(tokens)
        b = bucket_for(n, self.buckets)
        self._fill(b, tokens, positions, slots, tables)
        if not self.capture:
            return self._body(b)[:n]
        if self.failed is not None:
            return self._body(b, strict=False)[:n]
        if b not in self.graphs:
            try:
                self._capture(b)
            except RuntimeError as e:  # a capture that fails costs speed, not the step's result
                self.failed = " ".join(str(e).split())
                warn_once(f"CUDA graph capture failed ({self.failed}); decode steps run eagerly")
                self._fill(b, tokens, positions, slots, tables)
                return self._body(b, strict=False)[:n]  # eager: a reference op may sync
            self._fill(b, tokens, positions, slots, tables)  # the capture ran on padding
        self.graphs[b].replay()
        return self.outputs[b][:n]
