"""Fault injection, part 6: the driver stopped in any phase, and replicas that cannot start.

Each case runs the CLI as a user does, in its own process:
- SIGTERM while the driver plans (its input on a slow object store: moto holding each read of an
  input file for a second), while it starts its local Ray, and while Ray Data waits for a
  replica pool the cluster cannot place (it would wait --replica-start-timeout-s, 900 s): the
  driver exits 1 within seconds, with `_run_report.json` saying `complete: false` and
  `interrupted` (and the phase), its lease released, no Ray process or replica left behind;
- a setting every replica's constructor fails on (a KV cache no replica has room for: the
  driver cannot know the device memory of the nodes): the run stops after the first failure
  with one line and exit 1, its report's errors plain one-line text naming the replica's log,
  which holds the traceback.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from pipeline_fixtures import moto_s3, s3_filesystem, tiny_model, write_shards

pytestmark = pytest.mark.ray
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _driver(tmp_path, *args: str, env: dict | None = None):
    """`persimmon-batch generate ARGS` in its own process; its stderr goes to a file."""
    cmd = [sys.executable, "-m", "pipeline.cli", "generate", "--model", tiny_model("causal"), "--max-new-tokens", "2",
           *args]
    # single-node Ray on loopback: without this the driver swaps 127.0.0.1 for the host's address
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": REPO, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           **(env or {})}
    env.pop("RAY_ADDRESS", None)
    err = tmp_path / "driver.err"
    with open(err, "wb") as stderr:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    return proc, err


def _wait_for(proc, err, ready, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, err.read_text(errors="replace")[-3000:]
        assert time.monotonic() < deadline, err.read_text(errors="replace")[-3000:]
        time.sleep(0.05)


def _stop(proc, err, sig=signal.SIGTERM) -> tuple[int, float]:
    """Send `sig`; (exit code, seconds until the process ended)."""
    t0 = time.monotonic()
    proc.send_signal(sig)
    try:
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return code, time.monotonic() - t0


def _sigterm_ends_with_a_report(proc, err, out) -> dict:
    """SIGTERM the driver: it exits 1 within seconds, not SIGABRT after Ray's C++ handler
    ("*** SIGTERM received"), with an incomplete report and its lease released."""
    code, seconds = _stop(proc, err)
    text = err.read_text(errors="replace")
    assert code == 1 and seconds < 30, (code, seconds, text[-3000:])
    assert "SIGTERM received" not in text, text[-3000:]
    report = json.loads((out / "_run_report.json").read_text())
    assert report["complete"] is False and report["interrupted"] == "SIGTERM"
    assert not (out / "_lease.json").exists()
    return report


def _interrupted_report(out, sig: str, phase: str) -> dict:
    report = json.loads((out / "_run_report.json").read_text())
    assert report["complete"] is False and report["interrupted"] == sig
    assert report["error"].startswith(f"interrupted by {sig} while {phase}: "), report["error"]
    assert report["rows_written"] == 0 and report["units"]["done"] == 0
    assert not (out / "_lease.json").exists()  # released: a rerun starts at once
    return report


def test_sigterm_while_planning_stops_the_driver_at_once(tmp_path):
    """64 input files, each read held for 1 s by the store: planning takes about 25 s here;
    the signal comes with the first read. The reads in flight finish, the rest are never made,
    and nothing else is started (no Ray)."""
    with moto_s3() as s3:
        b = s3["bucket"]
        write_shards(f"{b}/in", shards=64, rows=1, fs=s3_filesystem(s3))
        s3["faults"].add("GET", rf"^{b}/in/part-", None, delay_s=1.0)
        out = tmp_path / "out"
        proc, err = _driver(tmp_path, "--input", f"s3://{b}/in/", "--output", str(out), "--s3-endpoint",
                            s3["endpoint"], env={k: s3[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")})
        _wait_for(proc, err, lambda: s3["faults"].hits("GET", rf"^{b}/in/part-"))
        code, seconds = _stop(proc, err)
        reads = len(s3["faults"].hits("GET", rf"^{b}/in/part-"))
    text = err.read_text(errors="replace")
    assert code == 1 and seconds < 12, (code, seconds, text[-3000:])
    report = _interrupted_report(out, "SIGTERM", "planning")
    assert report["error"] == ("interrupted by SIGTERM while planning: no unit was started; rerun the same "
                               "command to finish")
    assert reads < 64, reads  # the plan was cut short: not every input file was read
    assert "Traceback" not in text and "Started a local Ray" not in text, text


def _processes_of_session(pid: int) -> list[str]:
    """Processes of the Ray session a driver with this pid started (its session directory,
    on every Ray process's command line, ends with the driver's pid)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if entry.isdigit() and f"_{pid}/" in cmdline and "session_" in cmdline:
            found.append(cmdline[:120])
    return found


