"""Specification of the data layer: AudioLens prompts, SAKURA in its three forms, manifests, and bad input."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from audiolens_ct.audio import decode
from audiolens_ct.data import (
    ATTRIBUTES,
    TRACKS,
    DataError,
    get_track,
    load_manifest,
    load_sakura,
    load_sakura_hf,
    make_track,
)
from audiolens_ct.data.sample import make_sample
from audiolens_ct.demo.synthetic import write_synthetic_sakura
from audiolens_ct.errors import AudioLoadError

RATE = 16000


def _tone(seconds: float, freq: float, rate: int = RATE) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _write_wav(path: Path, wave: np.ndarray, rate: int = RATE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, wave, rate, subtype="PCM_16")
    return path


def _write_csv(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def synthetic_github(tmp_path_factory) -> Path:
    return write_synthetic_sakura(tmp_path_factory.mktemp("sakura_github"), n_per_label=1, seed=3)


# -- prompts ------------------------------------------------------------------------------------------------------


def test_tracks_are_the_audiolens_prompts_word_for_word():
    assert ATTRIBUTES == ("animal", "emotion", "gender", "language")
    expected = {
        "animal": (
            "What animal makes the sound? Possible options: dog, cat, pig, cow, frog, hen, rooster, sheep, crow.",
            "The sound file's animal is",
        ),
        "emotion": (
            "What is the emotion of the speaker in the speech? Possible options: angry, disgust, fear, happy, sad.",
            "The speaker's emotion is",
        ),
        "gender": (
            "What is the gender of the speaker in the speech? Possible options: male, female.",
            "The speaker's gender is",
        ),
        "language": (
            "What is the language spoken in the speech? Possible options: English, German, Spanish, French, "
            "Italian, Chinese, Japanese, Korean.",
            "The speech's spoken language is",
        ),
    }
    for attribute, (prompt, prefix) in expected.items():
        track = TRACKS[attribute]
        assert (track.prompt, track.response_prefix) == (prompt, prefix)
        assert track.object_text == ", ".join(track.labels)
    assert TRACKS["animal"].labels == ("dog", "cat", "pig", "cow", "frog", "hen", "rooster", "sheep", "crow")
    assert TRACKS["gender"].object_text == "male, female"
    assert TRACKS["language"].canonical_label(" english ") == "English"
    assert TRACKS["language"].canonical_label("Klingon") is None


def test_custom_tracks_keep_the_option_list_findable_in_the_prompt():
    reworded = make_track("gender", prompt="Is this voice male, female? Answer briefly.")
    assert reworded.labels == ("male", "female") and reworded.object_text == "male, female"
    assert reworded.response_prefix == "The speaker's gender is"
    fewer = make_track("emotion", labels=("happy", "sad"))
    assert fewer.prompt == "What is the emotion of the speaker in the speech? Possible options: happy, sad."
    slashed = make_track("gender", prompt="Male or female?", object_text="Male or female")
    assert slashed.object_text == "Male or female"
    new = make_track("speed", prompt="Fast or slow? Options: fast, slow.", labels=["fast", "slow"],
                     response_prefix="The speech is")  # fmt: skip
    assert new.attribute == "speed" and new.labels == ("fast", "slow")

    with pytest.raises(DataError, match=r"option list 'male, female' does not occur in the prompt"):
        make_track("gender", prompt="Who is speaking?")
    with pytest.raises(
        DataError, match=r"'speed' is not one of the paper's tracks .* give labels, response_prefix"
    ):
        make_track("speed", prompt="Fast or slow?")
    with pytest.raises(DataError, match="ends in whitespace"):
        make_track("gender", response_prefix="The speaker's gender is ")
    with pytest.raises(DataError, match="labels repeat"):
        make_track("gender", labels=("male", "Male"))
    with pytest.raises(
        DataError, match="unknown attribute 'colour'; the tracks are animal, emotion, gender, language"
    ):
        get_track("colour")


# -- SAKURA on disk -----------------------------------------------------------------------------------------------


def test_github_layout_reads_every_track_with_audiolens_questions(synthetic_github):
    samples = load_sakura(synthetic_github)
    assert len(samples) == sum(len(t.labels) for t in TRACKS.values()) == 24
    by_attribute = {a: [s for s in samples if s.attribute == a] for a in ATTRIBUTES}
    for attribute, group in by_attribute.items():
        track = TRACKS[attribute]
        assert [s.label for s in group] == list(track.labels)
        assert all(s.ok and s.prompt == track.prompt and s.options == track.labels for s in group)
    first = by_attribute["gender"][0]
    assert first.id == "Gender/0000.wav"
    assert first.audio_path == synthetic_github / "Gender" / "audio" / "0000.wav"
    wave = first.load(RATE)
    assert wave.dtype == np.float32 and wave.ndim == 1 and 1.0 <= len(wave) / RATE <= 5.0


def test_audiofolder_layout_gives_the_same_samples_as_the_github_layout(synthetic_github, tmp_path):
    root = write_synthetic_sakura(
        tmp_path, n_per_label=1, seed=3, layout="audiofolder", attributes=["gender"]
    )
    assert (root / "Gender" / "0000.wav").is_file() and not (root / "Gender" / "audio").exists()
    folder = load_sakura(root)
    github = load_sakura(synthetic_github, attributes="gender")
    assert [(s.id, s.label) for s in folder] == [(s.id, s.label) for s in github]
    np.testing.assert_array_equal(folder[1].load(RATE), github[1].load(RATE))


def test_repository_root_limit_and_attribute_selection(tmp_path):
    write_synthetic_sakura(tmp_path / "data", n_per_label=2, seed=0, attributes=["gender", "emotion"])
    samples = load_sakura(tmp_path, attributes=["emotion", "Gender"], limit=3)
    assert [s.attribute for s in samples] == ["emotion"] * 3 + ["gender"] * 3
    assert len(load_sakura(tmp_path)) == 2 * (5 + 2)  # None: every track folder present


def test_labels_are_normalised_and_unknown_labels_are_flagged_not_dropped(tmp_path):
    track_dir = tmp_path / "Language"
    for name in ("a.wav", "b.wav", "c.wav"):
        _write_wav(track_dir / "audio" / name, _tone(1.0, 220))
    _write_csv(
        track_dir / "metadata.csv",
        [
            {"file": "a.wav", "attribute_label": " english"},
            {"file": "audio/b.wav", "attribute_label": "KOREAN "},
            {"file": "data/Language/audio/c.wav", "attribute_label": "Klingon"},
        ],
    )
    a, b, c = load_sakura(tmp_path)
    assert (a.label, b.label, a.error, b.error) == ("English", "Korean", None, None)
    assert b.audio_path == track_dir / "audio" / "b.wav" and c.id == "Language/c.wav"
    assert c.label == "Klingon" and not c.ok
    assert c.error.startswith(
        "label 'Klingon' is not among the options of track 'language' (English, German,"
    )


def test_sakura_errors_name_the_path_column_or_attribute(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path / 'nowhere'}: SAKURA folder not found"):
        load_sakura(tmp_path / "nowhere")
    with pytest.raises(
        DataError, match="holds none of the SAKURA track folders Animal, Emotion, Gender, Language; .* --manifest FILE"
    ):
        load_sakura(tmp_path)
    (tmp_path / "Gender").mkdir()
    with pytest.raises(DataError, match=f"{tmp_path / 'Gender' / 'metadata.csv'}: metadata file not found"):
        load_sakura(tmp_path)
    with pytest.raises(DataError, match=f"{tmp_path / 'Animal'}: track folder not found"):
        load_sakura(tmp_path, attributes=["animal"])
    with pytest.raises(
        DataError, match="unknown attribute 'accent'; the tracks are animal, emotion, gender, language"
    ):
        load_sakura(tmp_path, attributes=["accent"])
    _write_csv(tmp_path / "Gender" / "metadata.csv", [{"file": "x.wav", "label": "male"}])
    with pytest.raises(
        DataError, match=r"metadata.csv: no 'attribute_label' column; columns: \['file', 'label'\]"
    ):
        load_sakura(tmp_path)


def test_missing_audio_is_recorded_and_corrupt_audio_fails_on_load_naming_the_file(tmp_path):
    track_dir = tmp_path / "Gender"
    (track_dir / "audio").mkdir(parents=True)
    (track_dir / "audio" / "bad.wav").write_bytes(b"RIFF\x00\x00 this is not audio")
    _write_csv(
        track_dir / "metadata.csv",
        [{"file": "gone.wav", "attribute_label": "male"}, {"file": "bad.wav", "attribute_label": "female"}],
    )
    gone, bad = load_sakura(tmp_path)
    assert gone.error == f"{track_dir / 'audio' / 'gone.wav'}: no such audio file"
    assert bad.ok
    with pytest.raises(AudioLoadError, match=r"bad\.wav: not a readable audio file \(soundfile: ") as err:
        bad.load(RATE)
    assert str(err.value).count("bad.wav") == 1  # soundfile's own message names the file again; said once


def test_nan_audio_is_refused_naming_the_file_or_the_sample(tmp_path):
    wave = _tone(0.2, 440)
    wave[100] = np.nan
    sf.write(tmp_path / "nan.wav", wave, RATE, subtype="FLOAT")
    (from_file,) = load_manifest(_write_csv(tmp_path / "m.csv", [{"audio": "nan.wav", "attribute": "gender",
                                                                  "label": "male"}]))  # fmt: skip
    with pytest.raises(AudioLoadError, match=r"nan\.wav: the file holds NaN or infinite samples"):
        from_file.load(RATE)
    in_memory = make_sample(TRACKS["gender"], "clip-7", "male", waveform=wave, waveform_rate=RATE)
    with pytest.raises(AudioLoadError, match="sample clip-7: the waveform holds NaN or infinite samples"):
        in_memory.load(RATE)


# -- SAKURA as a Hugging Face dataset -----------------------------------------------------------------------------


def test_hf_dataset_with_audio_feature_is_read_without_torchcodec(tmp_path):
    datasets = pytest.importorskip("datasets")

    paths = [_write_wav(tmp_path / f"{i}.wav", _tone(1.0, 200 + 100 * i)) for i in range(3)]
    ds = datasets.Dataset.from_dict(
        {"audio": [str(p) for p in paths], "attribute_label": ["female", "Male", "robot"]}
    ).cast_column("audio", datasets.Audio(sampling_rate=RATE))
    samples = load_sakura_hf(datasets.DatasetDict({"test": ds}), "gender")
    assert [(s.id, s.label, s.ok) for s in samples] == [
        ("Gender/0.wav", "female", True),
        ("Gender/1.wav", "male", True),
        ("Gender/2.wav", "robot", False),
    ]
    np.testing.assert_allclose(samples[1].load(RATE), _tone(1.0, 300), atol=1e-4)  # 16-bit PCM round trip
    assert load_sakura_hf(ds, "gender", limit=2)[-1].id == "Gender/1.wav"


def test_hf_dataset_with_decoded_arrays_and_class_labels_resamples_in_load():
    datasets = pytest.importorskip("datasets")

    wave = _tone(0.5, 440, rate=22050)
    ds = datasets.Dataset.from_dict(
        {"audio": [{"array": wave, "sampling_rate": 22050}], "label": [1]},
        features=datasets.Features(
            {
                "audio": {
                    "array": datasets.Sequence(datasets.Value("float32")),
                    "sampling_rate": datasets.Value("int64"),
                },
                "label": datasets.ClassLabel(names=["English", "German"]),
            }
        ),
    )
    (sample,) = load_sakura_hf(ds, "language")
    assert (sample.id, sample.label, sample.waveform_rate) == ("Language/0", "German", 22050)
    loaded = sample.load(RATE)
    assert len(loaded) == RATE // 2
    assert abs(np.argmax(np.abs(np.fft.rfft(loaded))) * RATE / len(loaded) - 440) <= 2


def test_hf_dataset_errors_name_the_missing_column_and_bad_bytes_are_flagged():
    datasets = pytest.importorskip("datasets")

    with pytest.raises(DataError, match=r"has no 'audio' column; columns: \['path', 'attribute_label'\]"):
        load_sakura_hf(datasets.Dataset.from_dict({"path": ["a.wav"], "attribute_label": ["male"]}), "gender")
    with pytest.raises(DataError, match="has splits \\['train', 'dev'\\]"):
        empty = datasets.Dataset.from_dict({"audio": [], "attribute_label": []})
        load_sakura_hf(datasets.DatasetDict({"train": empty, "dev": empty}), "gender")
    ds = datasets.Dataset.from_dict(
        {"audio": [{"bytes": b"not audio", "path": "clip.wav"}], "attribute_label": ["male"]}
    ).cast_column("audio", datasets.Audio(decode=False))
    (sample,) = load_sakura_hf(ds, "gender")
    assert sample.error.startswith("clip.wav: not readable audio (soundfile: ")


# -- manifests ----------------------------------------------------------------------------------------------------


def test_csv_manifest_with_defaults_custom_options_and_absolute_paths(tmp_path):
    _write_wav(tmp_path / "clips" / "a.wav", _tone(1.0, 220))
    absolute = _write_wav(tmp_path / "elsewhere" / "b.wav", _tone(1.0, 330))
    manifest = _write_csv(
        tmp_path / "manifest.csv",
        [
            {"audio": "clips/a.wav", "attribute": "gender", "label": "Female", "prompt": "", "options": ""},
            {
                "audio": str(absolute),
                "attribute": "emotion",
                "label": "sad",
                "prompt": "How does the speaker feel? Possible options: happy, sad.",
                "options": "happy|sad",
            },
        ],
    )
    a, b = load_manifest(manifest)
    assert (a.id, a.label, a.prompt, a.options) == (
        "clips/a.wav",
        "female",
        TRACKS["gender"].prompt,
        ("male", "female"),
    )
    assert a.audio_path == tmp_path / "clips" / "a.wav" and a.ok
    assert (b.options, b.object_text, b.response_prefix) == (
        ("happy", "sad"),
        "happy, sad",
        "The speaker's emotion is",
    )
    np.testing.assert_allclose(b.load(RATE), _tone(1.0, 330), atol=1e-4)


def test_jsonl_manifest_with_a_new_attribute_and_recorded_problems(tmp_path):
    _write_wav(tmp_path / "a.wav", _tone(1.0, 220))
    rows = [
        {"id": "fast-1", "audio": "a.wav", "attribute": "speed", "label": "Fast", "options": ["fast", "slow"],
         "prompt": "Is the speech fast or slow?", "object_text": "fast or slow", "response_prefix": "The speech is"},
        {"audio_path": "missing.wav", "attribute": "gender", "label": "male"},
        {"audio": "a.wav", "attribute": "animal", "label": "wolf"},
    ]  # fmt: skip
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    speed, missing, wolf = load_manifest(manifest)
    assert (speed.id, speed.attribute, speed.label, speed.object_text) == (
        "fast-1",
        "speed",
        "fast",
        "fast or slow",
    )
    assert missing.error == f"{tmp_path / 'missing.wav'}: no such audio file"
    assert wolf.error.startswith("label 'wolf' is not among the options of track 'animal' (dog, cat, pig,")
    assert wolf.label == "wolf" and wolf.load(RATE).shape == (RATE,)


MALFORMED_JSONL = {  # manifest text -> the error, which names the file and the line
    '{"audio": "a.wav", "attribute": "gender", "label": "male"}\n{"audio": "b.wav",\n': r"m\.jsonl:2: not valid JSON",
    '["a.wav", "gender", "male"]\n': r"m\.jsonl:1: expected a JSON object, got list",
    '{"audio": "a.wav", "attribute": "gender", "label": "male", "options": "male"}\n':
        r"m\.jsonl:1: 'options' must be a list of strings",
}
MALFORMED_CSV = {
    "audio,attribute,label\na.wav,gender,male\nb.wav,gender\n": r"m\.csv:3: fewer fields than the header has columns",
    "audio,attribute,label\na.wav,gender,male,extra\n": r"m\.csv:2: more fields than the header",
    "audio,attribute\na.wav,gender\n": r"m\.csv:2: no value in column 'label'",
    "audio,attribute,label\na.wav,gender,male\na.wav,gender,female\n": r"m\.csv:3: id 'a\.wav' repeats line 2",
    "audio,attribute,label,prompt\na.wav,gender,male,Who speaks?\n":
        r"m\.csv:2: track 'gender': the option list 'male, female' does not occur in the prompt",
    "audio,attribute,label\na.wav,colour,red\n": r"m\.csv:2: attribute 'colour' is not one of",
    "audio,attribute,label\n": r"m\.csv: the manifest lists no samples",
}  # fmt: skip


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        *(("m.jsonl", text, message) for text, message in MALFORMED_JSONL.items()),
        *(("m.csv", text, message) for text, message in MALFORMED_CSV.items()),
        ("m.txt", "a.wav gender male\n", r"m\.txt: a manifest must be \.csv or \.jsonl"),
    ],
)
def test_malformed_manifests_raise_naming_file_and_line(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(DataError, match=message):
        load_manifest(tmp_path / name)


def test_latin1_manifests_and_metadata_are_refused_naming_the_file_and_byte_offset(tmp_path):
    text = "audio,attribute,label,prompt\nb\xe9b\xe9.wav,gender,male,\n"
    (tmp_path / "m.csv").write_bytes(text.encode("latin-1"))
    (tmp_path / "m.jsonl").write_bytes('{"audio": "\xe9.wav", "attribute": "gender", "label": "male"}\n'.encode("latin-1"))
    for name, offset in (("m.csv", 30), ("m.jsonl", 11)):
        with pytest.raises(DataError, match=rf"{name}: not UTF-8 text \(byte 0xe9 at offset {offset}\); save it as UTF-8"):
            load_manifest(tmp_path / name)
    (tmp_path / "Gender").mkdir()
    (tmp_path / "Gender" / "metadata.csv").write_bytes("file,attribute_label\nh\xe9.wav,male\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"Gender/metadata\.csv: not UTF-8 text \(byte 0xe9 at offset 22\)"):
        load_sakura(tmp_path)
    (tmp_path / "u.csv").write_text("\ufeff" + text, encoding="utf-8")  # UTF-8 with a byte-order mark reads fine
    assert load_manifest(tmp_path / "u.csv")[0].id == "b\xe9b\xe9.wav"


def test_missing_manifest_is_named(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path / 'none.csv'}: manifest not found"):
        load_manifest(tmp_path / "none.csv")


# -- audio boundary -----------------------------------------------------------------------------------------------


def test_44k_stereo_file_loads_as_16k_mono(tmp_path):
    left = _tone(0.5, 440, rate=44100)
    stereo = np.stack([left, np.zeros_like(left)], axis=1)
    _write_wav(tmp_path / "stereo.wav", stereo, rate=44100)
    (sample,) = load_manifest(_write_csv(tmp_path / "m.csv", [{"audio": "stereo.wav", "attribute": "gender",
                                                                "label": "male"}]))  # fmt: skip
    wave = sample.load(RATE)
    assert wave.shape == (RATE // 2,) and wave.dtype == np.float32
    assert abs(np.argmax(np.abs(np.fft.rfft(wave))) * RATE / len(wave) - 440) <= 2
    assert abs(np.abs(wave[1000:-1000]).max() - 0.25) < 0.01  # the two channels averaged


def test_a_file_decodes_alike_from_its_path_and_its_bytes_and_errors_name_it_once(tmp_path):
    path = _write_wav(tmp_path / "a.wav", np.stack([_tone(0.5, 440), np.zeros(RATE // 2, np.float32)], axis=1))
    from_path, from_bytes = decode(path), decode(path.read_bytes(), name="a.wav")
    np.testing.assert_array_equal(from_path[0], from_bytes[0])
    assert from_path[1] == from_bytes[1] == RATE and from_path[0].shape == (RATE // 2,)  # channels averaged
    with pytest.raises(AudioLoadError, match=r"^clip\.wav: not readable audio \(soundfile: [^<]*\)$"):
        decode(b"not audio", name="clip.wav")  # soundfile's repr of the buffer is left out
    with pytest.raises(AudioLoadError, match=r"gone\.wav: no such audio file"):
        decode(tmp_path / "gone.wav")
