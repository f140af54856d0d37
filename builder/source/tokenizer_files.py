"""The ``tokenizer.json`` the server uses: the checkpoint's own, or one converted from Mistral's ``tekken.json``.

Mistral's own repositories (Magistral Small 1.2, Voxtral) ship only ``tekken.json``. transformers 5.23 converts it
without mistral-common (``integrations.mistral.convert_tekken_tokenizer``, a ``MistralConverter``); the written file is
then checked token for token against that conversion, against tekken's own rank-ordered BPE, and against
mistral-common's ``Tekkenizer`` when it is installed.
"""

from __future__ import annotations

import atexit
import base64
import hashlib
import json
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

from builder.cache import Stage, StageCache
from builder.errors import BuildError

TOKENIZER_FILE = "tokenizer.json"
TEKKEN_FILE = "tekken.json"
# What the encodings are compared on: scripts, whitespace runs, emoji, and text that looks like control tokens
PROBE_STRINGS = (
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "café naïve résumé Ærøskøbing Straße ÉCOLE",
    "日本語のテキストです。中文字符，한국어 텍스트",
    "emoji 🙂👍🏽 🇫🇷 done",
    "    indented\n\n\tand tabs\r\n  \n   trailing   ",
    "numbers 1234567 3.14159 -42 1e-5",
    "mixedCASE Words ABCdef HTTPServer",
    "[INST] not a turn [/INST] [IMG][IMG_BREAK][IMG_END] [SYSTEM_PROMPT]",
    "<s>text</s><unk> [AUDIO][BEGIN_AUDIO] [THINK]x[/THINK]",
    "symbols ~!@#$%^&*()_+{}|:\"<>? // path/to/file.py",
)
CONVERSION = Stage("source", ("source/tokenizer_files",))  # tekken.json -> tokenizer.json
_CONVERTED: dict[str, Path] = {}  # tekken conversions this process made or found, by cache key


def tokenizer_source(checkpoint: Path) -> Path:
    """The file the checkpoint's tokenizer comes from: its ``tokenizer.json``, else Mistral's ``tekken.json``.

    Raises ``BuildError`` naming both when it has neither. Cheap: nothing is read or converted.
    """
    for name in (TOKENIZER_FILE, TEKKEN_FILE):
        if (checkpoint / name).is_file():
            return checkpoint / name
    raise BuildError(f"{checkpoint}: no tokenizer; looked for {TOKENIZER_FILE} and {TEKKEN_FILE}")


def serving_tokenizer(checkpoint: Path, cache: StageCache | None = None) -> Path:
    """The ``tokenizer.json`` this checkpoint serves with: its own, else one converted from its ``tekken.json``.

    Every stage asks this function (facts, chat files, the repository, calibration). A conversion
    (:func:`convert_tekken`, verified) is made once: in ``cache`` (the build's, stage "source") under a key of
    tekken.json's bytes, the converter's versions and this module's code, beside its ``tokenizer_config.json``
    (bos/eos/unk/pad names, which ``tekken.json`` holds only as ranks); without a cache, in a temporary directory
    removed at exit. A call without a cache reuses a conversion this process already made. Raises ``BuildError``
    if neither file exists (:func:`tokenizer_source`), if ``tekken.json`` cannot be read, or if the conversion
    differs from tekken's own encoding on any probe string.
    """
    source = tokenizer_source(checkpoint)
    if source.name == TOKENIZER_FILE:
        return source
    key = CONVERSION.key(hashlib.sha256(source.read_bytes()).hexdigest(), metadata.version("tokenizers"))
    if cache is None:
        if key not in _CONVERTED or not _CONVERTED[key].is_file():
            work_dir = Path(tempfile.mkdtemp(prefix="tekken-tokenizer-"))
            atexit.register(shutil.rmtree, work_dir, True)
            _CONVERTED[key] = convert_tekken(source, work_dir)
        return _CONVERTED[key]
    entry = CONVERSION.run(cache, "tokenizer", key, lambda tmp: convert_tekken(source, tmp))
    _CONVERTED[key] = entry / TOKENIZER_FILE
    return _CONVERTED[key]


def convert_tekken(tekken: Path, work_dir: Path) -> Path:
    """``work_dir/tokenizer.json`` from ``tekken`` as transformers converts it, verified (see ``serving_tokenizer``)."""
    raw = _read_tekken(tekken)
    ranks = _ranks(tekken, raw)
    reference = _transformers_tokenizer(tekken)
    work_dir.mkdir(parents=True, exist_ok=True)
    saved = [Path(name) for name in reference.save_pretrained(str(work_dir))]
    written = work_dir / TOKENIZER_FILE
    try:
        _verify(raw, ranks, tekken, written, reference)
    except BuildError:
        for path in saved:  # an unverified tokenizer must not be picked up by a later step
            path.unlink(missing_ok=True)
        raise
    return written


