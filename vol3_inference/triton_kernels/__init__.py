"""Triton kernels for the engine's ops on a GPU (the `triton` backend, `vol3_inference/triton_ops.py`).

One module per kernel. Each has three parts:

    the `@triton.jit` kernel;
    a wrapper that checks shapes, strides, dtypes and block sizes (`problem(...)` returns what is
        wrong as one line, or None; the wrapper raises ValueError with it) and launches the kernel;
    the plain-torch reference it is tested against (`reference(...)`, usually a `TorchOps` method).

Modules: `rmsnorm` (RMSNorm, and residual add + RMSNorm in one pass), `rope_cache` (RoPE on q and k
of the fused qkv, k and v stored into the paged cache in the same kernel), `swiglu` (SwiGLU on the
fused gate_up), `int8_linear` (int8 weight-only linear: a GEMV for decode, a tiled GEMM for prefill),
`decode_attention` and `prefill_attention` (attention over the paged KV cache: see their docstrings).

Where the kernels run. On a CUDA device, compiled for it. On CPU tensors, only in Triton's
interpreter (`TRITON_INTERPRET=1`, which `@triton.jit` reads when a module is imported): slow, for
checking. The tests set it when CUDA is absent (`tests/conftest.py`).

Compile specs (the convention `compile_check.py` relies on). A module may define `COMPILE_SPECS`, a
list of `(kernel, signature, constexprs)` or `(kernel, signature, constexprs, options)` tuples: the
`@triton.jit` function, its argument types as `triton.compiler.ASTSource` takes them (every argument
named, e.g. {"x_ptr": "*fp16", "n": "i32", "BLOCK": "constexpr"}), the constexpr values, and compile
options such as {"num_warps": 8}. The list holds every specialization the module's GPU path can
launch (each dtype and block configuration its wrapper picks), so `python -m
vol3_inference.triton_kernels.compile_check` can build each one for sm_80 and sm_90 without a GPU
and report its shared memory and registers. A module without `COMPILE_SPECS` is skipped.
"""
