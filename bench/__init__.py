"""Measurement, apart from the system it measures: the benches of the three volumes, the probes behind
the engine's design choices, one timing module and one report module.

    python -m bench.vol1        # one NumPy training step vs PyTorch eager        (make vol1-bench)
    python -m bench.vol2        # training tok/s, ours vs transformers' Llama     (make vol2-bench)
    python -m bench.vol3        # decode, roofline, int8, serving vs baselines     (make vol3-bench)
    python -m bench.tokenizer   # our BPE vs Hugging Face tokenizers               (make tokenizer-bench)
    python -m bench.quant       # the int8 matmul routes vs fp32 F.linear          (make quant-bench)
    python -m bench.probes NAME # layout, fused, argmax, overhead, threads

| file | what |
|---|---|
| `timing.py` | interleaved rounds and medians, the device sync, read bandwidth by size, the cache size |
| `report.py` | the run header, results as JSON + Markdown (`--out`, `--publish`), charts, `figures` / `check_quoted` |
| `workload.py` | the serving workload and the policies it is served by |
| `vol3_tables.py` | the vol3 bench's tables and charts |

Every bench writes `<out>/<name>.json` and `<out>/<name>.md` (default `runs/bench/`); `--publish
results` copies the Markdown to the tracked `results/` folder that the chapters link.
"""