def test_sigterm_while_starting_local_ray_stops_it_and_leaves_no_ray_behind(tmp_path):
    """SIGTERM as the driver starts its local Ray (seconds on a small machine): ray.init used to
    install Ray's own handler, which exits at once with no report and the lease left behind.
    The run keeps its handler, acts on the signal as ray.init returns, and the Ray processes
    started so far end with the driver."""
    write_shards(str(tmp_path / "in"), shards=2, rows=2)
    out = tmp_path / "out"
    proc, err = _driver(tmp_path, "--input", str(tmp_path / "in"), "--output", str(out))
    _wait_for(proc, err, lambda: "unit(s) from" in err.read_text(errors="replace"))  # planned: Ray starts next
    code, seconds = _stop(proc, err)
    text = err.read_text(errors="replace")
    assert code == 1 and seconds < 20, (code, seconds, text[-3000:])
    _interrupted_report(out, "SIGTERM", "starting Ray")
    assert "Traceback" not in text, text
    deadline = time.monotonic() + 30
    while _processes_of_session(proc.pid):
        assert time.monotonic() < deadline, _processes_of_session(proc.pid)
        time.sleep(0.2)


def test_sigterm_late_in_starting_local_ray_exits_1_not_sigabrt(tmp_path):
    """SIGTERM once the driver's core worker is up (its log file exists) but before ray.init
    returns: abseil's failure handler, installed by the core worker, armed its 3 s abort alarm
    while the main thread waited in C (recv), so no Python handler could cancel it: exit 134
    (SIGABRT), sometimes before the report or the lease release. The driver's core worker now
    starts without that handler while the run owns the signals."""
    import glob

    write_shards(str(tmp_path / "in"), shards=2, rows=2)
    out = tmp_path / "out"
    proc, err = _driver(tmp_path, "--input", str(tmp_path / "in"), "--output", str(out))
    core_log = os.environ.get("RAY_TMPDIR", "/tmp") + f"/ray/session_*_{proc.pid}/logs/python-core-driver-*_{proc.pid}.log"
    _wait_for(proc, err, lambda: glob.glob(core_log), timeout=180)
    _sigterm_ends_with_a_report(proc, err, out)


def test_sigterm_while_running_on_local_ray_exits_1_not_sigabrt(tmp_path):
    """The common case: the driver's own local Ray, SIGTERM once units are committing. Ray's core
    worker puts abseil's failure signal handler on SIGTERM in C++, which printed "*** SIGTERM
    received ..." and armed a 3-second alarm that aborted the driver (exit -6, SIGABRT) while it
    shut its local Ray down, every time on a 2-core machine (ray #64830)."""
    write_shards(str(tmp_path / "in"), shards=8, rows=4)
    out = tmp_path / "out"
    proc, err = _driver(tmp_path, "--input", str(tmp_path / "in"), "--output", str(out), "--replicas", "1",
                        "--num-cpus", "2", "--batch-size", "1", "--max-new-tokens", "200")
    _wait_for(proc, err, lambda: out.exists() and any(f.endswith(".parquet") for f in os.listdir(out)), timeout=300)
    report = _sigterm_ends_with_a_report(proc, err, out)
    assert report["error"].startswith("interrupted by SIGTERM while running replicas: ")
    deadline = time.monotonic() + 30
    while _processes_of_session(proc.pid):
        assert time.monotonic() < deadline, _processes_of_session(proc.pid)
        time.sleep(0.2)


ABSEIL_FUSE = """
import ctypes, os, signal, time
from pipeline.signals import StopSignals

libc = ctypes.CDLL(None)
with StopSignals() as stop:
    # what abseil's failure handler (Ray's core worker) does in C before it chains to ours: SIGALRM
    # aborts, alarm armed; Python's signal.getsignal does not see a handler installed from C
    libc.signal(signal.SIGALRM, ctypes.cast(libc.abort, ctypes.c_void_p))
    libc.alarm(1)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(2)
print(stop.signal)
"""


def test_sigterm_that_found_abseils_handler_cancels_its_abort_fuse():
    """SIGTERM late in ray.init (the core worker is up, the run has not taken SIGTERM back yet):
    abseil's handler armed its 3 s abort alarm and the driver ended in SIGABRT (exit 134) as it
    wrote its report, because the fuse was cancelled only when signal.getsignal(SIGALRM) was None,
    and getsignal only knows handlers installed from Python (it said SIG_DFL)."""
    proc = subprocess.run([sys.executable, "-c", ABSEIL_FUSE], cwd=REPO, env={**os.environ, "PYTHONPATH": REPO},
                          capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout.strip()) == (0, "SIGTERM"), (proc.returncode, proc.stderr[-2000:])


