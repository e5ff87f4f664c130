"""The `audiolens-ct` command line: trace writes records, an aggregate and a report; a killed run resumes to the
same result; bad input ends in one line and exit code 2."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import soundfile as sf
import torch
from _shared_checks import assert_same

import audiolens_ct as act
from audiolens_ct import cli
from audiolens_ct.data.prompts import TRACKS
from audiolens_ct.plots import static_export_available
from audiolens_ct.testing import tiny_model, tone
from audiolens_ct.tracing.audit import TOKEN_CELLS
from audiolens_ct.tracing.scoring import answer_tokens

ANIMAL = TRACKS["animal"]
N_SAMPLES = 6


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-qwen2-audio")
    hf_model, processor = tiny_model("qwen2-audio", seed=2)
    hf_model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def clips(tiny_dir):
    """Tones labelled so that this random model keeps two (clean right, silent wrong) and gets one wrong."""
    model = act.HookedLALM.from_pretrained(str(tiny_dir))
    ids = answer_tokens(model.tokenizer, ANIMAL.labels)

    def probs(wave):
        with torch.no_grad():
            return model(model.prepare(wave, ANIMAL.prompt, ANIMAL.response_prefix))[0, -1].softmax(-1)

    kept = []
    for freq in (250, 400, 600, 900, 1300, 2000):
        wave = tone(0.5, freq, seed=freq)
        clean, silent = probs(wave), probs(np.zeros_like(wave))
        label = max(ANIMAL.labels, key=lambda o: float(clean[ids[o]]))
        if label != max(ANIMAL.labels, key=lambda o: float(silent[ids[o]])) and clean[ids[label]] > silent[ids[label]]:
            kept.append((wave, label))
    assert len(kept) >= 3, "the tiny model keeps too few tones for the fixture"
    wrong = next(o for o in ANIMAL.labels if o != kept[2][1])
    return {"kept": kept[:2], "wrong": (kept[2][0], wrong)}


def write_sakura(root, layout, clips):
    """Animal track: kept, corrupted wav, kept, missing file, label outside the options, wrongly labelled."""
    folder = root / "Animal"
    audio = folder / "audio" if layout == "github" else folder
    audio.mkdir(parents=True)
    (k1, l1), (k2, l2) = clips["kept"]
    rows = [(k1, l1), (b"RIFF\x00\x00not a wav", l1), (k2, l2), (None, l1), (k2, "unicorn"), clips["wrong"]]
    column = "file" if layout == "github" else "file_name"
    with open(folder / "metadata.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[column, "attribute_label"])
        writer.writeheader()
        for i, (content, label) in enumerate(rows):
            name = f"{i:04d}.wav"
            if isinstance(content, bytes):
                (audio / name).write_bytes(content)
            elif content is not None:
                sf.write(audio / name, content, 16000, subtype="PCM_16")
            writer.writerow({column: name, "attribute_label": label})
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory, clips):
    root = tmp_path_factory.mktemp("sakura")
    return {layout: write_sakura(root / layout, layout, clips) for layout in ("github", "audiofolder")}


def trace_args(model, source, out, *extra):
    return ["run", str(model), *([] if source is None else [str(source)]), "--out", str(out),
            "--modes", "layer", "token", "--no-progress", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def reference(tiny_dir, data, tmp_path_factory):
    """An uninterrupted run over the GitHub layout, in process."""
    out = tmp_path_factory.mktemp("runs") / "reference"
    assert cli.main(trace_args(tiny_dir, data["github"], out)) == 0
    return out


def record_names(out):
    return sorted(p.relative_to(out).as_posix() for p in (out / "records").glob("*/*.json"))




def test_killed_trace_resumes_to_the_same_aggregate_as_an_uninterrupted_run(tiny_dir, data, reference, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "audiolens_ct.cli", *trace_args(tiny_dir, data["github"], out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "stderr.txt", "w") as stderr:
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.monotonic() + 240
        while not list((out / "records").glob("*/*.json")):
            assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()
            assert time.monotonic() < deadline, "no record appeared"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    before = len(record_names(out))
    assert 1 <= before < N_SAMPLES and not (out / "aggregate.json").exists()  # killed mid-run
    traced = sum(json.loads(p.read_text())["status"] != "error" for p in (out / "records").glob("*/*.json"))

    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "error: animal Animal/0003.wav: " in resumed.stderr and "no such audio file" in resumed.stderr
    assert f"{N_SAMPLES} samples: 2 kept, 1 excluded, 3 errors ({traced} from an earlier run)" in resumed.stdout
    assert record_names(out) == record_names(reference) and len(record_names(out)) == N_SAMPLES
    assert not list(out.rglob("*.tmp"))
    aggregate = json.loads((out / "aggregate.json").read_text())
    assert_same(json.loads((reference / "aggregate.json").read_text()), aggregate)
    animal = aggregate["attributes"]["animal"]
    assert animal["counts"] == {"samples": 6, "kept": 2, "excluded": {"clean_wrong": 1}, "errors": 3}
    assert len(animal["layer_rr"]["mean"]) == 3 and animal["token_rr"]["from_end"][-1] == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["invocations"]) == 2 and manifest["settings"]["modes"] == ["layer", "token"]
    page = (out / "report.html").read_text()
    assert "<td>animal</td><td>6</td><td>2</td><td>1</td>" in page and page.count("Plotly.newPlot") == 3


def test_errors_are_recorded_with_their_reason(reference):
    errors = json.loads((reference / "aggregate.json").read_text())["attributes"]["animal"]["errors"]
    reasons = {e["sample_id"]: e["error"] for e in errors}
    assert "not a readable audio file" in reasons["Animal/0001.wav"]
    assert "no such audio file" in reasons["Animal/0003.wav"]
    assert "'unicorn' is not among the options of track 'animal'" in reasons["Animal/0004.wav"]
    assert all(message in (reference / "report.html").read_text() for message in ("no such audio file", "unicorn"))


def test_audiofolder_layout_and_a_manifest_trace_the_same_clips(tiny_dir, data, reference, tmp_path):
    out = tmp_path / "audiofolder"
    assert cli.main(trace_args(tiny_dir, data["audiofolder"], out)) == 0
    ours = json.loads((out / "aggregate.json").read_text())["attributes"]["animal"]
    theirs = json.loads((reference / "aggregate.json").read_text())["attributes"]["animal"]
    for key in ("counts", "layer_rr", "segment_rr", "token_rr"):
        assert_same(theirs[key], ours[key], key)

    root = data["github"]
    kept_label = next(csv.DictReader((root / "Animal" / "metadata.csv").read_text().splitlines()))["attribute_label"]
    with open(root / "clips.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "audio", "attribute", "label"])
        writer.writerows([
            ["good", "Animal/audio/0000.wav", "animal", kept_label],
            ["broken", "Animal/audio/0001.wav", "animal", kept_label],
            ["missing", "Animal/audio/0003.wav", "animal", kept_label],
            ["unicorn", "Animal/audio/0000.wav", "animal", "unicorn"],
        ])  # fmt: skip
    out = tmp_path / "manifest"
    assert cli.main(trace_args(tiny_dir, None, out, "--manifest", str(root / "clips.csv"), "--attributes", "animal")) == 0
    animal = json.loads((out / "aggregate.json").read_text())["attributes"]["animal"]
    assert animal["counts"] == {"samples": 4, "kept": 1, "excluded": {}, "errors": 3}
    assert sorted(e["sample_id"] for e in animal["errors"]) == ["broken", "missing", "unicorn"]
    good = json.loads(next((out / "records").glob("*/good-*.json")).read_text())["result"]
    first = json.loads(next((reference / "records").glob("*/Animal_0000.wav-*.json")).read_text())["result"]
    assert np.abs(np.subtract(good["layer_rr"], first["layer_rr"])).max() <= 1e-9


def test_bad_input_ends_in_one_line_and_exit_code_2(tiny_dir, data, tmp_path, capsys):
    bad_manifest = tmp_path / "bad.jsonl"
    bad_manifest.write_text('{"audio": "a.wav", "attribute": "gender", "label": "male"}\n{not json\n')
    out = tmp_path / "out"
    a_file = tmp_path / "out.txt"
    a_file.write_text("not a folder")
    cases = [
        (trace_args(tmp_path / "no-model", data["github"], out), "no such checkpoint directory"),
        *[(trace_args(tiny_dir, data["github"], out, "--device", device), "is not available to torch")
          for device in ("mps", "cuda:7") + (() if torch.cuda.is_available() else ("cuda",))],
        (trace_args(tiny_dir, data["github"], out, "--device", "gpu"), "'gpu' is not a torch device"),
        (trace_args(tiny_dir, data["github"], a_file), "out.txt: exists and is not a directory"),
        (trace_args(tiny_dir, data["github"], a_file / "run"), "cannot write here (Not a directory)"),
        (trace_args(tiny_dir, tmp_path / "no-data", out), "SAKURA folder not found"),
        (trace_args(tiny_dir, data["github"], out, "--attributes", "colour"), "unknown attribute 'colour'"),
        (trace_args(tiny_dir, None, out, "--manifest", str(bad_manifest)), "bad.jsonl:2: not valid JSON"),
        (trace_args(tiny_dir, None, out), "either a SAKURA data folder or --manifest"),
        (trace_args(tiny_dir, data["github"], out, "--port", "qwen3-audio"), "unknown port 'qwen3-audio'"),
        (trace_args(tiny_dir, data["github"], out, "--window", "0"), "window must be an integer >= 1, got 0"),
        (["plot", str(tmp_path)], "not an audiolens-ct output directory"),
    ]
    for argv, message in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("audiolens-ct: error: ") and message in err, err
        assert err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


def test_other_settings_into_the_same_directory_are_refused(tiny_dir, data, reference, capsys):
    before = {p: p.stat().st_mtime_ns for p in (reference / "records").glob("*/*.json")}
    assert cli.main(trace_args(tiny_dir, data["github"], reference, "--corruption", "noise")) == 2
    err = capsys.readouterr().err
    assert "corruption: 'silence' here, 'noise' asked" in err and err.count("\n") == 1
    assert {p: p.stat().st_mtime_ns for p in (reference / "records").glob("*/*.json")} == before


def test_a_directory_traced_with_other_library_versions_is_refused_unless_accepted(tiny_dir, data, reference,
                                                                                   tmp_path, capsys):  # fmt: skip
    out = tmp_path / "older"
    shutil.copytree(reference, out)
    manifest = json.loads((out / "manifest.json").read_text())
    installed = manifest["versions"]["transformers"]
    manifest["versions"]["transformers"] = "5.0.0"
    (out / "manifest.json").write_text(json.dumps(manifest))
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert cli.main(trace_args(tiny_dir, data["github"], out)) == 2
    err = capsys.readouterr().err
    assert f"transformers 5.0.0 -> {installed}" in err and "new --out" in err and "--accept-versions" in err
    assert err.count("\n") == 1
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # refused before anything was written
    assert cli.main(trace_args(tiny_dir, data["github"], out, "--accept-versions")) == 0
    invocations = json.loads((out / "manifest.json").read_text())["invocations"]
    assert invocations[-1]["versions"]["transformers"] == installed


def test_records_keep_the_audit_and_no_audit_turns_it_off(tiny_dir, data, reference, tmp_path):
    kept = [json.loads(p.read_text()) for p in (reference / "records").glob("*/*.json")]
    kept = [r for r in kept if r["status"] == "kept"]
    assert kept and all(r["result"]["audit"]["max_abs_diff"] <= 1e-5 for r in kept)
    assert all(len(r["result"]["audit"]["cells"]) == 2 + TOKEN_CELLS for r in kept)
    out = tmp_path / "unaudited"
    assert cli.main(trace_args(tiny_dir, data["github"], out, "--no-audit")) == 0
    records = [json.loads(p.read_text()) for p in (out / "records").glob("*/*.json")]
    assert all(r["result"]["audit"] is None for r in records if r["status"] == "kept")


HOLD_LOCK = """
import sys
from audiolens_ct.store import RunStore
with RunStore(sys.argv[1]).lock("audiolens-ct trace holder"):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_a_second_writer_is_refused_before_loading_and_a_killed_writer_blocks_nothing(tiny_dir, data, tmp_path,
                                                                                     capsys, monkeypatch):  # fmt: skip
    out = tmp_path / "shared-out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"

        def must_not_load(*args, **kwargs):
            raise AssertionError("the model was loaded although the directory is locked")

        with monkeypatch.context() as patch:
            patch.setattr(act.HookedLALM, "from_pretrained", must_not_load)
            assert cli.main(trace_args(tiny_dir, data["github"], out, "--corruption", "noise")) == 2
        err = capsys.readouterr().err
        assert f"pid {holder.pid}" in err and "audiolens-ct trace holder" in err and "another --out" in err
        assert err.count("\n") == 1 and not (out / "manifest.json").exists()
    finally:
        holder.kill()  # SIGKILL: the lock file stays behind, the lock itself dies with the process
        holder.wait()
    assert (out / ".lock").exists()
    assert cli.main(trace_args(tiny_dir, data["github"], out)) == 0
    assert len(record_names(out)) == N_SAMPLES


