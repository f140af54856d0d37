"""Mistral's own files: tekken.json converted to the server's tokenizer.json, image parameters, SYSTEM_PROMPT.txt.

The fixture is a checkpoint directory laid out as Magistral Small 1.2 / Voxtral publish theirs: only
``tekken.json`` (a byte-level BPE trained here with the ``tokenizers`` library, written in tekken's rank format with
Mistral's control tokens), ``params.json`` and ``SYSTEM_PROMPT.txt``. No network, no model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from builder.cache import StageCache
from builder.errors import BuildError
from builder.families.mistral_files import MistralImageParams, default_system_prompt, image_params_from_mistral_files
from builder.source import tokenizer_files
from builder.source.tokenizer_files import PROBE_STRINGS, serving_tokenizer
from tests.hf_checkpoints import NUM_SPECIAL, SPECIALS, SYSTEM_PROMPT, UNUSED_TAIL, tekken_json, tekken_ranks

PARAMS = {"dim": 64, "n_layers": 2, "vocab_size": 411,
          "vision_encoder": {"patch_size": 14, "image_size": 1540, "max_image_size": 1540, "spatial_merge_size": 2,
                             "image_token_id": 10, "image_break_token_id": 12, "image_end_token_id": 13}}


@pytest.fixture(scope="module")
def ranks() -> list[bytes]:
    return tekken_ranks()


@pytest.fixture
def checkpoint(tmp_path: Path, ranks: list[bytes]) -> Path:
    """Laid out as Mistral publishes: tekken.json, params.json, SYSTEM_PROMPT.txt, no HF tokenizer or processor."""
    directory = tmp_path / "Magistral-Tiny-2509"
    directory.mkdir()
    (directory / "tekken.json").write_text(json.dumps(tekken_json(ranks)), encoding="utf-8")
    (directory / "params.json").write_text(json.dumps(PARAMS))
    (directory / "SYSTEM_PROMPT.txt").write_text(SYSTEM_PROMPT, encoding="utf-8")
    return directory


def test_tekken_converts_token_for_token(checkpoint: Path, tmp_path: Path, ranks: list[bytes]) -> None:
    path = serving_tokenizer(checkpoint, StageCache(tmp_path / "cache"))
    assert path.parent.parent == tmp_path / "cache" / "source" and path.name == "tokenizer.json"
    served = Tokenizer.from_file(str(path))
    from transformers.integrations.mistral.tokenizer import convert_tekken_tokenizer

    transformers_own = convert_tekken_tokenizer(str(checkpoint / "tekken.json"), chat_template="")
    offset = {token: rank + NUM_SPECIAL for rank, token in enumerate(ranks[:len(ranks) - UNUSED_TAIL])}
    for text in PROBE_STRINGS:
        assert served.encode(text, add_special_tokens=False).ids == transformers_own.encode(text, add_special_tokens=False)
        as_text = tokenizer_files._encode_as_text(served, text)
        assert b"".join(ranks[i - NUM_SPECIAL] for i in as_text) == text.encode("utf-8")  # no control token
        assert all(i in offset.values() for i in as_text)
    # tekken's ids: the byte sequence's rank shifted past the special tokens; the unused tail is not a token
    assert served.encode("numbers", add_special_tokens=False).ids == [offset[b"numbers"]]
    assert ranks[-1] == b" dog" and len(served.encode(" dog", add_special_tokens=False).ids) > 1
    assert served.get_vocab_size(with_added_tokens=True) == len(ranks) - UNUSED_TAIL + NUM_SPECIAL


def test_special_tokens_are_added_tokens_at_tekkens_ids(checkpoint: Path, tmp_path: Path) -> None:
    path = serving_tokenizer(checkpoint, StageCache(tmp_path / "cache"))
    served = Tokenizer.from_file(str(path))
    added = served.get_added_tokens_decoder()
    for token in ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]",
                  "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[AUDIO]", "[BEGIN_AUDIO]"):
        rank = SPECIALS.index(token)
        assert added[rank].content == token and added[rank].special
        assert served.encode(f"a{token}b", add_special_tokens=False).ids[1] == rank
    assert added[NUM_SPECIAL - 1].content == f"<SPECIAL_{NUM_SPECIAL - 1}>"  # fillers up to the declared count
    config = json.loads((path.parent / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["unk_token"]) == ("<s>", "</s>", "<unk>")
    assert config.get("chat_template") is None and not (path.parent / "chat_template.jinja").exists()


def test_matches_mistral_common(checkpoint: Path, tmp_path: Path) -> None:
    tekken = pytest.importorskip("mistral_common.tokens.tokenizers.tekken")
    served = Tokenizer.from_file(str(serving_tokenizer(checkpoint, StageCache(tmp_path / "cache"))))
    reference = tekken.Tekkenizer.from_file(checkpoint / "tekken.json")
    for text in PROBE_STRINGS:
        assert tokenizer_files._encode_as_text(served, text) == reference.encode(text, bos=False, eos=False)


def test_converted_once_into_the_cache(checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    converted, convert = [], tokenizer_files.convert_tekken
    monkeypatch.setattr(tokenizer_files, "convert_tekken", lambda *args: converted.append(args) or convert(*args))
    cache = StageCache(tmp_path / "cache")
    path = serving_tokenizer(checkpoint, cache)
    assert serving_tokenizer(checkpoint, cache) == path  # the cache entry, keyed by tekken.json's bytes
    assert serving_tokenizer(checkpoint) == path  # without a cache: what this process already has
    moved = tmp_path / "elsewhere" / checkpoint.name
    moved.parent.mkdir()
    checkpoint.rename(moved)
    assert serving_tokenizer(moved, cache) == path and len(converted) == 1  # the same bytes in another directory
    raw = json.loads((moved / "tekken.json").read_text())
    (moved / "tekken.json").write_text(json.dumps({**raw, "note": "other bytes"}))
    assert serving_tokenizer(moved, cache) != path and len(converted) == 2


def test_checkpoint_tokenizer_json_wins(checkpoint: Path, tmp_path: Path) -> None:
    (checkpoint / "tokenizer.json").write_text("{}")
    assert serving_tokenizer(checkpoint, StageCache(tmp_path / "cache")) == checkpoint / "tokenizer.json"
    assert not (tmp_path / "cache").exists()


def test_neither_file_names_both(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match=r"no tokenizer; looked for tokenizer\.json and tekken\.json"):
        serving_tokenizer(tmp_path, StageCache(tmp_path / "cache"))


@pytest.mark.parametrize("corrupt", [
    lambda raw: json.dumps(raw)[:5000],
    lambda raw: json.dumps({key: value for key, value in raw.items() if key != "special_tokens"}),
    lambda raw: json.dumps({**raw, "vocab": [{**raw["vocab"][0], "token_bytes": "%%%"}, *raw["vocab"][1:]]}),
    lambda raw: json.dumps({**raw, "special_tokens": raw["special_tokens"][1:]}),  # ranks no longer from 0
    lambda raw: json.dumps([raw]),
], ids=["truncated", "no-special-tokens", "bad-base64", "special-ranks-gap", "not-an-object"])
def test_corrupted_tekken_is_a_build_error(checkpoint: Path, tmp_path: Path, ranks: list[bytes], corrupt) -> None:
    (checkpoint / "tekken.json").write_text(corrupt(tekken_json(ranks)), encoding="utf-8")
    with pytest.raises(BuildError, match=r"tekken\.json"):
        serving_tokenizer(checkpoint, StageCache(tmp_path / "cache"))


def test_a_difference_names_the_string(checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rank_bpe = tokenizer_files._rank_bpe

    def off_by_one(text: str, *args) -> list[int]:
        ids = rank_bpe(text, *args)
        return ids[:-1] if "日本語" in text else ids

    monkeypatch.setattr(tokenizer_files, "_rank_bpe", off_by_one)
    with pytest.raises(BuildError, match="日本語のテキストです"):
        serving_tokenizer(checkpoint, StageCache(tmp_path / "cache"))
    assert not list((tmp_path / "cache" / "source").iterdir())  # nothing unverified left behind


def test_image_params_from_tekken_and_params(checkpoint: Path) -> None:
    both = image_params_from_mistral_files(checkpoint)
    assert both == MistralImageParams(patch_size=14, spatial_merge_size=2, longest_edge=1540)
    (checkpoint / "params.json").unlink()
    assert image_params_from_mistral_files(checkpoint) == both  # tekken.json alone
    (checkpoint / "tekken.json").unlink()
    assert image_params_from_mistral_files(checkpoint) is None
    (checkpoint / "params.json").write_text(json.dumps({"vision_encoder": {
        "patch_size": 16, "image_size": 1024, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]}}))
    assert image_params_from_mistral_files(checkpoint) == MistralImageParams(  # params.json alone, Pixtral-12B-like
        patch_size=16, spatial_merge_size=1, longest_edge=1024, image_mean=(0.5, 0.5, 0.5), image_std=(0.25,) * 3)


def test_older_multimodal_key(checkpoint: Path, ranks: list[bytes]) -> None:
    raw = tekken_json(ranks)
    raw["multimodal"] = raw.pop("image")
    (checkpoint / "tekken.json").write_text(json.dumps(raw))
    (checkpoint / "params.json").unlink()
    assert image_params_from_mistral_files(checkpoint) == MistralImageParams(14, 2, 1540)


@pytest.mark.parametrize("encoder, message", [
    ({"patch_size": 16, "max_image_size": 1540, "spatial_merge_size": 2}, "patch_size is 14 in tekken.json but 16"),
    ({"patch_size": 14, "max_image_size": 1540, "spatial_merge_size": "2"}, "spatial_merge_size is 2 in tekken"),
    ({"patch_size": 14, "spatial_merge_size": 2, "image_std": [0.2, 0.2]}, "image_std"),
])
def test_inconsistent_image_params(checkpoint: Path, encoder: dict, message: str) -> None:
    (checkpoint / "params.json").write_text(json.dumps({"vision_encoder": encoder}))
    with pytest.raises(BuildError, match=message):
        image_params_from_mistral_files(checkpoint)


def test_bad_image_params(tmp_path: Path) -> None:
    (tmp_path / "params.json").write_text(json.dumps({"vision_encoder": {"patch_size": 0, "image_size": 1540}}))
    with pytest.raises(BuildError, match="patch_size missing or not a positive integer in params.json"):
        image_params_from_mistral_files(tmp_path)
    (tmp_path / "params.json").write_text("{not json")
    with pytest.raises(BuildError, match=r"params\.json: not valid JSON"):
        image_params_from_mistral_files(tmp_path)


def test_default_system_prompt(checkpoint: Path) -> None:
    assert default_system_prompt(checkpoint) == SYSTEM_PROMPT.replace("{name}", "Magistral-Tiny-2509")
    assert "{today}" in default_system_prompt(checkpoint)  # filled per request, not frozen at build time
    (checkpoint / "SYSTEM_PROMPT.txt").unlink()
    assert default_system_prompt(checkpoint) is None
