"""A checkpoint laid out as Mistral publishes Magistral Small 1.2: HF weights and config.json, but only
Mistral's own tekken.json (no tokenizer.json), params.json and tekken.json's image section (no
preprocessor or processor config), SYSTEM_PROMPT.txt, the chat template. It builds, serves, and
answers exactly as HF's pipeline does on the same files: transformers' tekken conversion, a
PixtralProcessor with params.json's image parameters, ``apply_chat_template`` + ``generate``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import tritonclient.grpc as grpcclient
from transformers import Mistral3Config, Mistral3ForConditionalGeneration, PixtralImageProcessorPil

from builder.build import build
from builder.errors import BuildError
from builder.serve.client import Request, ask
from builder.source.checkpoint import check_checkpoint_files
from builder.source.tiny import widen_init
from builder.spec import load_spec
from tests.conftest import CACHE, ROOT
from tests.hf_checkpoints import MISTRAL_SMALL_TEMPLATE, hf_pipeline_generate, image, load_reference_model
from tests.test_mistral_files import NUM_SPECIAL, SPECIALS, SYSTEM_PROMPT, tekken_json, tekken_ranks
from tests.test_real_checkpoint import png

NEW_TOKENS = 12
IMAGE = {"image_patch_size": 6, "max_image_size": 72, "spatial_merge_size": 2}  # tekken.json's keys
CASES = {"text": ("What is in the picture?", []), "one non-square image": ("Describe the colours.", [(5, 50, 30)])}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("mistral-layout") / "Magistral-Tiny-2509"
    tekken = tekken_json(tekken_ranks())
    tekken["image"] = IMAGE
    ids = {token: SPECIALS.index(token) for token in ("<s>", "</s>", "[IMG]")}
    config = Mistral3Config(
        text_config={"model_type": "mistral", "vocab_size": tekken["config"]["default_vocab_size"], "hidden_size": 40,
                     "intermediate_size": 72, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
                     "head_dim": 20, "max_position_embeddings": 2048, "bos_token_id": ids["<s>"],
                     "eos_token_id": ids["</s>"], "tie_word_embeddings": False},
        vision_config={"model_type": "pixtral", "hidden_size": 24, "intermediate_size": 40, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "head_dim": 12, "patch_size": 6, "image_size": 72, "num_channels": 3},
        image_token_index=ids["[IMG]"], spatial_merge_size=2, vision_feature_layer=-1, multimodal_projector_bias=False,
    )
    torch.manual_seed(7)
    model = Mistral3ForConditionalGeneration(config).eval()
    widen_init(model, torch.Generator().manual_seed(7), special_tokens=NUM_SPECIAL)
    model.to(torch.bfloat16).save_pretrained(directory, max_shard_size="80KB")
    (directory / "tekken.json").write_text(json.dumps(tekken), encoding="utf-8")
    (directory / "params.json").write_text(json.dumps({"dim": 40, "vision_encoder": {
        "patch_size": 6, "max_image_size": 72, "spatial_merge_size": 2, "image_token_id": ids["[IMG]"]}}))
    (directory / "SYSTEM_PROMPT.txt").write_text(SYSTEM_PROMPT, encoding="utf-8")
    (directory / "chat_template.jinja").write_text(MISTRAL_SMALL_TEMPLATE)
    assert not any((directory / name).exists() for name in ("tokenizer.json", "preprocessor_config.json",
                                                             "processor_config.json", "tokenizer_config.json"))
    return directory


@pytest.fixture(scope="module")
def reference(checkpoint: Path):
    """HF's pipeline on Mistral's files: transformers' own tekken conversion and Pixtral processor."""
    import sys

    import transformers.models.pixtral.image_processing_pil_pixtral as pil
    from transformers.integrations.mistral.tokenizer import convert_tekken_tokenizer

    sys.modules.setdefault("transformers.models.pixtral.image_processing_pixtral", pil)  # see hf_checkpoints
    from transformers.models.pixtral.processing_pixtral import PixtralProcessor

    processor = PixtralProcessor(
        image_processor=PixtralImageProcessorPil(size={"longest_edge": 72}, patch_size={"height": 6, "width": 6}),
        tokenizer=convert_tekken_tokenizer(str(checkpoint / "tekken.json"), chat_template=""),
        chat_template=MISTRAL_SMALL_TEMPLATE, patch_size=6, spatial_merge_size=2, image_token="[IMG]",
        image_break_token="[IMG_BREAK]", image_end_token="[IMG_END]",
    )
    model = load_reference_model(checkpoint)
    return lambda text, images: hf_pipeline_generate(model, processor, text, images, None, NEW_TOKENS)


@pytest.fixture(scope="module")
def served(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    from builder.serve.tritonserver import TritonServer

    spec = load_spec(ROOT / "specs" / "tiny.yaml", {"source.preset": None, "source.checkpoint": str(checkpoint),
                                                    "name": "mistral-layout-test"})
    repository = tmp_path_factory.mktemp("mistral-layout-repo") / "model_repository"
    build(spec, repository, CACHE, progress=False)
    log = tmp_path_factory.mktemp("triton") / "tritonserver.log"
    with TritonServer(repository, log_path=log) as server, grpcclient.InferenceServerClient(server.grpc_url) as client:
        yield repository, client


def test_the_converted_tokenizer_and_mistral_image_parameters_are_served(served) -> None:
    repository, _ = served
    facts = json.loads((repository / "preprocess" / "1" / "model_facts.json").read_text())
    assert (facts["image"]["patch_size"], facts["image"]["merge_size"], facts["image"]["longest_edge"]) == (6, 2, 72)
    assert facts["image"]["token"] == SPECIALS.index("[IMG]")
    assert (repository / "preprocess" / "1" / "tokenizer.json").is_file()


@pytest.mark.parametrize("case", CASES)
def test_served_tokens_equal_hf_pipeline(case: str, served, reference) -> None:
    _, client = served
    text, specs = CASES[case]
    pictures = [image(*spec) for spec in specs]
    expected = reference(text, pictures)
    assert len(set(expected)) > 2, expected  # a decoder that answers, not one token repeated
    assert ask(client, Request(text, images=tuple(png(p) for p in pictures), max_tokens=NEW_TOKENS)).token_ids == expected


def test_neither_tokenizer_file_is_one_clear_error(checkpoint: Path, tmp_path: Path) -> None:
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(checkpoint, bare)
    (bare / "tekken.json").unlink()
    with pytest.raises(BuildError, match=r"no tokenizer; looked for tokenizer\.json and tekken\.json"):
        check_checkpoint_files(bare)
