"""A checkpoint laid out as Mistral publishes Magistral Small 1.2 / Mistral Small 3.2: HF weight shards and
config.json, but only Mistral's own tekken.json (no tokenizer.json), params.json and tekken.json's image section
(no preprocessor or processor config), SYSTEM_PROMPT.txt, and a chat template as published or none.

It builds, serves, and answers exactly as HF's pipeline does on the same files: transformers' tekken conversion,
a PixtralProcessor with params.json's image parameters, ``apply_chat_template`` + ``generate``. Without a
template the family's instruct layout renders the turn and SYSTEM_PROMPT.txt is the system message, filled as
Mistral's model cards fill it ({name}: the repository's name, {today} and {yesterday}: the request's dates).
"""

from __future__ import annotations

import json
from datetime import date, timedelta
from pathlib import Path

import pytest
import torch
import tritonclient.grpc as grpcclient
from transformers import Mistral3Config, Mistral3ForConditionalGeneration, PixtralImageProcessorPil

from builder.build import build
from builder.errors import BuildError
from builder.families.mistral_files import MISTRAL_INSTRUCT_TEMPLATE
from builder.serve.client import Request, ask
from builder.source.tiny import widen_init
from builder.spec import load_spec
from tests.conftest import CACHE, ROOT
from tests.hf_checkpoints import (
    MISTRAL_SMALL_TEMPLATE,
    NUM_SPECIAL,
    SPECIALS,
    SYSTEM_PROMPT,
    hf_pipeline_generate,
    image,
    load_reference_model,
    tekken_json,
    tekken_ranks,
)
from tests.test_real_checkpoint import png

NEW_TOKENS = 12
NAME = "Magistral-Tiny-2509"
TEMPLATES = {"published template": MISTRAL_SMALL_TEMPLATE, "no template": None}
CASES = {"text": ("What is in the picture?", []), "one non-square image": ("Describe the colours.", [(5, 50, 30)])}


def write_mistral_layout(directory: Path, chat_template: str | None) -> Path:
    """transformers' own Mistral-3 classes, then Mistral's files beside the weights instead of HF's."""
    tekken = tekken_json(tekken_ranks())
    tekken["image"] = {"image_patch_size": 6, "max_image_size": 72, "spatial_merge_size": 2}
    ids = {token: SPECIALS.index(token) for token in ("<s>", "</s>", "[IMG]")}
    text = {
        "model_type": "mistral",
        "vocab_size": tekken["config"]["default_vocab_size"],
        "hidden_size": 40,
        "intermediate_size": 72,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 20,
        "max_position_embeddings": 2048,
        "bos_token_id": ids["<s>"],
        "eos_token_id": ids["</s>"],
        "tie_word_embeddings": False,
    }
    vision = {
        "model_type": "pixtral",
        "hidden_size": 24,
        "intermediate_size": 40,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "head_dim": 12,
        "patch_size": 6,
        "image_size": 96,
        "num_channels": 3,
    }  # image_size is not the longest edge: that comes from Mistral's files
    config = Mistral3Config(
        text_config=text,
        vision_config=vision,
        image_token_index=ids["[IMG]"],
        spatial_merge_size=2,
        vision_feature_layer=-1,
        multimodal_projector_bias=False,
    )
    torch.manual_seed(7)
    model = Mistral3ForConditionalGeneration(config).eval()
    widen_init(model, torch.Generator().manual_seed(7), special_tokens=NUM_SPECIAL)
    model.to(torch.bfloat16).save_pretrained(directory, max_shard_size="80KB")
    (directory / "tekken.json").write_text(json.dumps(tekken), encoding="utf-8")
    encoder = {"patch_size": 6, "max_image_size": 72, "spatial_merge_size": 2, "image_token_id": ids["[IMG]"]}
    (directory / "params.json").write_text(json.dumps({"dim": 40, "vision_encoder": encoder}))
    (directory / "SYSTEM_PROMPT.txt").write_text(SYSTEM_PROMPT, encoding="utf-8")
    if chat_template is not None:
        (directory / "chat_template.jinja").write_text(chat_template)
    hf_files = ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json")
    assert len(list(directory.glob("*.safetensors"))) > 1 and not any((directory / name).exists() for name in hf_files)
    return directory


def model_card_system_prompt() -> str:
    """SYSTEM_PROMPT.txt filled as Mistral's model cards fill it at request time."""
    today = date.today()
    return (
        SYSTEM_PROMPT.replace("{name}", NAME)
        .replace("{today}", today.isoformat())
        .replace("{yesterday}", (today - timedelta(1)).isoformat())
    )


