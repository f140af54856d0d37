"""Tokenizer use on the serving side: prompt text to ids, ids to text, incrementally for streaming."""

from __future__ import annotations

from tokenizers import Tokenizer


def load_tokenizer(path: str) -> Tokenizer:
    return Tokenizer.from_file(path)


def encode_text(tokenizer: Tokenizer, text: str) -> list[int]:
    # Special tokens are added by the prompt layout, never parsed out of user text.
    return tokenizer.encode(text, add_special_tokens=False).ids


class TextStream:
    """Turns a growing list of token ids into text deltas.

    Byte-level tokens can end in the middle of a UTF-8 character; a delta is held back until the
    character is complete, so concatenated deltas equal the decoded whole.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.sent = ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        delta, self.sent = text[len(self.sent):], text
        return delta
