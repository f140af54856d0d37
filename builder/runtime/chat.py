"""The checkpoint's own chat template, rendered and tokenized as Hugging Face does, at serve time.

Rendering is transformers 5.23's ``render_jinja_template`` (immutable sandbox, its globals and ``tojson``);
ids are a processor's ``apply_chat_template(..., tokenize=True, sanitize_control_tokens=True)``: control
tokens a client writes (``[IMG]``, ``</s>``) are marked before rendering and encoded as plain text, the
template's own stay control tokens. Without such text the ids equal plain ``apply_chat_template``'s.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from .errors import RequestError

TEMPLATE_FILE = "chat_template.jinja"
SETTINGS_FILE = "chat.json"
# transformers' private-use markers around the control tokens found in client strings.
_START, _END = "\U000f0000", "\U000f0001"


@dataclass(frozen=True)
class ChatTemplate:
    """One Jinja chat template, compiled in transformers' environment."""

    source: str

    def render(self, messages: list[dict[str, Any]], variables: dict[str, Any], add_generation_prompt: bool = True) -> str:
        """``variables`` are the special tokens (``bos_token``...), as HF passes ``special_tokens_map``."""
        try:
            return _compiled(self.source).render(messages=messages, tools=None, documents=None,
                                                 add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.TemplateError as exc:  # e.g. the template's raise_exception for content it does not take
            raise RequestError(f"chat template: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - the checkpoint's code failing on this request's messages, e.g. a
            # system turn given in a form it does not take (a TypeError in its string concatenation)
            raise RequestError(f"chat template: {type(exc).__name__}: {exc}") from None


def request_messages(text: str, images: int, audio: int, system_prompt: str | None = None,
                     system_as_blocks: bool = True) -> list[dict[str, Any]]:
    """One user turn as HF's multimodal examples write it (media first, then the text), after an optional system turn.

    The system turn's content is a text block list, as multimodal templates (Mistral Small 3.1's) read it,
    or a plain string for templates that print it as it is (``system_as_blocks``, decided at build time).
    """
    # Each media block also carries its kind as a key, as HF's examples do ({"type": "audio", "audio": ...}):
    # some templates (Qwen2-Audio's) test for the key, not the type.
    content = ([{"type": "image", "image": f"image[{i}]"} for i in range(images)]
               + [{"type": "audio", "audio": f"audio[{i}]"} for i in range(audio)] + [{"type": "text", "text": text}])
    user = {"role": "user", "content": content}
    return [user] if system_prompt is None else [system_message(system_prompt, system_as_blocks), user]


def system_message(text: str, as_blocks: bool = True) -> dict[str, Any]:
    return {"role": "system", "content": [{"type": "text", "text": text}] if as_blocks else text}


ROLES = ("system", "user", "assistant")


def parse_conversation(document: str, images: int, audio: int, system_as_blocks: bool = True) -> list[dict[str, Any]]:
    """A client's ``messages`` input (JSON: ``[{"role", "content"}, ...]``, OpenAI's shape) as the conversation HF's
    ``apply_chat_template`` takes: content a string or parts ``{"type": "text", "text"}``, ``{"type": "image",
    "index": i}``, ``{"type": "audio", "index": i}``, a media part naming item ``i`` of the request's ``image`` /
    ``audio`` input. Media parts name every item once, in order of appearance (the placeholders expand in that
    order); a system turn comes first, in the form the template takes; the last turn is the user's."""
    try:
        turns = json.loads(document)
    except json.JSONDecodeError as exc:
        raise RequestError(f"messages: not valid JSON ({exc.msg} at character {exc.pos})") from None
    if not isinstance(turns, list) or not turns:
        raise RequestError("messages: expected a non-empty JSON list of {\"role\", \"content\"} objects")
    seen = {"image": [], "audio": []}
    conversation = [_turn(turn, i, seen) for i, turn in enumerate(turns)]
    for kind, count in (("image", images), ("audio", audio)):
        if seen[kind] != list(range(count)):
            raise RequestError(f"messages: the {kind} parts name items {seen[kind]}, the request has {count} "
                               f"{kind} input(s): name each once, in order (0, 1, ...)")
    if any(turn["role"] == "system" for turn in conversation[1:]):
        raise RequestError("messages: a system turn may only come first")
    if conversation[-1]["role"] != "user":
        raise RequestError(f"messages: the last turn is the {conversation[-1]['role']}'s; it must be the user's")
    if conversation[0]["role"] == "system":
        content = conversation[0]["content"]
        text = content if isinstance(content, str) else "".join(part.get("text", "") for part in content)
        if not isinstance(content, str) and any(part["type"] != "text" for part in content):
            raise RequestError("messages[0]: a system turn holds text only")
        conversation[0] = system_message(text, system_as_blocks)
    return conversation


def _turn(turn: Any, index: int, seen: dict[str, list[int]]) -> dict[str, Any]:
    where = f"messages[{index}]"
    if not isinstance(turn, dict) or turn.get("role") not in ROLES or set(turn) - {"role", "content"}:
        raise RequestError(f"{where}: expected {{\"role\": one of {', '.join(ROLES)}, \"content\": ...}}")
    content = turn.get("content")
    if isinstance(content, str):
        return {"role": turn["role"], "content": content}
    if not isinstance(content, list):
        raise RequestError(f"{where}.content: expected a string or a list of parts")
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str) and set(part) == {"type", "text"}:
            parts.append({"type": "text", "text": part["text"]})
        elif kind in seen and turn["role"] == "user" and isinstance(part.get("index"), int) and set(part) == {"type", "index"}:
            seen[kind].append(part["index"])
            # Each media block carries its kind as a key, as HF's examples do (see request_messages).
            parts.append({"type": kind, kind: f"{kind}[{part['index']}]"})
        else:
            raise RequestError(f"{where}.content[{j}]: expected {{\"type\": \"text\", \"text\": ...}} or, in a user "
                               f"turn, {{\"type\": \"image\" | \"audio\", \"index\": n}}")
    return {"role": turn["role"], "content": parts}


@dataclass(frozen=True)
class ChatPrompt:
    """What serving needs to turn one request into prompt ids; written by the build beside ``tokenizer.json``."""

    template: str
    special_tokens: dict[str, str]  # bos_token, eos_token...: the template's variables (HF's special_tokens_map)
    control_tokens: tuple[str, ...]  # encoded as plain text when a client writes them (HF's list for this template)
    default_system_prompt: str | None = None  # the checkpoint's SYSTEM_PROMPT.txt, when its template has no default
    system_as_blocks: bool = True  # the system turn's content form (see request_messages)

    def save(self, directory: Path) -> list[Path]:
        (directory / TEMPLATE_FILE).write_text(self.template)
        settings = {"special_tokens": self.special_tokens, "control_tokens": list(self.control_tokens),
                    "default_system_prompt": self.default_system_prompt, "system_as_blocks": self.system_as_blocks}
        (directory / SETTINGS_FILE).write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n")
        return [directory / TEMPLATE_FILE, directory / SETTINGS_FILE]

    @classmethod
    def load(cls, directory: str | Path) -> "ChatPrompt":
        directory = Path(directory)
        settings = json.loads((directory / SETTINGS_FILE).read_text())
        return cls((directory / TEMPLATE_FILE).read_text(), settings["special_tokens"], tuple(settings["control_tokens"]),
                   settings["default_system_prompt"], settings["system_as_blocks"])

    def conversation(self, text: str, images: int, audio: int, system_prompt: str | None = None) -> list[dict[str, Any]]:
        """The one-turn request (``text_input``, ``system_prompt``) as a conversation (see :func:`request_messages`)."""
        return request_messages(text, images, audio, system_prompt, self.system_as_blocks)

    def render(self, messages: list[dict[str, Any]]) -> str:
        """The prompt text of a conversation, client strings marked; the checkpoint's default system prompt first when
        the conversation has no system turn of its own."""
        messages = _mark(messages, self.control_tokens)
        if self.default_system_prompt is not None and (not messages or messages[0]["role"] != "system"):
            # The checkpoint's own prompt is trusted: its control tokens (Magistral's [THINK]) stay control tokens.
            messages = [system_message(_fill_dates(self.default_system_prompt), self.system_as_blocks), *messages]
        return ChatTemplate(self.template).render(messages, self.special_tokens)

    def encode(self, tokenizer: Tokenizer, messages: list[dict[str, Any]], expansions: dict[str, str] | None = None) -> list[int]:
        """Token ids of the rendered conversation, with whatever the template writes once per image and audio file;
        ``expansions``: text that replaces each marker the template (not a client) wrote, before tokenizing."""
        rendered = self.render(messages)
        for marker, expansion in (expansions or {}).items():  # a client's copy is wrapped in _START ... _END
            rendered = re.sub(f"(?<!{re.escape(_START)}){re.escape(marker)}", lambda _: expansion, rendered)
        # A processor adds the tokenizer's special tokens (its post-processor) unless the template wrote the BOS.
        bos = self.special_tokens.get("bos_token")
        add_special = not (bos and rendered.startswith(bos))
        if _START not in rendered and _END not in rendered:
            return tokenizer.encode(rendered, add_special_tokens=add_special).ids
        ids = _encode_marked(tokenizer, rendered)
        if not add_special:
            return ids
        prefix, suffix = _special_affixes(tokenizer)
        return prefix + ids + suffix


@functools.lru_cache(maxsize=8)
def _compiled(source: str) -> jinja2.Template:
    return _environment().from_string(source)


@functools.lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    """transformers' ``_compile_jinja_template`` environment, with the same globals and filters."""
    major_minor_patch = tuple(int(part) for part in re.findall(r"\d+", jinja2.__version__)[:3])
    if major_minor_patch < (3, 1, 6):  # transformers refuses these too: known sandbox escapes
        raise RuntimeError(f"chat templates need jinja2>=3.1.6, this is {jinja2.__version__}")

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        # Not Jinja's own tojson, which escapes HTML characters
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format: str) -> str:
        return datetime.now().strftime(format)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: transformers parses it to mask assistant tokens; it renders the body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


