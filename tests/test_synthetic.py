"""Specification of the synthetic SAKURA: format, determinism, and classes that are learnable but not trivial."""

import csv

import numpy as np
import pytest
import soundfile as sf
import torch

from audiolens_ct.data import TRACKS, load_sakura
from audiolens_ct.demo.synthetic import SAMPLING_RATE, clip_rng, synthetic_clip, write_synthetic_sakura
from audiolens_ct.errors import DataError

TRAIN_CLIPS, HELDOUT_CLIPS = 160, 80  # per track, spread evenly over its labels


def test_clips_are_16k_mono_float32_of_one_to_five_seconds_at_a_sane_level():
    for attribute, track in TRACKS.items():
        for label in track.labels:
            wave = synthetic_clip(attribute, label, clip_rng(0, attribute, label, 0))
            assert wave.dtype == np.float32 and wave.ndim == 1
            assert 1.0 <= len(wave) / SAMPLING_RATE <= 5.0
            assert np.isfinite(wave).all() and np.abs(wave).max() <= 0.99
            rms_db = 20 * np.log10(np.sqrt(np.mean(wave**2)))
            assert -30 < rms_db < -10, (attribute, label, rms_db)


def test_same_seed_gives_identical_clips_whatever_else_is_generated(tmp_path):
    first = synthetic_clip("animal", "dog", clip_rng(7, "animal", "dog", 3))
    np.testing.assert_array_equal(first, synthetic_clip("animal", "dog", clip_rng(7, "animal", "dog", 3)))
    assert not np.array_equal(
        first[:16000], synthetic_clip("animal", "dog", clip_rng(7, "animal", "dog", 4))[:16000]
    )
    assert not np.array_equal(
        first[:16000], synthetic_clip("animal", "dog", clip_rng(8, "animal", "dog", 3))[:16000]
    )

    alone = write_synthetic_sakura(tmp_path / "alone", 2, seed=5, attributes=["gender"])
    both = write_synthetic_sakura(tmp_path / "both", 2, seed=5, attributes=["emotion", "gender"])
    for name in ("0000.wav", "0003.wav"):
        a, _ = sf.read(alone / "Gender" / "audio" / name)
        b, _ = sf.read(both / "Gender" / "audio" / name)
        np.testing.assert_array_equal(a, b)


def test_written_set_has_the_sakura_layout_format_and_label_counts(tmp_path):
    root = write_synthetic_sakura(tmp_path, n_per_label=2, seed=1, attributes=["emotion"])
    with open(root / "Emotion" / "metadata.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["file", "attribute_label", "single_instruction", "single_answer", "multi_instruction",
                             "multi_answer"]  # fmt: skip
    assert sorted(r["attribute_label"] for r in rows) == sorted(TRACKS["emotion"].labels * 2)
    assert rows[1]["single_answer"] == "(b) disgust"
    info = sf.info(root / "Emotion" / "audio" / rows[0]["file"])
    assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
    samples = load_sakura(root)
    assert len(samples) == 10 and all(s.ok for s in samples)
    written, _ = sf.read(samples[0].audio_path, dtype="float32")
    np.testing.assert_allclose(written, synthetic_clip("emotion", "angry", clip_rng(1, "emotion", "angry", 0)),
                               atol=1 / 32768)  # fmt: skip


def test_unknown_label_or_layout_is_refused():
    with pytest.raises(
        DataError, match=r"label 'wolf' is not among the options of track 'animal' \(dog, cat,"
    ):
        synthetic_clip("animal", "wolf", np.random.default_rng(0))
    with pytest.raises(DataError, match="unknown layout 'zip'"):
        write_synthetic_sakura("/nonexistent", 1, layout="zip")


# -- the classes are learnable from the sound, and not from one number --------------------------------------------

_MEL = None


def _clip_features(wave: np.ndarray) -> np.ndarray:
    """Per-clip log-mel statistics: mean and spread over sounding frames, and mean frame-to-frame change."""
    global _MEL
    if _MEL is None:
        import librosa

        _MEL = librosa.filters.mel(sr=SAMPLING_RATE, n_fft=512, n_mels=40).astype(np.float32)
    frames = np.lib.stride_tricks.sliding_window_view(np.pad(wave, 256), 512)[::160]
    power = np.abs(np.fft.rfft(frames * np.hanning(512).astype(np.float32), axis=1)) ** 2
    log_mel = np.log(power @ _MEL.T + 1e-6)
    loudest = log_mel.max(1)
    sounding = log_mel[loudest > loudest.max() - 6]
    change = np.abs(np.diff(log_mel, axis=0)).mean(0)
    return np.concatenate([sounding.mean(0), sounding.std(0), change])


def _dataset(attribute: str, indices: range) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    labels = TRACKS[attribute].labels
    waves = [
        synthetic_clip(attribute, label, clip_rng(0, attribute, label, i))
        for label in labels
        for i in indices
    ]
    features = np.stack([_clip_features(w) for w in waves]).astype(np.float32)
    durations = np.array([len(w) / SAMPLING_RATE for w in waves], dtype=np.float32)[:, None]
    return features, durations, np.repeat(np.arange(len(labels)), len(indices))


def _linear_probe(x: np.ndarray, y: np.ndarray, x_test: np.ndarray, classes: int) -> np.ndarray:
    """Multinomial logistic regression (L2, LBFGS): predicted classes of `x_test`."""
    inputs, targets = torch.from_numpy(x), torch.from_numpy(y)
    weight = torch.zeros(x.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimiser = torch.optim.LBFGS([weight, bias], max_iter=100)

    def loss() -> torch.Tensor:
        optimiser.zero_grad()
        value = (
            torch.nn.functional.cross_entropy(inputs @ weight + bias, targets) + 1e-2 * weight.square().sum()
        )
        value.backward()
        return value

    optimiser.step(loss)
    with torch.no_grad():
        return (torch.from_numpy(x_test) @ weight + bias).argmax(1).numpy()


def _nearest_centroid_1d(x: np.ndarray, y: np.ndarray, x_test: np.ndarray, classes: int) -> np.ndarray:
    """For every single feature column: predictions of a nearest-centroid classifier on that column alone."""
    centroids = np.stack([x[y == k].mean(0) for k in range(classes)], axis=1)  # (features, classes)
    return np.abs(x_test[:, :, None] - centroids[None]).argmin(2)  # (samples, features)


@pytest.mark.parametrize("attribute", list(TRACKS))
def test_heldout_clips_are_classified_from_log_mel_statistics_but_not_from_a_single_feature(attribute):
    classes = len(TRACKS[attribute].labels)
    x, duration, y = _dataset(attribute, range(TRAIN_CLIPS // classes))
    x_test, duration_test, y_test = _dataset(attribute, range(1000, 1000 + HELDOUT_CLIPS // classes))
    mean, std = x.mean(0), x.std(0) + 1e-6
    x, x_test = (x - mean) / std, (x_test - mean) / std

    probe = (_linear_probe(x, y, x_test, classes) == y_test).mean()
    single = (_nearest_centroid_1d(x, y, x_test, classes) == y_test[:, None]).mean(0).max()
    by_duration = (_nearest_centroid_1d(duration, y, duration_test, classes)[:, 0] == y_test).mean()
    print(
        f"{attribute}: linear probe {probe:.3f}, best single feature {single:.3f}, duration {by_duration:.3f}"
    )

    assert probe >= 0.85
    if (
        attribute == "gender"
    ):  # pitch alone nearly decides it, as in real speech, but speakers overlap a little
        assert single < 1.0
    else:
        assert single <= 0.85
    assert by_duration <= 1 / classes + 0.2  # the clip length says nothing about the class
