"""Weight quantization (model/quantization.py): our int8 linear against torchao's, a quantized
model against the unquantized one, loading, the engine, the pipeline flag, and the errors."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from conftest import LIVELY, prompts_of, random_model
from pipeline_fixtures import PROMPTS, tiny_model, write_shards
from tolerances import accumulation_tol, unit_roundoff

from model import Engine, PersimmonConfig, PersimmonForCausalLM, SamplingParams, capacity, load_pretrained
from model import quantization as quant
from model.quantization import Float8Linear, Int8Linear, QuantizedLinear, quantization_of, quantize_model

pytest.importorskip("torchao", reason="int8 quantizes through torchao (the quant extra)")

LAYER_LINEARS = ("self_attn.query_key_value", "self_attn.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")


def torchao_linear(linear: torch.nn.Linear) -> torch.nn.Linear:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    ref = copy.deepcopy(linear)
    quantize_(ref, Int8WeightOnlyConfig(set_inductor_config=False))
    return ref


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 8, 9, 64])
@pytest.mark.parametrize("in_features,misaligned", [(1024, False), (1024, True), (1000, False)])
def test_int8_linear_matches_torchao(dtype, rows, in_features, misaligned, monkeypatch):
    """Same int8 weights and scales as torchao's Int8WeightOnlyConfig, and the same outputs: on
    the int8-matmul path (CPU, bf16, <= INT8_ROWS rows, in_features a multiple of 16; an
    activation not 32-byte aligned is copied first, as the kernel's aligned loads need) and on
    the sliced-dequantize path (everything else).

    Tolerance: both accumulate an output's products in fp32. torchao then stores x.W in bf16,
    x.W*s in bf16 and adds the bias in bf16; the int8 matmul stores x.W*s once, then adds the
    bias: at most 3 roundings of |x.W*s| and 2 of |y| apart, u = 2^-9 each (plus fp32
    accumulation order). fp32 runs the same operations as torchao, in slices."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(in_features, 700).to(dtype)
    with torch.no_grad():
        linear.bias.normal_()
    ours, ref = Int8Linear.from_weights(linear.weight, linear.bias), torchao_linear(linear)
    assert ours.weight.dtype == torch.int8 and torch.equal(ours.weight, ref.weight.qdata)
    assert torch.equal(ours.scale, ref.weight.scale.reshape(-1).to(dtype))  # torchao multiplies by it in dtype
    monkeypatch.setitem(quant.SLICE_BYTES, "cpu", 100 * in_features * dtype.itemsize)  # 7 slices of 100 rows
    calls = []
    int8_mm = torch._weight_int8pack_mm
    monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda x, *a: calls.append(x.data_ptr() % 32) or int8_mm(x, *a))
    x = torch.randn(rows * in_features + 8, dtype=dtype)[8 if misaligned else 0:][:rows * in_features]
    x = x.view(rows, in_features)  # misaligned: starts 8 values (16 or 32 bytes) into its storage
    with torch.inference_mode():
        got, want = ours(x[None])[0], ref(x)
        scaled = (want.float() - linear.bias.float()).abs()  # |x.W*s|
    assert calls == ([0] if dtype == torch.bfloat16 and rows <= quant.INT8_ROWS and in_features % 16 == 0 else [])
    u = unit_roundoff(dtype) if dtype != torch.float32 else 0.0
    tol = 3 * u * scaled + 2 * u * want.float().abs() + accumulation_tol(torch.float32, in_features,
                                                                          scaled.max().item())
    assert ((got.float() - want.float()).abs() <= tol).all(), (got.float() - want.float()).abs().max()


