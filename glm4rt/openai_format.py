"""OpenAI chat messages to and from GLM-4: the request's messages in the chat template's terms, GLM-4
tool calls and GLM-Z1 reasoning out of the generated text. No HTTP here (``server.py``).

GLM-4-0414 writes a tool call as the function's name, a newline and the JSON arguments, right
after ``<|assistant|>`` and without any marker; its chat template renders a call made earlier as an
assistant message whose ``metadata`` is the name and whose content is the arguments, and a tool's
result as an ``observation`` message (``<|observation|>``). GLM-Z1 thinks first: the text up to
``</think>`` is reasoning, the rest the answer.
"""
from __future__ import annotations

import json
import re
import uuid
from typing import Any, Optional

ROLES = ("system", "user", "assistant", "tool", "developer")


class RequestError(ValueError):
    """A request the server answers with 400: ``param`` names the field."""

    def __init__(self, message: str, param: Optional[str] = None, code: Optional[str] = None) -> None:
        super().__init__(message)
        self.param, self.code = param, code


def _text(content: Any, param: str) -> str:
    """A message's content: a string, or OpenAI's list of ``{"type": "text", "text": ...}`` parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError(f"{param}[{i}] must be a text part ({{\"type\": \"text\", \"text\": ...}}); "
                                   "this model reads text only", param)
            parts.append(part["text"])
        return "".join(parts)
    raise RequestError(f"{param} must be a string or a list of text parts", param)


def template_messages(messages: Any) -> list[dict[str, Any]]:
    """OpenAI ``messages`` as the GLM-4 chat template reads them.

    Raises:
        RequestError: not a non-empty list, an unknown role, a malformed tool call.
    """
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RequestError(f"{param} must be an object", param)
        role = m.get("role")
        if role not in ROLES:
            raise RequestError(f"{param}.role must be one of {', '.join(ROLES)}, got {role!r}", param + ".role")
        content = _text(m.get("content"), param + ".content")
        if role == "developer":
            role = "system"
        if role == "tool":
            out.append({"role": "observation", "content": content})
            continue
        if role == "assistant":
            calls = m.get("tool_calls") or []
            if not isinstance(calls, list):
                raise RequestError(f"{param}.tool_calls must be a list", param + ".tool_calls")
            if content or not calls:
                out.append({"role": "assistant", "content": content})
            for j, call in enumerate(calls):
                fn = call.get("function") if isinstance(call, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise RequestError(f"{param}.tool_calls[{j}] must have a function with a name",
                                       f"{param}.tool_calls")
                args = fn.get("arguments", "{}")
                if not isinstance(args, str):
                    args = json.dumps(args, ensure_ascii=False)
                out.append({"role": "assistant", "metadata": fn["name"], "content": args})
            continue
        if role == "user" and not content:
            raise RequestError(f"{param}.content is empty", param + ".content")
        out.append({"role": role, "content": content})
    return out


def check_tools(tools: Any) -> list[dict[str, Any]]:
    """OpenAI ``tools``: a list of ``{"type": "function", "function": {"name": ...}}``."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise RequestError("tools must be a list", "tools")
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise RequestError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}",
                               f"tools[{i}]")
    return tools


_NAME_LINE = re.compile(r"\s*([A-Za-z_][\w.\-]*)[ \t]*\n")


def parse_tool_calls(text: str, tool_names: set[str]) -> Optional[list[dict[str, Any]]]:
    """The OpenAI ``tool_calls`` of a GLM-4 reply that is one or more ``name\\n{json}`` blocks of
    known tools (arguments parsed as JSON, never evaluated); None when the reply is text."""
    calls, pos, decoder = [], 0, json.JSONDecoder()
    while True:
        m = _NAME_LINE.match(text, pos)
        if not m or m.group(1) not in tool_names:
            return None
        rest = text[m.end():]
        stripped = rest.lstrip()
        try:
            args, end = decoder.raw_decode(stripped)
        except json.JSONDecodeError:
            return None
        if not isinstance(args, dict):
            return None
        calls.append({"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                      "function": {"name": m.group(1), "arguments": json.dumps(args, ensure_ascii=False)}})
        pos = m.end() + (len(rest) - len(stripped)) + end
        if not text[pos:].strip():
            return calls


def may_be_tool_call(text: str, tool_names: set[str]) -> bool:
    """Whether a reply that starts with ``text`` could still be a tool call (its first line is, or
    may become, a known tool's name)."""
    head = text.lstrip()
    if "\n" in head:
        return head.split("\n", 1)[0].strip() in tool_names
    return any(name.startswith(head) for name in tool_names)


class ReasoningSplitter:
    """Splits a GLM-Z1 reply, as it streams, into reasoning (up to ``</think>``) and answer.

    Args:
        thinking: whether the prompt already opened ``<think>`` (the reply starts in reasoning).
    """

    OPEN, CLOSE = "<think>", "</think>"

    def __init__(self, thinking: bool) -> None:
        self.thinking = thinking
        self.started = False  # whether any text was seen (an opening tag counts only first)
        self.buffer = ""
        self.after_close = False  # the answer's leading newlines (after </think>) are dropped

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        """``(reasoning, answer)`` pieces that ``text`` completes; ``final`` flushes the rest."""
        buf = self.buffer + text
        reasoning = ""
        if not self.started:
            stripped = buf.lstrip()
            if not final and len(stripped) < len(self.OPEN) and self.OPEN.startswith(stripped):
                self.buffer = buf
                return "", ""
            self.started = True
            if stripped.startswith(self.OPEN):
                self.thinking, buf = True, stripped[len(self.OPEN):]
        if self.thinking:
            i = buf.find(self.CLOSE)
            if i >= 0:
                reasoning, buf, self.thinking = buf[:i], buf[i + len(self.CLOSE):], False
                self.after_close = True
            else:
                hold = 0 if final else max((k for k in range(1, len(self.CLOSE)) if buf.endswith(self.CLOSE[:k])), default=0)
                self.buffer = buf[len(buf) - hold:] if hold else ""
                return buf[:len(buf) - hold], ""
        self.buffer = ""
        if self.after_close:
            buf = buf.lstrip("\n")
            self.after_close = not buf
        return reasoning, buf
