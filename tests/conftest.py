"""Test configuration: no hub access, deterministic torch, and shared tiny models."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # tiny models: threads cost more than they give

from audiolens_ct.data.prompts import TRACKS  # noqa: E402

GENDER = TRACKS["gender"]
GENDER_PROMPT = GENDER.prompt
GENDER_PREFIX = GENDER.response_prefix


@pytest.fixture(scope="session")
def qwen2_audio_model():
    """A tiny random Qwen2-Audio wrapped as a HookedLALM (shared: tests must not mutate it).

    Seed 3: its clean run of a 1-s tone prefers " male" to " female" and its silent run the reverse, so the tracing
    tests have a clip the paper's rules keep with the gender track's own options.
    """
    import audiolens_ct as act
    from audiolens_ct.testing import tiny_model

    hf_model, processor = tiny_model("qwen2-audio", seed=3)
    return act.HookedLALM.from_hf(hf_model, processor, port="qwen2-audio")


@pytest.fixture(scope="session")
def demo_model():
    """The shipped demo model (a Qwen2-Audio that really listens), loaded once (shared: tests must not mutate it)."""
    import audiolens_ct as act
    from audiolens_ct.demo import demo_model_path

    return act.HookedLALM.from_pretrained(str(demo_model_path()))


@pytest.fixture(scope="session")
def demo_samples():
    """Four held-out synthetic gender clips (two male, two female; in memory) and one whose audio file is missing."""
    from audiolens_ct.data.sample import make_sample
    from audiolens_ct.demo.synthetic import SAMPLING_RATE, clip_rng, synthetic_clip

    clips = [
        make_sample(GENDER, f"{label}_{i}.wav", label, waveform_rate=SAMPLING_RATE,
                    waveform=synthetic_clip("gender", label, clip_rng(11, "gender", label, i)))
        for label in GENDER.labels for i in range(2)
    ]  # fmt: skip
    return [*clips, make_sample(GENDER, "missing.wav", "male", audio_path="missing.wav")]
