"""``Glm4Tokenizer``: GLM-4's tokenizer and chat template, without transformers.

The vocabulary and the encode/decode pipeline are the checkpoint's own ``tokenizer.json``, run by
the ``tokenizers`` package (byte-level BPE behind a GPT-4-style split regex for GLM-4);
``tokenizer_config.json`` adds the special tokens, padding side and the chat template. The API and
every result mirror transformers 5.x ``PreTrainedTokenizerFast`` (``TokenizersBackend``) loaded from
the same files; where transformers would return tensors this returns NumPy int64 arrays. Input that
transformers lets through to a confusing error or a silent loss is refused with a ValueError or
TypeError that names it: ids ``decode`` does not know, text with lone surrogates, chat messages
with no role, a role the template does not render, or content that is not text.

Chat templates are rendered the way transformers renders them (``utils/chat_template_utils.py``):
a jinja2 ``ImmutableSandboxedEnvironment`` with ``trim_blocks``, ``lstrip_blocks`` and the
``loopcontrols`` extension, a ``tojson`` filter that does not escape HTML and keeps non-ASCII text,
``raise_exception`` / ``strftime_now`` globals, the named special tokens as template variables.
The rendered text is then tokenized WITHOUT adding special tokens: GLM templates write
``[gMASK]<sop>`` themselves, and GLM's post-processor would prepend them a second time.

``StreamDecoder`` turns generated ids into text piece by piece for streaming, holding back bytes
of a character that byte-level BPE split across tokens.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any

import numpy as np

from .errors import Glm4rtError
from .hub import HUB_KWARGS, resolve_model_dir

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "additional_chat_templates"

# transformers' named special tokens, in its order (special_tokens_map, all_special_tokens).
SPECIAL_TOKENS_ATTRIBUTES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                             "mask_token")
VERY_LARGE_INTEGER = int(1e30)  # transformers' "no limit" model_max_length
LARGE_INTEGER = int(1e20)

# Private-use characters that mark control tokens found in user input (sanitize_control_tokens).
_CONTROL_TOKEN_START = "\U000f0000"
_CONTROL_TOKEN_END = "\U000f0001"
# Message keys a reasoning trace may come under; the first is the one templates read.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


class TokenizerError(Glm4rtError):
    """A tokenizer.json / tokenizer_config.json / chat template that is unreadable or inconsistent."""


class BatchEncoding(dict):
    """The dict ``Glm4Tokenizer.__call__`` returns; keys are also readable as attributes
    (``enc.input_ids``), as with transformers' ``BatchEncoding``."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


# --------------------------------------------------------------------------------------------------
# Loading helpers
# --------------------------------------------------------------------------------------------------

def _token_content(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string or a serialized AddedToken."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(f"special token must be a string or an AddedToken dict, got {value!r}")


def _added_token(content: str, spec: Mapping | None = None, special: bool = True):
    """A ``tokenizers.AddedToken`` from tokenizer_config.json's ``added_tokens_decoder`` entry."""
    from tokenizers import AddedToken

    if spec is None:
        return AddedToken(content, special=special, normalized=not special)
    kwargs = {k: spec[k] for k in ("single_word", "lstrip", "rstrip", "normalized", "special") if k in spec}
    return AddedToken(content, **kwargs)


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from e


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{path}: not valid UTF-8 ({e})") from e


def _to_py(ids: Any) -> Any:
    """NumPy arrays / scalars (and anything with ``tolist``, e.g. torch tensors) -> Python ints/lists."""
    if isinstance(ids, Mapping):
        ids = ids["input_ids"]
    if hasattr(ids, "tolist"):
        return ids.tolist()
    if isinstance(ids, (list, tuple)):
        return [_to_py(x) for x in ids]
    return ids


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _check_texts(texts: list) -> None:
    """Text to encode must be ``str`` with a UTF-8 form: no lone surrogates, which is how Python
    keeps bytes it could not decode (``errors="surrogateescape"``); tokenizers would refuse them
    with a TypeError that does not say why."""
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"text must be a string or a list of strings, got {type(text).__name__}")
        bad = _LONE_SURROGATE.search(text)
        if bad:
            raise ValueError(f"text has a lone surrogate {bad.group()!r} at index {bad.start()}, which is not "
                             "a character (undecodable input bytes?): decode input with errors='replace'")


# --------------------------------------------------------------------------------------------------
# Chat template rendering (mirrors transformers/utils/chat_template_utils.py)
# --------------------------------------------------------------------------------------------------

@lru_cache(maxsize=32)
def _compile_template(chat_template: str):
    """Compile a chat template in transformers' jinja environment (cached per template text)."""
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    import jinja2.utils
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    version = tuple(int(p) for p in re.findall(r"\d+", jinja2.__version__)[:3])
    if version < (3, 1, 6):
        # Same floor as transformers: older jinja2 has known sandbox escapes, templates are untrusted code.
        raise ImportError(f"chat templates need jinja2>=3.1.6, found {jinja2.__version__}: pip install -U jinja2")

    class GenerationTag(jinja2.ext.Extension):
        # transformers' {% generation %}...{% endgeneration %} marks assistant text for its assistant
        # mask; it renders the body unchanged, and so does this.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes <, >, & and ' for HTML; chat templates want plain JSON.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    class TemplateDict:
        # dict() for templates, without exposing the dict type itself.
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        # namespace() that refuses underscore attributes (no way to CPython internals).
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"Chat templates cannot store underscore-prefixed attributes on a namespace, but got {name!r}.")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    try:
        return env.from_string(chat_template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise TokenizerError(f"chat template does not compile: {e} (line {e.lineno})") from e


@lru_cache(maxsize=32)
def _template_literal_text(chat_template: str) -> str:
    """The template's raw text and string constants, NUL-joined (control-token detection)."""
    import jinja2.nodes

    ast = _compile_template(chat_template).environment.parse(chat_template)
    literals = {node.data for node in ast.find_all(jinja2.nodes.TemplateData)}
    literals |= {node.value for node in ast.find_all(jinja2.nodes.Const) if isinstance(node.value, str)}
    return "\0".join(literals)


@lru_cache(maxsize=32)
def _template_roles(chat_template: str) -> frozenset[str] | None:
    """The message roles a template renders: the strings it compares a message's role with
    (``message.role == 'user'``, ``role in [...]``, ``selectattr('role', 'equalto', ...)``).
    None when any role renders: the template writes the role out or uses it some other way."""
    import jinja2.nodes as nodes

    ast = _compile_template(chat_template).environment.parse(chat_template)
    names = {"role"}  # variables that hold a role, as {% set role = message['role'] %} makes

    def is_role(node) -> bool:
        return (isinstance(node, nodes.Getattr) and node.attr == "role"
                or isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const) and node.arg.value == "role"
                or isinstance(node, nodes.Name) and node.ctx == "load" and node.name in names)

    def strings(node) -> list[str]:
        items = node.items if isinstance(node, (nodes.List, nodes.Tuple)) else [node]
        if all(isinstance(i, nodes.Const) and isinstance(i.value, str) for i in items):
            return [i.value for i in items]
        return []

    understood: set[int] = set()  # ids of the role nodes whose use is known (assigned, compared)
    for assign in ast.find_all(nodes.Assign):
        if isinstance(assign.target, nodes.Name) and is_role(assign.node):
            names.add(assign.target.name)
            understood.add(id(assign.node))
    roles: set[str] = set()
    for compare in ast.find_all(nodes.Compare):
        operands = [compare.expr] + [op.expr for op in compare.ops]
        for a, b in zip(operands, operands[1:]):
            for role, other in ((a, b), (b, a)):
                if is_role(role) and strings(other):
                    roles.update(strings(other))
                    understood.add(id(role))
    for test in ast.find_all(nodes.Test):  # message.role is equalto 'user'
        if test.name in ("eq", "equalto", "==", "ne", "!=") and is_role(test.node) and \
                len(test.args) == 1 and strings(test.args[0]):
            roles.update(strings(test.args[0]))
            understood.add(id(test.node))
    for selection in ast.find_all(nodes.Filter):  # messages | selectattr('role', 'equalto', 'system')
        args = selection.args
        if selection.name in ("selectattr", "rejectattr") and len(args) == 3 and strings(args[0]) == ["role"]:
            roles.update(strings(args[2]))
    used = [n for n in ast.find_all((nodes.Getattr, nodes.Getitem, nodes.Name)) if is_role(n)]
    if not roles or any(id(n) not in understood for n in used):
        return None
    return frozenset(roles)


