"""shared.results: a result file is the old one or the new one, never half of one, and never a temp file
left beside it; the machine line names the CPU and its SIMD extensions."""

from __future__ import annotations

import json
import os

import pytest

from shared import results


def _names(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_write_json_creates_parents_and_replaces_an_existing_file(tmp_path):
    path = tmp_path / "runs" / "bench" / "r.json"
    results.write_json(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}
    results.write_json(path, {"b": [2, 3]})
    assert json.loads(path.read_text()) == {"b": [2, 3]}
    assert path.read_text().endswith("\n")
    assert _names(path.parent) == ["r.json"]  # no temp file left


def test_write_text_and_bytes(tmp_path):
    results.write_text(tmp_path / "t.md", "| a |\n| é |\n")
    assert (tmp_path / "t.md").read_text(encoding="utf-8") == "| a |\n| é |\n"
    results.write_bytes(tmp_path / "b.bin", b"\x00\xff")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\xff"
    assert _names(tmp_path) == ["b.bin", "t.md"]


def test_an_unserializable_result_leaves_the_old_file(tmp_path):
    path = tmp_path / "r.json"
    path.write_text("old\n")
    with pytest.raises(TypeError):
        results.write_json(path, {"x": object()})
    assert path.read_text() == "old\n" and _names(tmp_path) == ["r.json"]


def test_a_failing_rename_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    path.write_text("old\n")

    def fail(src, dst):
        assert os.path.exists(src)  # the new content was written in full beside the target
        raise OSError("disk gone")

    monkeypatch.setattr(results.os, "replace", fail)
    with pytest.raises(OSError, match="disk gone"):
        results.write_json(path, {"new": True})
    assert path.read_text() == "old\n" and _names(tmp_path) == ["r.json"]


def test_save_figure_writes_a_png_and_replaces_the_old_one(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = tmp_path / "figs" / "chart.png"
    path.parent.mkdir()
    path.write_bytes(b"old")
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    results.save_figure(fig, path, dpi=50)
    plt.close(fig)
    assert path.read_bytes().startswith(b"\x89PNG") and _names(path.parent) == ["chart.png"]


def test_a_failing_savefig_leaves_the_old_figure(tmp_path):
    class Broken:
        def savefig(self, target, **kw):
            with open(target, "wb") as f:
                f.write(b"half a PN")  # a crash halfway through drawing
            raise RuntimeError("renderer died")

    path = tmp_path / "chart.png"
    path.write_bytes(b"old figure")
    with pytest.raises(RuntimeError, match="renderer died"):
        results.save_figure(Broken(), path)
    assert path.read_bytes() == b"old figure" and _names(tmp_path) == ["chart.png"]


def test_save_figure_keeps_the_format_of_the_target(tmp_path):
    seen = {}

    class Fig:
        def savefig(self, target, **kw):
            seen["suffix"], seen["kw"] = os.path.splitext(target)[1], kw
            open(target, "wb").close()

    results.save_figure(Fig(), tmp_path / "c.svg", dpi=72)
    assert seen == {"suffix": ".svg", "kw": {"dpi": 72}}  # matplotlib picks the format by the suffix


def test_machine_names_the_simd_extensions_in_order(monkeypatch):
    flags = {"sse2", "amx_tile", "avx2", "avx512f", "fma"}
    monkeypatch.setattr(results, "_cpuinfo", lambda: ("Intel Xeon Platinum 8480+", flags))
    m = results.machine()
    assert m == {"cpu": "Intel Xeon Platinum 8480+", "simd": ["AVX2", "FMA", "AVX-512", "AMX"],
                 "cores": os.cpu_count()}


def test_machine_here_has_its_keys():
    m = results.machine()
    assert set(m) == {"cpu", "simd", "cores"}
    assert isinstance(m["cpu"], str) and m["cpu"] and m["cores"] >= 1
    assert set(m["simd"]) <= {name for _, name in results.SIMD_FLAGS}
    json.dumps(m)  # it goes into every bench's JSON


def test_describe_machine():
    fake = {"cpu": "AMD EPYC 7B13", "simd": ["AVX2", "FMA"], "cores": 2}
    assert results.describe_machine(fake) == "AMD EPYC 7B13, 2 cores, AVX2 FMA"
    assert results.describe_machine({**fake, "simd": []}) == "AMD EPYC 7B13, 2 cores, no AVX2"
    assert results.describe_machine().startswith(results.machine()["cpu"])
