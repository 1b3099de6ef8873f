"""Chat templates rendered exactly as transformers renders them (``utils/chat_template_utils.py``).

A template is compiled in a jinja2 ``ImmutableSandboxedEnvironment`` with ``trim_blocks``,
``lstrip_blocks`` and the ``loopcontrols`` extension, transformers' ``{% generation %}`` tag, a
``tojson`` filter that neither escapes HTML nor non-ASCII text, ``raise_exception`` /
``strftime_now`` globals and a ``dict`` / ``namespace`` that expose no Python internals. Everything
the template sees is rebuilt from plain JSON types first, as transformers does, and reasoning kept
under ``thinking`` or ``reasoning`` is also offered as ``reasoning_content``.

On top of that, glm4rt refuses messages a template would silently drop or garble (no role, a
role the template never compares with, content that is not text): ``check_messages``.
"""
from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any

import numpy as np

# Message keys a reasoning trace may come under; the first is the one templates read.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
# Appended to the message that continue_final_message leaves open, to find where to cut.
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


@lru_cache(maxsize=32)
def compile_template(template: str):
    """Compile a chat template in transformers' jinja environment (cached per template text).

    Args:
        template: the jinja template text.
    Returns:
        The ``jinja2.Template``.
    Raises:
        jinja2.exceptions.TemplateSyntaxError: the template does not compile.
        ImportError: jinja2 older than 3.1.6 (known sandbox escapes; templates are untrusted code).
    """
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    import jinja2.utils
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    version = tuple(int(p) for p in re.findall(r"\d+", jinja2.__version__)[:3])
    if version < (3, 1, 6):
        raise ImportError(f"chat templates need jinja2>=3.1.6, found {jinja2.__version__}: pip install -U jinja2")

    class GenerationTag(jinja2.ext.Extension):
        # transformers' {% generation %}...{% endgeneration %} marks assistant text for its assistant
        # mask; the body renders unchanged.
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
    return env.from_string(template)


@lru_cache(maxsize=32)
def template_roles(template: str) -> frozenset[str] | None:
    """The message roles a template renders: the strings it compares a message's role with
    (``message.role == 'user'``, ``role in [...]``, ``selectattr('role', 'equalto', ...)``).

    Args:
        template: the jinja template text (it must compile).
    Returns:
        The roles, or None when any role renders (the template writes the role out, or uses it in
        a way not understood here).
    """
    import jinja2.nodes as nodes

    ast = compile_template(template).environment.parse(template)
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


def to_conversations(conversation: Any) -> tuple[list[list[dict]], bool]:
    """One conversation or a batch of them -> a list of message-dict lists, as transformers reads them.

    Args:
        conversation: a list of messages (dicts, dataclasses or pydantic models such as the OpenAI
            SDK's), an object with a ``messages`` list, or a list of such conversations.
    Returns:
        ``(conversations, batched)``; keys whose value is None are dropped from each message.
    Raises:
        ValueError: an empty conversation.
        TypeError: a conversation that is not a list, or a message that is not a dict.
    """
    if isinstance(conversation, (list, tuple)) and len(conversation) == 0:
        raise ValueError("Cannot apply chat template to an empty conversation. Provide at least one message.")
    batched = isinstance(conversation, (list, tuple)) and (
        isinstance(conversation[0], (list, tuple)) or hasattr(conversation[0], "messages"))
    return [_normalize_messages(c) for c in (conversation if batched else [conversation])], batched


def _normalize_messages(conversation: Any) -> list[dict]:
    messages = _message_objects_to_dicts(getattr(conversation, "messages", conversation))
    if not isinstance(messages, (list, tuple)):
        raise TypeError(f"a conversation must be a list of message dicts, got {type(messages).__name__}")
    out = []
    for message in messages:
        if not isinstance(message, dict):
            raise TypeError(f"Chat messages should be dicts, dataclasses or pydantic models, but got {message!r}.")
        out.append({key: value for key, value in message.items() if value is not None})
    return out


def _message_objects_to_dicts(value: Any) -> Any:
    """Dataclasses and pydantic models -> plain dicts, recursively."""
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


def check_messages(messages: list[dict], roles: frozenset[str] | None) -> None:
    """Refuse messages a template would drop or garble. Content may be left out of an assistant
    message only (a tool call, or reasoning alone).

    Args:
        messages: one conversation's message dicts.
        roles: the roles the template renders (``template_roles``); None: any.
    Raises:
        ValueError: a message without a role or content, or with a role the template does not render.
        TypeError: a role that is not a string, or content neither a string nor a list of block dicts.
    """
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
            shown = repr(content)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise TypeError(f"message {i} (role {role!r}): content must be a string or a list of content-block "
                            f"dicts, got {type(content).__name__} {shown}")


