"""Tokenizer use on the serving side: ids to text, incrementally for streaming (prompts: :mod:`builder.runtime.chat`)."""

from __future__ import annotations

import functools
import json

from tokenizers import Tokenizer


def load_tokenizer(path: str) -> Tokenizer:
    return Tokenizer.from_file(path)


class TextStream:
    """Turns a growing list of token ids into text deltas whose concatenation equals the decoded whole.

    A delta is held back while its text can still change: a partial UTF-8 character from byte-level tokens, and a
    run of byte-fallback tokens (``<0xNN>``, SentencePiece tokenizers such as Gemma's), which the decoder turns into
    one U+FFFD per byte when the run is not valid UTF-8, so a later byte can change bytes that were valid alone.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.sent = ""
        self._held = _held_tokens(tokenizer)

    def push(self, token: int) -> str:
        self.ids.append(token)
        if token in self._held:
            return ""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        delta, self.sent = text[len(self.sent):], text
        return delta


@functools.lru_cache(maxsize=8)
def _held_tokens(tokenizer: Tokenizer) -> frozenset[int]:
    """Tokens after which no delta goes: the byte-fallback tokens, when the decoder has ByteFallback (a run goes once
    a token that is not a byte ends it), and the special tokens, which decode to nothing (so a byte run goes on past
    them)."""
    special = {i for i, token in tokenizer.get_added_tokens_decoder().items() if token.special}
    if "ByteFallback" not in json.dumps(json.loads(tokenizer.to_str()).get("decoder")):
        return frozenset(special)
    byte_tokens = (tokenizer.token_to_id(f"<0x{byte:02X}>") for byte in range(256))
    return frozenset(special | {i for i in byte_tokens if i is not None})
