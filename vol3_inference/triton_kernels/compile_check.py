"""Compile every Triton kernel for real GPUs (sm_80, sm_90) on a machine without one.

    python -m vol3_inference.triton_kernels.compile_check            # all modules, sm_80 and sm_90
    python -m vol3_inference.triton_kernels.compile_check --arch 90 --module rmsnorm

`triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", arch, 32))` runs
Triton's whole pipeline (TTIR, TTGIR, LLVM IR, PTX) and the ptxas that ships inside the triton wheel,
so it needs no GPU and no CUDA driver. It catches what Triton's interpreter lets through: tile shapes
a GPU `tl.dot` rejects (a dimension under 16), dtype pairs it cannot multiply, layouts that need more
shared memory than the SM has, and anything ptxas refuses. It cannot catch wrong results, races, or
out-of-bounds addresses (those need the interpreter tests, or a GPU).

What it compiles: each module of this package that defines `COMPILE_SPECS` (the convention is in the
package docstring), every spec, for every arch asked. For each it reports the shared memory the
launch needs (Triton's metadata) and the registers and stack (spill) bytes per thread (from the cubin,
with the `cuobjdump` inside the wheel), and fails a spec whose shared memory exceeds the arch's
per-block limit.

The kernels must be compiled functions, not interpreted ones: run this in a process where
TRITON_INTERPRET is unset (`main` unsets it before importing any kernel module).
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

ARCHS = (80, 90)
# Largest dynamic shared memory one block may use (CUDA C Programming Guide, compute capabilities table)
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
PACKAGE = "vol3_inference.triton_kernels"


@dataclass
class Result:
    module: str
    kernel: str
    arch: int
    config: str  # the constexprs, options and pointer dtypes that tell specs apart
    shared: int | None = None  # bytes of shared memory a launch needs
    regs: int | None = None  # registers per thread
    stack: int | None = None  # bytes of stack frame per thread: where ptxas spills registers
    seconds: float = 0.0
    error: str | None = None


def spec_modules(names: list[str] | None = None) -> list[tuple[str, list]]:
    """(module name, COMPILE_SPECS) for each module of the package that has them (or the named ones).
    Raises RuntimeError if the kernels were decorated under TRITON_INTERPRET=1 (they cannot compile)."""
    pkg = importlib.import_module(PACKAGE)
    found = []
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if info.name == "compile_check" or (names and info.name not in names):
            continue
        mod = importlib.import_module(f"{PACKAGE}.{info.name}")
        specs = getattr(mod, "COMPILE_SPECS", None)
        if specs:
            found.append((info.name, specs))
    from triton.runtime.interpreter import InterpretedFunction

    if any(isinstance(spec[0], InterpretedFunction) for _, specs in found for spec in specs):
        raise RuntimeError("the kernels were decorated under TRITON_INTERPRET=1 and cannot be compiled: "
                           "run compile_check in a process without it")
    return found


def _describe(signature: dict, constexprs: dict, options: dict) -> str:
    dtypes = sorted({t[1:] for t in signature.values() if t.startswith("*") and t[1:] not in ("i8", "i32", "i64")})
    parts = [f"{k}={v}" for k, v in constexprs.items()] + [f"{k}={v}" for k, v in options.items()]
    return " ".join(["/".join(dtypes)] + parts)


def resources(cubin: bytes) -> tuple[int | None, int | None]:
    """(registers per thread, stack bytes per thread) of the one kernel in `cubin`, read with the
    wheel's cuobjdump; (None, None) where it is missing. A kernel with a stack frame spills
    registers to local memory (Triton kernels call no functions)."""
    from triton import knobs

    try:
        tool = knobs.nvidia.cuobjdump.path
    except Exception:  # an older triton without the knob: report no registers rather than fail
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    regs, stack = re.search(r"REG:(\d+)", out), re.search(r"STACK:(\d+)", out)
    return (int(regs.group(1)) if regs else None), (int(stack.group(1)) if stack else None)


def compile_spec(module: str, spec: tuple, arch: int) -> Result:
    """Compile one spec for `arch` (sm_<arch>); errors are caught into the Result."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel, signature, constexprs = spec[:3]
    options = dict(spec[3]) if len(spec) > 3 else {}
    res = Result(module, kernel.__name__, arch, _describe(signature, constexprs, options))
    t0 = time.perf_counter()
    try:
        compiled = triton.compile(ASTSource(kernel, signature, constexprs),
                                  target=GPUTarget("cuda", arch, 32), options=options)
        res.shared = int(compiled.metadata.shared)
        res.regs, res.stack = resources(compiled.asm["cubin"])
        if res.shared > SMEM_LIMIT.get(arch, 48 * 1024):
            res.error = f"needs {res.shared} B of shared memory; sm_{arch} allows {SMEM_LIMIT.get(arch)}"
    except Exception as e:  # a compile error is the finding: report it, keep going
        res.error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
    res.seconds = time.perf_counter() - t0
    return res


