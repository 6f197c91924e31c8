"""Loading streams tensors into the target dtype: peak memory stays near one model's size."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from model import PersimmonConfig, PersimmonForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = textwrap.dedent("""
    import json, sys, torch
    sys.path.insert(0, {root!r})
    import model  # imports settle before the baseline

    def status(key):  # kB values from /proc/self/status
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    import tempfile  # warm up: load a tiny checkpoint first, so code pages and lazy inits are in
    with tempfile.TemporaryDirectory() as warm:
        tiny = model.PersimmonForCausalLM(model.PersimmonConfig.tiny()).to(getattr(torch, {dtype!r}))
        tiny.save_pretrained(warm)
        model.load_pretrained(warm, dtype={dtype!r})
        del tiny
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS watermark (VmHWM) to the current RSS
    before = status("VmRSS")
    m = model.load_pretrained({path!r}, dtype={dtype!r})
    peak = status("VmHWM")
    size = sum(p.numel() * p.element_size() for p in m.parameters())
    print(json.dumps({{"peak_growth": peak - before, "model_bytes": size,
                      "dtype": str(next(m.parameters()).dtype)}}))
""")


@pytest.mark.parametrize("source,target,layout", [("float32", "float32", "safetensors"),
                                                  ("float32", "bfloat16", "safetensors"),
                                                  ("bfloat16", "bfloat16", "sharded")])
def test_load_peak_memory_is_about_one_model(tmp_path, source, target, layout):
    # ~100 MB of fp32 weights: large enough that a second full copy would show in the peak RSS
    config = PersimmonConfig.tiny(vocab_size=8192, hidden_size=512, intermediate_size=2048, num_hidden_layers=6,
                                  num_attention_heads=8)
    with torch.device("meta"):
        model = PersimmonForCausalLM(config)
    model = model.to_empty(device="cpu").init_weights(torch.Generator().manual_seed(0)).to(getattr(torch, source))
    model.save_pretrained(tmp_path, max_shard_size="20MB" if layout == "sharded" else "5GB")
    del model
    code = PROBE.format(root=ROOT, path=str(tmp_path), dtype=target)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    assert stats["dtype"] == f"torch.{target}"
    assert stats["model_bytes"] > 40e6
    # one model plus at most one tensor in flight (largest here: 16 MB embedding) and allocator slack
    assert stats["peak_growth"] <= 1.1 * stats["model_bytes"] + 24e6, stats
