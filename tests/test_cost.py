"""`persimmon-batch plan --gpu`: the roofline arithmetic against a hand computation from the
datasheet numbers, the plan's token counts against sentencepiece itself, calibration by a GPU
benchmark's file, and the errors for unknown GPUs and bad prices."""

from __future__ import annotations

import json
import math
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm
from pipeline_fixtures import tiny_model

from model import PersimmonConfig, capacity, roofline
from pipeline import PipelineConfig
from pipeline.cli import main
from pipeline.cost import PRICES, estimate, parse_gpus, parse_prices

# Persimmon-8B (PERSIMMON.md): 9,397,175,296 parameters, of which the embedding and the lm_head
# are 262144 x 4096 each; bf16 weights 18,794,350,592 bytes; KV 36 x 2 x 4096 x 2 = 589,824 B/token.
PARAMS, VC, WEIGHTS, KV = 9_397_175_296, 262144 * 4096, 18_794_350_592, 589_824
BODY = PARAMS - 2 * VC  # the layers' matmuls (+ norms): 7,249,691,648
L4_BANDWIDTH, L4_BF16 = 300e9, 242e12 / 2  # NVIDIA L4 datasheet: 300 GB/s, 242 TFLOPS bf16 with sparsity


def test_roofline_of_persimmon_8b_on_an_l4_by_hand():
    """1000 rows of 300 prompt tokens and 100 new tokens, 20 rows in flight, bf16, on an L4 at
    50% of peak FLOP/s."""
    work = roofline.Work(rows=1000, prompt_tokens=300_000, new_tokens=100, rows_in_flight=20)
    got = roofline.roofline(PersimmonConfig(), capacity.GPUS["L4"], work, efficiency=0.5)

    prefill_flops = 2 * BODY * 300_000 + 2 * VC * 1000  # every prompt token; the head on each row's last
    assert BODY == 7_249_691_648 and got.prefill_flops == prefill_flops
    assert got.prefill_s == pytest.approx(prefill_flops / (L4_BF16 * 0.5))
    steps = 1000 * 100 // 20  # 5000
    read = (WEIGHTS - 2 * VC) + 20 * (300 + 100 / 2) * KV  # all weights but the embedding; KV at the mean context
    step_flops = 2 * (BODY + VC) * 20
    assert got.decode_steps == steps and got.decode_step.bytes == read and got.decode_step.flops == step_flops
    assert read / L4_BANDWIDTH > step_flops / (L4_BF16 * 0.5)  # memory-bound: 69 ms against 5.5 ms
    assert got.decode_step.bound == "memory"
    assert got.decode_s == pytest.approx(steps * read / L4_BANDWIDTH)
    assert got.decode_s == pytest.approx(346.3, abs=0.1) and got.prefill_s == pytest.approx(71.9, abs=0.1)


def test_a_big_decode_batch_turns_compute_bound_and_int8_moves_its_dequantized_copy():
    work = roofline.Work(rows=256, prompt_tokens=256 * 10, new_tokens=10, rows_in_flight=256)
    bf16 = roofline.roofline(PersimmonConfig(), capacity.GPUS["L4"], work)
    flops = 2 * (BODY + VC) * 256
    assert bf16.decode_step.bound == "compute"
    assert bf16.decode_step.seconds == pytest.approx(flops / (L4_BF16 * 0.5))
    small = roofline.Work(rows=10, prompt_tokens=100, new_tokens=10, rows_in_flight=1)
    linear = 36 * (3 * 4096 * 4096 + 4096 * 4096 + 2 * 16384 * 4096)
    scales = 36 * (3 * 4096 + 4096 + 16384 + 4096) * 2
    int8 = roofline.roofline(PersimmonConfig(), capacity.GPUS["L4"], small, quantization="int8")
    plain = roofline.roofline(PersimmonConfig(), capacity.GPUS["L4"], small)
    # the engine's GPU path: each int8 weight read (1 byte), dequantized to bf16 in device memory
    # (2 written) and read back by the matmul (2): 5 bytes against bf16's 2, plus the scales
    assert int8.decode_step.bytes - plain.decode_step.bytes == linear * (5 - 2) + scales
    assert int8.prefill_s == plain.prefill_s  # weight-only quantization multiplies at the 16-bit peak