def run(archs=ARCHS, modules: list[str] | None = None) -> list[Result]:
    """Compile every spec of every module for every arch. Returns one Result each."""
    return [compile_spec(name, spec, arch) for name, specs in spec_modules(modules)
            for spec in specs for arch in archs]


def summary(results: list[Result]) -> list[tuple]:
    """Per (module, kernel, arch): (specs compiled, failures, max shared bytes, max regs, max stack)."""
    groups: dict[tuple, list[Result]] = {}
    for r in results:
        groups.setdefault((r.module, r.kernel, r.arch), []).append(r)
    rows = []
    for key, rs in groups.items():
        ok = [r for r in rs if r.error is None]

        def top(field, ok=ok):
            vals = [getattr(r, field) for r in ok if getattr(r, field) is not None]
            return max(vals) if vals else None
        rows.append((*key, len(rs), len(rs) - len(ok), top("shared"), top("regs"), top("stack")))
    return rows


def report(results: list[Result], verbose: bool = False) -> str:
    """A Markdown table: per kernel and arch, specs compiled, the largest shared memory, registers and
    stack (spill) bytes over its specs; with `verbose`, one row per spec; then every failure."""
    lines = ["| module | kernel | arch | specs | failed | shared (B, max) | regs (max) | stack (B, max) |",
             "|---|---|---|---|---|---|---|---|"]
    for mod, kern, arch, n, bad, smem, regs, stack in summary(results):
        lines.append(f"| {mod} | {kern} | sm_{arch} | {n} | {bad} | {smem} | {regs} | {stack} |")
    if verbose:
        lines += ["", "| kernel | arch | config | shared (B) | regs | stack (B) | s |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r.kernel} | sm_{r.arch} | {r.config} | {r.shared} | {r.regs} | {r.stack} | {r.seconds:.2f} |"
                  for r in results]
    failures = [r for r in results if r.error]
    if failures:
        lines += ["", "Failures:"] + [f"- {r.module}.{r.kernel} sm_{r.arch} [{r.config}]: {r.error}" for r in failures]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Compile, print the report and the time; exit status 1 if any spec failed."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, action="append", help="compute capability, e.g. 90 (default: 80 and 90)")
    p.add_argument("--module", action="append", help="only this module of the package (repeatable)")
    p.add_argument("--verbose", action="store_true", help="one row per spec")
    args = p.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # before any kernel module is imported (decorated)
    t0 = time.perf_counter()
    try:
        results = run(tuple(args.arch or ARCHS), args.module)
    except RuntimeError as e:
        print(f"compile_check: {e}", file=sys.stderr)
        return 2
    print(report(results, args.verbose))
    n_bad = sum(r.error is not None for r in results)
    print(f"\n{len(results)} compiles, {n_bad} failed, {time.perf_counter() - t0:.1f} s")
    return 1 if n_bad else 0


if __name__ == "__main__":
    sys.exit(main())
