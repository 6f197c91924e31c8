"""What can be checked on the driver is, before Ray starts, with exit 2 and one line naming the
fix (issue 20): a prompt template a text cannot fill, a regex no text matches, a tokenizer that
does not load, a KV pool too small for one full-length row, a YAML file that does not parse.
And what only the engine sees is a row's error of the right kind: a row's own json_schema
that cannot be compiled is `invalid_sampling`, a constraint no text satisfies a
`grammar_error`, never an empty "stop" completion."""

from __future__ import annotations

import os
import shutil

import pytest
from pipeline_fixtures import error_of, tiny_model, write_shards

from model import Engine, SamplingParams
from model.structured import check_grammar
from pipeline import GenerateStage, PipelineConfig
from pipeline.cli import main

UNSATISFIABLE = r"[a&&b]"  # an empty character class: it compiles, but no text matches it


@pytest.fixture
def no_ray():
    import ray

    assert not ray.is_initialized(), "a previous test module left Ray running"
    yield
    assert not ray.is_initialized(), "Ray was started for a run that should have failed on the driver"


def _fails_on_the_driver(tmp_path, capsys, *flags, model=None) -> str:
    """Run the CLI; it must exit 2 with one line on stderr, write no output and start no Ray."""
    inputs = tmp_path / "in"
    if not inputs.exists():
        write_shards(str(inputs), shards=1, rows=2)
    code = main(["generate", "--input", str(inputs), "--output", str(tmp_path / "out"),
                 "--model", model or tiny_model("causal"), "--quiet", *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")
    return err


def test_a_prompt_template_a_text_cannot_fill_fails_the_config_check(tmp_path, capsys, no_ray):
    err = _fails_on_the_driver(tmp_path, capsys, "--prompt-template", "{prompt:d}")
    assert err == ("persimmon-batch: error: prompt_template: '{prompt:d}' cannot be filled with a text prompt "
                   "(Unknown format code 'd' for object of type 'str'); write {prompt} without a format spec")
    PipelineConfig(input="i", output="o", model="m", prompt_template="[{prompt:>8}]").validate()  # str specs are fine


def test_a_regex_no_text_matches_fails_on_the_driver(tmp_path, capsys, no_ray):
    assert check_grammar(regex=UNSATISFIABLE).startswith("no text matches it")
    assert check_grammar(regex=r"[^\s\S]").startswith("no text matches it")
    assert check_grammar(regex=r"a{0}") == "" and check_grammar(regex=r"\d{3}") == ""  # "" and "123" match
    err = _fails_on_the_driver(tmp_path, capsys, "--regex", UNSATISFIABLE)
    assert err.startswith("persimmon-batch: error: regex: no text matches it")


def test_a_constraint_no_text_satisfies_is_a_row_error_not_an_empty_stop():
    """The engine's own guard, for constraints that reach it (the Python API, a row's schema):
    the first mask allows only EOS, which used to end the row "stop" with '' that does not
    match; now it is that row's grammar_error, and its neighbour runs."""
    engine = Engine.from_pretrained(tiny_model("causal"), device="cpu")
    bad, good = engine.generate(["hello", "hello"], [SamplingParams(max_new_tokens=6, regex=UNSATISFIABLE),
                                                     SamplingParams(max_new_tokens=6, regex=r"[ab]{3}")])
    assert (bad.finish_reason, bad.error_kind, bad.text) == ("error", "grammar_error", "")
    assert "\n" not in bad.error and "no text can continue the constraint" in bad.error
    assert good.finish_reason == "stop" and len(good.text) == 3 and set(good.text) <= {"a", "b"}


def test_a_rows_own_json_schema_that_cannot_compile_is_invalid_sampling():
    """A per-row json_schema is a setting of that row: its compile error is `invalid_sampling`
    (it was reported as `invalid_prompt`, blaming the prompt)."""
    config = PipelineConfig(task="generate", input="-", output="-", model=tiny_model("causal"), max_new_tokens=4)
    stage = GenerateStage(config, engine=Engine.from_pretrained(tiny_model("causal"), device="cpu"))
    out = stage({"id": [1, 2], "prompt": ["a", "b"],
                 "json_schema": ['{"type": "string", "minLength": 3, "maxLength": 1}', None]}).to_pylist()
    assert str(error_of(out[0])).startswith("invalid_sampling: invalid grammar: Unsatisfiable schema: minLength (3)")
    assert out[1]["error"] is None and out[1]["finish_reason"] in ("stop", "length")


def test_a_tokenizer_that_does_not_load_fails_on_the_driver(tmp_path, capsys, no_ray):
    model = tmp_path / "model"
    shutil.copytree(tiny_model("causal"), model)
    data = (model / "tokenizer.model").read_bytes()
    (model / "tokenizer.model").write_bytes(data[: len(data) // 3])  # a cut download
    err = _fails_on_the_driver(tmp_path, capsys, model=str(model))
    assert "its tokenizer cannot be used" in err and "put the model's own tokenizer.model" in err


def test_a_kv_pool_below_one_full_length_row_fails_on_the_driver(tmp_path, capsys, no_ray):
    """The tiny model in float32: 1 KiB of KV per token, max_seq_len 512 = 32 blocks of 16, plus
    the runner's 2 reserved blocks: 34 KiB. 12 blocks hold 160 tokens: not one full row."""
    twelve_blocks = 12 * 16 * 1024 / 2**30
    err = _fails_on_the_driver(tmp_path, capsys, "--kv-cache-gib", repr(twelve_blocks))
    assert err.endswith("holds 160 tokens (1 KiB a token in float32), fewer than one row of max_seq_len=512: "
                        "use --kv-cache-gib 0.001 or more, or --max-seq-len 160 or less")
    err = _fails_on_the_driver(tmp_path, capsys, "--kv-cache-gib", "1e-9")  # below the runner's minimum
    assert "holds 0 tokens" in err and "--max-seq-len" not in err
    from pipeline.modelcheck import check_model

    check_model(PipelineConfig(input="-", output="-", model=tiny_model("causal"), kv_cache_gib=twelve_blocks,
                               max_seq_len=160))  # 160 tokens fit exactly: fine
    check_model(PipelineConfig(task="generate", input="-", output="-", model=tiny_model("causal"),
                               kv_cache_gib=34 * 16 * 1024 / 2**30))


def test_an_output_under_a_file_fails_at_once_in_one_line(tmp_path, capsys, no_ray):
    """--output a/b where a is a file: NotADirectoryError was taken for a transient storage
    error, retried 3 times with backoff (about 4 s, a warning line each) before the same error."""
    import time

    write_shards(str(tmp_path / "in"), shards=1, rows=2)
    (tmp_path / "afile").write_text("not a directory")
    t0 = time.monotonic()
    code = main(["generate", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "afile" / "out"),
                 "--model", tiny_model("causal"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Not a directory" in err, err
    assert time.monotonic() - t0 < 3 and "gave up after" not in err, err


@pytest.mark.parametrize("text, where", [("input: in\n\tmodel: m\n", "line 2 column 1"),
                                         ("input: [a, b\nmodel: m\n", "line 2 column")])
def test_a_yaml_syntax_error_is_one_line_with_its_place(tmp_path, capsys, no_ray, text, where):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    assert main(["generate", "--config", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{path} {where}" in err and "not valid YAML" in err, err


@pytest.mark.parametrize("text, where", [("input: in\noutput: out\ninput: other\n", "line 3 column 1"),
                                         ("input: in\nstop: {a: 1, a: 2}\n", "line 2 column 14")])
def test_a_yaml_key_given_twice_is_refused_not_silently_the_last(tmp_path, capsys, no_ray, text, where):
    """PyYAML keeps the last of two equal keys: `input:` twice would run on the second input."""
    path = tmp_path / "job.yaml"
    path.write_text(text)
    assert main(["generate", "--config", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{path} {where}" in err and "appears twice" in err, err


@pytest.mark.parametrize("text, err_has", [
    ("max-new-tokens: 3\nmax_new_tokens: 4\n", "max_new_tokens: given twice, as max-new-tokens and max_new_tokens"),
    ("1: 2\n", "got int 1"), ("on: 3\n", "got bool True"), ("null: 3\n", "got NoneType None")])
def test_a_yaml_key_spelled_twice_or_not_a_name_is_one_line(tmp_path, capsys, no_ray, text, err_has):
    """`max-new-tokens:` and `max_new_tokens:` are one setting: the last silently won. A key YAML
    reads as a number, bool or null (`on:`) was a traceback (AttributeError on .replace)."""
    path = tmp_path / "job.yaml"
    path.write_text(text)
    assert main(["generate", "--config", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and err_has in err, err


@pytest.mark.parametrize("argv", [["plan", "--config", "{missing}"], ["plan", "generate", "--config", "{missing}"],
                                  ["generate", "--config", "{missing}"], ["generate", "--config", "{binary}"]])
def test_a_config_file_that_cannot_be_read_is_one_line(tmp_path, capsys, no_ray, argv):
    """`plan --config missing.yaml` raised FileNotFoundError with a traceback; a file that is not UTF-8
    gave a message without the file's name."""
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe input: x")
    paths = {"missing": str(tmp_path / "missing.yaml"), "binary": str(tmp_path / "binary.yaml")}
    argv = [a.format(**paths) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and argv[-1] in err, err


@pytest.mark.parametrize("command", ["generate", "plan"])
def test_ctrl_c_before_the_run_owns_the_signals_is_one_line_and_130(tmp_path, capsys, no_ray, monkeypatch, command):
    """Ctrl-C in the first second (imports, the model check: before the lease) printed a Python
    traceback and died of SIGINT."""
    import pipeline.api

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.api, "check_model", interrupted)
    write_shards(str(tmp_path / "in"), shards=1, rows=1)
    argv = [*(["plan"] if command == "plan" else []), "generate", "--input", str(tmp_path / "in"), "--output",
            str(tmp_path / "out"), "--model", tiny_model("causal")]
    assert main(argv) == 130
    assert capsys.readouterr().err.strip() == "persimmon-batch: interrupted before anything was started"
    assert not (tmp_path / "out").exists()


# ---- where the replicas run: local Ray is this machine, known before Ray starts -----------------
def _without_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the check has nothing to refuse here")


def test_device_cuda_without_cuda_on_local_ray_fails_before_ray_starts(tmp_path, capsys, no_ray):
    _without_cuda()
    err = _fails_on_the_driver(tmp_path, capsys, "--device", "cuda")
    assert err.startswith("persimmon-batch: error: device: cuda, but torch ") and "sees no CUDA device" in err
    assert err.endswith("use --device auto or cpu, or --ray-address of a cluster with GPU nodes")


def test_gpu_replicas_on_local_ray_without_a_gpu_fail_before_ray_starts(tmp_path, capsys, no_ray):
    """It was an uncaught RuntimeError once local Ray was up: a traceback, exit 1, no report."""
    _without_cuda()
    err = _fails_on_the_driver(tmp_path, capsys, "--num-gpus-per-replica", "1")
    assert err == ("persimmon-batch: error: num_gpus_per_replica: 1 replica(s) of 1 CPU + 1 GPU each need 1 GPU(s), "
                   "but local Ray has 0 (the GPUs torch sees on this machine) and no node can join it; use "
                   "--num-gpus-per-replica 0 for CPU replicas, or --ray-address of a cluster with GPU nodes")


def test_more_replicas_than_local_cpus_fail_before_ray_starts(tmp_path, capsys, no_ray):
    """10 one-CPU replicas on a local Ray of 8 CPUs: the pool would have waited
    --replica-start-timeout-s (900 s) for CPUs no node can bring."""
    write_shards(str(tmp_path / "in"), shards=10, rows=1)  # 10 units: the pool's size is not capped below 10
    err = _fails_on_the_driver(tmp_path, capsys, "--replicas", "10", "--num-cpus", "8")
    assert err == ("persimmon-batch: error: replicas: 10 replica(s) of 1 CPU each need 10 CPUs, but local Ray has 8 "
                   "(--num-cpus) and no node can join it, so the pool would wait --replica-start-timeout-s=900 s "
                   "for nothing; use --replicas 8 or fewer, --num-cpus 10 or a smaller --num-cpus-per-replica")
    plan = ["plan", "generate", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--model",
            tiny_model("causal"), "--replicas", "10", "--num-cpus", "8"]
    assert main(plan) == 2 and err.split("error: ", 1)[1] in capsys.readouterr().err  # as the run refuses it
    from pipeline.placement import check_room, fits

    check_room(PipelineConfig(input="-", output="-", model="-", replicas="10", num_cpus=8), 8)  # 8 fit
    assert fits([{"CPU": 8.0, "GPU": 1.0}, {"CPU": 2.0}], {"CPU": 2.0, "GPU": 0.5}) == 2  # node by node