def _check_messages(messages: list[dict], roles: frozenset[str] | None) -> None:
    """Refuse messages a template would drop or garble: no role, a role it does not render
    (``roles``; None: any), content that is not text. Content may be left out of an assistant
    message only (a tool call, or reasoning alone)."""
    for i, message in enumerate(messages):
        role = message.get("role")
        if role is None:
            raise ValueError(f"message {i} has no 'role'")
        if not isinstance(role, str):
            raise TypeError(f"message {i}: role must be a string, got {role!r} ({type(role).__name__})")
        if roles is not None and role not in roles:
            raise ValueError(f"message {i} has role {role!r}, which the chat template does not render (it renders "
                             f"{', '.join(map(repr, sorted(roles)))}): the message would be dropped")
        content = message.get("content")
        if content is None:
            if role == "assistant":
                continue
            raise ValueError(f"message {i} (role {role!r}) has no content: give a string ('' for an empty message)")
        blocks = isinstance(content, (list, tuple)) and all(isinstance(block, dict) for block in content)
        if not isinstance(content, str) and not blocks:
            raise TypeError(f"message {i} (role {role!r}): content must be a string or a list of content-block "
                            f"dicts, got {type(content).__name__} {_short_repr(content)}")


def _short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


@lru_cache(maxsize=32)
def _control_token_patterns(control_tokens: tuple[str, ...]) -> tuple[re.Pattern, re.Pattern]:
    """Regex for any control token (longest first) and regex for a marked token or a lone marker."""
    longest_first = sorted(control_tokens, key=len, reverse=True)
    tokens_re = re.compile("|".join(map(re.escape, longest_first)) or "(?!)")
    start, end = _CONTROL_TOKEN_START, _CONTROL_TOKEN_END
    markers_re = re.compile(f"{start}({tokens_re.pattern}){end}|[{start}{end}]")
    return tokens_re, markers_re


def _mark_control_tokens(obj: Any, tokens_re: re.Pattern) -> Any:
    """Wrap control tokens inside user strings in private-use markers (dict keys untouched)."""
    if isinstance(obj, str):
        obj = obj.replace(_CONTROL_TOKEN_START, "").replace(_CONTROL_TOKEN_END, "")
        return tokens_re.sub(f"{_CONTROL_TOKEN_START}\\g<0>{_CONTROL_TOKEN_END}", obj)
    if isinstance(obj, dict):
        return {key: _mark_control_tokens(value, tokens_re) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_mark_control_tokens(value, tokens_re) for value in obj]
    return obj


