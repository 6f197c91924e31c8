"""Memory arithmetic and `persimmon-batch capacity`: literals for the real 8B, parameter counts
against the model itself, what the engine admits, and every shipped job config against the GPU
of the cluster its header names (cluster.yaml, cluster_l4.yaml)."""

import glob
import json
import os
import re

import pytest
import torch
import yaml

from model import Engine, PersimmonConfig, PersimmonForCausalLM, PersimmonForSequenceClassification, SamplingParams
from model import capacity
from pipeline.capacity_cli import PRESETS
from pipeline.cli import main as cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_persimmon_8b_sizes_from_its_published_numbers():
    cfg = PersimmonConfig()  # the released config.json's values
    assert capacity.param_count(cfg) == 9_397_175_296
    assert capacity.weights_bytes(cfg, "bfloat16") == 18_794_350_592  # 17.5 GiB
    assert capacity.kv_bytes_per_token(cfg, "bfloat16") == 576 * 1024
    assert capacity.kv_bytes_per_token(cfg, "float32") == 1152 * 1024


@pytest.mark.parametrize("overrides,cls", [({}, PersimmonForCausalLM), ({"tie_word_embeddings": True}, PersimmonForCausalLM),
                                           ({"qk_layernorm": False}, PersimmonForCausalLM),
                                           ({"num_labels": 5}, PersimmonForSequenceClassification)])
def test_param_count_equals_the_model(overrides, cls):
    cfg = PersimmonConfig.tiny(**overrides)
    with torch.device("meta"):
        model = cls(cfg)
    head = "causal" if cls is PersimmonForCausalLM else "sequence_classification"
    assert capacity.param_count(cfg, head) == sum(p.numel() for p in model.parameters())


def test_plan_matches_what_the_engine_allocates_and_admits():
    """The same budget gives the same pool in `plan` and in the engine, and the engine holds at
    least the rows `plan` promises at once."""
    cfg = PersimmonConfig.tiny(initializer_range=0.3)
    kv_gib = (20 + 2) * 16 * 1024 / 2**30  # 22 blocks of 16 tokens of the tiny model's fp32 KV (1 KiB/token)
    planned = capacity.plan(cfg, device_memory_gib=1.0, dtype="float32", kv_cache_gib=kv_gib, prompt_tokens=40,
                            new_tokens=24, max_batch_size=64)
    model = PersimmonForCausalLM(cfg).init_weights(torch.Generator().manual_seed(0)).eval()
    engine = Engine(model, None, max_batch_size=64, kv_cache_gib=kv_gib)
    assert engine.stats()["kv_tokens_capacity"] == planned.kv_tokens
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 500, (40,), generator=g).tolist() for _ in range(60)]
    engine.generate(prompts, SamplingParams(max_new_tokens=24, ignore_eos=True))
    assert planned.kv_tokens == 320 and planned.rows_in_flight == 5
    assert engine.stats()["rows_in_flight_peak"] >= planned.rows_in_flight


def header(job: str) -> str:
    """The comment lines a job config starts with."""
    lines = []
    with open(job) as f:
        for line in f:
            if not line.startswith("#"):
                break
            lines.append(line)
    return "".join(lines)


def cluster_gpu(job: str) -> str:
    """The GPU of the cluster a job config's header names (`ray up CLUSTER.yaml`): its one worker
    node type's instance family."""
    named = re.search(r"ray up (\S+\.yaml)", header(job))
    assert named, f"{job}: the header must say which cluster it runs on (`ray up CLUSTER.yaml`)"
    with open(os.path.join(REPO, named[1])) as f:
        cluster = yaml.safe_load(f)
    workers = [t for name, t in cluster["available_node_types"].items() if name != cluster["head_node_type"]]
    assert len(workers) == 1, f"{named[1]}: one GPU worker type (a replica may land on any of them)"
    family = workers[0]["node_config"]["InstanceType"].split(".")[0]
    return capacity.AWS_INSTANCE_GPUS[family]


@pytest.fixture(scope="module")
def eight_b_dirs(tmp_path_factory):
    """config.json of Persimmon-8B (causal) and of an 8B sequence classifier: no weights."""
    causal, classifier = tmp_path_factory.mktemp("p8b"), tmp_path_factory.mktemp("p8b-cls")
    PersimmonConfig(architectures=["PersimmonForCausalLM"]).save_pretrained(causal)
    PersimmonConfig(architectures=["PersimmonForSequenceClassification"], num_labels=8).save_pretrained(classifier)
    return {"causal": str(causal), "classifier": str(classifier)}