def test_fp8_linear_numerics_on_cpu():
    """The fp8 layer's arithmetic runs on CPU too (only the device check needs a GPU): weights
    within e4m3's rounding of the originals (3 mantissa bits: relative error <= 2^-4 for
    normal numbers), outputs equal to x.(q*s)^T + b, and a model cast leaves the bytes alone."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(512, 300)
    layer = Float8Linear.from_weights(linear.weight, linear.bias)
    assert layer.weight.dtype == torch.uint8 and layer.scale.dtype == torch.float32
    deq = layer.weight_8bit().float() * layer.scale[:, None]
    w = linear.weight.detach()
    normal = w.abs() >= layer.scale[:, None] * 2.0 ** -6  # e4m3's smallest normal, scaled
    assert ((deq - w).abs() <= 2.0 ** -4 * (1 + 2.0 ** -20) * w.abs())[normal].all()  # and fp32's w / s
    assert ((deq - w).abs() <= layer.scale[:, None] * 2.0 ** -10).where(~normal, True).all()  # subnormal spacing 2^-9
    assert (deq.abs().amax(1) - w.abs().amax(1)).abs().max() <= 1e-6  # each row's largest maps to 448 exactly
    x = torch.randn(5, 512)
    with torch.inference_mode():
        assert torch.allclose(layer(x), x @ deq.t() + linear.bias, rtol=1e-5, atol=1e-5)
    layer.to(torch.bfloat16)
    assert layer.weight.dtype == torch.uint8



def test_int8_linear_runs_outside_inference_mode_after_an_engine_call():
    """The CPU scratch the dequantizing path reuses must not be an inference tensor: one made
    under the engine's inference_mode cannot be written in a plain or no_grad forward (a user's
    own model(ids) after engine.generate raised 'Inplace update to inference tensor')."""
    linear = torch.nn.Linear(64, 48)
    layer = Int8Linear.from_weights(linear.weight, linear.bias)
    x = torch.randn(3, 64)
    with torch.inference_mode():
        want = layer(x)
    with torch.no_grad():
        assert torch.equal(layer(x), want)
    assert torch.equal(layer(x), want)



@pytest.mark.parametrize("layer_class", [Int8Linear, Float8Linear])
def test_float16_outputs_do_not_overflow_before_the_scale(layer_class):
    """In float16 the unscaled x.q^T is about 127 / max|w| (int8; fp8: 448 / max|w|) times
    the output: a linear whose fp16 output is ~60 passed fp16's 65504 before the scale was
    applied and came out inf. The scale goes into each dequantized slice instead."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(4096, 256)
    with torch.no_grad():
        linear.weight.normal_(0, 0.02)
    linear = linear.half()
    layer = layer_class.from_weights(linear.weight, linear.bias)
    x = (torch.randn(3, 4096) * 15).half()
    with torch.inference_mode():
        want, got = linear(x), layer(x)
    assert want.isfinite().all() and want.abs().max() < 1000
    deq = layer.weight_8bit().float() * layer.scale.float()[:, None]
    exact = x.float() @ deq.t() + linear.bias.float()
    assert got.isfinite().all()
    assert ((got.float() - exact).abs() <= 1e-2 * exact.abs().max()).all()


def top1_agreement_and_error(model, reference, prompts) -> tuple[float, float]:
    """(share of positions whose argmax agrees, |logit difference| / |logits|, as RMS)."""
    ids = torch.tensor(prompts)
    with torch.inference_mode():
        got, want = model(ids).logits.float(), reference(ids).logits.float()
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    return agree, ((got - want).norm() / want.norm()).item()


