"""Models given as Hugging Face hub ids, offline: each test lays out a real HF cache
(models--owner--name/blobs, snapshots/<commit>/, refs/<branch or tag>) holding the tiny
checkpoint, with HF_HUB_OFFLINE=1. The hub's endpoint points at a closed loopback port, so
nothing can leave the machine; the one test that talks HTTP talks to a fake hub on 127.0.0.1.

Proven: the id rule (a local path of that name wins; hf:// forces the hub), the snapshot loads
and generates exactly what the same checkpoint does from its local directory, revisions and
the driver's pinned commit, the model fingerprint of the resolved files, the errors (not
cached offline, unknown repository / revision, gated, huggingface_hub missing) before any
replica starts, one fetch at a time per node, the files fetched, and a full Ray run.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import shutil
import sys
import threading

import pytest
from pipeline_fixtures import PROMPTS, all_prompts, local_ray, read_output, tiny_model, write_shards

from model import Engine, SamplingParams
from pipeline import ModelError, PipelineConfig, check_model, run, run_generate
from pipeline.cli import main
from pipeline.hub import CONFIG_AND_TOKENIZER, PICKLES, SAFETENSORS, TOP_LEVEL_ONLY, HubModel, hub_model, pin, snapshot
from pipeline.modelcheck import model_identity
from pipeline.storage import local_model_dir

hh = pytest.importorskip("huggingface_hub", reason="huggingface_hub is the optional `hub` extra (in `test`)")
from huggingface_hub import constants as hub_constants  # noqa: E402  (read at import: patched below)

MAIN, V2 = "a" * 40, "b" * 40          # two commits of owner/tiny: main (seed 0) and tag v2 (seed 1)
NOWHERE = "http://127.0.0.1:9"          # a closed loopback port: any request that escapes fails here


def lay_out(cache, repo_id: str, model_dir: str, commit: str, refs=("main",)) -> str:
    """Put `model_dir`'s files into an HF cache as snapshot_download leaves them: content in
    blobs/, the snapshot's files as relative symlinks to them, each ref naming the commit."""
    repo = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    snap = os.path.join(repo, "snapshots", commit)
    os.makedirs(os.path.join(repo, "blobs"), exist_ok=True)
    os.makedirs(snap, exist_ok=True)
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    for name in sorted(os.listdir(model_dir)):
        with open(os.path.join(model_dir, name), "rb") as f:
            data = f.read()
        blob = os.path.join(repo, "blobs", hashlib.sha256(data).hexdigest())
        with open(blob, "wb") as f:
            f.write(data)
        os.symlink(os.path.relpath(blob, snap), os.path.join(snap, name))
    for ref in refs:
        with open(os.path.join(repo, "refs", ref), "w") as f:
            f.write(commit)
    return snap


def hub_env(monkeypatch, cache, offline: bool = True, endpoint: str = NOWHERE) -> dict:
    """This process's huggingface_hub (its settings are read at import) and the environment
    (for Ray workers started later) pointed at `cache`, offline, endpoint on loopback."""
    env = {"HF_HUB_CACHE": str(cache), "HF_HOME": str(cache) + "-home", "HF_ENDPOINT": endpoint,
           "HF_HUB_OFFLINE": "1" if offline else "0", "HF_HUB_DISABLE_TELEMETRY": "1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(hub_constants, "ENDPOINT", endpoint)
    return env


@pytest.fixture(scope="module")
def seed1_model(tmp_path_factory):
    from model.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("seed1"), seed=1)


@pytest.fixture
def cache(tmp_path, monkeypatch, seed1_model):
    """An offline HF cache holding owner/tiny: main -> the tiny checkpoint, tag v2 -> seed 1."""
    cache = tmp_path / "hf-cache"
    lay_out(cache, "owner/tiny", tiny_model("causal"), MAIN)
    lay_out(cache, "owner/tiny", seed1_model, V2, refs=("v2",))
    hub_env(monkeypatch, cache)
    return cache


def cfg(model: str, **kw) -> PipelineConfig:
    return PipelineConfig(task="generate", input="in", output="out", model=model, **kw)


def greedy(path: str) -> list[str]:
    engine = Engine.from_pretrained(path, max_batch_size=8, dtype="float32", device="cpu")
    return [c.text for c in engine.generate(PROMPTS, SamplingParams(max_new_tokens=6))]