@pytest.fixture(scope="module")
def ray_address(ray_local):
    import ray

    return "127.0.0.1:" + ray.get_runtime_context().gcs_address.rsplit(":", 1)[1]


def _foreign_actors_alive() -> list:
    """Actors of other jobs (the driver's) that are not dead yet."""
    import ray

    me = ray.get_runtime_context().get_job_id()
    return [a["ActorClassName"] for a in ray._private.state.actors().values()
            if a["JobID"] != me and a["State"] != "DEAD" and not a["IsDetached"]]


def test_sigterm_while_waiting_for_a_pool_the_cluster_cannot_place(ray_address, tmp_path):
    """A replica of 16 CPUs on a cluster of 8: joined by address, where an autoscaler or new
    nodes could bring room, so the driver says what it waits for and waits. SIGTERM ends the
    wait (Ray Data's ray.get, up to 900 s) at once."""
    write_shards(str(tmp_path / "in"), shards=2, rows=2)
    out = tmp_path / "out"
    proc, err = _driver(tmp_path, "--input", str(tmp_path / "in"), "--output", str(out), "--ray-address", ray_address,
                        "--num-cpus-per-replica", "16")
    _wait_for(proc, err, lambda: "waiting up to" in err.read_text(errors="replace"))
    time.sleep(1.0)  # into Ray Data's wait for the pool
    code, seconds = _stop(proc, err)
    text = err.read_text(errors="replace")
    assert code == 1 and seconds < 20, (code, seconds, text[-3000:])
    assert ("waiting up to 900 s (--replica-start-timeout-s) for room for 1 replica(s) of 16 CPU each: the Ray "
            "cluster holds 0 of them now (8 CPU in all); an autoscaler or nodes that join can add the rest") in text
    report = _interrupted_report(out, "SIGTERM", "running replicas")
    assert report["error"] == ("interrupted by SIGTERM while running replicas: no unit was started; rerun the same "
                               "command to finish")
    assert "Traceback" not in text, text
    deadline = time.monotonic() + 30  # the pending replicas and the tracker go with their driver
    while _foreign_actors_alive():
        assert time.monotonic() < deadline, _foreign_actors_alive()
        time.sleep(0.2)


def test_a_replica_that_cannot_start_stops_the_run_in_one_line(ray_address, tmp_path):
    """--memory-fraction 1e-9: no replica has room for a KV cache of one block. Ray used to
    print the constructor's traceback for every replica (400-500 lines), and the report's
    failed units carried it with ANSI colour escapes."""
    write_shards(str(tmp_path / "in"), shards=3, rows=2)
    out = tmp_path / "out"
    proc, err = _driver(tmp_path, "--input", str(tmp_path / "in"), "--output", str(out), "--ray-address", ray_address,
                        "--replicas", "2", "--memory-fraction", "1e-9")
    code = proc.wait(timeout=240)
    text = err.read_text(errors="replace")
    assert code == 1, text[-3000:]
    assert "Traceback" not in text and len(text.splitlines()) <= 6, text
    stopped = [line for line in text.splitlines() if line.startswith("the run stopped: ")]
    assert len(stopped) == 1 and stopped[0].startswith(
        "the run stopped: replica_start_failed: ValueError: no room for a KV cache (memory_fraction=1e-09"), text

    report = json.loads((out / "_run_report.json").read_text())
    assert report["complete"] is False and report["rows_written"] == 0 and report["units"]["failed"] == 3
    error = report["error"]
    assert stopped[0] == f"the run stopped: {error}"
    assert [u["error"] for u in report["failed_units"]] == [error] * 3
    assert "\n" not in error and "\x1b" not in error
    log = error.rsplit(" (traceback in ", 1)[1].split(" on ", 1)[0]  # the replica's log, on this machine
    logged = open(log, errors="replace").read()
    assert "Traceback (most recent call last)" in logged and "ValueError: no room for a KV cache" in logged


def test_errors_in_the_report_are_one_plain_line():
    """What Ray puts in the message of an actor that died in its constructor: colour escapes, then
    the traceback. The report keeps the first line, as plain text."""
    from pipeline.errors import one_line

    ray_text = ("ActorDiedError: The actor died because of an error raised in its creation task, \x1b[36mray::MapWorker("
                "MapBatches(UnitRunner)).__init__()\x1b[39m (pid=1, ip=127.0.0.1)\n           ^^^^^^^^^\n"
                "  File \"x.py\", line 1, in __init__\nValueError: boom")
    assert one_line(ray_text) == ("ActorDiedError: The actor died because of an error raised in its creation task, "
                                  "ray::MapWorker(MapBatches(UnitRunner)).__init__() (pid=1, ip=127.0.0.1)")
    assert one_line("\n  plain  \n") == "plain" and one_line(None) is None
