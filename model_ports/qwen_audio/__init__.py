"""Qwen-Audio v1 (`Qwen/Qwen-Audio`, `Qwen/Qwen-Audio-Chat`) re-implemented on native transformers modules.

The release ships remote code (`QWenLMHeadModel`, tiktoken tokenizer, `audio.AudioEncoder`). This port rebuilds the
same forward pass from modules transformers already has, so it runs through the same bridge and hooks as every other
port, and loads the release weights by renaming them:

- LLM: the v1 QWen decoder is a `Qwen2ForCausalLM` (multi-head attention, q|k|v bias, no o_proj bias, SwiGLU with
  the SiLU on `w2`, RMSNorm, rotary base `rotary_emb_base`) for contexts up to `seq_length` = 2048 tokens; beyond it
  the release switches on dynamic NTK and logN attention, which this port refuses rather than reproduces;
- audio: a Whisper-large-v2-style encoder (`Qwen2AudioEncoder`, 80 mel bins) run on the mel *truncated to the real
  length* (2·T_cnn frames, positions [:T_cnn], the Whisper sinusoid table), frames past a clip's own length zeroed
  and masked as keys in a batch; then AvgPool ×2, `ln_post`, `proj` (1280 → d_model);
- splice: each clip's first N rows, wrapped in the two learned `audio_bos_eos_token` vectors, overwrite the whole
  `<audio>` … `</audio>` span (N + 2 rows), so the tag tokens' own embeddings are never used;
- features: the Whisper log-mel (80 bins) of the waveform padded to 30 s (`WhisperFeatureExtractor`); mel_len =
  min(samples, 480000) // 160, T_cnn = (mel_len − 1)//2 + 1, N = (T_cnn − 2)//2 + 1. The release decodes files with
  ffmpeg to int16; this port uses the float waveform it is given;
- prompts: ChatML for the chat model (`Audio 1:<audio>…</audio>\\n{question}` as the user turn, each piece tokenised
  on its own as the release `make_context` does), raw text for the base model (`<audio>…</audio>{prompt}`); the
  response prefix follows.

One job per file: `tokenization.py` (the tiktoken tokenizer), `processing.py` (features and prompt ids),
`modeling.py` (audio tower and model), `checkpoint.py` (the release checkpoint layout), `port.py` (the port).
"""

from model_ports.qwen_audio.checkpoint import (
    load_release_checkpoint,
    release_config,
    release_state_dict,
    save_release_checkpoint,
)
from model_ports.qwen_audio.modeling import QwenAudioModel, QwenAudioTower
from model_ports.qwen_audio.port import QwenAudioPort
from model_ports.qwen_audio.processing import QwenAudioProcessor
from model_ports.qwen_audio.tokenization import QwenAudioTokenizer

__all__ = [
    "QwenAudioModel",
    "QwenAudioPort",
    "QwenAudioProcessor",
    "QwenAudioTokenizer",
    "QwenAudioTower",
    "load_release_checkpoint",
    "release_config",
    "release_state_dict",
    "save_release_checkpoint",
]