def test_plot_overlays_runs_and_report_rewrites_the_page(reference, tmp_path, capsys):
    assert cli.main(["plot", str(reference), str(reference), "--out", str(tmp_path / "figures")]) == 0
    written = sorted(p.name for p in (tmp_path / "figures").iterdir())
    assert written == ["layer_rr.html", "plotly.min.js", "segment_rr.html", "token_rr_tiny-qwen2-audio0_reference_1_animal.html",
                       "token_rr_tiny-qwen2-audio0_reference_2_animal.html"]  # fmt: skip
    layer = (tmp_path / "figures" / "layer_rr.html").read_text()
    assert "tiny-qwen2-audio0 (reference) #1 95% CI" in layer and "tiny-qwen2-audio0 (reference) #2" in layer
    if not static_export_available():
        assert cli.main(["plot", str(reference), "--static", "png"]) == 2
        assert "needs the kaleido package" in capsys.readouterr().err
    (reference / "report.html").unlink()
    assert cli.main(["report", str(reference)]) == 0
    assert (reference / "report.html").stat().st_size > 1_000_000  # plotly.js inlined


def test_demo_command_calls_run_demo(monkeypatch, tmp_path, capsys):
    calls = []
    fake = types.ModuleType("audiolens_ct.demo")
    fake.run_demo = lambda out: calls.append(out) or out / "report.html"
    monkeypatch.setitem(sys.modules, "audiolens_ct.demo", fake)
    assert cli.main(["demo", "--out", str(tmp_path)]) == 0
    assert calls == [tmp_path] and str(tmp_path / "report.html") in capsys.readouterr().out


