"""Result files that survive a crash, and the machine they were measured on.

Every file a command leaves behind as a result (a benchmark's JSON, a Markdown table, a chart, a
rewritten metrics log) is written to a sibling temporary file, fsynced, and renamed over its target
(`os.replace` is atomic on POSIX): a reader, or a crash at any moment, sees the old file or the new
one, never half of one. A benchmark calls `write_json` after each section it finishes, so a crash in
a later section loses only that section.

`machine()` describes the CPU (model name and the SIMD extensions the kernels and bf16 paths care
about: AVX2, AVX-512, AVX512-BF16, AMX) for the header of every benchmark: these figures move a lot
from one x86-64 family to the next, and a figure without its machine says little.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

# /proc/cpuinfo flag -> the name people use for it, in the order printed
SIMD_FLAGS = (("avx2", "AVX2"), ("fma", "FMA"), ("avx512f", "AVX-512"), ("avx512_bf16", "AVX512-BF16"),
              ("amx_tile", "AMX"))


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically (temp file in the same folder, fsync, rename); make parents."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text(path: str | Path, text: str) -> Path:
    """`write_bytes` for UTF-8 text."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> Path:
    """`obj` as indented JSON, written atomically (see `write_bytes`)."""
    return write_text(path, json.dumps(obj, indent=2) + "\n")


def save_figure(fig, path: str | Path, **kw) -> Path:
    """`fig.savefig` atomically: into a temp file of the same format, then renamed over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        fig.savefig(tmp, **kw)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _cpuinfo() -> tuple[str, set[str]]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine() or "unknown CPU", set()
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return model or platform.machine() or "unknown CPU", flags


def machine() -> dict:
    """{"cpu": model name, "simd": [AVX2, ...], "cores": os.cpu_count()} of this machine."""
    model, flags = _cpuinfo()
    return {"cpu": model, "simd": [name for flag, name in SIMD_FLAGS if flag in flags],
            "cores": os.cpu_count() or 1}


def describe_machine(m: dict | None = None) -> str:
    """One line: 'AMD EPYC, 2 cores, AVX2 FMA' (no SIMD extension named: 'no AVX2')."""
    m = m or machine()
    simd = " ".join(m["simd"]) or "no AVX2"
    return f"{m['cpu']}, {m['cores']} cores, {simd}"