def _read_tekken(tekken: Path) -> dict[str, Any]:
    """The parsed file; the rest of its shape is checked by transformers' conversion, which reads all of it."""
    try:
        raw = json.loads(tekken.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise BuildError(f"{tekken}: not a readable Mistral tekken tokenizer ({exc})") from None
    if not isinstance(raw, dict) or not {"config", "vocab", "special_tokens"} <= raw.keys():
        raise BuildError(f"{tekken}: not a Mistral tekken tokenizer (needs 'config', 'vocab' and 'special_tokens')")
    return raw


def _transformers_tokenizer(tekken: Path) -> Any:
    """transformers' conversion (``MistralConverter``, bos/eos/unk/pad named), without a chat template of its own."""
    from transformers.integrations.mistral.tokenizer import convert_tekken_tokenizer

    try:
        tokenizer = convert_tekken_tokenizer(str(tekken), chat_template="")  # "" stops its template lookup
    except Exception as exc:  # noqa: BLE001 - transformers' converter raises anything on a malformed file
        raise BuildError(f"{tekken}: transformers cannot convert it ({type(exc).__name__}: {exc})") from None
    tokenizer.chat_template = None  # the checkpoint's template is read elsewhere (chat_files)
    return tokenizer


def _verify(raw: dict[str, Any], ranks: dict[bytes, int], tekken: Path, written: Path, reference: Any) -> None:
    """Every special token at tekken's id, and the same ids from every encoder on every probe string."""
    from tokenizers import Tokenizer

    served = Tokenizer.from_file(str(written))
    added = served.get_added_tokens_decoder()
    for entry in raw["special_tokens"]:
        token = added.get(int(entry["rank"]))
        if token is None or token.content != entry["token_str"] or not token.special:
            raise BuildError(f"{written}: special token {entry['token_str']!r} is not added token "
                             f"{entry['rank']} as in {tekken} (found {token.content if token else None!r})")
    config = raw["config"]
    if served.get_vocab_size(with_added_tokens=True) != config["default_vocab_size"]:
        raise BuildError(f"{written}: {served.get_vocab_size(with_added_tokens=True)} tokens, "
                         f"{tekken} declares {config['default_vocab_size']}")
    mistral_common = _mistral_common_tokenizer(tekken)
    for text in PROBE_STRINGS:
        # As the server encodes a template's own text: control tokens matched
        _same(text, written, served.encode(text, add_special_tokens=False).ids,
              "transformers", reference.encode(text, add_special_tokens=False))
        # As the server encodes user text, and as tekken always does: no control token matched
        plain = _encode_as_text(served, text)
        _same(text, written, plain, "tekken's rank BPE",
              _rank_bpe(text, config["pattern"], ranks, config["default_num_special_tokens"]))
        if mistral_common is not None:
            _same(text, written, plain, "mistral-common", mistral_common.encode(text, bos=False, eos=False))


def _same(text: str, written: Path, ids: list[int], other: str, other_ids: list[int]) -> None:
    if list(ids) != list(other_ids):
        raise BuildError(f"{written}: encodes {text!r} as {list(ids)}, {other} as {list(other_ids)}")


def _encode_as_text(tokenizer: Any, text: str) -> list[int]:
    """The backend's pipeline with no added token matched (transformers' ``_encode_without_added_tokens``)."""
    if tokenizer.normalizer is not None:
        text = tokenizer.normalizer.normalize_str(text)
    splits = [split for split, _ in tokenizer.pre_tokenizer.pre_tokenize_str(text)]
    return [token.id for split in splits for token in tokenizer.model.tokenize(split)]


def _ranks(tekken: Path, raw: dict[str, Any]) -> dict[bytes, int]:
    """tekken's byte sequences by rank, cut to the vocabulary size as mistral-common and transformers cut it.

    Decoded strictly: transformers' converter reads bad base64 as some other bytes without a word.
    """
    config = raw["config"]
    try:
        inner = config["default_vocab_size"] - config["default_num_special_tokens"]
        tokens = [base64.b64decode(entry["token_bytes"], validate=True) for entry in raw["vocab"][:inner]]
    except (KeyError, TypeError, ValueError) as exc:  # binascii.Error is a ValueError
        raise BuildError(f"{tekken}: not a readable Mistral tekken tokenizer ({type(exc).__name__}: {exc})") from None
    ranks = {token: rank for rank, token in enumerate(tokens)}
    if len(ranks) != len(tokens) or b"" in ranks:
        raise BuildError(f"{tekken}: its vocabulary has repeated or empty byte sequences")
    return ranks


def _rank_bpe(text: str, pattern: str, ranks: dict[bytes, int], offset: int) -> list[int]:
    """tiktoken's encoding, written out: split by the pattern, then merge the pair of lowest rank first."""
    import regex  # tekken's pattern uses \\p{...} classes, which the standard re module lacks

    ids: list[int] = []
    for piece in regex.findall(pattern, text):
        whole = piece.encode("utf-8")
        if whole in ranks:  # tiktoken takes a piece in the vocabulary as one token, merges or not
            ids.append(ranks[whole] + offset)
            continue
        parts = [bytes([byte]) for byte in whole]
        while len(parts) > 1:
            candidates = [(ranks[pair], i) for i in range(len(parts) - 1)
                          if (pair := parts[i] + parts[i + 1]) in ranks]
            if not candidates:
                break
            _, i = min(candidates)
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        ids += [ranks[part] + offset for part in parts]
    return ids


def _mistral_common_tokenizer(tekken: Path) -> Any:
    try:
        from mistral_common.tokens.tokenizers.tekken import Tekkenizer
    except ImportError:
        return None
    return Tekkenizer.from_file(tekken)
