"""The checkpoint's chat template and what rendering it needs, resolved at build time as transformers 5.23 does.

The template is found in a processor's order (``processor_config.json``, ``chat_template.json``,
``chat_template.jinja``), then a tokenizer's (``tokenizer_config.json``, its "default" when a named list);
without one, the family's fallback. Special tokens and the control-token list are transformers' own
for the checkpoint's tokenizer; Mistral's ``SYSTEM_PROMPT.txt`` is the default when the template has none.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder.errors import BuildError
from builder.families.mistral_files import default_system_prompt
from builder.runtime.chat import ChatPrompt, ChatTemplate, request_messages
from builder.runtime.errors import RequestError
from builder.source.tokenizer_files import serving_tokenizer

# For a checkpoint without a template whose family has no layout of its own: "role: text" lines after the
# BOS, each image or audio item written as the text "<image>" / "<audio>" for the family to expand.
GENERIC_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}{{ message['role'] }}: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for block in message['content'] %}"
    "{% if block['type'] == 'text' %}{{ block['text'] }}{% else %}<{{ block['type'] }}>{% endif %}"
    "{% endfor %}{% endif %}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
_PROBE_SYSTEM, _PROBE_USER = "\u2063probe-system\u2063", "\u2063probe-user\u2063"


@dataclass(frozen=True)
class ChatFiles:
    """Where the template came from (a file name, or "fallback") and what serving loads (``ChatPrompt.load``)."""

    source: str
    prompt: ChatPrompt

    def write(self, directory: Path) -> list[Path]:
        """The serving files: ``chat_template.jinja`` and ``chat.json``."""
        return self.prompt.save(directory)


def read_chat_files(directory: Path, fallback_template: str = GENERIC_CHAT_TEMPLATE,
                    tokenizer_file: Path | None = None) -> ChatFiles:
    """``tokenizer_file``: the ``tokenizer.json`` the checkpoint serves with (default: :func:`serving_tokenizer`'s)."""
    found = find_chat_template(directory)
    source, template = found if found else ("fallback", fallback_template)
    tokenizer = _hf_tokenizer(directory, tokenizer_file or serving_tokenizer(directory))
    special_tokens = {key: value for key, value in tokenizer.special_tokens_map.items() if isinstance(value, str)}
    chat = ChatTemplate(template)
    as_blocks = _takes_system_blocks(chat, special_tokens)
    system_prompt = default_system_prompt(directory)  # Mistral's SYSTEM_PROMPT.txt, if the checkpoint has one
    where = str(directory / source) if found else "the family's default chat template"
    if _has_default_system_prompt(chat, special_tokens, as_blocks, where) and system_prompt is not None:
        system_prompt = None  # the template's own default wins, as in HF's pipeline
    return ChatFiles(source, ChatPrompt(
        template=template,
        special_tokens=special_tokens,
        # transformers' list for `sanitize_control_tokens`: special tokens, `chat_control_tokens`, or the template's
        control_tokens=tuple(tokenizer._get_control_tokens(template)),
        default_system_prompt=system_prompt,
        system_as_blocks=as_blocks,
    ))


def read_chat_prompt(checkpoint: Path, tokenizer_file: Path, fallback_template: str) -> ChatPrompt:
    """What the build copies into the repository for the server (``ChatPrompt.save``)."""
    return read_chat_files(checkpoint, fallback_template, tokenizer_file).prompt


def find_chat_template(directory: Path) -> tuple[str, str] | None:
    """(file name, template) as ``PixtralProcessor.from_pretrained`` then ``AutoTokenizer`` would find it, or None.

    A processor takes ``processor_config.json``'s key (with a warning), then the legacy ``chat_template.json``
    over ``chat_template.jinja``; a tokenizer reads ``chat_template.jinja``, then ``tokenizer_config.json``.
    """
    for name in ("processor_config.json", "chat_template.json"):
        template = _json(directory / name).get("chat_template")
        if template is not None:
            return name, _default_template(template, directory / name)
    for name in ("chat_template.jinja", "chat_templates/default.jinja"):
        if (directory / name).is_file():
            return name, (directory / name).read_text(encoding="utf-8")
    template = _json(directory / "tokenizer_config.json").get("chat_template")
    return ("tokenizer_config.json", _default_template(template, directory / "tokenizer_config.json")) if template else None


def _default_template(template: Any, path: Path) -> str:
    if isinstance(template, list):  # [{"name": ..., "template": ...}], as tokenizers store several
        template = {entry["name"]: entry["template"] for entry in template}
    if isinstance(template, dict):  # HF renders the "default" one when no name is asked for
        if "default" not in template:
            raise BuildError(f"{path}: chat templates {sorted(template)} and none named 'default'")
        template = template["default"]
    if not isinstance(template, str):
        raise BuildError(f"{path}: chat_template is a {type(template).__name__}, not a template")
    return template


def _hf_tokenizer(directory: Path, tokenizer_file: Path) -> Any:
    """transformers' tokenizer for the checkpoint, whose special tokens and control tokens serving reuses."""
    from transformers import PreTrainedTokenizerFast

    # A tokenizer converted from tekken.json has its bos/eos/unk names in a tokenizer_config.json beside it.
    beside = _json(tokenizer_file.parent / "tokenizer_config.json") if tokenizer_file.parent != directory else {}
    config = {**beside, **_json(directory / "special_tokens_map.json"), **_json(directory / "tokenizer_config.json")}
    kwargs = {key: value["content"] if isinstance(value, dict) else value for key, value in config.items()
              if key.endswith("_token") or key in ("chat_control_tokens", "extra_special_tokens")}
    try:
        return PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), **kwargs)
    except Exception as exc:  # noqa: BLE001 - a tokenizer file transformers cannot read is the user's to fix
        raise BuildError(f"{tokenizer_file}: transformers cannot load it ({exc})") from None


def _takes_system_blocks(chat: ChatTemplate, special_tokens: dict[str, str]) -> bool:
    """Whether the template prints a system turn given as text blocks (else it is given as a string).

    A template that fails on blocks (a ``TypeError`` where it concatenates the content) does not take them."""
    rendered = _rendered(chat, request_messages(_PROBE_USER, 0, 0, _PROBE_SYSTEM, True), special_tokens)
    return rendered is not None and _PROBE_SYSTEM in rendered and repr(_PROBE_SYSTEM) not in rendered  # not the list's repr


def _has_default_system_prompt(chat: ChatTemplate, special_tokens: dict[str, str], as_blocks: bool, where: str) -> bool:
    """Whether the template writes a system prompt of its own where a given one would go."""
    try:
        without = chat.render(request_messages(_PROBE_USER, 0, 0), special_tokens)
    except RequestError as exc:
        raise BuildError(f"{where}: the chat template cannot render one user turn ({exc})") from None
    given = _rendered(chat, request_messages(_PROBE_USER, 0, 0, _PROBE_SYSTEM, as_blocks), special_tokens)
    if given is None or _PROBE_SYSTEM not in given:
        return True  # the template takes no system prompt: a default could not be passed either
    before, after = given.split(_PROBE_SYSTEM, 1)
    return without.startswith(before) and without.endswith(after) and len(without) > len(before) + len(after)


def _rendered(chat: ChatTemplate, messages: list[dict[str, Any]], special_tokens: dict[str, str]) -> str | None:
    """The template's text for ``messages``, or None where it refuses them (it raises, whatever the exception)."""
    try:
        return chat.render(messages, special_tokens)
    except RequestError:
        return None


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except json.JSONDecodeError as exc:
        raise BuildError(f"{path}: not valid JSON ({exc})") from None
