"""The Qwen-Audio release tokenizer: tiktoken BPE over `qwen.tiktoken` ranks, then the special tokens in release
order (release `tokenization_qwen.py`); and a small rank table for tiny models."""

from __future__ import annotations

import base64
import unicodedata
from collections.abc import Iterable, Sequence
from functools import cache
from pathlib import Path

from audiolens_ct.errors import CheckpointError
from model_ports._tiny import tiny_bpe_tokenizer

DEFAULT_SYSTEM = "You are a helpful assistant."
CHAT_TEXT = (DEFAULT_SYSTEM, "system user assistant", "Audio 1:")
"""The chat format's own strings, learned by the tiny rank table."""

# The release pre-tokeniser: like cl100k, but digits are split one at a time.
PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
AUDIO_PAD = "[[[AUDIO:modality]]]"
AUDIO_START, AUDIO_END = "<audio>", "</audio>"
IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
_LANGUAGES = ("en", "zh", "de", "es", "ko", "fr", "ja", "it")

# Special tokens after the BPE ranks, in the release order (ids are len(ranks) + index): `<|endoftext|>` 151643 ...
# `<audio>` 155163, `</audio>` 155164 with the release vocabulary.
CHAT_SPECIALS = (ENDOFTEXT, IM_START, IM_END, *(f"<|extra_{i}|>" for i in range(205)))
AUDIO_SPECIALS = (
    AUDIO_PAD,
    "<|startoftranscript|>", "<|startofanalysis|>",
    "<|translate|>", "<|transcribe|>", "<|caption|>", "<|keyword|>",
    "<|unknown|>", *(f"<|{lang}|>" for lang in _LANGUAGES), "<|zh_tr|>",
    "<|notimestamps|>", "<|sil|>", "<|timestamps|>", *(f"<|{i * 0.01:.2f}|>" for i in range(3001)),
    "<|caption_audiocaps|>", "<|caption_clotho|>", "<|audioset_ontology|>", "<|caption_plain|>", "<|itn|>", "<|wo_itn|>",
    "<|startofentityvalue|>", "<|endofentityvalue|>", "<|startofentitytype|>", "<|endofentitytype|>",
    "<|named_entity_recognition|>", "<|audio_grounding|>", "<|startofword|>", "<|endofword|>", "<|delim|>",
    "<|emotion_recognition|>", "<|music_description|>", "<|note_analysis|>",
    "<|pitch|>", *(f"<|midi_pitch_{i}|>" for i in range(128)),
    "<|velocity|>", *(f"<|midi_velocity_{i}|>" for i in range(128)),
    "<|sonic|>", "<|instrument|>", "<|speaker_meta|>", "<|song_meta|>", "<|question|>", "<|answer|>", "<|choice|>",
    "<|scene|>", "<|event|>", "<|vocal_classification|>", "<|speech_understanding|>", "<|scenario|>", "<|action|>",
    "<|entities|>", "<|speech_edit|>",
    AUDIO_START, AUDIO_END,
)
SPECIAL_TOKENS = CHAT_SPECIALS + AUDIO_SPECIALS