@pytest.mark.parametrize("quantization,lowest_agreement,largest_error", [("int8", 0.93, 0.03), ("fp8", 0.8, 0.12)])
def test_quantized_tiny_model_stays_close(lm, quantization, lowest_agreement, largest_error, monkeypatch):
    """Top-1 agreement and RMS logit error of the quantized model on 4 x 48 positions.

    Weights: int8 rounds each weight to a step s = max|row| / 127.5, uniformly within half a
    step, so the RMS error is s / sqrt(12) (checked here: 0.6% of the weights' RMS); e4m3 keeps
    3 mantissa bits, 2.5% RMS. The lively tiny model (init std 0.3, hidden 64, relu^2, sharp
    attention) amplifies a weight error about 3x into its logits (measured over 3 seeds: int8
    1.8-2.0% RMS and 96-97% top-1 agreement, fp8 7.5-8% and 85-90%); the bounds leave 1.5x
    room in error and a few points in agreement. fp8 runs here on CPU with the GPU check
    bypassed: its arithmetic is the same on any device."""
    monkeypatch.setattr(quant, "check_supported", lambda *a: None)
    model = quantize_model(copy.deepcopy(lm), quantization)
    assert quantization_of(model) == (quantization, False)
    if quantization == "int8":
        layer, w = model.model.layers[0].mlp.dense_h_to_4h, lm.model.layers[0].mlp.dense_h_to_4h.weight
        error = (layer.weight.float() * layer.scale[:, None] - w.detach()).pow(2).mean().sqrt().item()
        assert error == pytest.approx(layer.scale.pow(2).mean().div(12).sqrt().item(), rel=0.1)
    agree, error = top1_agreement_and_error(model, lm, prompts_of([48] * 4))
    assert agree >= lowest_agreement and 1e-3 < error <= largest_error, (agree, error)



def test_engine_in_the_models_own_dtype_leaves_fp8_scales_in_float32(monkeypatch):
    """Engine(model, dtype=<the dtype it was loaded in>) is allowed on a quantized model and
    must change nothing: it cast the model, which turned fp8's float32 scales into bf16 (and
    the weights no longer took the bytes capacity sized the KV pool with)."""
    monkeypatch.setattr(quant, "check_supported", lambda *a: None)
    model = quantize_model(random_model(PersimmonForCausalLM, PersimmonConfig.tiny()).to(torch.bfloat16), "fp8")
    scale = model.model.layers[0].mlp.dense_h_to_4h.scale.clone()
    Engine(model, None, dtype="bfloat16", max_batch_size=2, kv_cache_gib=0.01)
    layer = model.model.layers[0].mlp.dense_h_to_4h
    assert layer.scale.dtype == torch.float32 and torch.equal(layer.scale, scale)


def naive_greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    """Full forward per token, no cache: the reference for cached decoding."""
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(new_tokens):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_int8_greedy_generation_through_the_engine(lm):
    """The engine's cached, packed-CPU decode on an int8 model gives the tokens of the same int8
    model run naively (full forward per token, fp32: same arithmetic up to accumulation order),
    and the non-quantized linears (lm_head) are still oneDNN-packed where this CPU packs."""
    from model.cpu_packing import cpu_packing_unsupported

    model = quantize_model(copy.deepcopy(lm), "int8")
    prompts = prompts_of([5, 17, 9])
    want = [naive_greedy(model, p, 12) for p in prompts]
    engine = Engine(model, None, max_batch_size=3, max_seq_len=64)
    got = engine.generate(prompts, SamplingParams(max_new_tokens=12, ignore_eos=True))
    assert [c.token_ids for c in got] == want
    assert all(isinstance(m, Int8Linear) for n, m in model.named_modules() if n.endswith(LAYER_LINEARS))
    assert engine.stats()["packed_cpu_linears"] == (cpu_packing_unsupported(torch.float32) is None)
    assert ("_packed_weight" in model.lm_head.__dict__) == engine.stats()["packed_cpu_linears"]
    with pytest.raises(ValueError, match="quantized \\(int8\\).*load it in torch.bfloat16"):
        Engine(model, None, max_batch_size=3, max_seq_len=64, dtype="bfloat16")


@pytest.fixture(scope="module")
def causal_dir():
    return tiny_model("causal")


