"""The Ray executor: a run spread over Ray workers stores the same records and aggregate as a local run; a worker
killed mid-run loses nothing and duplicates nothing; a killed driver resumes, on Ray or locally.

The tests marked `ray` share one real local Ray cluster (2 CPUs, 2 one-thread workers) and trace 16 synthetic
clips of the shipped demo model (plus one missing file, recorded as an error). They are skipped when Ray is not
installed (`pip install "audiolens-ct[ray]"`; `make test` installs it).
"""

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
from _shared_checks import assert_same

from audiolens_ct import cli
from audiolens_ct.config import TraceConfig
from audiolens_ct.data.sakura import load_sakura
from audiolens_ct.demo import DEMO_MODEL
from audiolens_ct.demo.synthetic import write_synthetic_sakura
from audiolens_ct.errors import DataError, ExecutorError, InputError
from audiolens_ct.executors import ModelSpec
from audiolens_ct.experiment import run_experiment
from audiolens_ct.store import RunStore

HAS_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAS_RAY, reason='Ray is not installed: pip install "audiolens-ct[ray]"')
CLIPS = 16


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """16 gender clips in SAKURA's layout, and a metadata row whose file is missing."""
    root = write_synthetic_sakura(tmp_path_factory.mktemp("sakura"), CLIPS // 2, seed=7, attributes=["gender"])
    with open(root / "Gender" / "metadata.csv", "a") as metadata:
        metadata.write("missing.wav,male,,,,\n")
    return root


@pytest.fixture(scope="module")
def samples(data):
    return load_sakura(data)


@pytest.fixture(scope="module")
def sweep(data):
    """What every run here shares with `audiolens-ct run DEMO DATA --modes layer`: the data set's description and
    the tracing options (layer-wise: what an executor does is the same for every mode)."""
    return dict(dataset={"source": "sakura", "path": str(data.resolve())}, modes=("layer",), progress=False)


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster for the module (startup costs seconds), shut down at its end."""
    if not HAS_RAY:
        pytest.skip('Ray is not installed: pip install "audiolens-ct[ray]"')
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def local(demo_model, samples, sweep, tmp_path_factory):
    """The same run with the local executor, in this process (one torch thread, as each Ray worker)."""
    out = tmp_path_factory.mktemp("runs") / "local"
    run_experiment(demo_model, samples, out, **sweep)
    return out


def records(out):
    """Every record by file name, without its timing."""
    found = {}
    for path in (out / "records").glob("*/*.json"):
        record = json.loads(path.read_text())
        record.pop("seconds")
        found[path.relative_to(out).as_posix()] = record
    return found




def assert_equal_runs(local, out):
    assert len(records(local)) == CLIPS + 1
    assert_same(records(local), records(out), "records")
    assert_same(json.loads((local / "aggregate.json").read_text()), json.loads((out / "aggregate.json").read_text()))
    assert not list(out.rglob("*.tmp"))


def run_args(data, out, *extra):
    return ["run", str(DEMO_MODEL), str(data), "--out", str(out), "--modes", "layer", "--no-progress", *extra]


@pytest.mark.ray
@needs_ray
def test_a_ray_run_stores_what_a_local_run_stores(cluster, samples, sweep, local, tmp_path, capsys):
    from audiolens_ct.executors.ray_executor import RayExecutor

    out = tmp_path / "ray"
    summary = run_experiment(ModelSpec(str(DEMO_MODEL)), samples, out, executor=RayExecutor(workers=2), **sweep)
    assert (summary.total, summary.errors, summary.resumed) == (CLIPS + 1, 1, 0)
    assert_equal_runs(local, out)
    assert "error: gender Gender/missing.wav: " in capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    executor = manifest["invocations"][-1]["executor"]
    assert executor["name"] == "ray" and executor["address"] == cluster and executor["cpus_per_worker"] == 1
    workers = executor["workers"]
    assert len(workers) == 2 and len({w["pid"] for w in workers}) == 2 and os.getpid() not in {w["pid"] for w in workers}
    assert all(w["device"] == "cpu" and w["dtype"] == "float32" and w["threads"] == 1 for w in workers)
    assert "executor" not in manifest["settings"] and manifest["settings"]["dtype"] == "float32"
    local_manifest = json.loads((local / "manifest.json").read_text())
    assert local_manifest["invocations"][-1]["executor"]["name"] == "local"


@pytest.mark.ray
@needs_ray
def test_a_killed_worker_loses_nothing_and_duplicates_nothing(cluster, samples, sweep, local, tmp_path, monkeypatch,
                                                              capsys):  # fmt: skip
    from audiolens_ct.executors.ray_executor import RayExecutor

    written = []
    write = RunStore.write_record
    monkeypatch.setattr(RunStore, "write_record", lambda store, record: written.append(record["sample_id"]) or write(store, record))
    out = tmp_path / "ray"
    outcome = {}

    def driver():
        try:
            outcome["summary"] = run_experiment(ModelSpec(str(DEMO_MODEL)), samples, out,
                                                executor=RayExecutor(workers=2), **sweep)  # fmt: skip
        except BaseException as exc:  # reported by the test below
            outcome["error"] = exc

    thread = threading.Thread(target=driver)
    thread.start()
    deadline = time.monotonic() + 120
    while len(written) < 2:  # the workers are up and tracing
        assert thread.is_alive(), outcome
        assert time.monotonic() < deadline, "no record appeared"
        time.sleep(0.01)
    victim = json.loads((out / "manifest.json").read_text())["invocations"][-1]["executor"]["workers"][0]["pid"]
    os.kill(victim, signal.SIGKILL)
    killed_at = len(written)
    thread.join(timeout=180)
    assert not thread.is_alive() and "error" not in outcome, outcome
    assert killed_at < CLIPS, "the worker was killed after the sweep"
    assert sorted(written) == sorted(s.id for s in samples)  # each sample written exactly once
    assert outcome["summary"].total == CLIPS + 1
    assert f"warning: Ray worker 0 (host {os.uname().nodename}, pid {victim}) died" in capsys.readouterr().err
    assert_equal_runs(local, out)


@pytest.mark.ray
@needs_ray
def test_a_killed_driver_resumes_on_ray_and_locally(cluster, data, local, tmp_path):
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "audiolens_ct.cli",
               *run_args(data, out, "--executor", "ray", "--ray-address", cluster, "--workers", "1")]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "stderr.txt", "w") as stderr:
        driver = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.monotonic() + 180
        while len(list((out / "records").glob("*/*.json"))) < 2:
            assert driver.poll() is None, (tmp_path / "stderr.txt").read_text()
            assert time.monotonic() < deadline, "no record appeared"
            time.sleep(0.01)
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    before = len(list((out / "records").glob("*/*.json")))
    assert 2 <= before < CLIPS + 1 and not (out / "aggregate.json").exists()
    shutil.copytree(out, tmp_path / "copy")
    for resumed, executor in ((out, ["--executor", "ray", "--ray-address", cluster, "--workers", "1"]),
                              (tmp_path / "copy", [])):  # fmt: skip
        assert cli.main(run_args(data, resumed, *executor)) == 0
        assert_equal_runs(local, resumed)
        invocations = json.loads((resumed / "manifest.json").read_text())["invocations"]
        assert [i["executor"]["name"] for i in invocations] == ["ray", "ray" if executor else "local"]


def test_without_ray_the_ray_executor_says_how_to_install_it(demo_model, data, samples, sweep, local, tmp_path,
                                                             monkeypatch, capsys):  # fmt: skip
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as when it is not installed
    with pytest.raises(ExecutorError, match=r'needs Ray, which is not installed here: pip install "audiolens-ct\[ray\]"'):
        run_experiment(demo_model, samples, tmp_path / "out", executor="ray", progress=False)
    assert not (tmp_path / "out").exists()
    done = shutil.copytree(local, tmp_path / "done")  # a finished run: re-running it starts no worker, loads nothing
    traced = [s for s in samples if s.ok]  # (an error record would be redone)
    summary = run_experiment(ModelSpec(str(DEMO_MODEL)), traced, done, executor="ray", **sweep)
    assert summary.resumed == CLIPS and json.loads((done / "manifest.json").read_text())["invocations"][-1]["executor"] == {
        "name": "ray", "workers": []}  # fmt: skip
    assert cli.main(run_args(data, tmp_path / "cli", "--executor", "ray")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == 'audiolens-ct: error: the Ray executor needs Ray, which is not installed here: pip install "audiolens-ct[ray]"'


def test_ray_options_need_the_ray_executor_and_a_model_workers_can_load(data, qwen2_audio_model, tmp_path, capsys):
    assert cli.main(run_args(data, tmp_path / "o", "--workers", "2")) == 2
    assert "--workers is an option of the Ray executor; add --executor ray, or drop --workers" in capsys.readouterr().err
    assert cli.main(run_args(data, tmp_path / "o", "--executor", "ray", "--workers", "0")) == 2
    assert "workers must be an integer >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    with pytest.raises(InputError, match="workers load the model by its name or path"):
        ModelSpec.of(qwen2_audio_model)  # built in memory (from_hf): nothing a worker could load


@needs_ray
def test_a_cluster_address_where_none_answers_is_refused_at_once(samples, sweep, tmp_path, monkeypatch):
    import ray

    from audiolens_ct.executors.ray_executor import RayExecutor

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as in a fresh process, whatever ran before
    with pytest.raises(ExecutorError, match=r"no Ray cluster answers at 127.0.0.1:1 \(.*\); start one with `ray start"):
        run_experiment(ModelSpec(str(DEMO_MODEL)), samples, tmp_path / "o", executor=RayExecutor(address="127.0.0.1:1"),
                       **sweep)  # fmt: skip
    assert not (tmp_path / "o").exists()


@needs_ray
def test_a_worker_that_sees_a_clip_other_than_the_driver_refuses_before_loading_the_model(samples):
    from audiolens_ct.executors.ray_executor import TracerActor

    elsewhere = ModelSpec("/no/such/checkpoint")  # never loaded: the clips are checked first
    with pytest.raises(DataError, match=r"Gender/audio/0000.wav has \d+ bytes, not 1 on worker host .*: put the data "
                                        "set on a shared filesystem or copy it to the same path on every node"):  # fmt: skip
        TracerActor().start(elsewhere, samples, TraceConfig(), 1, {0: 1})