class QwenAudioTokenizer:
    """The release tokenizer: tiktoken BPE over `qwen.tiktoken` ranks, then the special tokens in release order.

    The same class serves the real vocabulary and the tiny test one (a small rank table built in code), so the
    port has one code path. Text is NFC-normalised first, as the release does.
    """

    def __init__(self, mergeable_ranks: dict[bytes, int], source: str = "<in memory>") -> None:
        import tiktoken

        self.mergeable_ranks = mergeable_ranks
        self.source = source
        self.special_tokens = {tok: len(mergeable_ranks) + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self._encoding = tiktoken.Encoding(
            "qwen-audio", pat_str=PAT_STR, mergeable_ranks=mergeable_ranks, special_tokens=self.special_tokens
        )
        self._audio_specials = set(AUDIO_SPECIALS)

    @classmethod
    def from_file(cls, path: str | Path) -> QwenAudioTokenizer:
        """Read a `qwen.tiktoken` file: one `base64(token) rank` pair per line, ranks 0..n-1."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: no such tokenizer file (the release ships qwen.tiktoken)")
        ranks: dict[bytes, int] = {}
        for number, line in enumerate(path.read_bytes().splitlines(), start=1):
            if not line:
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError as exc:
                raise CheckpointError(f"{path}:{number}: not a 'base64-token rank' line ({exc})") from exc
        if sorted(ranks.values()) != list(range(len(ranks))):
            raise CheckpointError(f"{path}: ranks are not the contiguous range 0..{len(ranks) - 1}")
        return cls(ranks, source=str(path))

    def save(self, path: str | Path) -> Path:
        """Write the rank table in the release `qwen.tiktoken` format."""
        path = Path(path)
        ordered = sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1])
        path.write_text("".join(f"{base64.b64encode(tok).decode()} {rank}\n" for tok, rank in ordered))
        return path

    def __len__(self) -> int:
        return self._encoding.n_vocab

    def encode(self, text: str, add_special_tokens: bool = False, allowed_special: str | set[str] = "all") -> list[int]:
        """Token ids of `text`. No BOS/EOS is ever added (the release adds none), so `add_special_tokens` is
        accepted for the Hugging Face tokenizer signature only; special tokens written in the text are parsed as
        such when in `allowed_special`, otherwise encoded as plain text."""
        return self._encoding.encode(
            unicodedata.normalize("NFC", text), allowed_special=allowed_special, disallowed_special=()
        )

    def encode_content(self, text: str) -> list[int]:
        """Ids of a chat-turn piece as the release `make_context` encodes it: only audio specials are special."""
        return self.encode(text, allowed_special=self._audio_specials)

    def decode(self, ids: Iterable[int]) -> str:
        return self._encoding.decode(list(ids), errors="replace")

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int]:
        """Ids of special tokens, or of single BPE pieces given as text."""
        if isinstance(tokens, str):
            return self._token_id(tokens)
        return [self._token_id(t) for t in tokens]

    def _token_id(self, token: str) -> int:
        if token in self.special_tokens:
            return self.special_tokens[token]
        rank = self.mergeable_ranks.get(token.encode())
        if rank is None:
            raise KeyError(f"{token!r} is not a single token of the Qwen-Audio vocabulary ({self.source})")
        return rank

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | list[str]:
        if isinstance(ids, int):
            return self.decode([ids])
        return [self.decode([i]) for i in ids]

    # the ids of the release's special tokens, as its tokenizer names them
    audio_start_id = property(lambda self: self.special_tokens[AUDIO_START])
    audio_end_id = property(lambda self: self.special_tokens[AUDIO_END])
    audio_pad_id = property(lambda self: self.special_tokens[AUDIO_PAD])
    eos_token_id = property(lambda self: self.special_tokens[ENDOFTEXT])
    pad_token_id = property(lambda self: self.special_tokens[ENDOFTEXT])



@cache
def _tiny_ranks() -> tuple[tuple[bytes, int], ...]:
    """A ~540-piece byte-level BPE rank table, trained in code on the AudioLens prompts and the chat format's own
    strings (for tiny models)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = tiny_bpe_tokenizer([], CHAT_TEXT).backend_tokenizer.get_vocab()
    to_byte = {char: byte for byte, char in bytes_to_unicode().items()}
    pieces = sorted(vocab, key=vocab.get)
    return tuple((bytes(to_byte[c] for c in piece), rank) for rank, piece in enumerate(pieces))


def tiny_tokenizer() -> QwenAudioTokenizer:
    """The release tokenizer class over a small rank table, with every release special token."""
    return QwenAudioTokenizer(dict(_tiny_ranks()), source="<tiny rank table>")