def _plain_template_data(value: Any) -> Any:
    """Everything a template sees, rebuilt from plain JSON types; other objects become "<TypeName>"
    (the sandbox does not know which methods of a rich object are dangerous)."""
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


def _open_final_message(chat: list[dict], continue_final_message: bool | str, template: str) -> str:
    """Append the continue tag to the field of the last message that is to be continued; return
    that field's text (for a list of content blocks: the last text block's)."""
    if not chat:
        raise ValueError("continue_final_message is set but the conversation is empty!")
    field = continue_final_message if isinstance(continue_final_message, str) else "content"
    final_message = chat[-1].get(field)
    if final_message is None:
        raise ValueError(f'continue_final_message is set but the final message has no "{field}" to continue!')
    fields = [field]
    if field in _REASONING_FIELDS:
        fields = [f for f in _REASONING_FIELDS if chat[-1].get(f) == final_message]
    if not any(f in template for f in fields):
        raise ValueError(f'continue_final_message is set to "{field}" but this is not an accepted field '
                         "in the chat_template")
    if isinstance(final_message, (list, tuple)):
        for block in reversed(final_message):
            if "text" in block:  # continue the last text block
                final_message = block["text"]
                block["text"] = block["text"] + _CONTINUE_TAG
                return final_message
        raise ValueError("continue_final_message is set but we could not find any text to continue "
                         "in the final message!")
    for f in fields:
        chat[-1][f] = chat[-1][f] + _CONTINUE_TAG
    return final_message


def _cut_at_continue_tag(text: str, final_message: str) -> str:
    if final_message.strip() not in text or _CONTINUE_TAG.strip() not in text:
        raise ValueError("continue_final_message is set but the final message does not appear in the chat after "
                         f"applying the chat template! Final message to continue: {final_message.strip()}")
    tag_at = text.rindex(_CONTINUE_TAG.strip())
    if text[tag_at:tag_at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
        return text[:tag_at]  # spacing preserved
    return text[:tag_at].rstrip()  # the template trimmed trailing spacing


def render_chat_template(template: str, conversations: list[list[dict]], tools: list | None = None,
           documents: list | None = None, add_generation_prompt: bool = False,
           continue_final_message: bool | str = False, **variables: Any) -> list[str]:
    """Render conversations with a chat template exactly as transformers' ``render_jinja_template``.

    Args:
        template: the jinja template text.
        conversations: a list of conversations, each a list of message dicts (``to_conversations``).
        tools: JSON-schema tool definitions (dicts), or None.
        documents: RAG documents (dicts), or None.
        add_generation_prompt: passed to the template.
        continue_final_message: leave the last message open (True continues ``content``; a string
            names the field to continue, e.g. ``"reasoning_content"``).
        **variables: further template variables (special tokens, ``enable_thinking``, ...).
    Returns:
        One rendered string per conversation.
    Raises:
        ValueError: tools that are not dicts, or a final message the template does not reproduce.
        TypeError: documents or messages that are not dicts.
        jinja2.exceptions.TemplateError: the template's own ``raise_exception``, or a syntax error.
    """
    compiled = compile_template(template)
    tools = None if tools is None else list(tools)
    for tool in tools or ():
        if callable(tool):
            raise ValueError("glm4rt takes tools as JSON schemas (dicts); convert a Python function first, e.g. "
                             "with transformers.utils.get_json_schema(fn)")
        if not isinstance(tool, dict):
            raise ValueError("Tools should either be a JSON schema, or a callable function with type hints "
                             "and a docstring suitable for auto-conversion to a schema.")
    for document in documents or ():
        if not isinstance(document, dict):
            raise TypeError("Documents should be a list of dicts with 'title' and 'text' keys!")
    tools, documents = _plain_template_data(tools), _plain_template_data(documents)
    variables = _plain_template_data(variables)

    rendered = []
    for chat in conversations:
        chat = _plain_template_data(chat)  # a fresh copy: the continue tag stays local
        for message in chat:
            if not isinstance(message, dict):
                raise TypeError(f"Chat messages should be dicts, dataclasses or pydantic models, but got {message!r}.")
        chat = _alias_reasoning_fields(chat)
        final_message = _open_final_message(chat, continue_final_message, template) if continue_final_message \
            else None
        text = compiled.render(messages=chat, tools=tools, documents=documents,
                               add_generation_prompt=add_generation_prompt, **variables)
        rendered.append(_cut_at_continue_tag(text, final_message) if continue_final_message else text)
    return rendered