def test_help_and_argument_errors_import_neither_torch_nor_a_model_library():
    """`audiolens-ct --help` answers at once: the parser needs only `audiolens_ct.choices`."""
    probe = (
        "import sys\n"
        "from audiolens_ct import cli\n"
        "for argv in (['--help'], ['run', '--help'], ['run', 'm', '--kind', 'bogus']):\n"
        "    try:\n"
        "        cli.build_parser().parse_args(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'transformer_lens', 'numpy') if m in sys.modules)\n"
        "print(','.join(heavy) or 'none')\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "none"


def test_help_explains_every_run_option(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["run", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for option in ("--port", "--manifest", "--attributes", "--corruption", "--modes", "--engine", "--kind", "--window",
                   "--device", "--dtype", "--out", "--limit", "--seed", "--max-batch", "--no-audit",
                   "--accept-versions", "--long-audio", "--layer-positions", "--trace-excluded"):  # fmt: skip
        assert option in text
    assert "(default: resid_pre)" in text


def test_every_trace_config_field_is_a_run_flag_with_the_same_default():
    """The command line builds its `TraceConfig` field by field; a new option needs its flag here too."""
    parser = cli.build_parser()
    args = parser.parse_args(["run", "m", "data", "--out", "o"])
    assert cli.trace_config(args) == act.TraceConfig()
    changed = cli.trace_config(parser.parse_args(["run", "m", "data", "--out", "o", "--no-audit", "--window", "3",
                                                  "--modes", "token", "--trace-excluded"]))  # fmt: skip
    assert changed == act.TraceConfig(audit=False, window=3, modes=("token",), trace_excluded=True)


def test_the_old_trace_verb_still_runs_and_says_it_was_renamed(tiny_dir, data, tmp_path, capsys):
    assert cli.main(["trace", str(tiny_dir), str(data["github"]), "--out", str(tmp_path / "o"), "--limit", "1",
                     "--attributes", "animal", "--modes", "layer", "--no-progress"]) == 0  # fmt: skip
    assert "`trace` is now `run`" in capsys.readouterr().err
