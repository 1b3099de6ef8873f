"""Multi-turn chat with a KV cache that lives across turns.

Each turn renders the whole conversation with the checkpoint's chat template. When the rendered
text extends the conversation's tokens so far (the prompts plus the tokens the model generated,
kept as generated, not re-tokenized), only the new text is tokenized and appended; the cache
already holds the keys and values of that prefix, so only the new tokens are prefilled. With the
GLM-4-0414 template that is just the new user message. Templates that rewrite history (GLM-Z1 drops
earlier ``<think>`` blocks) fall back to tokenizing the whole text and re-prefilling from the
first token that differs. Either way the reply is what a fresh full prefill of the same tokens
gives.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Optional

from .errors import Glm4rtError
from .generate import check_count, generate_tokens, resolve_settings
from .kv_cache import Glm4Cache
from .tokenizer import StreamDecoder


class ContextFullError(Glm4rtError):
    """The conversation no longer fits in the model's context."""


def split_thinking(text: str) -> tuple[str, str]:
    """Split a GLM-Z1 reply into ``(thinking, answer)`` at ``</think>`` (no thinking: ``("", text)``)."""
    if "</think>" not in text:
        return "", text
    thinking, answer = text.split("</think>", 1)
    return thinking.replace("<think>", "").strip(), answer.strip()


def _system_messages(system: Optional[str]) -> list[dict[str, Any]]:
    if system is not None and not isinstance(system, str):
        raise TypeError(f"system must be a string, got {type(system).__name__}")
    return [{"role": "system", "content": system}] if system else []


class ChatSession:
    """A conversation with one model.

    Args:
        model: a ``Glm4ForCausalLM``.
        tokenizer: its ``Glm4Tokenizer`` (with a chat template).
        system: optional system prompt.
        tools: optional tool definitions passed to the chat template.
        max_context: cap on the conversation length in tokens (default: the model's
            ``max_position_embeddings``).
        **generation_kwargs: defaults for every turn (``max_new_tokens``, ``do_sample``,
            ``temperature``, ``top_p`` ...), as ``generate`` takes them; checked on each turn.
    Raises:
        TypeError: a system prompt that is not a string.
        ValueError: a ``max_context`` that is not a whole number >= 1.
    """

    def __init__(self, model, tokenizer, system: Optional[str] = None, tools: Optional[list] = None,
                 max_context: Optional[int] = None, **generation_kwargs: Any) -> None:
        self.model, self.tokenizer, self.tools = model, tokenizer, tools
        limit = model.config.max_position_embeddings
        self.max_context = limit if max_context is None else min(check_count("max_context", max_context, 1), limit)
        self.generation_kwargs = generation_kwargs
        self.messages: list[dict[str, Any]] = _system_messages(system)
        self.cache = Glm4Cache.for_config(model.config, 1, 0)
        self.history_ids: list[int] = []  # every token of the conversation so far, as the model saw it
        self.last_prefill = 0             # tokens prefilled by the last turn
        self.last_prompt_len = 0          # tokens in the last turn's prompt

    def reset(self, system: Optional[str] = None) -> None:
        """Forget the conversation (keeps the cache's memory for reuse)."""
        self.messages = _system_messages(system)
        self.cache.crop(0)
        self.history_ids = []

    def prompt_ids(self) -> list[int]:
        """The conversation so far, rendered with the generation prompt, as token ids: the
        history's tokens plus the tokenized new text when the rendering extends the history."""
        text = self.tokenizer.apply_chat_template(self.messages, tools=self.tools,
                                                  add_generation_prompt=True, tokenize=False)
        if self.history_ids:
            previous = self.tokenizer.decode(self.tokenizer.known_ids(self.history_ids), skip_special_tokens=False)
            if text.startswith(previous):
                return self.history_ids + self.tokenizer.encode(text[len(previous):], add_special_tokens=False)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def send(self, content: str, role: str = "user", **overrides: Any) -> Iterator[str]:
        """Add a message (``role`` "user" or "observation" for a tool result) and stream the reply.

        Yields:
            The reply's text pieces. When the iteration ends — normally, or because the caller
            stopped early (Ctrl-C) — the reply so far is stored as the assistant's message.
        Raises:
            ContextFullError: the conversation does not fit in ``max_context`` any more.
            ValueError, TypeError: a role the chat template does not render, content that is not a
                string, or bad generation arguments (see ``generate``).
            In every case the conversation stays as it was.
        """
        if not isinstance(content, str):
            raise TypeError(f"content must be a string, got {type(content).__name__}")
        self.messages.append({"role": role, "content": content})
        try:
            ids = self.prompt_ids()
            room = self.max_context - len(ids)
            if room <= 0:
                raise ContextFullError(
                    f"the conversation is {len(ids)} tokens long and the context holds {self.max_context}: "
                    "start a new conversation (reset)")
            kwargs = {**self.generation_kwargs, **overrides}
            max_new = kwargs.pop("max_new_tokens", None)
            new = room if max_new is None else min(check_count("max_new_tokens", max_new), room)
            settings = resolve_settings(self.model, len(ids), {**kwargs, "max_new_tokens": new})
        except BaseException:
            self.messages.pop()
            raise
        keep = 0  # longest prefix of the prompt that the cache already holds
        cached = self.history_ids[:self.cache.get_seq_length()]
        for a, b in zip(cached, ids[:-1]):  # at least one token is always prefilled
            if a != b:
                break
            keep += 1
        self.cache.crop(keep)
        self.last_prefill = len(ids) - keep
        self.last_prompt_len = len(ids)

        decoder = StreamDecoder(self.tokenizer, skip_special_tokens=True)
        generated: list[int] = []
        try:
            for next_tokens, _ in generate_tokens(self.model, [ids], settings=settings, cache=self.cache,
                                                  tokenizer=self.tokenizer):
                generated.append(int(next_tokens[0]))
                piece = decoder.put(generated[-1])
                if piece:
                    yield piece
            rest = decoder.flush()
            if rest:
                yield rest
        finally:
            self.history_ids = ids + generated
            reply = self.tokenizer.decode(self.tokenizer.known_ids(generated), skip_special_tokens=True)
            self.messages.append({"role": "assistant", "content": reply})

    def ask(self, content: str, **overrides: Any) -> str:
        """``send`` and return the whole reply."""
        return "".join(self.send(content, **overrides))