def measured(rows: int, tokens: int) -> dict:
    """prompt_stats' numbers for `rows` rows of `tokens` prompt tokens in all, none over the limit."""
    return {"rows_read": rows, "rows_not_run": 0, "tokens_measured": tokens, "exact": True,
            "limit": {"name": "max_seq_len", "tokens": 4096, "over": "prompt_too_long"},
            "rows_over_limit_read": 0, "tokens_over_limit_read": 0}


def test_the_estimate_per_gpu_is_hours_times_price():
    """cost.estimate on the 8B config, with the prompt statistics a plan would hand it."""
    config = PipelineConfig(task="generate", input="in", output="out", model="m", max_new_tokens=100,
                            num_gpus_per_replica=1, max_num_seqs=20, batch_size=64)
    prompts = measured(1000, 300_000)
    est = estimate(config, PersimmonConfig(), "causal", prompts, 1000, ["L4", "H100-80GB", "A100-80GB"],
                   prices={"L4": 0.5})
    l4, h100, a100 = est["gpus"]
    assert est["label"] == "estimate (roofline)" and est["dtype"] == "bfloat16"
    assert (est["rows"], est["prompt_tokens"], est["output_tokens"]) == (1000, 300_000, 100_000)
    # in bf16 an L4 keeps ~2k tokens of KV: 5 of the 20 configured rows of 300 + 100 tokens
    cap = capacity.plan(PersimmonConfig(), device_memory_gib=capacity.GPUS["L4"].memory_gib, prompt_tokens=300,
                        new_tokens=100, max_batch_size=20)
    assert l4["kv_tokens_capacity"] == cap.kv_tokens and l4["kv_tokens_needed"] == 20 * 400
    assert l4["rows_in_flight"] == cap.rows_in_flight == cap.kv_tokens // 400 < 20
    line = roofline.roofline(PersimmonConfig(), capacity.GPUS["L4"],
                             roofline.Work(1000, 300_000, 100, rows_in_flight=l4["rows_in_flight"]))
    assert l4["hours"] == pytest.approx(line.total_s / 3600)
    assert l4["cost_usd"] == pytest.approx(l4["hours"] * 0.5) and l4["price_from"] == "--price-per-hour"
    assert h100["rows_in_flight"] == 20 and h100["price_per_hour"] == PRICES["H100-80GB"]
    assert h100["cost_usd"] == pytest.approx(h100["hours"] * PRICES["H100-80GB"])
    assert a100["cost_usd"] is None and a100["hours"] > h100["hours"]  # no default price; less bandwidth


def test_fp8_has_no_estimate_on_a_gpu_without_fp8():
    config = PipelineConfig(task="generate", input="in", output="out", model="m", num_gpus_per_replica=1,
                            quantization="fp8")
    prompts = measured(10, 1000)
    a10g, l4 = estimate(config, PersimmonConfig(), "causal", prompts, 10, ["A10G", "L4"])["gpus"]
    assert not a10g["fits"] and "compute capability 8.9+" in a10g["reason"] and "hours" not in a10g
    assert l4["fits"] and l4["hours"] > 0


@pytest.fixture(scope="module")
def reviews(tmp_path_factory):
    """Eight prompts of different lengths, one Parquet file."""
    d = tmp_path_factory.mktemp("in")
    texts = ["good", "bad value for money", "the strap broke after two days of light use, sent it back",
             "ok", "Great! Would buy again.", "meh " * 30, "arrived late", "fits well and looks nice"]
    pq.write_table(pa.table({"id": list(range(len(texts))), "prompt": texts}), d / "a.parquet")
    return str(d), texts