@pytest.fixture(scope="module", params=TEMPLATES)
def layout(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """(built repository, gRPC client, HF's reference for (text, images), the template's name)."""
    import sys

    import transformers.models.pixtral.image_processing_pil_pixtral as pil
    from transformers.integrations.mistral.tokenizer import convert_tekken_tokenizer

    from builder.serve.tritonserver import TritonServer

    template = TEMPLATES[request.param]
    checkpoint = write_mistral_layout(tmp_path_factory.mktemp("mistral-layout") / NAME, template)
    spec = load_spec(
        ROOT / "specs" / "tiny.yaml", {"source.preset": None, "source.checkpoint": str(checkpoint), "name": "mistral-layout-test"}
    )
    repository = tmp_path_factory.mktemp("mistral-layout-repo") / "model_repository"
    build(spec, repository, CACHE, progress=False)

    sys.modules.setdefault("transformers.models.pixtral.image_processing_pixtral", pil)  # see hf_checkpoints
    from transformers.models.pixtral.processing_pixtral import PixtralProcessor

    processor = PixtralProcessor(  # the image processor transformers' convert_tekken_image_processor writes
        image_processor=PixtralImageProcessorPil(size={"longest_edge": 72}, patch_size={"height": 6, "width": 6}),
        tokenizer=convert_tekken_tokenizer(str(checkpoint / "tekken.json"), chat_template=""),
        chat_template=template or MISTRAL_INSTRUCT_TEMPLATE,
        patch_size=6,
        spatial_merge_size=2,
        image_token="[IMG]",
        image_break_token="[IMG_BREAK]",
        image_end_token="[IMG_END]",
    )
    model = load_reference_model(checkpoint)
    system = None if template else model_card_system_prompt()

    def reference(text: str, images: list) -> list[int]:
        return hf_pipeline_generate(model, processor, text, images, system, NEW_TOKENS)

    log = tmp_path_factory.mktemp("triton") / "tritonserver.log"
    with TritonServer(repository, log_path=log) as server, grpcclient.InferenceServerClient(server.grpc_url) as client:
        yield repository, client, reference, request.param


def test_the_converted_tokenizer_mistral_image_parameters_and_system_prompt_are_served(layout) -> None:
    repository, _, _, template = layout
    served = repository / "preprocess" / "1"
    facts = json.loads((served / "model_facts.json").read_text())
    assert (facts["image"]["patch_size"], facts["image"]["merge_size"], facts["image"]["longest_edge"]) == (6, 2, 72)
    assert facts["image"]["token"] == SPECIALS.index("[IMG]")
    assert json.loads((served / "tokenizer.json").read_text())["added_tokens"][1]["content"] == "<s>"
    chat = json.loads((served / "chat.json").read_text())
    # HF renders a template's own default system prompt; Mistral's file is the default only without one
    expected = None if template == "published template" else SYSTEM_PROMPT.replace("{name}", NAME)
    assert chat["default_system_prompt"] == expected


@pytest.mark.parametrize("case", CASES)
def test_served_tokens_equal_hf_pipeline(case: str, layout) -> None:
    _, client, reference, _ = layout
    text, specs = CASES[case]
    pictures = [image(*spec) for spec in specs]
    expected = reference(text, pictures)
    assert len(set(expected)) > 2, expected  # a decoder that answers, not one token repeated
    assert ask(client, Request(text, images=tuple(png(p) for p in pictures), max_tokens=NEW_TOKENS)).token_ids == expected


def test_neither_tokenizer_file_is_one_clear_error(tmp_path: Path) -> None:
    checkpoint = write_mistral_layout(tmp_path / NAME, None)
    (checkpoint / "tekken.json").unlink()
    spec = load_spec(ROOT / "specs" / "tiny.yaml", {"source.preset": None, "source.checkpoint": str(checkpoint)})
    with pytest.raises(BuildError) as raised:
        build(spec, tmp_path / "model_repository", tmp_path / "cache", progress=False)
    assert str(raised.value) == f"{checkpoint}: no tokenizer; looked for tokenizer.json and tekken.json"
    assert not (tmp_path / "model_repository").exists()


def test_facts_without_a_build_and_a_merge_size_the_model_does_not_have(tmp_path: Path) -> None:
    from builder.source.checkpoint import read_facts

    checkpoint = write_mistral_layout(tmp_path / NAME, None)
    facts = read_facts(checkpoint).image  # the tokenizer converted outside any build cache
    assert (facts.token, facts.patch_size, facts.merge_size, facts.longest_edge) == (SPECIALS.index("[IMG]"), 6, 2, 72)
    for name, section in (("tekken.json", "image"), ("params.json", "vision_encoder")):  # both, or they disagree
        raw = json.loads((checkpoint / name).read_text())
        raw[section]["spatial_merge_size"] = 1
        (checkpoint / name).write_text(json.dumps(raw))
    with pytest.raises(BuildError, match="processor spatial_merge_size 1 differs from config.json's 2"):
        read_facts(checkpoint)
