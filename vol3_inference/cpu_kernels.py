"""Compiled CPU kernels: C with AVX2 intrinsics, built by the system's C compiler at first use and
called through ctypes.

Two small libraries in `kernels/`:
  * `w8a16_avx2.c`, the int8-weight matmul. PyTorch has none that is fast on an AVX2-only CPU with
    float32 activations (see `quant.py` and chapter 3, "int8 weights").
  * `ops_avx2.c`, RMSNorm, RoPE with the cache write, and paged decode attention as single calls:
    the "cpu" backend of `ops.py`, which cuts the per-op dispatch cost that dominates a small model's
    decode step; and the fused step,
    `forward_step_f32` (`FusedStep` here), a whole engine step in one call, with a matmul on packed
    weights. It is linked with `w8a16_avx2.c` (`LINKED`) for its int8 matrices. And `argmax_rows`,
    the greedy tokens of a step's logits rows (`sampling.greedy_tokens`, whatever the backend).

This module compiles each once per source version with `cc -O3 -mavx2 -mfma` into a cache folder
(`$VOL3_KERNEL_CACHE`, default `~/.cache/llama-from-scratch/kernels`), loads it, and wraps it for
tensors. Where one cannot be built or run (no C compiler, a CPU without AVX2, not x86),
`unavailable(name)` says why and its callers take their PyTorch route; nothing else changes.

Matmuls of at least PARALLEL_MIN_WEIGHTS weights are split over `torch.get_num_threads()` OpenMP
threads by output column. They are torch's own threads: built with gcc, the library asks for
`libgomp.so.1`, and the dynamic linker hands it the copy torch has already loaded, so one thread pool
serves both (a test checks it on Linux; a clang build would bring its own libomp).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

KERNELS = Path(__file__).parent / "kernels"
_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
SIGNATURES = {  # library -> {function: argument types}
    "w8a16_avx2": {"w8a16_linear_f32": [_P] * 6 + [_I] * 4},
    "ops_avx2": {"rmsnorm_f32": [_P] * 3 + [_I] * 2 + [_F],
                 "rope_qkv_cache_f32": [_P] * 7 + [_I] * 6,
                 "paged_decode_attention_f32": [_P] * 7 + [_I] * 8 + [_F],
                 "matmul_packed_f32": [_P] * 3 + [_I] * 5,
                 "forward_step_f32": [_P] * 8 + [_I] * 5,
                 "argmax_rows_f32": [_P, _I, _I, _I, _P],
                 "attend_scratch_floats": [_I] * 5},
}
LINKED = {"ops_avx2": ("w8a16_avx2.c",)}  # other sources built into a library (the fused step's int8 matmul)
RESTYPES = {"paged_decode_attention_f32": ctypes.c_int64,  # error codes, and a size; the others return nothing
            "rope_qkv_cache_f32": ctypes.c_int64, "forward_step_f32": ctypes.c_int64,
            "attend_scratch_floats": ctypes.c_int64}
CFLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC")
# Split a matmul over torch's threads from this many weights: below it, waking a second thread costs
# more than it saves (measured on the large preset's and the trained model's matrices at batch 1).
PARALLEL_MIN_WEIGHTS = 1 << 18


class KernelUnavailable(RuntimeError):
    """The compiled kernel cannot be built or run here (the message says why)."""


def cache_dir() -> Path:
    return Path(os.environ.get("VOL3_KERNEL_CACHE") or Path.home() / ".cache" / "llama-from-scratch" / "kernels")


def _build(source: Path, out_dir: Path, extra: tuple[Path, ...] = ()) -> Path:
    """Compile `source` (and the `extra` sources linked with it) to a shared library in out_dir
    (atomically; reused while the sources and flags are unchanged). Raises KernelUnavailable if there
    is no compiler or it fails."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise KernelUnavailable("no C compiler found (set CC, or install gcc)")
    text = b"".join(p.read_bytes() for p in (source, *extra))
    key = hashlib.sha256(text + " ".join((cc, *CFLAGS)).encode()).hexdigest()[:16]
    lib = out_dir / f"{source.stem}-{key}.so"
    if lib.is_file():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so.tmp", dir=out_dir)
    os.close(fd)
    try:
        r = subprocess.run([cc, *CFLAGS, "-o", tmp, str(source), *map(str, extra), "-lm"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise KernelUnavailable(f"{cc} failed to compile {source.name}: {last}")
        os.replace(tmp, lib)  # atomic: a concurrent build or reader never sees half a library
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


@functools.cache
def _load(name: str) -> ctypes.CDLL | str:
    """The library `name` (a key of SIGNATURES), loaded, or the reason it is unavailable (cached)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the kernels are x86 AVX2 code and this CPU is {platform.machine()}"
    cap = torch.backends.cpu.get_cpu_capability()
    if not cap.startswith("AVX"):  # "AVX2", "AVX512"; "DEFAULT" means no AVX2
        return f"this CPU has no AVX2 (torch reports CPU capability {cap})"
    try:
        lib = ctypes.CDLL(str(_build(KERNELS / f"{name}.c", cache_dir(), tuple(KERNELS / f for f in LINKED.get(name, ())))))
    except (KernelUnavailable, OSError) as e:
        return str(e)
    for fn, argtypes in SIGNATURES[name].items():
        getattr(lib, fn).argtypes = argtypes
        getattr(lib, fn).restype = RESTYPES.get(fn)
    return lib


def unavailable(name: str) -> str | None:
    """None if library `name` ("w8a16_avx2", "ops_avx2") is usable here, else why not (it is built
    on the first call)."""
    lib = _load(name)
    return lib if isinstance(lib, str) else None


def _lib(name: str) -> ctypes.CDLL:
    lib = _load(name)
    if isinstance(lib, str):
        raise KernelUnavailable(lib)
    return lib


@functools.cache
def warn_once(message: str) -> None:
    """A RuntimeWarning, once per distinct message (a missing kernel is said once, not per call)."""
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def _threads_for(n_weights: int) -> int:
    return torch.get_num_threads() if n_weights >= PARALLEL_MIN_WEIGHTS else 1


def w8a16_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """y = x @ (q * scale[:, None])^T with x rounded per row to int16 (see the kernel's header).

    x: (M, K) float32 on the CPU; q: (N, K) int8; scale: (N,) float32; K % 16 == 0.
    Returns y (M, N) float32. Raises KernelUnavailable (with the reason) where the kernel cannot
    run, ValueError for tensors it does not take.
    """
    lib = _lib("w8a16_avx2")
    M, K = x.shape
    N = q.shape[0]
    if (x.dtype, q.dtype, scale.dtype) != (torch.float32, torch.int8, torch.float32) or q.shape[1] != K \
            or K % 16 or not (x.is_cpu and q.is_cpu and scale.is_cpu) or scale.shape != (N,):
        raise ValueError(f"w8a16_linear takes x (M, K) float32, q (N, K) int8, scale (N,) float32 on the CPU "
                         f"with K % 16 == 0; got {tuple(x.shape)} {x.dtype}, {tuple(q.shape)} {q.dtype}, "
                         f"{tuple(scale.shape)} {scale.dtype}")
    x, q, scale = x.contiguous(), q.contiguous(), scale.contiguous()
    xq = torch.empty(M, K, dtype=torch.int16)
    sx = torch.empty(M, dtype=torch.float32)
    y = torch.empty(M, N, dtype=torch.float32)
    lib.w8a16_linear_f32(x.data_ptr(), xq.data_ptr(), sx.data_ptr(), q.data_ptr(), scale.data_ptr(),
                         y.data_ptr(), M, N, K, _threads_for(N * K))
    return y


# --- the "cpu" ops backend ---------------------------------------------------------------------------
#
# Each op has a `*_problem(...)` check, which says why the kernel cannot take some inputs (None when it
# can), and the op itself. `ops.CpuOps` asks the check to choose between the kernel and the PyTorch
# reference, then calls the op with `checked=True`, so on the hot path the inputs are checked once and
# the fallback boundary is exactly what the kernel accepts. Called directly, an op runs its check and
# raises ValueError with the reason.


def _f32_cpu(*ts: torch.Tensor) -> bool:
    """Every tensor float32, contiguous, on the CPU (a plain loop: this runs several times per layer)."""
    for t in ts:  # a negative view (torch._neg_view) would hand C its unnegated data
        if t.dtype is not torch.float32 or not t.is_cpu or not t.is_contiguous() or t.is_neg():
            return False
    return True


def _int_cpu(*ts: torch.Tensor) -> bool:
    """Every tensor an integer tensor on the CPU (index tensors; `_index` makes them int64 contiguous)."""
    for t in ts:
        if not t.is_cpu or t.is_floating_point() or t.is_complex() or t.dtype is torch.bool:
            return False
    return True


def _index(t: torch.Tensor) -> torch.Tensor:
    """An index tensor as the kernels read it: int64, contiguous (a copy only if needed)."""
    if t.dtype is torch.long and t.is_contiguous():  # the engine's own: nothing to do
        return t
    return t.to(torch.long).contiguous()


def _fail(op: str, why: str | None) -> None:
    if why is not None:
        raise ValueError(f"{op}: {why}")


def argmax_rows_problem(x: torch.Tensor) -> str | None:
    if (x.dim() != 2 or x.shape[1] < 1 or not x.is_cpu or x.dtype is not torch.float32
            or x.layout is not torch.strided):
        return f"float32 logits (R, V) on the CPU, V >= 1, expected, got {x.dtype} {tuple(x.shape)} on {x.device}"
    if x.is_neg():  # its memory holds the values unnegated
        return "a negative view (torch._neg_view) cannot be read in place"
    if x.shape[1] > 1 and x.stride(1) != 1:
        return "logits rows each contiguous (x.stride(1) == 1) expected"
    return None


def argmax_rows(x: torch.Tensor, checked: bool = False) -> list[int]:
    """torch.argmax(x, dim=-1) of logits x (R, V), float32 on the CPU, V >= 1, each row contiguous
    (rows may be any stride apart: a slice of a larger matrix), in one call (`argmax_rows_f32`): the
    first index of each row's largest value, or of its first NaN. Raises ValueError for other input
    (unless the caller `checked` it with `argmax_rows_problem`), KernelUnavailable where the kernels
    cannot run."""
    lib = _lib("ops_avx2")
    if not checked:
        _fail("argmax_rows", argmax_rows_problem(x))
    R, V = x.shape
    out = torch.empty(R, dtype=torch.long)
    lib.argmax_rows_f32(x.data_ptr(), R, V, x.stride(0), out.data_ptr())
    return out.tolist()


def rmsnorm_problem(x: torch.Tensor, weight: torch.Tensor) -> str | None:
    if x.dim() != 2 or weight.dim() != 1 or weight.shape[0] != x.shape[1]:
        return f"x (N, D) and weight (D,) expected, got {tuple(x.shape)}, {tuple(weight.shape)}"
    if x.shape[1] % 8 or not _f32_cpu(x) or weight.dtype is not torch.float32 or not weight.is_cpu:
        return "float32 on the CPU, x contiguous, D % 8 == 0 expected"
    return None


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, checked: bool = False) -> torch.Tensor:
    """x (N, D) / sqrt(mean(x^2) + eps) * weight (D,): float32 on the CPU, x contiguous, D % 8 == 0.
    Returns (N, D). Raises KernelUnavailable, or ValueError saying what it cannot take."""
    lib = _lib("ops_avx2")
    if not checked:
        _fail("rmsnorm", rmsnorm_problem(x, weight))
    weight = weight.contiguous()
    y = torch.empty_like(x)
    lib.rmsnorm_f32(x.data_ptr(), weight.data_ptr(), y.data_ptr(), x.shape[0], x.shape[1], eps)
    return y


def attention_problem(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      block_tables: torch.Tensor, context_lens: torch.Tensor) -> str | None:
    if q.dim() != 3 or k_cache.dim() != 4 or block_tables.dim() != 2 or v_cache.shape != k_cache.shape:
        return "q (B, H, hd), caches (NB, bs, Hkv, hd) and tables (B, W) expected"
    (B, H, hd), Hkv = q.shape, k_cache.shape[2]
    if hd % 8 or k_cache.shape[3] != hd or H % Hkv or block_tables.shape[0] != B or context_lens.shape != (B,):
        return "shapes that do not match (hd % 8 == 0 and H % Hkv == 0 are needed)"
    if (q.dtype is not torch.float32 or not q.is_cpu or not _f32_cpu(k_cache, v_cache)
            or not _int_cpu(block_tables, context_lens)):
        return "float32 q and contiguous caches, integer tables and lengths, all on the CPU, expected"
    return None


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor,
                           checked: bool = False) -> torch.Tensor:
    """Decode attention read in place from the paged cache (see `ops.TorchOps.decode_attention`).

    q: (B, H, hd) float32; k_cache, v_cache: (NB, bs, Hkv, hd) float32, contiguous; block_tables:
    (B, W) and context_lens (B,) integer; all on the CPU. hd % 8 == 0, H % Hkv == 0. Returns
    (B, H, hd) float32. Raises ValueError for other inputs, a length outside [1, W * bs], or a block
    id the lengths reach outside the cache (the kernel checks before it reads).
    """
    lib = _lib("ops_avx2")
    if not checked:
        _fail("paged_decode_attention", attention_problem(q, k_cache, v_cache, block_tables, context_lens))
    B, H, hd = q.shape
    NB, bs, Hkv, _ = k_cache.shape
    W = block_tables.shape[1]
    block_tables, context_lens = _index(block_tables), _index(context_lens)
    if q.stride()[1:] != (hd, 1):  # sequences may be strided (rows of a wider buffer), heads not
        q = q.contiguous()
    out = torch.empty(B, H, hd, dtype=torch.float32)
    scratch = torch.empty(lib.attend_scratch_floats(H, Hkv, hd, W, bs), dtype=torch.float32)
    err = lib.paged_decode_attention_f32(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                                         block_tables.data_ptr(), context_lens.data_ptr(), out.data_ptr(),
                                         scratch.data_ptr(), B, H, Hkv, hd, bs, W, NB, q.stride(0), hd ** -0.5)
    _fail("paged_decode_attention", {0: None, 1: "a context length is outside [1, blocks * block_size]"}.get(
        err, "a block id is outside the cache"))
    return out


def rope_problem(qkv: torch.Tensor, rope_table: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor,
                 k_cache: torch.Tensor, v_cache: torch.Tensor, n_heads: int, n_kv_heads: int) -> str | None:
    if (qkv.dim() != 2 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape or rope_table.dim() != 2
            or rope_table.dtype is not torch.complex64):
        return "qkv (N, width), caches (NB, bs, Hkv, hd) and a complex64 table (max_pos, hd/2) expected"
    N, hd = qkv.shape[0], k_cache.shape[3]
    if (n_heads < 1 or n_kv_heads < 1 or qkv.shape[1] != (n_heads + 2 * n_kv_heads) * hd
            or k_cache.shape[2] != n_kv_heads or rope_table.shape[1] * 2 != hd
            or pos.shape != (N,) or slots.shape != (N,)):
        return "shapes that do not match"
    if (not _f32_cpu(qkv, k_cache, v_cache) or not rope_table.is_cpu or not rope_table.is_contiguous()
            or not _int_cpu(pos, slots)):
        return "contiguous float32 qkv and caches, a contiguous table, integer positions and slots, all on the CPU, expected"
    return None


def rope_qkv_cache(qkv: torch.Tensor, rope_table: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, n_heads: int, n_kv_heads: int,
                   checked: bool = False):
    """Rotate q and k of the fused qkv rows by RoPE and store k, v in the cache, in one call.

    qkv: (N, (H + 2 Hkv) hd) float32, contiguous; rope_table: (max_pos, hd/2) complex64 (cos + i sin);
    pos, slots: (N,) integer; k_cache, v_cache: (NB, bs, Hkv, hd) float32, contiguous; all on the CPU.
    Returns q (N, H, hd), k, v (N, Hkv, hd): views of one new buffer, k rotated.
    Raises ValueError for other inputs, or a position or slot out of range.
    """
    lib = _lib("ops_avx2")
    if not checked:
        _fail("rope_qkv_cache", rope_problem(qkv, rope_table, pos, slots, k_cache, v_cache, n_heads, n_kv_heads))
    N = qkv.shape[0]
    H, Hkv, hd = n_heads, n_kv_heads, k_cache.shape[-1]
    table = torch.view_as_real(rope_table)  # (max_pos, hd/2, 2): cos, sin
    pos, slots = _index(pos), _index(slots)
    out = torch.empty_like(qkv)
    err = lib.rope_qkv_cache_f32(qkv.data_ptr(), out.data_ptr(), table.data_ptr(), pos.data_ptr(), slots.data_ptr(),
                                 k_cache.data_ptr(), v_cache.data_ptr(), N, H, Hkv, hd, table.shape[0],
                                 k_cache.shape[0] * k_cache.shape[1])
    _fail("rope_qkv_cache", {0: None, 1: "a position is outside the RoPE table"}.get(err, "a slot is outside the cache"))
    return out.view(N, H + 2 * Hkv, hd).split_with_sizes([H, Hkv, Hkv], 1)  # one op for three views


# --- the whole step ---------------------------------------------------------------------------------


class _StepModel(ctypes.Structure):
    """`StepModel` in kernels/ops_avx2.c (field for field)."""

    _fields_ = [*((n, _I) for n in ("n_layers", "dim", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "vocab",
                                   "block_size", "n_blocks", "max_pos")),
                ("tok_embeddings", _P), ("emb_scale", _P), ("emb_stride_tok", _I), ("emb_stride_dim", _I),
                ("layers", _P), ("norm", _P), ("output", _P), ("output_scale", _P), ("rope", _P),
                ("parallel_min", _I), ("eps", _F)]


STEP_ERRORS = {1: "a position is outside the RoPE table", 2: "a slot is outside the cache",
               3: "a position is past its block table", 4: "a block id is outside the cache",
               5: "a token id is outside the vocabulary", 6: "out of memory for the step's activations",
               7: "a row's sequence index is outside the block tables",
               8: "an output row is outside the step (or more output rows than rows)"}


def _is_int8(w) -> bool:
    # An int8 matrix is anything with an int8 `q` (N, K) and a `scale` (N,), as `quant.Int8Weight`:
    # this module is below quant.py (quant calls its w8a16 kernel) and does not import it.
    q = getattr(w, "q", None)
    return isinstance(q, torch.Tensor) and q.dtype == torch.int8 and hasattr(w, "scale")


def step_problem(weights, k_cache: torch.Tensor, v_cache: torch.Tensor, rope_table: torch.Tensor) -> str | None:
    """Why `FusedStep` cannot run these (None if it can). weights: an `engine.ModelWeights`, float32
    or with int8 matrices (`quant.Int8Weight` on the "w8a16" route, whose kernel it uses:
    in_features % 16 == 0);
    k_cache, v_cache: (n_layers, NB, bs, Hkv, hd); rope_table: (max_pos, hd/2) complex64."""
    c = weights.config
    D, H, Hkv, hd, V = c.dim, c.n_heads, c.n_kv_heads, c.head_dim, c.vocab_size
    if len(weights.layers) != c.n_layers or not weights.layers:
        return f"{len(weights.layers)} layers for a config of {c.n_layers}"
    F = weights.layers[0].w2.shape[1]  # the FFN width (the config's hidden_dim is before rounding)
    shapes = [(m, (n, k)) for L in weights.layers for m, n, k in (
        (L.wqkv, (H + 2 * Hkv) * hd, D), (L.wo, D, H * hd), (L.w13, 2 * F, D), (L.w2, D, F))]
    shapes += [(weights.output, (V, D)), (weights.tok_embeddings, (V, D))]
    for m, shape in shapes:  # the C reads every matrix at the config's sizes: each must be exactly that
        if _is_int8(m):
            if (m.q.dtype is not torch.int8 or m.scale.dtype is not torch.float32 or not m.q.is_cpu
                    or not m.scale.is_cpu or m.q.shape[1] % 16):
                return "int8 weights must be int8 (N, K) with float32 scales on the CPU, K % 16 == 0"
            if tuple(m.q.shape) != shape or tuple(m.scale.shape) != shape[:1]:
                return f"an int8 weight of shape {tuple(m.q.shape)} where the config makes it {shape}"
            if getattr(m, "route", "w8a16") != "w8a16":  # (the bench compares routes op by op)
                return f"int8 weights on route {m.route!r}: the fused step's int8 matmul is w8a16's"
        elif type(m) is not torch.Tensor or m.dtype is not torch.float32 or not m.is_cpu:
            return "the fused step takes float32 or int8 weight matrices on the CPU"
        elif tuple(m.shape) != shape:
            return f"a weight of shape {tuple(m.shape)} where the config makes it {shape}"
    norms = [weights.norm] + [n for L in weights.layers for n in (L.attention_norm, L.ffn_norm)]
    if not _f32_cpu(*norms, k_cache, v_cache) or any(tuple(n.shape) != (D,) for n in norms):
        return "float32 norms (D,) and caches on the CPU, contiguous, expected"
    if D % 8 or hd % 8 or H % Hkv:
        return "dim and head_dim must be multiples of 8, n_heads a multiple of n_kv_heads"
    if (k_cache.shape != v_cache.shape or k_cache.dim() != 5 or k_cache.shape[0] != c.n_layers
            or k_cache.shape[3:] != (Hkv, hd) or rope_table.dtype is not torch.complex64
            or not rope_table.is_contiguous() or rope_table.dim() != 2 or rope_table.shape[1] * 2 != hd):
        return "caches (n_layers, NB, bs, Hkv, hd) and a contiguous complex64 RoPE table (max_pos, hd/2) expected"
    return None


PANEL = 16  # output columns per packed panel (PANEL in kernels/ops_avx2.c)


def pack_panels(w: torch.Tensor) -> torch.Tensor:
    """A float32 weight (N, K), any strides, in the fused step's packed layout: (ceil(N/16), K, 16),
    panel p holding W[16p : 16p + 16, :]^T, the last panel zero-padded (see `matmul_packed` in
    kernels/ops_avx2.c). A copy."""
    N, K = w.shape
    P = -(-N // PANEL)
    padded = torch.zeros(P * PANEL, K, dtype=torch.float32)
    padded[:N] = w
    return padded.view(P, PANEL, K).transpose(1, 2).contiguous()


def matmul_packed(x: torch.Tensor, packed: torch.Tensor, n: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) @ W^T for W (n, K) packed by `pack_panels`; with `out` (M, n), out += that (in place)
    and out is returned. float32 contiguous CPU tensors. Raises ValueError for other inputs."""
    lib = _lib("ops_avx2")
    M, K = x.shape
    if (packed.dim() != 3 or packed.shape != (-(-n // PANEL), K, PANEL) or not _f32_cpu(x, packed)
            or (out is not None and (out.shape != (M, n) or not _f32_cpu(out)))):
        raise ValueError(f"matmul_packed: x (M, K), packed (ceil(n/16), K, 16) and out (M, n), float32 contiguous "
                         f"on the CPU, expected; got {tuple(x.shape)}, {tuple(packed.shape)}, n={n}")
    y = torch.empty(M, n, dtype=torch.float32) if out is None else out
    lib.matmul_packed_f32(x.data_ptr(), packed.data_ptr(), y.data_ptr(), M, n, K, out is not None,
                          _threads_for(n * K))
    return y


class FusedStep:
    """A whole engine step as one C call (`forward_step_f32` in kernels/ops_avx2.c): embedding, every
    layer (RMSNorm, QKV, RoPE with the cache write, paged attention, Wo, RMSNorm, SwiGLU FFN, both
    residual adds) and the LM head, for any mix of decode rows and prefill chunks.

    Built once per engine from its weights, cache and RoPE table (it keeps references to them, and
    the C side holds their addresses). It makes its own copy of every float32 weight matrix, packed
    in panels (`pack_panels`), so that the step reads each matrix in order, once, for any number of
    rows: one more copy of the float linear weights in memory, and a snapshot (the weights are not
    meant to change under an engine). int8 matrices (`quant.Int8Weight`) are
    read in place by the w8a16 kernel. Raises ValueError (from `step_problem`) for weights it
    does not take, KernelUnavailable where the kernels cannot run.
    """

    def __init__(self, weights, k_cache: torch.Tensor, v_cache: torch.Tensor, rope_table: torch.Tensor):
        self._lib = _lib("ops_avx2")
        _fail("FusedStep", step_problem(weights, k_cache, v_cache, rope_table))
        self.vocab = weights.config.vocab_size
        self.int8 = any(_is_int8(m) for m in [weights.output] + [m for L in weights.layers
                                                                  for m in (L.wqkv, L.wo, L.w13, L.w2)])
        c = weights.config
        table = torch.view_as_real(rope_table)  # (max_pos, hd/2, 2)
        keep = []

        def matrix(w) -> list[int]:  # [data, scale]: float32 packed in panels (scale NULL), or int8 (N, K) rows
            if _is_int8(w):
                q, scale = w.q.contiguous(), w.scale.contiguous()
                keep.extend((q, scale))
                return [q.data_ptr(), scale.data_ptr()]
            keep.append(pack_panels(w))
            return [keep[-1].data_ptr(), 0]

        ptrs = []
        for L, kc, vc in zip(weights.layers, k_cache.unbind(0), v_cache.unbind(0), strict=True):
            ptrs += [L.attention_norm.data_ptr(), *matrix(L.wqkv), *matrix(L.wo), L.ffn_norm.data_ptr(),
                     *matrix(L.w13), *matrix(L.w2), kc.data_ptr(), vc.data_ptr()]
        output = matrix(weights.output)
        self._layers = (ctypes.c_void_p * len(ptrs))(*ptrs)
        emb = weights.tok_embeddings  # (V, D), any strides (tied embeddings: the LM head's column-major matrix)
        emb, emb_scale = (emb.q.contiguous(), emb.scale.contiguous()) if _is_int8(emb) else (emb, None)
        keep += [emb, emb_scale]
        NB, bs = k_cache.shape[1:3]
        self._model = _StepModel(
            c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.head_dim, weights.layers[0].w2.shape[1], c.vocab_size,
            bs, NB, table.shape[0], emb.data_ptr(), 0 if emb_scale is None else emb_scale.data_ptr(),
            emb.stride(0), emb.stride(1), ctypes.cast(self._layers, _P), weights.norm.data_ptr(), *output,
            table.data_ptr(), PARALLEL_MIN_WEIGHTS, c.norm_eps)
        self._keep = (weights, k_cache, v_cache, table, keep)  # what the addresses point into
        self._model_ptr = ctypes.addressof(self._model)

    def __call__(self, tokens: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor, row_table: torch.Tensor,
                 block_tables: torch.Tensor, out_rows: torch.Tensor, checked: bool = False) -> torch.Tensor:
        """Run one step of N token rows of B sequences.

        tokens, pos, slots, row_table: (N,) integer: row n is token tokens[n] at position pos[n] of
        sequence row_table[n], cached at slot slots[n]; it attends to that sequence's positions
        0..pos[n]. block_tables: (B, W) integer, each sequence's blocks. out_rows: (R,) integer, the
        rows whose logits are returned. CPU tensors. Writes every row's k and v to the cache and
        returns the logits (R, V) float32. Raises ValueError (with nothing written) for mismatched
        shapes, or ids, positions, slots, block ids or rows out of range; MemoryError if the step's
        activations cannot be allocated. `checked`: the caller made these tensors int64, contiguous and
        of matching shapes (the engine does), so only the kernel's own range checks run.
        """
        N = tokens.shape[0] if tokens.dim() == 1 else -1
        if not checked:
            if (N < 1 or pos.shape != (N,) or slots.shape != (N,) or row_table.shape != (N,)
                    or block_tables.dim() != 2 or out_rows.dim() != 1
                    or not _int_cpu(tokens, pos, slots, row_table, block_tables, out_rows)):
                raise ValueError("FusedStep: tokens, pos, slots, row_table (N,), block_tables (B, W) and out_rows "
                                 "(R,), integer tensors on the CPU, expected")
            tokens, pos, slots, row_table = _index(tokens), _index(pos), _index(slots), _index(row_table)
            block_tables, out_rows = _index(block_tables), _index(out_rows)
        R = out_rows.shape[0]
        logits = torch.empty(R, self.vocab, dtype=torch.float32)
        err = self._lib.forward_step_f32(self._model_ptr, tokens.data_ptr(), pos.data_ptr(), slots.data_ptr(),
                                         row_table.data_ptr(), block_tables.data_ptr(), out_rows.data_ptr(),
                                         logits.data_ptr(), N, block_tables.shape[0], R, block_tables.shape[1],
                                         torch.get_num_threads())
        if err:
            raise (MemoryError if err == 6 else ValueError)(f"FusedStep: {STEP_ERRORS.get(err, f'error {err}')}")
        return logits