class _TemplateDict:
    """transformers' ``dict`` global: the constructor and fromkeys only, no attribute access to break out with."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """transformers' ``namespace`` global: no underscore attributes, so no way to CPython internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # Jinja's signature trick, so namespace(self=...) works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot store {name!r} on a namespace")


def _fill_dates(system_prompt: str) -> str:
    # Mistral's SYSTEM_PROMPT.txt carries {today} and {yesterday}, which their model cards fill per request.
    today = date.today()
    return system_prompt.replace("{today}", today.isoformat()).replace("{yesterday}", (today - timedelta(1)).isoformat())


@functools.lru_cache(maxsize=8)
def _patterns(control_tokens: tuple[str, ...]) -> tuple[re.Pattern[str], re.Pattern[str]]:
    """transformers' ``_get_control_token_patterns``: any token (longest first), and a marked token or a lone marker."""
    longest_first = sorted(control_tokens, key=len, reverse=True)  # a token wins over the tokens it contains
    tokens = re.compile("|".join(map(re.escape, longest_first)) or "(?!)")
    return tokens, re.compile(f"{_START}({tokens.pattern}){_END}|[{_START}{_END}]")


def _mark(value: Any, control_tokens: tuple[str, ...]) -> Any:
    """transformers' ``mark_control_tokens``: wrap control tokens in client strings with private markers."""
    if isinstance(value, str):
        value = value.replace(_START, "").replace(_END, "")  # markers a client sends cannot forge a marked token
        return _patterns(control_tokens)[0].sub(f"{_START}\\g<0>{_END}", value)
    if isinstance(value, dict):
        return {key: _mark(item, control_tokens) for key, item in value.items()}
    if isinstance(value, list):
        return [_mark(item, control_tokens) for item in value]
    return value


