"""Test configuration: no hub access, deterministic torch, and shared tiny models."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # tiny models: threads cost more than they give

GENDER_PROMPT = "What is the gender of the speaker in the speech? Possible options: male, female."
GENDER_PREFIX = "The speaker's gender is"


@pytest.fixture(scope="session")
def qwen2_audio_model():
    """A tiny random Qwen2-Audio wrapped as a HookedLALM (shared: tests must not mutate it)."""
    import audiolens_ct as act
    from audiolens_ct.testing import tiny_model

    hf_model, processor = tiny_model("qwen2-audio")
    return act.HookedLALM.from_hf(hf_model, processor, port="qwen2-audio")