def plan_json(capsys, *argv) -> dict:
    assert main(["plan", *argv, "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_plan_counts_the_tokens_sentencepiece_counts(reviews, tmp_path, capsys):
    src, texts = reviews
    model = tiny_model("causal")
    sp = spm.SentencePieceProcessor(model_file=os.path.join(model, "tokenizer.model"))
    by_hand = sum(len(sp.encode(t)) + 1 for t in texts)  # + BOS, as the engine adds it
    est = plan_json(capsys, "generate", "--input", src, "--output", str(tmp_path / "o"), "--model", model,
                    "--max-new-tokens", "7", "--sample-rows", "0", "--gpu", "L4,h100-80gb")["estimate"]
    assert est["prompt_tokens"] == by_hand and est["rows"] == len(texts)
    assert est["mean_prompt_tokens"] == round(by_hand / len(texts), 2)
    assert est["new_tokens_per_row"] == 7 and est["output_tokens"] == 7 * len(texts)
    assert [g["gpu"] for g in est["gpus"]] == ["L4", "H100-80GB"]
    body, head = roofline.matmul_params(PersimmonConfig.from_pretrained(model))
    assert est["gpus"][0]["roofline"]["prefill_flops"] == 2 * body * by_hand + 2 * head * len(texts)

    limit = sorted(len(sp.encode(t)) + 1 for t in texts)[4]  # max_seq_len: rows past limit - 1 are refused
    short = plan_json(capsys, "generate", "--input", src, "--output", str(tmp_path / "o3"), "--model", model,
                      "--max-new-tokens", "1", "--max-seq-len", str(limit), "--sample-rows", "0",
                      "--gpu", "L4")["estimate"]
    kept = [len(sp.encode(t)) + 1 for t in texts if len(sp.encode(t)) + 1 <= limit - 1]
    assert 0 < len(kept) < len(texts) and (short["rows"], short["prompt_tokens"]) == (len(kept), sum(kept))

    label = plan_json(capsys, "label", "--input", src, "--output", str(tmp_path / "o2"), "--model", model,
                      "--choices", "yes,no", "--sample-rows", "0", "--gpu", "L4")["estimate"]
    stripped = sum(len(sp.encode(t.rstrip())) + 1 for t in texts)  # label: trailing whitespace goes to the choices
    assert stripped == by_hand - 1  # "meh meh ... " loses its last space
    assert label["prompt_tokens"] == stripped and label["new_tokens_per_row"] == 0  # label decodes nothing
    assert label["scored_tokens_per_row"] > 0 and label["gpus"][0]["roofline"]["decode_steps"] == 0


def test_plan_prints_the_estimate_labelled(reviews, tmp_path, capsys):
    src, _ = reviews
    assert main(["plan", "generate", "--input", src, "--output", str(tmp_path / "o"), "--model", tiny_model("causal"),
                 "--gpu", "L4,A100-80GB,T4"]) == 0
    text = capsys.readouterr().out
    assert "estimate (roofline):" in text and "A100-80GB: no default price; give --price-per-hour" in text
    assert "T4         cannot run this job: no bf16 tensor cores" in text


@pytest.mark.parametrize("argv,message", [
    (["--gpu", "H100"], "unknown GPU 'H100'; did you mean H100-80GB"),
    (["--gpu", "L40"], "did you mean L40S"),
    (["--gpu", ","], "--gpu: no GPU named"),
    (["--gpu", ""], "--gpu: no GPU named"),  # an empty shell variable, not a silent skip
    (["--gpu", "L4", "--price-per-hour", "L4"], "'L4' is not GPU=USD"),
    (["--gpu", "L4", "--price-per-hour", "L4=cheap"], "L4's price 'cheap' is not a number"),
    (["--gpu", "L4", "--price-per-hour", "L4=0"], "must be a number > 0"),
    (["--gpu", "L4", "--price-per-hour", "L4=nan"], "must be a number > 0"),
    (["--gpu", "L4", "--price-per-hour", "L40S=1"], "L40S is not among --gpu L4"),
    (["--gpu", "L4", "--price-per-hour", "L5=1"], "unknown GPU 'L5'"),
    (["--price-per-hour", "L4=1"], "--price-per-hour is for the cost estimate: give --gpu too"),
    (["--gpu", "L4", "--calibration", "/no/such.json"], "calibration /no/such.json: cannot read it"),
])
def test_bad_gpus_and_prices_are_refused(argv, message, reviews, tmp_path, capsys):
    src, _ = reviews
    assert main(["plan", "generate", "--input", src, "--output", str(tmp_path / "o"), "--model",
                 tiny_model("causal"), *argv]) == 2
    assert message in capsys.readouterr().err


def test_parsing_keeps_order_and_names():
    assert parse_gpus("l4, L40S,L4") == ["L4", "L40S"]
    assert parse_prices("L4=0.8, H100-80GB=4.5", ["L4", "H100-80GB"]) == {"L4": 0.8, "H100-80GB": 4.5}


def bench_file(path, device="NVIDIA H100 80GB HBM3", steps=((1, 1.0), (64, 2.0))) -> str:
    """A gpu_bench.json as bench/gpu_bench.py writes it (4 layers of Persimmon-8B's widths)."""
    cfg = PersimmonConfig(num_hidden_layers=4)
    with open(path, "w") as f:
        json.dump({"device": device, "dtype": "bfloat16", "layers": 4, "params_b": round(capacity.param_count(cfg) / 1e9, 3),
                   "prompt_len": [32, 256], "results": [{"batch": b, "decode_step_ms": ms} for b, ms in steps]}, f)
    return str(path)


def test_calibration_scales_decode_by_measured_over_roofline(tmp_path):
    """The benchmark's step times its 4 layers (no embedding, no head) for `batch` rows of 256
    tokens of context; on an H100 at 3.35 TB/s that is memory-bound."""
    path = bench_file(tmp_path / "h100.json")
    cal = roofline.read_calibration(path)
    C, I, D = 4096, 16384, 64
    layer = 2 * C + 3 * C * C + 3 * C + 4 * D + C * C + C + 2 * C + C * I + I + I * C + C  # PERSIMMON.md's layer
    weights = (4 * layer + 2 * C) * 2  # 4 layers and the final norm, bf16
    kv_4_layers = 4 * 2 * C * 2
    roof64 = (weights + 64 * 256 * kv_4_layers) / 3.35e12
    assert cal.gpu == "H100-80GB" and cal.factor(50) == (pytest.approx(roof64 / 2e-3), 64)
    assert cal.factor(2)[1] == 1

    config = PipelineConfig(task="generate", input="in", output="out", model="m", max_new_tokens=100,
                            num_gpus_per_replica=1, max_num_seqs=64)
    prompts = measured(1000, 300_000)
    plain, = estimate(config, PersimmonConfig(), "causal", prompts, 1000, ["H100-80GB"])["gpus"]
    scaled, = estimate(config, PersimmonConfig(), "causal", prompts, 1000, ["H100-80GB"],
                       calibrated={"H100-80GB": cal})["gpus"]
    factor = roof64 / 2e-3
    assert scaled["calibration"]["factor"] == pytest.approx(factor) and scaled["calibration"]["source"] == path
    assert scaled["decode_hours"] == pytest.approx(plain["decode_hours"] / factor)
    assert scaled["prefill_hours"] == plain["prefill_hours"]


def test_a_calibration_file_that_cannot_be_used_says_why(tmp_path, reviews, capsys):
    with pytest.raises(ValueError, match="device 'NVIDIA H100 PCIe' is none of"):
        roofline.read_calibration(bench_file(tmp_path / "pcie.json", device="NVIDIA H100 PCIe"))
    (tmp_path / "old.json").write_text(json.dumps({"device": "NVIDIA L4", "results": []}))
    with pytest.raises(ValueError, match="no dtype, layers, params_b, prompt_len"):
        roofline.read_calibration(str(tmp_path / "old.json"))
    src, _ = reviews
    path = bench_file(tmp_path / "l4.json", device="NVIDIA L4")
    assert main(["plan", "generate", "--input", src, "--output", str(tmp_path / "o"), "--model", tiny_model("causal"),
                 "--gpu", "L4,L40S", "--calibration", path]) == 0
    text = capsys.readouterr().out
    assert f"L4 decode calibrated by {path}: measured NVIDIA L4" in text
    assert "L40S decode calibrated" not in text


def test_the_h100_decode_floor_is_persimmons():
    step = roofline.decode_step(PersimmonConfig(), capacity.GPUS["H100-80GB"], rows=1, context=0)
    assert math.isclose(step.seconds * 1e3, 5.0, abs_tol=0.05)  # PERSIMMON.md: ~5 ms from reading the weights


@pytest.mark.parametrize("edit,message", [
    (lambda b: 5, "a JSON int, not an object"),
    (lambda b: None, "a JSON NoneType, not an object"),
    (lambda b: {**b, "device": None}, "device must be a CUDA device name"),
    (lambda b: {**b, "dtype": "float64"}, "dtype must be float32, bfloat16 or float16"),
    (lambda b: {**b, "layers": "4"}, "layers must be a positive integer"),
    (lambda b: {**b, "prompt_len": 256}, "prompt_len must be [shortest, longest]"),
    (lambda b: {**b, "results": {"a": 1}}, "results must be a list"),
    (lambda b: {**b, "results": [1]}, "results[0] must be an object"),
    (lambda b: {**b, "results": [{"decode_step_ms": 1.0}]}, "results[0].batch must be a positive integer"),
    (lambda b: {**b, "results": [{"batch": 0, "decode_step_ms": 1.0}]}, "results[0].batch must be a positive"),
    (lambda b: {**b, "results": [{"batch": "8", "decode_step_ms": 1.0}]}, "results[0].batch must be a positive"),
    (lambda b: {**b, "results": [{"batch": 8, "decode_step_ms": -1.0}]}, "decode_step_ms must be a number > 0"),
    (lambda b: {**b, "results": [{"batch": 8, "decode_step_ms": float("nan")}]}, "decode_step_ms must be a number"),
    (lambda b: {**b, "results": [{"batch": 8, "decode_step_ms": "1.0"}]}, "decode_step_ms must be a number > 0"),
])
def test_a_malformed_calibration_file_is_refused_naming_it_and_the_field(tmp_path, edit, message):
    """A hand-edited or truncated gpu_bench.json: a ValueError naming the file and the field,
    not a TypeError traceback, a 'math domain error' or a negative / NaN decode time."""
    path = bench_file(tmp_path / "l4.json", device="NVIDIA L4")
    with open(path) as f:
        bench = json.load(f)
    with open(path, "w") as f:
        json.dump(edit(bench), f)
    with pytest.raises(ValueError, match=f"calibration {path}: ") as info:
        roofline.read_calibration(path)
    assert message in str(info.value)
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match="bin.json: cannot read it as JSON"):
        roofline.read_calibration(str(tmp_path / "bin.json"))


def test_a_calibration_that_would_calibrate_nothing_or_twice_is_refused(tmp_path, reviews, capsys):
    """--calibration for a GPU that is not among --gpu was silently unused, and of two files for
    one GPU the last silently won; a GPU priced twice likewise."""
    src, _ = reviews
    h100, l4 = bench_file(tmp_path / "h100.json"), bench_file(tmp_path / "l4.json", device="NVIDIA L4")
    l4b = bench_file(tmp_path / "l4b.json", device="NVIDIA L4")
    base = ["plan", "generate", "--input", src, "--output", str(tmp_path / "o"), "--model", tiny_model("causal")]
    assert main([*base, "--gpu", "L4,L40S", "--calibration", h100]) == 2
    assert f"{h100} measured NVIDIA H100 80GB HBM3 (H100-80GB), which is not among --gpu L4,L40S" in capsys.readouterr().err
    assert main([*base, "--gpu", "L4", "--calibration", l4, "--calibration", l4b]) == 2
    assert f"{l4} and {l4b} are both for L4" in capsys.readouterr().err
    assert main([*base, "--gpu", "L4", "--price-per-hour", "L4=1,l4=2"]) == 2
    assert "L4 is priced twice (1 and 2)" in capsys.readouterr().err


def test_score_runs_the_head_on_every_scored_token_and_rolling_windows_read_tokens_again():
    """Scoring computes log-probabilities at every position (model/scoring.py), so the 262k-vocab
    head runs on each scored token, not on one per row plus one 'scored token' (12% of the
    FLOPs undercounted); generate with --prompt-logprobs likewise. A text over max_seq_len is
    scored in rolling windows of W tokens, each after the first reading W tokens to score
    `stride` new ones, not counted at the limit's tokens."""
    rows, tokens = 1000, 300_000
    config = PipelineConfig(task="score", input="in", output="out", model="m", num_gpus_per_replica=1)
    est = estimate(config, PersimmonConfig(), "causal", measured(rows, tokens), rows, ["H100-80GB"])
    g, = est["gpus"]
    assert g["roofline"]["prefill_flops"] == 2 * BODY * tokens + 2 * VC * tokens  # the head on n - 1 + the last
    assert est["scored_tokens_per_row"] == 0 and est["new_tokens_per_row"] == 0
    assert est["output_tokens"] == tokens - rows  # the tokens scored: all but each row's first (BOS)

    gen = PipelineConfig(task="generate", input="in", output="out", model="m", num_gpus_per_replica=1,
                         max_new_tokens=10, prompt_logprobs=True)
    g, = estimate(gen, PersimmonConfig(), "causal", measured(rows, tokens), rows, ["H100-80GB"])["gpus"]
    assert g["roofline"]["prefill_flops"] == 2 * BODY * tokens + 2 * VC * tokens

    # 10 rows of 100 tokens and 2 of 3000 over max_seq_len 1000: windows of 1000 tokens, stride 500
    long = {**measured(12, 10 * 100 + 2 * 3000), "rows_over_limit_read": 2, "tokens_over_limit_read": 6000,
            "limit": {"name": "max_seq_len", "tokens": 1000, "over": "scored in rolling windows"}}
    rolling = PipelineConfig(task="score", input="in", output="out", model="m", num_gpus_per_replica=1,
                             max_seq_len=1000)
    est = estimate(rolling, PersimmonConfig(), "causal", long, 12, ["H100-80GB"])
    read = 10 * 100 + 2 * (1000 + (3000 - 1000) * 1000 // 500)  # each token past the first window read twice
    assert est["prompt_tokens"] == read
    assert est["gpus"][0]["roofline"]["prefill_flops"] == 2 * BODY * read + 2 * VC * (10 * 100 + 2 * 3000)


def test_plan_counts_the_texts_a_score_job_reads_in_rolling_windows(reviews, tmp_path, capsys):
    """ScoreStage.prompt_tokens never flagged a text over max_seq_len when rolling windows score
    it, so plan said '0 row(s)' over the limit and the estimate never saw the windows."""
    src, _ = reviews
    argv = ["plan", "score", "--input", src, "--output", str(tmp_path / "o"), "--model", tiny_model("causal"),
            "--max-seq-len", "8", "--gpu", "L4", "--json"]
    assert main(argv) == 0
    plan = json.loads(capsys.readouterr().out)
    stats, est = plan["prompt_tokens"], plan["estimate"]
    assert stats["limit"]["over"] == "scored in rolling windows" and stats["rows_over_limit"] > 0
    assert est["prompt_tokens"] > stats["tokens_measured"]  # windows read tokens again
    assert est["output_tokens"] == stats["tokens_measured"] - est["rows"]  # each token scored once