def _message_objects_to_dicts(value: Any) -> Any:
    """Messages given as dataclasses or pydantic models (OpenAI SDK) -> plain dicts, recursively."""
    if isinstance(value, Mapping):
        return {key: _message_objects_to_dicts(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_message_objects_to_dicts(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_message_objects_to_dicts(item) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _message_objects_to_dicts(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _message_objects_to_dicts(value.model_dump())
    return value


def _normalize_messages(conversation: Any) -> list[dict]:
    """A conversation -> list of message dicts with the ``None``-valued keys dropped (as transformers)."""
    messages = _message_objects_to_dicts(getattr(conversation, "messages", conversation))
    if not isinstance(messages, (list, tuple)):
        raise TypeError(f"a conversation must be a list of message dicts, got {type(messages).__name__}")
    out = []
    for message in messages:
        if not isinstance(message, dict):
            raise TypeError(f"Chat messages should be dicts, dataclasses or pydantic models, but got {message!r}.")
        out.append({key: value for key, value in message.items() if value is not None})
    return out


def _plain_template_data(value: Any) -> Any:
    """Everything a template sees, rebuilt from plain JSON types; other objects become "<TypeName>"."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain_template_data(k): _plain_template_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain_template_data(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain_template_data(v) for v in value)
    if isinstance(value, np.generic):
        return _plain_template_data(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain_template_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain_template_data(value.model_dump())
    return f"<{type(value).__name__}>"


def _alias_reasoning_fields(chat: list[dict]) -> list[dict]:
    """Copy a message's reasoning to ``reasoning_content`` (and ``thinking``), as transformers does."""
    aliased = []
    for message in chat:
        if isinstance(message, dict):
            reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
            if reasoning is not None:
                message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        aliased.append(message)
    return aliased


def render_chat_template(chat_template: str, conversations: list[list[dict]], tools: list | None = None,
                         documents: list | None = None, add_generation_prompt: bool = False,
                         continue_final_message: bool | str = False, **template_kwargs: Any) -> list[str]:
    """Render conversations with a chat template exactly as transformers' ``render_jinja_template``.

    Args:
        chat_template: the jinja template text.
        conversations: a list of conversations, each a list of message dicts.
        tools: JSON-schema tool definitions (dicts), or None.
        documents: RAG documents (dicts), or None.
        add_generation_prompt: passed to the template.
        continue_final_message: leave the last message open (True continues ``content``; a string
            names the field to continue, e.g. ``"reasoning_content"``).
        **template_kwargs: further template variables (special tokens, ``enable_thinking``, ...).
    Returns:
        One rendered string per conversation.
    Raises:
        ValueError: malformed tools, or a final message the template does not reproduce.
        TypeError: documents or messages that are not dicts.
        jinja2.exceptions.TemplateError: the template's own ``raise_exception``.
    """
    compiled = _compile_template(chat_template)
    if tools is not None:
        schemas = []
        for tool in tools:
            if isinstance(tool, dict):
                schemas.append(tool)
            elif callable(tool):
                raise ValueError(
                    "glm4rt takes tools as JSON schemas (dicts); convert a Python function first, e.g. "
                    "with transformers.utils.get_json_schema(fn)")
            else:
                raise ValueError("Tools should either be a JSON schema, or a callable function with type hints "
                                 "and a docstring suitable for auto-conversion to a schema.")
        tools = schemas
    if documents is not None:
        for document in documents:
            if not isinstance(document, dict):
                raise TypeError("Documents should be a list of dicts with 'title' and 'text' keys!")
    tools = _plain_template_data(tools)
    documents = _plain_template_data(documents)
    template_kwargs = _plain_template_data(template_kwargs)

    rendered = []
    for chat in conversations:
        chat = _plain_template_data(getattr(chat, "messages", chat))  # a fresh copy: edits stay local
        for message in chat:
            if not isinstance(message, dict):
                raise TypeError(f"Chat messages should be dicts, dataclasses or pydantic models, but got {message!r}.")
        chat = _alias_reasoning_fields(chat)
        final_message = None
        if continue_final_message:
            if not chat:
                raise ValueError("continue_final_message is set but the conversation is empty!")
            field = continue_final_message if isinstance(continue_final_message, str) else "content"
            final_message = chat[-1].get(field)
            if final_message is None:
                raise ValueError(f'continue_final_message is set but the final message has no "{field}" to continue!')
            fields = [field]
            if field in _REASONING_FIELDS:
                fields = [f for f in _REASONING_FIELDS if chat[-1].get(f) == final_message]
            if not any(f in chat_template for f in fields):
                raise ValueError(f'continue_final_message is set to "{field}" but this is not an accepted field '
                                 "in the chat_template")
            if isinstance(final_message, (list, tuple)):
                for block in reversed(final_message):
                    if "text" in block:  # continue the last text block
                        final_message = block["text"]
                        block["text"] = block["text"] + _CONTINUE_TAG
                        break
                else:
                    raise ValueError("continue_final_message is set but we could not find any text to continue "
                                     "in the final message!")
            else:
                for f in fields:
                    chat[-1][f] = chat[-1][f] + _CONTINUE_TAG
        text = compiled.render(messages=chat, tools=tools, documents=documents,
                               add_generation_prompt=add_generation_prompt, **template_kwargs)
        if continue_final_message:
            if final_message.strip() not in text or _CONTINUE_TAG.strip() not in text:
                raise ValueError(
                    "continue_final_message is set but the final message does not appear in the chat after "
                    f"applying the chat template! Final message to continue: {final_message.strip()}")
            tag_at = text.rindex(_CONTINUE_TAG.strip())
            if text[tag_at:tag_at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
                text = text[:tag_at]  # spacing preserved
            else:
                text = text[:tag_at].rstrip()  # the template trimmed trailing spacing
        rendered.append(text)
    return rendered


# --------------------------------------------------------------------------------------------------
# The tokenizer
# --------------------------------------------------------------------------------------------------

class Glm4Tokenizer:
    """GLM-4's tokenizer: ``tokenizer.json`` through ``tokenizers``, plus ``tokenizer_config.json``.

    Mirrors transformers' ``PreTrainedTokenizerFast`` loaded from the same directory. Build it with
    ``Glm4Tokenizer.from_pretrained(path_or_hub_id)``.

    Args:
        tokenizer: a ``tokenizers.Tokenizer``.
        config: the tokenizer_config.json contents (special tokens, ``padding_side``,
            ``clean_up_tokenization_spaces``, ``model_max_length``, ``chat_template`` ...).
        name_or_path: where it came from (informational).
    """

    def __init__(self, tokenizer, config: Mapping | None = None, name_or_path: str = "") -> None:
        config = dict(config or {})
        self._tk = tokenizer
        self._span: tuple[int, int, bool] | None = None  # cache of _id_span, keyed by len(self)
        self.name_or_path = name_or_path
        self.init_kwargs = config

        # Named special tokens: the standard seven, then model-specific "*_token" string keys and a
        # dict-valued extra_special_tokens (transformers v5 treats both as named tokens).
        extra = config.get("extra_special_tokens")
        if not extra and config.get("additional_special_tokens"):
            extra = config["additional_special_tokens"]
        self._special: dict[str, str] = {}
        for key in SPECIAL_TOKENS_ATTRIBUTES:
            content = _token_content(config.get(key))
            if content is not None:
                self._special[key] = content
        for key, value in config.items():
            if key.endswith("_token") and key not in SPECIAL_TOKENS_ATTRIBUTES and isinstance(value, str):
                self._special[key] = value
        self._extra_special: list[str] = []
        if isinstance(extra, Mapping):
            for key, value in extra.items():
                self._special[key] = _token_content(value)
        elif isinstance(extra, (list, tuple)):
            self._extra_special = [_token_content(t) for t in extra]
        elif extra is not None:
            raise TokenizerError(f"extra_special_tokens must be a list or a dict, got {type(extra).__name__}")

        self.padding_side = config.get("padding_side", "right")
        self.truncation_side = config.get("truncation_side", "right")
        for name in ("padding_side", "truncation_side"):
            if getattr(self, name) not in ("left", "right"):
                raise TokenizerError(f"{name} must be 'left' or 'right', got {getattr(self, name)!r}")
        max_len = config.get("model_max_length", config.get("max_len"))
        self.model_max_length = int(max_len) if max_len is not None else VERY_LARGE_INTEGER
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        self._cleanup_bpe_anyway = bool(
            config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False))
        self.split_special_tokens = bool(config.get("split_special_tokens", False))
        self.chat_control_tokens = config.get("chat_control_tokens")
        template = config.get("chat_template")
        if isinstance(template, (list, tuple)):  # [{"name": ..., "template": ...}, ...]
            try:
                template = {t["name"]: t["template"] for t in template}
            except (KeyError, TypeError) as e:
                raise TokenizerError("chat_template list entries need 'name' and 'template' keys") from e
        if template is not None and not isinstance(template, (str, dict)):
            raise TokenizerError(f"chat_template must be a string or a list of named templates, got {template!r}")
        self.chat_template = template

        # What transformers does on load: re-add the config's added tokens (its flags win), then add
        # any named or extra special token the vocabulary lacks.
        decoder = config.get("added_tokens_decoder") or {}
        try:
            entries = sorted(((int(i), spec) for i, spec in decoder.items()), key=lambda e: e[0])
        except (TypeError, ValueError, AttributeError) as e:
            raise TokenizerError(f"added_tokens_decoder must map ids to token dicts ({e})") from e
        to_add = [_added_token(_token_content(spec), spec) for _, spec in entries]
        if to_add:
            self._tk.add_tokens(to_add)
        known = set(self.added_tokens_encoder)
        missing = []
        for content in [*self._special.values(), *self._extra_special]:
            if content is not None and content not in known:  # even if the BPE vocab has it
                missing.append(_added_token(content))
                known.add(content)
        if missing:
            self._tk.add_tokens(missing)
        self._tk.encode_special_tokens = self.split_special_tokens

    # ---------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> "Glm4Tokenizer":
        """Load the tokenizer of a checkpoint directory or Hugging Face hub id.

        Reads ``tokenizer.json`` (required), ``tokenizer_config.json`` (optional), and a
        ``chat_template.jinja`` / ``additional_chat_templates/*.jinja`` next to them, which take
        precedence over the config's ``chat_template`` as in transformers 5.

        Args:
            pretrained_model_name_or_path: a directory or a hub id such as ``"zai-org/GLM-4-9B-0414"``.
            **kwargs: hub options (``revision``, ``cache_dir``, ``local_files_only``, ``token``,
                ``force_download``); any other keyword overrides the tokenizer_config.json entry of
                the same name (e.g. ``padding_side="right"``, ``chat_template=...``).
        Returns:
            The tokenizer.
        Raises:
            FileNotFoundError: no such directory / hub id, or no tokenizer.json in it.
            TokenizerError: a corrupt tokenizer.json, tokenizer_config.json or chat template.
        """
        from tokenizers import Tokenizer

        hub = {k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}
        directory = resolve_model_dir(pretrained_model_name_or_path, **hub)
        tok_path = os.path.join(directory, TOKENIZER_FILE)
        if not os.path.isfile(tok_path):
            raise FileNotFoundError(f"no {TOKENIZER_FILE} in {directory!r}: glm4rt reads the fast-tokenizer "
                                    "serialization that GLM-4 checkpoints ship")
        try:
            tokenizer = Tokenizer.from_file(tok_path)
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            raise TokenizerError(f"{tok_path}: cannot be read by the tokenizers library ({e})") from e

        config: dict = {}
        cfg_path = os.path.join(directory, TOKENIZER_CONFIG_FILE)
        if os.path.isfile(cfg_path):
            config = _read_json(cfg_path)
            if not isinstance(config, dict):
                raise TokenizerError(f"{cfg_path}: expected a JSON object, got {type(config).__name__}")
        templates = {}
        jinja_path = os.path.join(directory, CHAT_TEMPLATE_FILE)
        if os.path.isfile(jinja_path):
            templates["default"] = _read_text(jinja_path)
        extra_dir = os.path.join(directory, CHAT_TEMPLATE_DIR)
        if os.path.isdir(extra_dir):
            for name in sorted(os.listdir(extra_dir)):
                if name.endswith(".jinja"):
                    templates[name[:-len(".jinja")]] = _read_text(os.path.join(extra_dir, name))
        if len(templates) == 1 and "default" in templates:
            config["chat_template"] = templates["default"]
        elif templates:
            config["chat_template"] = templates
        config.update(kwargs)
        return cls(tokenizer, config, name_or_path=os.fspath(pretrained_model_name_or_path))

    # ---------------------------------------------------------------------------------------------
    # Vocabulary and special tokens
    @property
    def backend_tokenizer(self):
        """The ``tokenizers.Tokenizer`` doing the work."""
        return self._tk

    @property
    def vocab_size(self) -> int:
        """Size of the base vocabulary, without added tokens (as transformers)."""
        return self._tk.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        """Size of the full vocabulary with the added tokens (as transformers)."""
        return self._tk.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        """Returns: token -> id for the whole vocabulary, added tokens included."""
        return self._tk.get_vocab(with_added_tokens=True)

    @property
    def added_tokens_decoder(self) -> dict:
        """id -> ``tokenizers.AddedToken`` for every added token."""
        return self._tk.get_added_tokens_decoder()

    @property
    def added_tokens_encoder(self) -> dict[str, int]:
        """content -> id for every added token, in id order."""
        return {t.content: i for i, t in sorted(self.added_tokens_decoder.items(), key=lambda e: e[0])}

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """Named special tokens (``eos_token``, ``pad_token``, ...) -> their text; these are also the
        special-token variables a chat template sees."""
        order = [*SPECIAL_TOKENS_ATTRIBUTES, *(k for k in self._special if k not in SPECIAL_TOKENS_ATTRIBUTES)]
        return {k: self._special[k] for k in order if self._special.get(k) is not None}

    @property
    def all_special_tokens(self) -> list[str]:
        """Named then extra special tokens, without repeats (as transformers v5)."""
        seen, out = set(), []
        for token in [*self.special_tokens_map.values(), *self._extra_special]:
            if token not in seen:
                seen.add(token)
                out.append(token)
        return out

    @property
    def all_special_ids(self) -> list[int]:
        """Ids of ``all_special_tokens``."""
        return self.convert_tokens_to_ids(self.all_special_tokens)

    @property
    def extra_special_tokens(self) -> list[str]:
        """The extra (``additional_special_tokens``) special tokens."""
        return list(self._extra_special)

    def _named_token(key: str, doc: str) -> property:  # noqa: N805 - property factory for the class body
        def get(self) -> str | None:
            return self._special.get(key)

        def set(self, value: str | None) -> None:  # tok.pad_token = tok.eos_token, as in transformers
            if value is None:
                self._special.pop(key, None)
            else:
                self._special[key] = _token_content(value)
        return property(get, set, doc=doc)

    bos_token = _named_token("bos_token", "Beginning-of-sequence token, or None (GLM has none).")
    eos_token = _named_token("eos_token", "End-of-sequence token (GLM: <|endoftext|>); assignable.")
    unk_token = _named_token("unk_token", "Unknown token, or None.")
    pad_token = _named_token("pad_token", "Padding token (GLM: <|endoftext|>); assignable.")
    del _named_token
    bos_token_id = property(lambda self: self._token_id("bos_token"), doc="Id of bos_token, or None.")
    eos_token_id = property(lambda self: self._token_id("eos_token"), doc="Id of eos_token, or None.")
    unk_token_id = property(lambda self: self._token_id("unk_token"), doc="Id of unk_token, or None.")
    pad_token_id = property(lambda self: self._token_id("pad_token"), doc="Id of pad_token, or None.")

    def _token_id(self, key: str) -> int | None:
        token = self._special.get(key)
        return None if token is None else self.convert_tokens_to_ids(token)

    def convert_tokens_to_ids(self, tokens: str | list[str] | None) -> int | list[int] | None:
        """Token text(s) -> id(s); unknown tokens give ``unk_token_id`` (None for GLM), as transformers.

        Args:
            tokens: one token or a list of tokens.
        Returns:
            An id, or a list of ids.
        """
        if tokens is None:
            return None
        if isinstance(tokens, str):
            index = self._tk.token_to_id(tokens)
            if index is None:
                unk = self._special.get("unk_token")
                return None if unk is None else self._tk.token_to_id(unk)
            return index
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | list[int], skip_special_tokens: bool = False) -> str | list[str]:
        """Id(s) -> token text(s) (byte-level BPE tokens are in their byte-to-unicode alphabet, e.g. "Ġthe").

        Args:
            ids: one id or a sequence of ids (list or 1-D array).
            skip_special_tokens: drop the ids of ``all_special_tokens``.
        Returns:
            A token, or a list of tokens; None for an id the vocabulary lacks (as transformers).
        Raises:
            TypeError: an id that is not an integer.
            ValueError: a negative id, or one past tokenizers' 32-bit ids.
        """
        ids = _to_py(ids)
        if isinstance(ids, int) and not isinstance(ids, bool):
            return self.convert_ids_to_tokens([ids])[0]
        if not isinstance(ids, (list, tuple)):
            raise TypeError(f"token ids must be an integer or a sequence of integers, got {type(ids).__name__}")
        for position, i in enumerate(ids):
            if type(i) is not int:
                raise TypeError(f"token ids must be integers, got {i!r} ({type(i).__name__}) at position {position}")
            if not 0 <= i < 2**32:  # tokenizers' ids are u32; an unknown id in range gives None
                raise ValueError(f"token id {i} at position {position} is out of range [0, 2**32)")
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        return [self._tk.id_to_token(i) for i in ids if i not in skip]

    def tokenize(self, text: str, add_special_tokens: bool = False) -> list[str]:
        """Split text into token strings.

        Args:
            text: the text.
            add_special_tokens: add the post-processor's special tokens (GLM: ``[gMASK]<sop>``).
        Returns:
            The tokens.
        Raises:
            TypeError, ValueError: as ``encode``.
        """
        _check_texts([text])
        return self._tk.encode(text, add_special_tokens=add_special_tokens).tokens

    # ---------------------------------------------------------------------------------------------
    # Encoding
    def encode(self, text: str, add_special_tokens: bool = True, truncation: bool | str | None = None,
               max_length: int | None = None) -> list[int]:
        """Text -> token ids.

        Args:
            text: the text. Special-token strings in it (``<|user|>``) become their ids.
            add_special_tokens: add the post-processor's special tokens (GLM: ``[gMASK]<sop>`` in front).
            truncation: truncate to ``max_length`` (default ``model_max_length``).
            max_length: the length to truncate to; alone it implies truncation, as in transformers.
        Returns:
            The ids.
        Raises:
            TypeError: ``text`` is not a string.
            ValueError: ``text`` has a lone surrogate (what Python makes of undecodable bytes).
        """
        _, truncate_to = self._strategies(False, truncation, max_length)
        return self._encode_ids([text], add_special_tokens, truncate_to)[0]

    def _strategies(self, padding, truncation, max_length) -> tuple[tuple[str, int | None] | None, int | None]:
        """transformers' _get_padding_truncation_strategies: (padding kind and length, truncation length)."""
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer))):
            raise TypeError(f"max_length must be an integer or None, got {max_length!r} ({type(max_length).__name__})")
        if max_length is not None and max_length < 0:
            raise ValueError(f"max_length must be >= 0, got {max_length}")
        if max_length is not None and padding is False and truncation is None:
            truncation = "longest_first"
        if padding is True or padding == "longest":
            pad = ("longest", None)
        elif padding in (False, None, "do_not_pad"):
            pad = None
        elif padding == "max_length":
            pad = ("max_length", max_length)
        else:
            raise ValueError(f"padding must be True/False, 'longest', 'max_length' or 'do_not_pad', got {padding!r}")
        truncate = truncation not in (False, None, "do_not_truncate")
        if truncate and truncation not in (True, "longest_first", "only_first"):
            raise ValueError(f"truncation {truncation!r} is not supported for single sequences")
        if max_length is None:
            if pad is not None and pad[0] == "max_length":
                pad = None if self.model_max_length > LARGE_INTEGER else ("max_length", self.model_max_length)
            if truncate:
                if self.model_max_length > LARGE_INTEGER:
                    truncate = False
                else:
                    max_length = self.model_max_length
        if pad is not None and self.pad_token_id is None:
            raise ValueError("Asking to pad but the tokenizer does not have a padding token. Set one with "
                             "tokenizer.pad_token = tokenizer.eos_token or in tokenizer_config.json.")
        return pad, (max_length if truncate else None)

    def _encode_ids(self, texts: list[str], add_special_tokens: bool, truncate_to: int | None) -> list[list[int]]:
        """Encode texts; with ``truncate_to`` the text is cut so that text + special tokens fit, on
        ``truncation_side``, as tokenizers' own truncation does."""
        _check_texts(texts)
        if truncate_to is None:
            return [e.ids for e in self._tk.encode_batch(texts, add_special_tokens=add_special_tokens)]
        n_special = self._tk.num_special_tokens_to_add(False) if add_special_tokens else 0
        if truncate_to < n_special:
            raise ValueError(f"max_length={truncate_to} leaves no room for the {n_special} special tokens")
        out = []
        for enc in self._tk.encode_batch(texts, add_special_tokens=False):
            enc.truncate(truncate_to - n_special, 0, self.truncation_side)
            out.append(self._tk.post_process(enc, add_special_tokens=add_special_tokens).ids)
        return out

    def _pad(self, ids: list[list[int]], pad: tuple[str, int | None] | None, padding_side: str | None,
             pad_to_multiple_of: int | None) -> BatchEncoding:
        """Lists of ids -> ``input_ids`` / ``attention_mask`` int64 arrays [batch, seq]."""
        side = padding_side if padding_side is not None else self.padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        lengths = [len(x) for x in ids]
        longest = max(lengths, default=0)
        if pad is None:
            if len(set(lengths)) > 1:
                raise ValueError(f"sequences of different lengths {sorted(set(lengths))} cannot form a "
                                 "[batch, seq] array: pass padding=True (or truncation with max_length)")
            target = longest
        else:
            target = longest if pad[0] == "longest" else max(longest, pad[1])
            if pad[0] == "max_length" and longest > pad[1]:
                raise ValueError(f"a sequence of {longest} tokens exceeds max_length={pad[1]}: "
                                 "pass truncation=True to cut it")
            if pad_to_multiple_of and target % pad_to_multiple_of:
                target += pad_to_multiple_of - target % pad_to_multiple_of
        pad_id = self.pad_token_id if pad is not None else 0
        input_ids = np.full((len(ids), target), pad_id, dtype=np.int64)  # [batch, seq]
        attention_mask = np.zeros((len(ids), target), dtype=np.int64)    # [batch, seq]
        for row, seq in enumerate(ids):
            if not seq:
                continue
            cols = slice(target - len(seq), target) if side == "left" else slice(0, len(seq))
            input_ids[row, cols] = seq
            attention_mask[row, cols] = 1
        return BatchEncoding(input_ids=input_ids, attention_mask=attention_mask)

    def __call__(self, text: str | list[str], padding: bool | str = False, padding_side: str | None = None,
                 add_special_tokens: bool = True, truncation: bool | str | None = None,
                 max_length: int | None = None, pad_to_multiple_of: int | None = None,
                 return_tensors: str | None = "np", sanitize_control_tokens: bool = False) -> BatchEncoding:
        """Tokenize one text or a batch into ``input_ids`` and ``attention_mask``.

        Args:
            text: a string (-> a batch of 1) or a list of strings.
            padding: False (all sequences must then have one length), True / ``"longest"`` (pad to
                the longest), ``"max_length"`` (pad to ``max_length``). Pads with ``pad_token_id``.
            padding_side: ``"left"`` or ``"right"``; default ``self.padding_side`` (GLM: left).
            add_special_tokens: add the post-processor's special tokens (GLM: ``[gMASK]<sop>``).
            truncation: cut sequences to ``max_length`` (default ``model_max_length``) on
                ``truncation_side``.
            max_length: the length for truncation / ``"max_length"`` padding.
            pad_to_multiple_of: round the padded length up to a multiple of this.
            return_tensors: ``"np"`` or None (both give NumPy arrays); ``"pt"`` is refused.
            sanitize_control_tokens: used by ``apply_chat_template``; text marked by it is encoded
                with the marked control tokens as plain text.
        Returns:
            ``BatchEncoding`` (a dict) with ``input_ids`` and ``attention_mask``: int64 [batch, seq].
        Raises:
            ValueError: unequal lengths without padding, padding without a pad token, a
                ``return_tensors`` other than NumPy, or text with a lone surrogate.
            TypeError: text that is not a string or a list of strings.
        """
        if return_tensors not in (None, "np"):
            raise ValueError(f"glm4rt returns NumPy arrays; return_tensors={return_tensors!r} is not supported")
        if not isinstance(text, (str, list, tuple)):
            raise TypeError(f"text must be a string or a list of strings, got {type(text).__name__}")
        texts = [text] if isinstance(text, str) else list(text)
        pad, truncate_to = self._strategies(padding, truncation, max_length)
        if truncate_to is not None and pad is not None and pad_to_multiple_of and truncate_to % pad_to_multiple_of:
            raise ValueError(f"Truncation and padding are both activated but truncation length ({truncate_to}) "
                             f"is not a multiple of pad_to_multiple_of ({pad_to_multiple_of}).")
        if sanitize_control_tokens:
            if add_special_tokens and self._tk.post_processor is not None and \
                    self._tk.post_processor.num_special_tokens_to_add(False):
                raise NotImplementedError("`sanitize_control_tokens=True` needs a template that writes special tokens")
            ids = [self._encode_marked_chat(t) for t in texts]
            if truncate_to is not None:
                ids = [x[:truncate_to] if self.truncation_side == "right" else x[-truncate_to:] for x in ids]
        else:
            ids = self._encode_ids(texts, add_special_tokens, truncate_to)
        return self._pad(ids, pad, padding_side, pad_to_multiple_of)

    # ---------------------------------------------------------------------------------------------
    # Decoding
    def decode(self, token_ids: Any, skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool | None = None) -> str | list[str]:
        """Token ids -> text.

        Args:
            token_ids: an id, a list / 1-D array of ids, or a batch (list of lists / 2-D array),
                which gives a list of strings as in transformers.
            skip_special_tokens: leave out the special added tokens.
            clean_up_tokenization_spaces: default ``self.clean_up_tokenization_spaces``. As in
                transformers 5, the clean-up (" ." -> "." ...) is skipped for BPE models such as
                GLM's unless the config sets
                ``clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output``.
        Returns:
            The text (or one text per sequence).
        Raises:
            TypeError: an id that is not an integer (floats are not rounded).
            ValueError: an id that is not in the vocabulary (negative, past the last id, in a gap),
                where transformers raises OverflowError or leaves the id out.
        """
        ids = _to_py(token_ids)
        if isinstance(ids, list) and ids and isinstance(ids[0], (list, tuple)):
            return [self._decode(seq, skip_special_tokens, clean_up_tokenization_spaces) for seq in ids]
        return self._decode(ids, skip_special_tokens, clean_up_tokenization_spaces)

    def _id_span(self) -> tuple[int, bool]:
        """(one past the largest id, whether every id below it is a token): ``len(self)`` counts
        tokens, and a vocabulary can have gaps. Recomputed when tokens are added."""
        size = len(self)
        if self._span is None or self._span[0] != size:
            limit = max(self._tk.get_vocab(with_added_tokens=True).values(), default=-1) + 1
            self._span = (size, limit, limit == size)
        return self._span[1], self._span[2]

    def _is_token_id(self, i: int) -> bool:
        limit, dense = self._id_span()
        return 0 <= i < limit and (dense or self._tk.id_to_token(i) is not None)

    def _known_ids(self, ids: list[int]) -> list[int]:
        """The ids of generated ``ids`` that ``decode`` takes. A model's embedding can have rows for
        ids the tokenizer lacks (GLM-4: 151552 rows, 151343 tokens); such an id has no text, and
        transformers' decode leaves it out, where ``decode`` here refuses it."""
        return [i for i in ids if self._is_token_id(i)]

    def _check_ids(self, ids: Any) -> list[int]:
        """Token ids as a list of ints, each one in the vocabulary; tokenizers itself raises
        OverflowError for a negative id and returns "" for one it does not know."""
        if isinstance(ids, int) and not isinstance(ids, bool):
            ids = [ids]
        if not isinstance(ids, (list, tuple)):
            raise TypeError(f"token ids must be an integer or a sequence of integers, got {type(ids).__name__}")
        limit, dense = self._id_span()
        if dense and all(type(i) is int for i in ids) and (not ids or (min(ids) >= 0 and max(ids) < limit)):
            return list(ids)  # the common case, checked without a call per id
        for position, i in enumerate(ids):
            if type(i) is not int:  # NumPy integers are ints by now (_to_py); bools are refused
                raise TypeError(f"token ids must be integers, got {i!r} ({type(i).__name__}) at position {position}")
            if not self._is_token_id(i):
                raise ValueError(f"token id {i} at position {position} is not in the vocabulary "
                                 f"({len(self)} tokens, ids 0 to {limit - 1})")
        return list(ids)

    def _decode(self, ids: Any, skip_special_tokens: bool, clean_up: bool | None) -> str:
        text = self._tk.decode(self._check_ids(ids), skip_special_tokens=skip_special_tokens)
        clean_up = self.clean_up_tokenization_spaces if clean_up is None else clean_up
        if clean_up and (type(self._tk.model).__name__ != "BPE" or self._cleanup_bpe_anyway):
            text = (text.replace(" .", ".").replace(" ?", "?").replace(" !", "!").replace(" ,", ",")
                    .replace(" ' ", "'").replace(" n't", "n't").replace(" 'm", "'m").replace(" 's", "'s")
                    .replace(" 've", "'ve").replace(" 're", "'re"))
        return text

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False,
                     clean_up_tokenization_spaces: bool | None = None) -> list[str]:
        """Decode a batch of id sequences.

        Args:
            sequences: a list of id lists, or a 2-D array [batch, seq].
            skip_special_tokens: leave out the special added tokens.
            clean_up_tokenization_spaces: as in ``decode``.
        Returns:
            One string per sequence.
        """
        seqs = _to_py(sequences)
        if not isinstance(seqs, (list, tuple)):
            raise TypeError(f"batch_decode takes a list of token id sequences or a 2-D array, got {type(seqs).__name__}")
        if len(seqs) == 0:
            return []
        if not isinstance(seqs[0], (list, tuple)):  # a single sequence: transformers wraps it
            return [self._decode(seqs, skip_special_tokens, clean_up_tokenization_spaces)]
        return [self._decode(s, skip_special_tokens, clean_up_tokenization_spaces) for s in seqs]

    # ---------------------------------------------------------------------------------------------
    # Chat
    def get_chat_template(self, chat_template: str | None = None, tools: list | None = None) -> str:
        """The template ``apply_chat_template`` uses.

        Args:
            chat_template: a template text, or the name of one of the checkpoint's named templates.
            tools: when given and the checkpoint has a ``tool_use`` template, that one is chosen.
        Returns:
            The jinja template text.
        Raises:
            ValueError: no template, or several named ones and none chosen.
        """
        if isinstance(self.chat_template, dict):
            named = self.chat_template
            if chat_template is not None and chat_template in named:
                return named[chat_template]
            if chat_template is None:
                if tools is not None and "tool_use" in named:
                    return named["tool_use"]
                if "default" in named:
                    return named["default"]
                raise ValueError("This model has multiple chat templates with no default specified! Pass a template "
                                 f"or one of the names {sorted(named)} as `chat_template`.")
            return chat_template
        if chat_template is None:
            if self.chat_template is None:
                raise ValueError("Cannot use chat template functions because tokenizer.chat_template is not set and "
                                 "no template argument was passed!")
            return self.chat_template
        return chat_template

    def apply_chat_template(self, conversation: Any, tools: list[dict] | None = None,
                            documents: list[dict] | None = None, add_generation_prompt: bool = False,
                            continue_final_message: bool | str = False, tokenize: bool = True,
                            return_dict: bool = True, chat_template: str | None = None,
                            padding: bool | str = False, truncation: bool = False, max_length: int | None = None,
                            return_tensors: str | None = None, sanitize_control_tokens: bool = False,
                            tokenizer_kwargs: dict | None = None, **template_kwargs: Any) -> Any:
        """Render a conversation with the chat template and (by default) tokenize it, as transformers 5.

        The template sees ``messages``, ``tools``, ``documents``, ``add_generation_prompt``, the
        named special tokens (``eos_token``, ``pad_token`` ...) and ``**template_kwargs``. The text is
        tokenized without adding special tokens (GLM templates write ``[gMASK]<sop>`` themselves).

        Return types follow transformers 5.24 (``return_dict`` defaults to True there too):

        - ``tokenize=False``: the rendered ``str`` (a ``list[str]`` for a batch of conversations).
        - ``tokenize=True, return_dict=True`` (default): a ``BatchEncoding`` dict whose ``input_ids``
          and ``attention_mask`` are int64 NumPy arrays [batch, seq] (batch 1 for one conversation),
          i.e. what transformers returns with ``return_tensors="np"``, ready for ``model(**inputs)``.
          transformers without ``return_tensors`` gives Python lists here; glm4rt always gives arrays.
        - ``tokenize=True, return_dict=False``: ``list[int]`` (``list[list[int]]`` for a batch), exactly
          as transformers; with ``return_tensors="np"`` an int64 array [batch, seq].

        Args:
            conversation: a list of message dicts (``role``, ``content``, and for GLM optionally
                ``metadata``), or a list of such lists (a batch). Dataclass / pydantic messages are
                converted to dicts; keys whose value is None are dropped.
            tools: tool definitions as JSON schemas (``{"type": "function", "function": {...}}``).
            documents: RAG documents (dicts), for templates that use them.
            add_generation_prompt: end with the assistant header (GLM: ``<|assistant|>``).
            continue_final_message: leave the last message open so the model continues it (True for
                ``content``, or the name of the field). Not together with ``add_generation_prompt``.
            tokenize: return ids instead of text.
            return_dict: return ``input_ids`` and ``attention_mask`` instead of the bare ids.
            chat_template: a template text or the name of a named template (default: the checkpoint's).
            padding, truncation, max_length: as in ``__call__`` (for batches).
            return_tensors: None or ``"np"``, see above.
            sanitize_control_tokens: encode control tokens that appear inside messages, tools,
                documents or template kwargs as plain text, so only the template's own control
                tokens become special ids (transformers 5's prompt-injection guard).
            tokenizer_kwargs: extra ``__call__`` arguments.
            **template_kwargs: extra template variables (they override special-token variables).
        Returns:
            See above.
        Raises:
            ValueError: an empty conversation, no chat template, incompatible options, tools that
                are not dicts; a message without a role, with a role the template does not render
                (it would be dropped: GLM templates render system, user, assistant and observation),
                or without content (allowed in assistant messages only).
            TypeError: a conversation that is not a list of dicts, a role that is not a string, or
                content that is neither a string nor a list of content-block dicts (None, int, bytes).
        """
        if return_tensors not in (None, "np"):
            raise ValueError(f"glm4rt returns NumPy arrays; return_tensors={return_tensors!r} is not supported")
        if template_kwargs.pop("return_assistant_tokens_mask", False):
            raise NotImplementedError("return_assistant_tokens_mask is not supported by glm4rt")
        if not tokenize:
            return_dict = False
        template = self.get_chat_template(chat_template, tools)
        if isinstance(conversation, (list, tuple)) and len(conversation) == 0:
            raise ValueError("Cannot apply chat template to an empty conversation. Provide at least one message.")
        if isinstance(conversation, (list, tuple)) and (
                isinstance(conversation[0], (list, tuple)) or hasattr(conversation[0], "messages")):
            conversations, batched = list(conversation), True
        else:
            conversations, batched = [conversation], False
        conversations = [_normalize_messages(c) for c in conversations]
        roles = _template_roles(template)
        for c in conversations:
            _check_messages(c, roles)
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt are not compatible. Use "
                             "continue_final_message to continue the final message, add_generation_prompt to "
                             "start a new assistant message.")
        if sanitize_control_tokens:
            if not tokenize:
                raise ValueError("`sanitize_control_tokens=True` requires `tokenize=True` and is not compatible "
                                 "with `return_assistant_tokens_mask=True`.")
            tokens_re, _ = _control_token_patterns(self._control_tokens(template))
            conversations = [_mark_control_tokens(c, tokens_re) for c in conversations]
            tools = _mark_control_tokens(tools, tokens_re)
            documents = _mark_control_tokens(documents, tokens_re)
            template_kwargs = _mark_control_tokens(template_kwargs, tokens_re)

        variables = {**self.special_tokens_map, **template_kwargs}  # caller's kwargs win
        rendered = render_chat_template(template, conversations, tools=tools, documents=documents,
                                        add_generation_prompt=add_generation_prompt,
                                        continue_final_message=continue_final_message, **variables)
        if not tokenize:
            return rendered if batched else rendered[0]

        call_kwargs = dict(tokenizer_kwargs or {})
        if return_dict or return_tensors == "np":
            encoded = self(rendered, padding=padding, truncation=truncation, max_length=max_length,
                           add_special_tokens=False, sanitize_control_tokens=sanitize_control_tokens,
                           **call_kwargs)
            return encoded if return_dict else encoded["input_ids"]
        # return_dict=False without tensors: Python lists, unpadded unless padding was asked for.
        pad, truncate_to = self._strategies(padding, truncation, max_length)
        if sanitize_control_tokens:
            ids = [self._encode_marked_chat(t) for t in rendered]
            if truncate_to is not None:
                ids = [x[:truncate_to] if self.truncation_side == "right" else x[-truncate_to:] for x in ids]
        else:
            ids = self._encode_ids(rendered, False, truncate_to)
        if pad is not None:
            ids = self._pad(ids, pad, call_kwargs.get("padding_side"), call_kwargs.get("pad_to_multiple_of"))
            ids = ids["input_ids"].tolist()
        return ids if batched else ids[0]

    # sanitize_control_tokens machinery (transformers' mark_control_tokens / encode_marked_chat)
    def _control_tokens(self, chat_template: str) -> tuple[str, ...]:
        added = self.added_tokens_decoder.values()
        if self.chat_control_tokens is not None:
            chosen = set(self.chat_control_tokens)
            return tuple(t.content for t in added if t.special or t.content in chosen)
        literal = _template_literal_text(chat_template)
        return tuple(t.content for t in added
                     if t.special or (t.content in literal and not t.content.isspace()))

    def _encode_without_added_tokens(self, text: str) -> list[int]:
        tk = self._tk
        if tk.normalizer is not None:
            text = tk.normalizer.normalize_str(text)
        splits = [text] if tk.pre_tokenizer is None else [s for s, _ in tk.pre_tokenizer.pre_tokenize_str(text)]
        return [token.id for split in splits for token in tk.model.tokenize(split)]

    def _encode_marked_chat(self, chat: str) -> list[int]:
        _check_texts([chat])
        _, markers_re = _control_token_patterns(tuple(self.added_tokens_encoder))
        pieces = markers_re.split(chat)  # [text, marked token or None, text, ...]
        newline_ids = self._tk.encode("\n", add_special_tokens=False).ids
        ids = self._tk.encode(pieces[0], add_special_tokens=False).ids
        for i, piece in enumerate(pieces[1:], start=1):
            if not piece:
                continue
            as_text = i % 2 == 1  # odd pieces are marked tokens, encoded as plain text
            encode = self._encode_without_added_tokens if as_text else \
                (lambda s: self._tk.encode(s, add_special_tokens=False).ids)
            # Encode after a newline and drop it again (avoids SentencePiece's prefix space).
            piece_ids = encode("\n" + piece)
            if piece_ids[:len(newline_ids)] == newline_ids:
                piece_ids = piece_ids[len(newline_ids):]
            else:
                piece_ids = encode(piece)
            if as_text and self.convert_tokens_to_ids(piece) in piece_ids:
                raise ValueError(f"Can't sanitize {piece!r}: the tokenizer produces it from plain text")
            ids += piece_ids
        return ids

    def __repr__(self) -> str:
        return (f"Glm4Tokenizer(name_or_path={self.name_or_path!r}, vocab_size={self.vocab_size}, len={len(self)}, "
                f"padding_side={self.padding_side!r}, special_tokens={self.special_tokens_map})")