def _encode_marked(tokenizer: Tokenizer, chat: str) -> list[int]:
    """transformers' ``encode_marked_chat``: marked tokens as plain text, the rest (the template's) normally.

    Splitting gives [text, marked token, text, ...] (None for a lone marker, which still breaks the text so
    that the text on either side cannot join into a control token).
    """
    added = tuple(token.content for token in tokenizer.get_added_tokens_decoder().values())
    pieces = _patterns(added)[1].split(chat)
    newline = tokenizer.encode("\n", add_special_tokens=False).ids
    ids = tokenizer.encode(pieces[0], add_special_tokens=False).ids
    for i, piece in enumerate(pieces[1:], start=1):
        if not piece:
            continue
        as_text = i % 2 == 1
        piece_ids = _encode_piece(tokenizer, piece, as_text, newline)
        if as_text and tokenizer.token_to_id(piece) in piece_ids:
            raise RequestError(f"text_input: {piece!r} cannot be encoded as plain text with this tokenizer")
        ids += piece_ids
    return ids


def _encode_piece(tokenizer: Tokenizer, piece: str, as_text: bool, newline: list[int]) -> list[int]:
    # After a newline, so a SentencePiece tokenizer adds no prefix space, then without it (as transformers does).
    def encode(text: str) -> list[int]:
        return _encode_without_added_tokens(tokenizer, text) if as_text else tokenizer.encode(text, add_special_tokens=False).ids

    ids = encode("\n" + piece)
    return ids[len(newline):] if ids[: len(newline)] == newline else encode(piece)


def _encode_without_added_tokens(tokenizer: Tokenizer, text: str) -> list[int]:
    """transformers' fast ``_encode_without_added_tokens``: the backend's pipeline with no added token matched."""
    if tokenizer.normalizer is not None:
        text = tokenizer.normalizer.normalize_str(text)
    splits = [split for split, _ in tokenizer.pre_tokenizer.pre_tokenize_str(text)] if tokenizer.pre_tokenizer else [text]
    return [token.id for split in splits for token in tokenizer.model.tokenize(split)]


def _special_affixes(tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """The ids the post-processor puts before and after one sequence (e.g. [BOS], [])."""
    bare = tokenizer.encode("a", add_special_tokens=False).ids
    full = tokenizer.encode("a", add_special_tokens=True).ids
    start = next(i for i in range(len(full) - len(bare) + 1) if full[i:i + len(bare)] == bare)
    return full[:start], full[start + len(bare):]