# ---- the rule ------------------------------------------------------------------------------
def test_hub_id_rule(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert hub_model("adept/persimmon-8b-base") == HubModel("adept/persimmon-8b-base", None)
    assert hub_model("adept/persimmon-8b-base@v1.0") == HubModel("adept/persimmon-8b-base", "v1.0")
    assert hub_model("hf://adept/persimmon-8b-base@refs/pr/1") == HubModel("adept/persimmon-8b-base", "refs/pr/1")
    (tmp_path / "owner" / "name").mkdir(parents=True)
    assert hub_model("owner/name") is None                 # a local directory of that name wins
    assert hub_model("hf://owner/name") == HubModel("owner/name", None)   # unless hf:// says otherwise
    assert hub_model("owner/name", commit=MAIN) == HubModel("owner/name", MAIN)  # the driver decided
    for local in ("./owner/other", "/abs/owner", "~/owner", "models", "a/b/c", "owner/-bad", "owner/na--me",
                  "owner/a..b", "s3://bucket/model", "memory://x/y", "owner/name@"):
        assert hub_model(local) is None, local
    with pytest.raises(ModelError, match="not a Hugging Face hub id; write hf://owner/name"):
        hub_model("hf://datasets/owner/name")


# ---- the snapshot is the checkpoint --------------------------------------------------------
def test_hub_snapshot_loads_and_generates_as_the_local_dir(cache):
    local = cfg(tiny_model("causal"))
    for spelling in ("owner/tiny", "hf://owner/tiny", "owner/tiny@main"):
        pinned = pin(cfg(spelling))
        assert pinned.model_commit == MAIN and pinned.model == spelling
        assert check_model(pinned) == check_model(local)
        path = local_model_dir(pinned.model, pinned)
        assert path == str(cache / "models--owner--tiny" / "snapshots" / MAIN)
        assert model_identity(pinned) == model_identity(local)  # the resolved files, fingerprinted
    assert greedy(path) == greedy(tiny_model("causal"))

    v2 = pin(cfg("owner/tiny@v2"))
    assert v2.model_commit == V2
    assert model_identity(v2) != model_identity(local)
    assert greedy(local_model_dir(v2.model, v2)) != greedy(path)


def test_pinned_commit_is_loaded_even_when_the_branch_moves(cache):
    pinned = pin(cfg("owner/tiny"))
    with open(cache / "models--owner--tiny" / "refs" / "main", "w") as f:
        f.write(V2)  # main moves after the driver checked it
    assert local_model_dir(pinned.model, pinned).endswith(MAIN)  # replicas load what was checked
    assert pin(cfg("owner/tiny")).model_commit == V2              # a new run sees the move


def test_pickle_weights_only_when_the_repo_has_no_safetensors(tmp_path, monkeypatch):
    import safetensors.torch
    import torch

    src = tmp_path / "bin-model"
    shutil.copytree(tiny_model("causal"), src)
    torch.save(safetensors.torch.load_file(str(src / "model.safetensors")), str(src / "pytorch_model.bin"))
    os.remove(src / "model.safetensors")
    lay_out(tmp_path / "cache", "owner/bin", str(src), MAIN)
    hub_env(monkeypatch, tmp_path / "cache")
    calls = []
    real = hh.snapshot_download
    monkeypatch.setattr(hh, "snapshot_download", lambda *a, **k: calls.append(k) or real(*a, **k))
    pinned = pin(cfg("owner/bin"))
    check_model(pinned)  # the pickle is opened as the replicas will (weights_only=True)
    assert [c["allow_patterns"] for c in calls[:2]] == [CONFIG_AND_TOKENIZER + SAFETENSORS,
                                                        CONFIG_AND_TOKENIZER + PICKLES]
    assert calls[0]["revision"] is None  # main, resolved once, by pin; every later look-up is of that commit
    assert len(calls) > 2 and all(c["revision"] == MAIN for c in calls[1:])


def test_fetches_what_the_engine_reads():
    from huggingface_hub.utils import filter_repo_objects

    repo = [".gitattributes", "README.md", "config.json", "generation_config.json", "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors", "model.safetensors.index.json", "pytorch_model-00001-of-00002.bin",
            "pytorch_model-00002-of-00002.bin", "pytorch_model.bin.index.json", "special_tokens_map.json",
            "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "tf_model.h5", "flax_model.msgpack",
            "original/consolidated.safetensors", "onnx/model.safetensors", "onnx/config.json"]
    first = set(filter_repo_objects(repo, allow_patterns=CONFIG_AND_TOKENIZER + SAFETENSORS,
                                    ignore_patterns=TOP_LEVEL_ONLY))
    assert first == {"config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                     "model.safetensors.index.json", "special_tokens_map.json", "tokenizer.model",
                     "tokenizer_config.json"}
    fallback = set(filter_repo_objects(repo, allow_patterns=CONFIG_AND_TOKENIZER + PICKLES,
                                       ignore_patterns=TOP_LEVEL_ONLY))
    assert fallback - first == {"pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin",
                                "pytorch_model.bin.index.json"}


def test_one_fetch_at_a_time_per_node(cache, monkeypatch):
    state = {"now": 0, "most": 0}
    lock = threading.Lock()
    real = hh.snapshot_download

    def slow(*a, **k):
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
        threading.Event().wait(0.2)
        try:
            return real(*a, **k)
        finally:
            with lock:
                state["now"] -= 1

    monkeypatch.setattr(hh, "snapshot_download", slow)
    paths = []
    threads = [threading.Thread(target=lambda: paths.append(snapshot(HubModel("owner/tiny", None)))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(paths) == 3 and set(paths) == {str(cache / "models--owner--tiny" / "snapshots" / MAIN)}
    assert state["most"] == 1  # the file lock: fetches on one node never overlap
    assert os.path.exists(cache / ".locks" / "persimmon-batch--models--owner--tiny.lock")


# ---- clear errors before any replica starts ------------------------------------------------
def test_unknown_id_fails_before_any_replica_starts(cache, tmp_path, monkeypatch, capsys):
    import pipeline.api

    monkeypatch.setattr(pipeline.api, "init_ray", lambda *a, **k: pytest.fail("Ray started"))
    write_shards(str(tmp_path / "in"), shards=1, rows=2)
    out = tmp_path / "out"
    with pytest.raises(ModelError, match=r"'owner/nope' is not a local directory, and as a Hugging Face hub id it "
                                         r"is not in this node's Hugging Face cache .*HF_HUB_OFFLINE is set: .*"
                                         r"`hf download owner/nope`"):
        run(PipelineConfig(task="generate", input=str(tmp_path / "in"), output=str(out), model="owner/nope"))
    with pytest.raises(ModelError, match=r"no revision 'v9'|is not in this node's Hugging Face cache .* revision 'v9'"):
        run(PipelineConfig(task="generate", input=str(tmp_path / "in"), output=str(out), model="owner/tiny@v9"))
    assert main(["generate", "--input", str(tmp_path / "in"), "--output", str(out), "--model", "hf://owner/nope"]) == 2
    err = capsys.readouterr().err
    assert "model 'hf://owner/nope' is not in this node's Hugging Face cache" in err and "Traceback" not in err
    assert not out.exists()  # nothing was written, not even the lease


class FakeHub(http.server.BaseHTTPRequestHandler):
    """The hub's answers for a missing repository, a missing revision and a gated repository."""

    paths: list[str] = []

    def do_GET(self):
        FakeHub.paths.append(self.path)
        code = ("GatedRepo" if "/gated/" in self.path else "RevisionNotFound" if "/revision/v9" in self.path
                else "RepoNotFound")
        body = json.dumps({"error": code}).encode()
        self.send_response(403 if code == "GatedRepo" else 404)
        self.send_header("X-Error-Code", code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


def test_hub_answers_become_clear_errors(tmp_path, monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        hub_env(monkeypatch, tmp_path / "cache", offline=False, endpoint=f"http://127.0.0.1:{server.server_port}")
        monkeypatch.setenv("HF_TOKEN", "")
        with pytest.raises(ModelError, match=r"'owner/missing' is not a local directory, and as a Hugging Face hub "
                                             r"id it names no repository on the hub .*HF_TOKEN"):
            pin(cfg("owner/missing"))
        with pytest.raises(ModelError, match=r"has no revision 'v9' \(a branch, tag or commit of owner/tiny\)"):
            pin(cfg("owner/tiny@v9"))
        with pytest.raises(ModelError, match=r"'hf://owner/gated' is gated: accept its terms on "
                                             r"https://huggingface.co/owner/gated"):
            pin(cfg("hf://owner/gated"))
    finally:
        server.shutdown()
        server.server_close()
    assert [p.split("?")[0] for p in FakeHub.paths] == ["/api/models/owner/missing/revision/main",
                                                        "/api/models/owner/tiny/revision/v9",
                                                        "/api/models/owner/gated/revision/main"]


def test_missing_huggingface_hub_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as if not installed
    with pytest.raises(ModelError, match=r"'owner/tiny' is not a local directory, and as a Hugging Face hub id it "
                                         r"needs huggingface_hub: pip install 'persimmon-batch\[hub\]'"):
        check_model(cfg("owner/tiny"))
    with pytest.raises(ModelError, match=r"^model 'hf://owner/tiny' needs huggingface_hub: pip install"):
        check_model(cfg("hf://owner/tiny"))


# ---- a full run ----------------------------------------------------------------------------
@pytest.mark.ray
def test_pipeline_run_with_a_hub_id_equals_the_local_dir(cache, tmp_path, monkeypatch):
    write_shards(str(tmp_path / "in"), shards=2, rows=4)
    out = str(tmp_path / "out")
    with local_ray():  # started after `cache` set HF_HUB_*: its replicas see the same offline cache
        report = run_generate(input=str(tmp_path / "in"), output=out, model="owner/tiny", replicas=1,
                              max_new_tokens=6, batch_size=4, progress=False)
        assert report["complete"] and report["units"]["done"] == 2, report
        assert report["config"]["model"] == "owner/tiny" and report["config"]["model_commit"] == MAIN
        assert report["config"]["model_identity"] == model_identity(cfg(tiny_model("causal")))
        # the same output spelled as the local directory: the same model, so nothing to redo
        again = run_generate(input=str(tmp_path / "in"), output=out, model=tiny_model("causal"), replicas=1,
                             max_new_tokens=6, batch_size=4, progress=False)
        assert again["complete"] and again["units"]["skipped"] == 2 and again["units"]["done"] == 0
    table = read_output(out).sort_by("id")
    ids, prompts = all_prompts(2, 4)
    assert table["id"].to_pylist() == ids
    engine = Engine.from_pretrained(tiny_model("causal"), max_batch_size=4, dtype="float32", device="cpu")
    assert table["completion"].to_pylist() == [c.text for c in engine.generate(prompts, SamplingParams(max_new_tokens=6))]


def test_capacity_sizes_a_hub_id_from_its_config_alone(cache, tmp_path, capsys, monkeypatch):
    import pipeline.hub
    from pipeline.cli import main

    def no_weights(*a, **k):
        raise AssertionError("capacity must not fetch a snapshot (weights)")

    monkeypatch.setattr(pipeline.hub, "snapshot", no_weights)
    def sized(model):
        assert main(["capacity", "--model", model, "--gpu-memory-gib", "2", "--prompt-tokens", "100",
                     "--new-tokens", "50", "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    local = sized(tiny_model("causal"))
    for spelling in ("owner/tiny", "hf://owner/tiny@main"):
        got = sized(spelling)
        assert {k: got[k] for k in ("weights_bytes", "kv_bytes_per_token", "kv_tokens")} == \
            {k: local[k] for k in ("weights_bytes", "kv_bytes_per_token", "kv_tokens")}
    assert main(["capacity", "--model", "owner/absent", "--gpu-memory-gib", "2"]) == 2
    assert "is not in this node's Hugging Face cache" in capsys.readouterr().err


def test_a_snapshot_without_weights_says_how_to_fix_it(cache, tmp_path):
    from pipeline.hub import pin
    from pipeline.modelcheck import check_model

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in os.listdir(tiny_model("causal")):
        if not name.endswith((".safetensors", ".bin", ".json")) or name == "config.json":
            shutil.copy(os.path.join(tiny_model("causal"), name), bare / name)
    lay_out(cache, "owner/bare", str(bare), MAIN)
    with pytest.raises(ModelError, match=r"no weights.*snapshot in the Hugging Face cache .* is incomplete: "
                                         r"fetch it again with `hf download owner/bare`"):
        check_model(pin(cfg("owner/bare")))