@pytest.mark.parametrize("quantize_lm_head", [False, True])
def test_load_quantizes_the_layer_linears_and_the_lm_head_only_when_asked(causal_dir, quantize_lm_head):
    """Quantized while streaming = quantized after a plain load, byte for byte; the embedding
    stays in the dtype, the lm_head too unless asked; the parameters take exactly the bytes
    capacity.weights_bytes counts (what the model runner sizes the KV pool with)."""
    model = load_pretrained(causal_dir, dtype="bfloat16", quantization="int8", quantize_lm_head=quantize_lm_head)
    plain = quantize_model(load_pretrained(causal_dir, dtype="bfloat16"), "int8", quantize_lm_head)
    assert [(n, p.dtype) for n, p in model.named_parameters()] == [(n, p.dtype) for n, p in plain.named_parameters()]
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), plain.parameters()))
    quantized = {n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    layers = {f"model.layers.{i}.{leaf}" for i in range(model.config.num_hidden_layers) for leaf in LAYER_LINEARS}
    assert quantized == layers | ({"lm_head"} if quantize_lm_head else set())
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert isinstance(model.lm_head, Int8Linear if quantize_lm_head else torch.nn.Linear)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    assert size == capacity.weights_bytes(model.config, "bfloat16", "causal", "int8", quantize_lm_head)
    assert size < capacity.weights_bytes(model.config, "bfloat16")


def test_a_classifier_keeps_its_score_head():
    clf = load_pretrained(tiny_model("sequence_classification"), dtype="float32", quantization="int8",
                          quantize_lm_head=True)
    assert isinstance(clf.score, torch.nn.Linear) and isinstance(clf.model.layers[0].mlp.dense_h_to_4h, Int8Linear)
    size = sum(p.numel() * p.element_size() for p in clf.parameters())
    assert size == capacity.weights_bytes(clf.config, "float32", "sequence_classification", "int8")


def test_fp8_weights_bytes_match_capacity(monkeypatch):
    monkeypatch.setattr(quant, "check_supported", lambda *a: None)
    model = quantize_model(random_model(PersimmonForCausalLM, PersimmonConfig.tiny()).to(torch.bfloat16), "fp8", True)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    assert size == capacity.weights_bytes(model.config, "bfloat16", "causal", "fp8", True)



def test_saving_a_quantized_model_is_refused(causal_dir, tmp_path):
    """save_pretrained writes checkpoints 'that both this package and transformers load': a
    quantized model's int8 weights and scales are neither (transformers would read the int8
    values into bf16 weights as they are, 100x too large), so it says so and writes nothing."""
    from model.checkpoint import save_pretrained

    model = load_pretrained(causal_dir, dtype="bfloat16", quantization="int8")
    with pytest.raises(ValueError, match=r"quantized \(int8\).*save the unquantized model"):
        save_pretrained(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_fp8_off_a_recent_gpu_is_a_clear_error_before_any_weight_is_read(causal_dir, monkeypatch):
    import model.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "iter_tensors", lambda files: pytest.fail("read weights before refusing"))
    with pytest.raises(ValueError, match=r"fp8.*compute capability 8\.9\+.*on cpu: use quantization='int8'"):
        Engine.from_pretrained(causal_dir, device="cpu", quantization="fp8")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(ValueError, match=r"NVIDIA A100-SXM4-80GB has compute capability 8\.0: use quantization='int8'"):
        quant.check_supported("fp8", "cuda")


def test_missing_torchao_is_a_clear_error(causal_dir, monkeypatch):
    for name in ("torchao", "torchao.quantization"):  # importing them now raises ImportError
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r"int8.*needs torchao.*pip install 'persimmon-batch\[quant\]'"):
        Engine.from_pretrained(causal_dir, device="cpu", quantization="int8")



def test_a_torchao_without_int8tensor_is_named_too_old_not_missing(causal_dir, monkeypatch):
    """pip may keep a torchao older than 0.15 (no Int8Tensor): the error says which version it
    found and that it is too old, not that torchao is not installed."""
    import types

    import torchao

    monkeypatch.setitem(sys.modules, "torchao.quantization", types.ModuleType("torchao.quantization"))
    monkeypatch.setattr(torchao, "__version__", "0.14.1", raising=False)
    with pytest.raises(ImportError, match=r"int8.*needs torchao >= 0\.15; this is torchao 0\.14\.1"):
        Engine.from_pretrained(causal_dir, device="cpu", quantization="int8")


