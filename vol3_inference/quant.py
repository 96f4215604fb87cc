"""int8 weight-only quantization: symmetric, per output channel, absmax.

For a linear weight W (out, in), each output channel (row) r gets its own scale

    s_r = max_j |W_rj| / 127,        q_rj = round(W_rj / s_r)  in [-127, 127]  (int8),

and W is replaced by q and s (Jacob et al. 2018, "Quantization and Training of Neural Networks for
Efficient Integer-Arithmetic-Only Inference", section 2, with zero point 0; the weight-only scheme of
gpt-fast and llama2.c's `export.py`). Rounding to nearest puts every reconstructed weight s_r q_rj
within s_r / 2 of W_rj, and `quantize_int8` returns the largest error it actually made so a caller
can check that bound. Storage per weight drops from 4 bytes (fp32) to 1 byte plus one scale per row:
(in + 4) / (4 in) of the fp32 bytes, 0.2520x for in = 288 or 512.

Using the weights. y = x W^T = (x q^T) * s, because the scale is per output column of y: the matmul
runs on int8 weights and the scale multiplies its output. Two routes compute it (`INT8_ROUTES`;
`python -m bench.quant` times them against fp32 on this CPU):

    "dequant"   the reference: W' = q * s in float, then F.linear. Plain and obviously right; it
                re-materializes the float matrix on every call, so it is never the fast route.
    "w8a16"     this project's AVX2 kernel (`kernels/w8a16_avx2.c`, built by `cpu_kernels.py`): each
                activation row rounded to int16 with its own scale (1/65534 of its largest value),
                int8 x int16 products summed exactly in int32. At batch 1 it streams the int8 weights
                at memory speed. Where it cannot run (not an x86 CPU with AVX2, no C compiler,
                K % 16 != 0, activations not float32 on the CPU) it takes the "dequant" route.

Only public, documented torch APIs are used. PyTorch's private int8 kernel
(`torch._weight_int8pack_mm`) was a route here until it was measured to read out of bounds with
bf16 activations when in_features % 16 == 8 on an AVX-512 Intel Xeon (garbage at one row, a
segfault at seven): a private op's behaviour can change with the CPU, and a crash in a kernel takes
the whole server down, so it is gone, and so is fbgemm's int8 x int8 route that was built on
private quantized-tensor constructors. `tests/test_vol3_quant.py` sweeps every route over widths
8..264 and rows 1..9 in a child process, so a crash there is a failing test with a name.

The route is a field of each `Int8Weight` ("w8a16" unless asked otherwise), so two models in one
process can use different routes and nothing global changes under a running engine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vol3_inference import cpu_kernels


@dataclass
class Int8Weight:
    """A quantized linear weight: q (out, in) int8 and scale (out,) float32; W ~= q * scale[:, None].
    `route` is how `int8_linear` multiplies by it (a key of `INT8_ROUTES`)."""

    q: torch.Tensor
    scale: torch.Tensor
    route: str = "w8a16"

    def __post_init__(self) -> None:
        if self.route not in INT8_ROUTES:
            raise ValueError(f"unknown int8 route {self.route!r}; choose one of: {', '.join(INT8_ROUTES)}")

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def nbytes(self) -> int:
        return self.q.numel() * self.q.element_size() + self.scale.numel() * self.scale.element_size()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight q * scale (out, in) this int8 weight stands for."""
        return self.q.to(dtype) * self.scale.to(dtype)[:, None]


def quantize_int8(w: torch.Tensor, route: str = "w8a16") -> tuple[Int8Weight, float]:
    """Quantize a float weight (out, in) per output channel; return (Int8Weight, max |W - q s|).

    An all-zero row gets scale 1 (its q is 0, so it reconstructs exactly).
    Raises ValueError for a weight that is not 2-D or not floating point, or an unknown route.
    """
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"quantize_int8 expects a 2-D float weight, got {tuple(w.shape)} {w.dtype}")
    wf = w.detach().float()
    absmax = wf.abs().amax(dim=1)  # (out,)
    scale = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))  # (out,)
    q = torch.round(wf / scale[:, None]).clamp_(-127, 127).to(torch.int8)  # (out, in)
    qw = Int8Weight(q.contiguous(), scale.contiguous(), route)
    max_err = (qw.dequantize() - wf).abs().max().item()
    return qw, max_err


def _dequant(x: torch.Tensor, w: Int8Weight) -> torch.Tensor:
    # q * s in float32, rounded once to x's dtype: in fp16 a small scale s is subnormal (under 6.1e-5)
    # and q * s computed there would lose most of its bits (hypothesis found one off by 4x the bound)
    return F.linear(x, w.dequantize().to(x.dtype))


def _w8a16(x: torch.Tensor, w: Int8Weight) -> torch.Tensor:
    if x.dtype != torch.float32 or x.device.type != "cpu" or w.q.shape[1] % 16:
        return _dequant(x, w)
    why = cpu_kernels.unavailable("w8a16_avx2")
    if why is not None:
        cpu_kernels.warn_once(f"int8 route 'w8a16' unavailable ({why}); using 'dequant'")
        return _dequant(x, w)
    shape = x.shape
    return cpu_kernels.w8a16_linear(x.reshape(-1, shape[-1]), w.q, w.scale).view(*shape[:-1], -1)


INT8_ROUTES = {"dequant": _dequant, "w8a16": _w8a16}


def int8_linear(x: torch.Tensor, w: Int8Weight, route: str | None = None) -> torch.Tensor:
    """y = x @ (q * s)^T for x (..., in) -> (..., out), by `route` (default: the weight's own).
    Raises ValueError for an unknown route."""
    try:
        fn = INT8_ROUTES[route or w.route]
    except KeyError:
        raise ValueError(f"unknown int8 route {route!r}; choose one of: {', '.join(INT8_ROUTES)}") from None
    return fn(x, w)
