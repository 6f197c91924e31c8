"""`persimmon-batch demo`: the whole pipeline on local Ray with the embedded tiny model.

Builds a tiny random Persimmon (causal, and a 2-label classifier), writes a few Parquet files
of prompts, then runs `generate`, `label` and `classify` exactly as on a cluster: a pool of
model replicas, one committed output file per input file, `_run_report.json`. The weights are
random, so the texts are noise; the row accounting is what to look at.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

SAMPLE_PROMPTS = [
    "the cat reads a long letter before lunch.",
    "Write a haiku about a quiet river.",
    "Our team builds the new server every morning.",
    "Explain why the sky is blue in one sentence.",
    "The old teacher answers a simple question with great care.",
    "List three red apples.",
    "A small robot paints the kitchen table at night.",
    "What does the farmer measure near the station?",
    "I loved this film, the acting was wonderful.",
    "Terrible service, the food was cold and late.",
    "The pilot follows the mountain road for the first time.",
    "def add(a, b):\n    return a + b",
]


def write_sample_files(directory: str, files: int = 4, rows: int = 8) -> list[str]:
    """`files` Parquet files of `rows` rows each: id (int64), prompt, source."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(directory, exist_ok=True)
    paths = []
    for s in range(files):
        ids = list(range(s * rows, (s + 1) * rows))
        table = pa.table({"id": pa.array(ids, pa.int64()),
                          "prompt": [SAMPLE_PROMPTS[i % len(SAMPLE_PROMPTS)] for i in ids],
                          "source": [f"file-{s}"] * rows})
        path = os.path.join(directory, f"part-{s:05d}.parquet")
        pq.write_table(table, path)
        paths.append(path)
    return paths


def run_demo(directory: str | None = None, tasks=("generate", "label", "classify"), files: int = 4,
             rows: int = 8, replicas: str = "2") -> int:
    import pyarrow.parquet as pq

    from model.tiny import build_tiny_checkpoint

    from .api import run
    from .report import summary
    from .settings import PipelineConfig

    t0 = time.perf_counter()
    own_dir = directory is None
    root = directory or tempfile.mkdtemp(prefix="persimmon-batch-demo-")
    print(f"demo directory: {root}")
    try:
        causal = os.path.join(root, "models", "tiny-causal")
        if not os.path.exists(os.path.join(causal, "config.json")):
            build_tiny_checkpoint(causal, task="causal", seed=0)
        classifier = os.path.join(root, "models", "tiny-classifier")
        if "classify" in tasks and not os.path.exists(os.path.join(classifier, "config.json")):
            build_tiny_checkpoint(classifier, task="sequence_classification", seed=0,
                                  id2label={0: "negative", 1: "positive"})
        inputs = os.path.join(root, "input")
        write_sample_files(inputs, files, rows)
        print(f"built tiny models and {files} input files x {rows} rows in {time.perf_counter() - t0:.1f} s\n")

        common = dict(input=inputs, model=causal, replicas=replicas, batch_size=8, keep_columns=["source"])
        configs = {
            "generate": PipelineConfig(task="generate", max_new_tokens=16, **common),
            "label": PipelineConfig(task="label", choices=["positive", "negative", "neutral"],
                                    prompt_template="Review: {prompt}\nSentiment:", **common),
            "classify": PipelineConfig(task="classify", **{**common, "model": classifier}),
            "score": PipelineConfig(task="score", **common),
        }
        ok = True
        for task in tasks:
            config = configs[task]
            config.output = os.path.join(root, "output", task)
            report = run(config)
            ok &= report["complete"]
            print(summary(report))
            table = pq.read_table(config.output).sort_by("id")
            show = [c for c in table.column_names if c not in ("probs", "scores", "source")]
            print(table.select(show).slice(0, 3).to_pandas().to_string(max_colwidth=40), "\n")
        print(f"demo finished in {time.perf_counter() - t0:.1f} s: {'all rows accounted for' if ok else 'INCOMPLETE'}")
        if not own_dir:
            print(f"outputs and reports under {root}/output")
        return 0 if ok else 1
    finally:
        if own_dir:
            shutil.rmtree(root, ignore_errors=True)