def test_bad_quantization_settings_are_refused(causal_dir):
    with pytest.raises(ValueError, match="unknown quantization 'int4'"):
        load_pretrained(causal_dir, quantization="int4")
    with pytest.raises(ValueError, match="quantize_lm_head=True needs quantization"):
        load_pretrained(causal_dir, quantize_lm_head=True)


def test_pipeline_generate_with_quantization_int8(causal_dir):
    """--quantization int8 reaches the engine the stage loads (pipeline/stages.load_engine),
    which completes the prompts as an int8 engine built directly does."""
    from pipeline import GenerateStage
    from pipeline.cli import build_parser, config_from_args

    args = ["generate", "--input", "in", "--output", "out", "--model", causal_dir, "--max-new-tokens", "6",
            "--quantization", "int8", "--dtype", "float32", "--device", "cpu", "--max-num-seqs", "4"]
    config = config_from_args(build_parser().parse_args(args))
    assert (config.quantization, config.quantize_lm_head) == ("int8", False)
    stage = GenerateStage(config)
    assert quantization_of(stage.engine.model) == ("int8", False)
    rows = stage({"id": list(range(4)), "prompt": PROMPTS[:4]}).to_pylist()
    direct = Engine.from_pretrained(causal_dir, dtype="float32", device="cpu", quantization="int8", max_batch_size=4)
    want = direct.generate(PROMPTS[:4], SamplingParams(**config.sampling()))  # greedy: seeds change nothing
    assert [r["completion"] for r in rows] == [c.text for c in want]
    assert all(r["error"] is None for r in rows)


def test_a_rerun_with_another_quantization_is_refused(tmp_path):
    """Quantization changes every row's result: a rerun into the same output with another
    --quantization or --quantize-lm-head is refused by name (recomputed with --overwrite)."""
    import dataclasses

    from pipeline import ConfigError, PipelineConfig
    from pipeline.plan import make_plan
    from pipeline.unit_runner import UnitRunner
    from test_pipeline_stages import FakeEngine

    write_shards(str(tmp_path / "in"), shards=1, rows=3)
    base = PipelineConfig(task="generate", input=str(tmp_path / "in"), output=str(tmp_path / "out"), model="m",
                          max_new_tokens=4, quantization="int8").validate()
    plan = make_plan(base)
    assert UnitRunner(base, plan.schema, engine=FakeEngine()).run_unit(plan.units[0])["status"] == "done"
    assert len(make_plan(base).done) == 1
    for change in (dict(quantization="none"), dict(quantize_lm_head=True)):
        name = next(iter(change))
        with pytest.raises(ConfigError, match=f"different settings: {name}="):
            make_plan(dataclasses.replace(base, **change).validate())
    redo = make_plan(dataclasses.replace(base, quantization="none", resume=False, overwrite=True).validate())
    assert not redo.done and len(redo.todo) == 1


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("quantization", ["int8", "fp8"])
def test_quantized_engine_on_gpu_with_cuda_graphs(quantization):
    """int8 / fp8 linears on CUDA, decode replayed from CUDA graphs: same tokens as eager."""
    if quantization == "fp8" and torch.cuda.get_device_capability() < quant.FP8_MIN_CAPABILITY:
        pytest.skip("fp8 needs compute capability 8.9+")
    model = random_model(PersimmonForCausalLM, PersimmonConfig.tiny(**LIVELY)).to("cuda", torch.bfloat16)
    model = quantize_model(model, quantization)
    prompts = prompts_of([5, 31, 2, 17, 9])
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    eager = Engine(model, None, max_batch_size=3, max_seq_len=128, decode_mode="dynamic").generate(prompts, params)
    graphed_engine = Engine(model, None, max_batch_size=3, max_seq_len=128, decode_mode="cuda_graph")
    graphed = graphed_engine.generate(prompts, params)
    assert graphed_engine.runner._graphs
    assert sum(a.token_ids == b.token_ids for a, b in zip(eager, graphed)) >= 4
