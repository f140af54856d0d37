"""What Mistral's own files say when a checkpoint has no Hugging Face processor config.

Mistral Small 3.x / Magistral repositories carry their image parameters in ``tekken.json`` (``image``, or the
older ``multimodal`` key) and ``params.json`` (``vision_encoder``), and a default system prompt in
``SYSTEM_PROMPT.txt``. Both readers return None when the files are absent; a malformed file is a ``BuildError``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder.errors import BuildError

SYSTEM_PROMPT_FILE = "SYSTEM_PROMPT.txt"

# mistral-common's instruct encoding as a chat template, for Mistral checkpoints without a template of their own
# (Mistral publishes tekken.json alone): media first, then the text.
MISTRAL_INSTRUCT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}[SYSTEM_PROMPT]{{ message['content'] }}[/SYSTEM_PROMPT]"
    "{% elif message['role'] == 'user' %}[INST]"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}[IMG]{% elif item['type'] == 'audio' %}[AUDIO]{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}[/INST]"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}"
)


@dataclass(frozen=True)
class MistralImageParams:
    """Pixtral's processing parameters: ``size.longest_edge`` is ``longest_edge``.

    ``image_mean``/``image_std`` are None when the files do not give them (the published ones do not): Pixtral's
    processor and mistral-common then both use CLIP's mean and std.
    """

    patch_size: int
    spatial_merge_size: int
    longest_edge: int
    image_mean: tuple[float, float, float] | None = None
    image_std: tuple[float, float, float] | None = None


def image_params_from_mistral_files(checkpoint: Path) -> MistralImageParams | None:
    """From ``tekken.json``'s image section and/or ``params.json``'s ``vision_encoder``; None if neither has one.

    tekken.json: ``image_patch_size``, ``max_image_size``, ``spatial_merge_size`` (mistral-common's
    ``ImageConfig``, merge 1 when absent). params.json: ``patch_size``, ``max_image_size`` (else ``image_size``),
    ``spatial_merge_size``, as transformers' ``convert_tekken_image_processor`` reads them. When both files
    give a value they must agree: a checkpoint whose tokenizer and vision encoder disagree cannot be served.
    """
    tekken = _json(checkpoint / "tekken.json")
    tekken_image = tekken.get("image") or tekken.get("multimodal")
    encoder = _json(checkpoint / "params.json").get("vision_encoder")
    for name, section in (("tekken.json image", tekken_image), ("params.json vision_encoder", encoder)):
        if section is not None and not isinstance(section, dict):
            raise BuildError(f"{checkpoint}: {name} is a {type(section).__name__}, not an object")
    found: dict[str, dict[str, Any]] = {}
    if tekken_image:
        found["tekken.json"] = {
            "patch_size": tekken_image.get("image_patch_size"),
            "longest_edge": tekken_image.get("max_image_size"),
            "spatial_merge_size": tekken_image.get("spatial_merge_size"),
        }
    if encoder:
        found["params.json"] = {
            "patch_size": encoder.get("patch_size"),
            "longest_edge": encoder.get("max_image_size", encoder.get("image_size")),
            "spatial_merge_size": encoder.get("spatial_merge_size"),
            "image_mean": encoder.get("image_mean"),
            "image_std": encoder.get("image_std"),
        }
    if not found:
        return None
    merged: dict[str, Any] = {}
    for source, values in found.items():
        for key, value in values.items():
            if value is None:
                continue
            if merged.get(key, value) != value:
                raise BuildError(f"{checkpoint}: {key} is {merged[key]} in tekken.json but {value} in {source}")
            merged[key] = value
    merged.setdefault("spatial_merge_size", 1)  # after merging: a file that omits it does not contradict the other
    return _image_params(checkpoint, merged, " and ".join(found))


def default_system_prompt(checkpoint: Path) -> str | None:
    """``SYSTEM_PROMPT.txt`` with ``{name}`` filled by the checkpoint directory's name; None without the file.

    Mistral's files (Mistral Small 3.x) read "You are {name}, ..." with "The current date is {today}" and
    "yesterday is {yesterday}"; their model cards fill all three with ``str.format`` (the repository name,
    and ``%Y-%m-%d`` dates at request time). mistral-common and vLLM do not read the file at all: the caller
    passes it as the system message. Here ``{name}`` is filled once at build time, while ``{today}`` and
    ``{yesterday}`` are left for the server to fill per request (a date baked in at build time goes stale).
    Only these three names are replaced, not ``str.format``, so other braces in the text stay as they are.
    Magistral Small 1.2's file has a ``[THINK]...[/THINK]`` part, which its card sends as a "thinking" block
    and its template prints as that same text: returned as is, its control tokens must be encoded as tokens.
    """
    path = checkpoint / SYSTEM_PROMPT_FILE
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BuildError(f"{path}: cannot be read ({exc})") from None
    return text.replace("{name}", checkpoint.resolve().name)


def _image_params(checkpoint: Path, values: dict[str, Any], source: str) -> MistralImageParams:
    sizes = {key: values.get(key) for key in ("patch_size", "spatial_merge_size", "longest_edge")}
    bad = [key for key, value in sizes.items() if not isinstance(value, int) or isinstance(value, bool) or value < 1]
    if bad:
        raise BuildError(f"{checkpoint}: image {', '.join(bad)} missing or not a positive integer in {source}")
    return MistralImageParams(**sizes, image_mean=_triple(checkpoint, values, "image_mean"),
                              image_std=_triple(checkpoint, values, "image_std"))


def _triple(checkpoint: Path, values: dict[str, Any], key: str) -> tuple[float, float, float] | None:
    value = values.get(key)
    if value is None:
        return None
    if not (isinstance(value, list) and len(value) == 3 and all(isinstance(v, (int, float)) for v in value)):
        raise BuildError(f"{checkpoint}: params.json vision_encoder.{key} is {value!r}, not three numbers")
    return (float(value[0]), float(value[1]), float(value[2]))


def _json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise BuildError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise BuildError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data