JOBS = sorted(glob.glob(os.path.join(REPO, "jobs", "configs", "*.yaml")))


@pytest.mark.parametrize("job", JOBS, ids=os.path.basename)
def test_every_job_config_fits_its_cluster_gpu(job, eight_b_dirs, capsys):
    with open(job) as f:
        raw = yaml.safe_load(f)
    gpu = cluster_gpu(job)
    model = eight_b_dirs["classifier" if raw["task"] == "classify" else "causal"]
    code = cli(["capacity", "--config", job, "--model", model, "--gpu", gpu, "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["fits"], out["reason"]
    assert out["quantization"] == raw.get("quantization", "none")  # sized as the replicas load it
    for key in ("weights_bytes", "kv_bytes_per_token", "kv_tokens", "rows_in_flight"):
        assert isinstance(out[key], int)
    if raw["task"] != "classify":  # the worst case (a row of the full max_seq_len) still batches
        assert out["prompt_tokens"] + out["new_tokens"] == out["max_seq_len"]
        assert out["rows_in_flight"] >= 8, out


@pytest.mark.parametrize("job", JOBS, ids=os.path.basename)
def test_the_capacity_command_in_each_config_header_runs_offline(job, capsys):
    """The header's `persimmon-batch capacity ...` line names a preset (the job's own model is a
    placeholder bucket: reading it would go to the network) and the cluster's GPU, and fits."""
    text = re.sub(r"\\\n#\s*", " ", header(job))
    command = re.search(r"persimmon-batch (capacity [^`\n]*)", text)
    assert command, f"{job}: no capacity command in its header"
    argv = command[1].split()
    assert argv[argv.index("--model") + 1] in PRESETS
    assert argv[argv.index("--gpu") + 1] == cluster_gpu(job)
    assert argv[argv.index("--config") + 1] == os.path.relpath(job, REPO)
    cwd = os.getcwd()
    try:
        os.chdir(REPO)
        assert cli(argv) == 0, capsys.readouterr()
    finally:
        os.chdir(cwd)


def test_the_l4_config_needs_its_int8_weights(eight_b_dirs, capsys):
    """Without --quantization int8 the L4 label job does not batch: the config check above only
    passes because the quantization is read from the job."""
    job = os.path.join(REPO, "jobs", "configs", "label_reviews_8b_l4.yaml")
    assert cluster_gpu(job) == "L4"
    cli(["capacity", "--config", job, "--model", eight_b_dirs["causal"], "--gpu", "L4", "--quantization", "none",
         "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["rows_in_flight"] < 8


def test_capacity_cli_says_when_it_does_not_fit(eight_b_dirs, capsys):
    assert cli(["capacity", "--model", eight_b_dirs["causal"], "--gpu", "T4"]) == 1
    text = capsys.readouterr().out
    assert re.search(r"fits\s+NO: weights \(17\.5 GiB\)", text)
    assert cli(["capacity", "--model", "adept/persimmon-8b-chat", "--gpu-memory-gib", "80", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["weights_bytes"] == 18_794_350_592 and out["kv_bytes_per_token"] == 589_824
    assert cli(["capacity", "--model", "/no/such/dir", "--gpu", "L40S"]) == 2
    assert "no such directory" in capsys.readouterr().err
    for flag, past in (("--max-num-seqs", (1 << 20) + 1), ("--prefill-token-budget", (1 << 24) + 1)):
        # what a replica would refuse is refused here too, not sized
        assert cli(["capacity", "--model", "adept/persimmon-8b-chat", "--gpu", "L40S", flag, str(past)]) == 2
        assert f"{flag} must be in [1, " in capsys.readouterr().err


def test_the_readmes_capacity_numbers_are_what_capacity_says(eight_b_dirs, capsys):
    """The README's example output and its table of GPUs were written before the sampler's
    estimate changed (activations 1.81 -> 1.62 GiB) and went on showing the old KV caches."""
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()

    def planned(gpu):
        assert cli(["capacity", "--model", eight_b_dirs["causal"], "--gpu", gpu, "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    out = planned("L40S")
    example = re.search(r"activations ([\d.]+) GiB.*?KV cache ([\d.]+) GiB = (\d+) tokens", readme, re.S)
    assert example, "the README's capacity example"
    assert float(example[1]) == round(out["activation_bytes"] / 2**30, 2)
    assert float(example[2]) == round(out["kv_cache_bytes"] / 2**30, 2) and int(example[3]) == out["kv_tokens"]
    rows = re.findall(r"^\| ([A-Z0-9/ -]+?) \(([\d.]+)\) \| ([\d.]+) GiB \| ~([\d.]+)k", readme, re.M)
    assert len(rows) == 4, rows
    for names, _, gib, ktokens in rows:
        for gpu in names.split(" / "):
            out = planned(gpu)
            assert float(gib) == round(out["kv_cache_bytes"] / 2**30, 1), (gpu, gib, out["kv_cache_bytes"] / 2**30)
            assert float(ktokens) == round(out["kv_tokens"] / 1000, 1), (gpu, ktokens, out["kv_tokens"])



def test_quantized_weights_bytes_by_hand():
    """Persimmon-8B with int8 linears: each layer's 4 linears (3C*C + C*C + I*C + C*I weights)
    drop from 2 bytes to 1 and gain one bf16 scale per output channel; fp8 scales are fp32."""
    cfg = PersimmonConfig()
    C, I, L, V = 4096, 16384, 36, 262144
    linear = 3 * C * C + C * C + 2 * I * C
    outs = 3 * C + C + I + C
    bf16 = 18_794_350_592
    assert capacity.weights_bytes(cfg, "bfloat16", quantization="int8") == bf16 - L * linear + L * outs * 2
    assert capacity.weights_bytes(cfg, "bfloat16", quantization="fp8") == bf16 - L * linear + L * outs * 4
    assert capacity.weights_bytes(cfg, "bfloat16", quantization="int8", quantize_lm_head=True) == \
        bf16 - L * linear + L * outs * 2 - V * C + V * 2
    assert capacity.weights_bytes(cfg, "bfloat16", "sequence_classification", "int8", True) == \
        capacity.weights_bytes(cfg, "bfloat16", "sequence_classification", "int8")  # no lm_head to quantize
    with pytest.raises(ValueError, match="quantization"):
        capacity.weights_bytes(cfg, "bfloat16", quantization="int4")


def test_capacity_cli_int8_on_an_l4_by_hand(capsys):
    """Persimmon-8B int8 on an L4 (22.49 GiB as the driver reports it): the weights drop by one
    byte per linear weight, and the KV pool gets what is left of 90% of the device after them
    and the activation headroom, in whole 16-token blocks of 576 KiB tokens, less 2 blocks."""
    C, I, L, V = 4096, 16384, 36, 262144
    bf16 = 18_794_350_592
    int8 = bf16 - L * (3 * C * C + C * C + 2 * I * C) + L * (3 * C + C + I + C) * 2
    with_head = int8 - V * C + V * 2
    for flags, weights in (([], int8), (["--quantize-lm-head"], with_head)):
        assert cli(["capacity", "--model", "adept/persimmon-8b-chat", "--gpu", "L4", "--quantization", "int8",
                    *flags, "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["quantization"] == "int8" and out["quantize_lm_head"] == bool(flags)
        assert out["weights_bytes"] == weights
        kv = 0.9 * 22.49 * 2**30 - weights - out["activation_bytes"]  # the smaller of the two limits here
        blocks = int(kv) // (576 * 1024 * 16) - 2
        assert out["kv_tokens"] == blocks * 16
        assert out["rows_in_flight"] == min(256, blocks * 16 // (512 + 256))
    assert round(int8 / 2**30, 1) == 10.8 and round(with_head / 2**30, 1) == 9.8
    assert cli(["capacity", "--model", "adept/persimmon-8b-chat", "--gpu", "L4", "--quantization", "int8"]) == 0
    text = capsys.readouterr().out
    assert re.search(r"weights\s+10\.76 GiB \(int8 linears, the rest bfloat16\)", text), text


@pytest.mark.parametrize("gpu", ["A10G", "T4", "A100-80GB"])
def test_fp8_is_refused_on_a_gpu_without_it(gpu, capsys):
    assert cli(["capacity", "--model", "adept/persimmon-8b-chat", "--gpu", gpu, "--quantization", "fp8"]) == 2
    err = capsys.readouterr().err
    assert "fp8 weights need a GPU of compute capability 8.9+" in err and f"{gpu} has " in err
    assert cli(["capacity", "--model", "adept/persimmon-8b-chat", "--gpu", "L4", "--quantization", "fp8"]) == 0
    capsys.readouterr()
    assert cli(["capacity", "--model", "adept/persimmon-8b-chat", "--gpu", "L4", "--quantize-lm-head"]) == 2
    assert "--quantize-lm-head needs --quantization" in capsys.readouterr().err


def test_fp8_capable_gpus_are_ada_and_hopper():
    able = {name for name, gpu in capacity.GPUS.items() if gpu.capability >= capacity.FP8_MIN_CAPABILITY}
    assert able == {"L4", "L40S", "H100-80GB", "H200"}