# --------------------------------------------------------------------------------------------------
# Streaming
# --------------------------------------------------------------------------------------------------

class StreamDecoder:
    """Incremental detokenizer for streaming generation.

    ``put(token_id)`` returns only the text completed by that token. Byte-level BPE splits CJK
    characters and emoji across tokens, so a prefix can decode to a trailing U+FFFD; such text is
    held back until the character is complete. The concatenation of every ``put`` and the final
    ``flush`` equals ``tokenizer.decode(all_ids, skip_special_tokens=...)``. Ids the tokenizer
    lacks, which a model whose embedding has more rows than the tokenizer has tokens can generate,
    have no text here (``decode`` refuses them).

    Each call decodes a short window (the tokens since the last emitted text, plus the tokens of
    that emission as left context so word-boundary decoding stays right), as text-generation-
    inference does; the cost per token does not grow with the length of the stream.

    Args:
        tokenizer: a ``Glm4Tokenizer``.
        skip_special_tokens: leave special tokens out of the text (default True, for chat output).
    """

    def __init__(self, tokenizer: Glm4Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # start of the context window (ids already emitted, kept as context)
        self._read = 0    # ids before this are emitted
        self._emitted = 0  # characters emitted so far

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(self.tokenizer._known_ids(ids), skip_special_tokens=self.skip_special_tokens)

    def put(self, token_id: int) -> str:
        """Add one generated id.

        Args:
            token_id: the id (int or NumPy integer).
        Returns:
            The newly completed text ("" while a character is still incomplete).
        Raises:
            TypeError: ``token_id`` is not an integer.
            ValueError: ``token_id`` is negative.
        """
        if isinstance(token_id, (bool, np.bool_)) or not isinstance(token_id, (int, np.integer)):
            raise TypeError(f"token_id must be an integer, got {token_id!r} ({type(token_id).__name__})")
        if token_id < 0:
            raise ValueError(f"token_id must be >= 0, got {token_id}")
        self.ids.append(int(token_id))
        prefix_text = self._decode(self.ids[self._prefix:self._read])
        new_text = self._decode(self.ids[self._prefix:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd") \
                and new_text.startswith(prefix_text):
            self._prefix, self._read = self._read, len(self.ids)
            piece = new_text[len(prefix_text):]
            self._emitted += len(piece)
            return piece
        return ""

    def flush(self) -> str:
        """End of stream.

        Returns:
            Whatever text is still held back (possibly ending in U+FFFD if the stream ended inside
            a character, exactly as ``decode`` of all ids would show it).
        """
        prefix_text = self._decode(self.ids[self._prefix:self._read])
        new_text = self._decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        if new_text.startswith(prefix_text):
            piece = new_text[len(prefix_text):]
        else:
            # Not reached with byte-level decoders; for a decoder that rewrites earlier text, fall
            # back to one full decode so the pieces still add up to decode(all ids).
            piece = self._decode(self.ids)[self._emitted:]
        self._emitted += len(piece)
        return piece

    def reset(self) -> None:
        """Forget the stream, to start a new one."""
        self.ids.clear()
        self._prefix = self._read = self._emitted = 0
