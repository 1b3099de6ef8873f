"""``Glm4Tokenizer``: GLM-4's tokenizer and chat template, without transformers.

The vocabulary and the encode/decode pipeline are the checkpoint's own ``tokenizer.json``, run by
the ``tokenizers`` package (byte-level BPE behind a GPT-4-style split regex for GLM-4);
``tokenizer_config.json`` adds the special tokens, the padding side and the chat template. Encode,
decode, padded batches and rendered templates are those of transformers' ``PreTrainedTokenizerFast``
loaded from the same files; where transformers would return tensors this returns NumPy int64
arrays. Only what a GLM runtime uses is here: loading, encode/decode, ``__call__`` with padding and
truncation, the special tokens, ``apply_chat_template`` (rendered by ``chat_template.py``) and
``StreamDecoder`` for streaming. Input that transformers lets through to a confusing error or a
silent loss is refused with a ValueError or TypeError that names it: ids ``decode`` does not know,
text with lone surrogates, chat messages a template would drop or garble.

The rendered chat text is tokenized WITHOUT adding special tokens: GLM templates write
``[gMASK]<sop>`` themselves, and GLM's post-processor would prepend them a second time.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from .chat_template import check_messages, render_chat_template, template_roles, to_conversations
from .errors import Glm4rtError
from .hub import pop_hub_kwargs, resolve_model_dir
from .jsonfile import read_json
from .checks import is_int

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
# GLM-4's pre-tokenizer split (GPT-4 / cl100k style: contractions, letters, 1-3 digits, punctuation
# runs, newlines, whitespace), as in its tokenizer.json; llama.cpp calls it the "glm4" pre-tokenizer.
GLM4_SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# transformers' named special tokens, in its order (special_tokens_map, all_special_tokens).
SPECIAL_TOKENS_ATTRIBUTES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                             "mask_token")
VERY_LARGE_INTEGER = int(1e30)  # transformers' model_max_length when the config gives none
LARGE_INTEGER = int(1e20)  # a model_max_length above this means "no limit", as in transformers
# transformers' apply_chat_template options that glm4rt does not take: refused, where a keyword
# glm4rt does not know would otherwise reach the template as a variable and silently do nothing.
UNSUPPORTED_CHAT_OPTIONS = ("sanitize_control_tokens", "return_assistant_tokens_mask", "tokenizer_kwargs")


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


def _token_content(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string or a serialized AddedToken."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(f"special token must be a string or an AddedToken dict, got {value!r}")


def _added_token(content: str, spec: Mapping | None = None):
    """A special ``tokenizers.AddedToken``, with the flags of its ``added_tokens_decoder`` entry."""
    from tokenizers import AddedToken

    if spec is None:
        return AddedToken(content, special=True, normalized=False)
    kwargs = {k: spec[k] for k in ("single_word", "lstrip", "rstrip", "normalized", "special") if k in spec}
    return AddedToken(content, **kwargs)


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


class Glm4Tokenizer:
    """GLM-4's tokenizer: ``tokenizer.json`` through ``tokenizers``, plus ``tokenizer_config.json``.

    Build it with ``Glm4Tokenizer.from_pretrained(path_or_hub_id)``.

    Args:
        tokenizer: a ``tokenizers.Tokenizer``.
        config: the tokenizer_config.json contents (special tokens, ``padding_side``,
            ``model_max_length``, ``chat_template`` ...).
        name_or_path: where it came from (informational).
    """

    def __init__(self, tokenizer, config: Mapping | None = None, name_or_path: str = "") -> None:
        config = dict(config or {})
        self._tk = tokenizer
        self._span: tuple[int, int, bool] | None = None  # cache of _id_span, keyed by len(self)
        self.name_or_path = name_or_path

        # Named special tokens: the standard seven, then model-specific "*_token" string keys and a
        # dict-valued extra_special_tokens (transformers v5 treats both as named tokens); a list of
        # extra (additional) special tokens is unnamed.
        self._special: dict[str, str] = {}
        for key in SPECIAL_TOKENS_ATTRIBUTES:
            content = _token_content(config.get(key))
            if content is not None:
                self._special[key] = content
        for key, value in config.items():
            if key.endswith("_token") and key not in SPECIAL_TOKENS_ATTRIBUTES and isinstance(value, str):
                self._special[key] = value
        extra = config.get("extra_special_tokens") or config.get("additional_special_tokens")
        self._extra_special: list[str] = []
        if isinstance(extra, Mapping):
            for key, value in extra.items():
                self._special[key] = _token_content(value)
        elif isinstance(extra, (list, tuple)):
            self._extra_special = [_token_content(t) for t in extra]
        elif extra is not None:
            raise TokenizerError(f"extra_special_tokens must be a list or a dict, got {type(extra).__name__}")

        self.padding_side = config.get("padding_side", "right")
        if self.padding_side not in ("left", "right"):
            raise TokenizerError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}")
        max_len = config.get("model_max_length", config.get("max_len"))
        self.model_max_length = int(max_len) if max_len is not None else VERY_LARGE_INTEGER
        self.chat_template = config.get("chat_template")
        if self.chat_template is not None and not isinstance(self.chat_template, str):
            raise TokenizerError(f"chat_template must be a string, got {type(self.chat_template).__name__}")

        # What transformers does on load: re-add the config's added tokens (its flags win), then add
        # any named or extra special token the vocabulary lacks.
        decoder = config.get("added_tokens_decoder") or {}
        try:
            entries = sorted(((int(i), spec) for i, spec in decoder.items()), key=lambda e: e[0])
        except (TypeError, ValueError, AttributeError) as e:
            raise TokenizerError(f"added_tokens_decoder must map ids to token dicts ({e})") from e
        if entries:
            self._tk.add_tokens([_added_token(_token_content(spec), spec) for _, spec in entries])
        known = set(self.added_tokens_encoder)
        missing = []
        for content in [*self._special.values(), *self._extra_special]:
            if content is not None and content not in known:  # even if the BPE vocab has it
                missing.append(_added_token(content))
                known.add(content)
        if missing:
            self._tk.add_tokens(missing)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> "Glm4Tokenizer":
        """Load the tokenizer of a checkpoint directory, Hugging Face hub id or GGUF file.

        Reads ``tokenizer.json`` (required), ``tokenizer_config.json`` (optional), and a
        ``chat_template.jinja`` next to them, which takes precedence over the config's
        ``chat_template`` as in transformers 5.

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

        from . import gguf_io

        if gguf_io.is_gguf_file(pretrained_model_name_or_path):
            return gguf_io.read_tokenizer(pretrained_model_name_or_path, **kwargs)
        directory = resolve_model_dir(pretrained_model_name_or_path, **pop_hub_kwargs(kwargs))
        tok_path = os.path.join(directory, TOKENIZER_FILE)
        if not os.path.isfile(tok_path):
            raise FileNotFoundError(f"no {TOKENIZER_FILE} in {directory!r}: glm4rt reads the fast-tokenizer "
                                    "serialization that GLM-4 checkpoints ship")
        try:
            tokenizer = Tokenizer.from_file(tok_path)
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            raise TokenizerError(f"{tok_path}: cannot be read by the tokenizers library ({e})") from e

        cfg_path = os.path.join(directory, TOKENIZER_CONFIG_FILE)
        config = read_json(cfg_path, TokenizerError) if os.path.isfile(cfg_path) else {}
        jinja_path = os.path.join(directory, CHAT_TEMPLATE_FILE)
        if os.path.isfile(jinja_path):
            config["chat_template"] = _read_text(jinja_path)
        config.update(kwargs)
        return cls(tokenizer, config, name_or_path=os.fspath(pretrained_model_name_or_path))

    # ---------------------------------------------------------------------------------------------
    # Vocabulary and special tokens
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
    def added_tokens_encoder(self) -> dict[str, int]:
        """content -> id for every added token, in id order."""
        return {t.content: i for i, t in sorted(self._tk.get_added_tokens_decoder().items(), key=lambda e: e[0])}

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """Named special tokens (``eos_token``, ``pad_token``, ...) -> their text; these are also the
        special-token variables a chat template sees."""
        order = [*SPECIAL_TOKENS_ATTRIBUTES, *(k for k in self._special if k not in SPECIAL_TOKENS_ATTRIBUTES)]
        return {k: self._special[k] for k in order if self._special.get(k) is not None}

    @property
    def all_special_tokens(self) -> list[str]:
        """Named then extra special tokens, without repeats (as transformers v5)."""
        return list(dict.fromkeys([*self.special_tokens_map.values(), *self._extra_special]))

    @property
    def all_special_ids(self) -> list[int]:
        """Ids of ``all_special_tokens``."""
        return self.convert_tokens_to_ids(self.all_special_tokens)

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
    pad_token = _named_token("pad_token", "Padding token (GLM: <|endoftext|>); assignable.")
    del _named_token
    bos_token_id = property(lambda self: self.convert_tokens_to_ids(self.bos_token), doc="Id of bos_token, or None.")
    eos_token_id = property(lambda self: self.convert_tokens_to_ids(self.eos_token), doc="Id of eos_token, or None.")
    pad_token_id = property(lambda self: self.convert_tokens_to_ids(self.pad_token), doc="Id of pad_token, or None.")

    def convert_tokens_to_ids(self, tokens: str | list[str] | None) -> int | list[int] | None:
        """Token text(s) -> id(s).

        Args:
            tokens: one token or a list of tokens.
        Returns:
            An id, or a list of ids; None for a token the vocabulary lacks (GLM has no unk_token).
        """
        if tokens is None or isinstance(tokens, str):
            return None if tokens is None else self._tk.token_to_id(tokens)
        return [self._tk.token_to_id(t) for t in tokens]

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

    # ---------------------------------------------------------------------------------------------
    # Encoding
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
            truncation = True
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
            no_limit = self.model_max_length > LARGE_INTEGER
            if pad is not None and pad[0] == "max_length":
                pad = None if no_limit else ("max_length", self.model_max_length)
            truncate = truncate and not no_limit
            max_length = self.model_max_length
        if pad is not None and self.pad_token_id is None:
            raise ValueError("Asking to pad but the tokenizer does not have a padding token. Set one with "
                             "tokenizer.pad_token = tokenizer.eos_token or in tokenizer_config.json.")
        return pad, (max_length if truncate else None)

    def _encode_ids(self, texts: list[str], add_special_tokens: bool, truncate_to: int | None) -> list[list[int]]:
        """Encode texts; with ``truncate_to`` the text is cut on the right so that text + special
        tokens fit, as tokenizers' own truncation does."""
        _check_texts(texts)
        if truncate_to is None:
            return [e.ids for e in self._tk.encode_batch(texts, add_special_tokens=add_special_tokens)]
        n_special = self._tk.num_special_tokens_to_add(False) if add_special_tokens else 0
        if truncate_to < n_special:
            raise ValueError(f"max_length={truncate_to} leaves no room for the {n_special} special tokens")
        out = []
        for enc in self._tk.encode_batch(texts, add_special_tokens=False):
            enc.truncate(truncate_to - n_special, 0, "right")
            out.append(self._tk.post_process(enc, add_special_tokens=add_special_tokens).ids)
        return out

    def _pad(self, ids: list[list[int]], pad: tuple[str, int | None] | None, padding_side: str | None) -> BatchEncoding:
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
                 max_length: int | None = None, return_tensors: str | None = "np") -> BatchEncoding:
        """Tokenize one text or a batch into ``input_ids`` and ``attention_mask``.

        Args:
            text: a string (-> a batch of 1) or a list of strings.
            padding: False (all sequences must then have one length), True / ``"longest"`` (pad to
                the longest), ``"max_length"`` (pad to ``max_length``). Pads with ``pad_token_id``.
            padding_side: ``"left"`` or ``"right"``; default ``self.padding_side`` (GLM: left).
            add_special_tokens: add the post-processor's special tokens (GLM: ``[gMASK]<sop>``).
            truncation: cut sequences on the right to ``max_length`` (default ``model_max_length``).
            max_length: the length for truncation / ``"max_length"`` padding.
            return_tensors: ``"np"`` or None (both give NumPy arrays); ``"pt"`` is refused.
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
        pad, truncate_to = self._strategies(padding, truncation, max_length)
        ids = self._encode_ids([text] if isinstance(text, str) else list(text), add_special_tokens, truncate_to)
        return self._pad(ids, pad, padding_side)

    # ---------------------------------------------------------------------------------------------
    # Decoding
    def decode(self, token_ids: Any, skip_special_tokens: bool = False) -> str | list[str]:
        """Token ids -> text. There is no clean-up of spaces: transformers 5 skips it for BPE
        tokenizers such as GLM's.

        Args:
            token_ids: an id, a list / 1-D array of ids, or a batch (list of lists / 2-D array),
                which gives a list of strings as in transformers.
            skip_special_tokens: leave out the special added tokens.
        Returns:
            The text (or one text per sequence).
        Raises:
            TypeError: an id that is not an integer (floats are not rounded).
            ValueError: an id that is not in the vocabulary (negative, past the last id, in a gap),
                where transformers raises OverflowError or leaves the id out; ``known_ids`` keeps
                the ids that are.
        """
        ids = _to_py(token_ids)
        if isinstance(ids, list) and ids and isinstance(ids[0], (list, tuple)):
            return self.batch_decode(ids, skip_special_tokens)
        return self._tk.decode(self._check_ids(ids), skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False) -> list[str]:
        """Decode a batch of id sequences.

        Args:
            sequences: a list of id lists, or a 2-D array [batch, seq].
            skip_special_tokens: leave out the special added tokens.
        Returns:
            One string per sequence.
        """
        seqs = _to_py(sequences)
        if not isinstance(seqs, (list, tuple)):
            raise TypeError(f"batch_decode takes a list of token id sequences or a 2-D array, got {type(seqs).__name__}")
        if seqs and not isinstance(seqs[0], (list, tuple)):  # a single sequence: transformers wraps it
            seqs = [seqs]
        return [self._tk.decode(self._check_ids(s), skip_special_tokens=skip_special_tokens) for s in seqs]

    def known_ids(self, ids: list[int]) -> list[int]:
        """The ids that ``decode`` takes, in order. A model's embedding can have rows for ids the
        tokenizer lacks (GLM-4: 151552 rows, 151343 tokens); such an id has no text, and
        transformers' decode leaves it out, where ``decode`` here refuses it.

        Args:
            ids: token ids (ints).
        Returns:
            ``ids`` without those the vocabulary lacks.
        """
        return [i for i in ids if self._is_token_id(i)]

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

    # ---------------------------------------------------------------------------------------------
    # Chat
    def apply_chat_template(self, conversation: Any, tools: list[dict] | None = None,
                            documents: list[dict] | None = None, add_generation_prompt: bool = False,
                            continue_final_message: bool | str = False, tokenize: bool = True,
                            return_dict: bool = True, chat_template: str | None = None,
                            padding: bool | str = False, truncation: bool = False, max_length: int | None = None,
                            return_tensors: str | None = None, **template_kwargs: Any) -> Any:
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
            chat_template: a template text (default: the checkpoint's).
            padding, truncation, max_length: as in ``__call__`` (for batches).
            return_tensors: None or ``"np"``, see above.
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
            TokenizerError: a template that does not compile.
            NotImplementedError: an option of transformers' that glm4rt does not take
                (``UNSUPPORTED_CHAT_OPTIONS``).
        """
        import jinja2

        if return_tensors not in (None, "np"):
            raise ValueError(f"glm4rt returns NumPy arrays; return_tensors={return_tensors!r} is not supported")
        unsupported = sorted(set(template_kwargs) & set(UNSUPPORTED_CHAT_OPTIONS))
        if unsupported:
            raise NotImplementedError(f"apply_chat_template: transformers' {', '.join(unsupported)} is not supported "
                                      "by glm4rt")
        template = chat_template if chat_template is not None else self.chat_template
        if template is None:
            raise ValueError("Cannot use chat template functions because tokenizer.chat_template is not set and "
                             "no template argument was passed!")
        conversations, batched = to_conversations(conversation)
        try:
            roles = template_roles(template)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise TokenizerError(f"chat template does not compile: {e} (line {e.lineno})") from e
        for c in conversations:
            check_messages(c, roles)
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt are not compatible. Use "
                             "continue_final_message to continue the final message, add_generation_prompt to "
                             "start a new assistant message.")
        variables = {**self.special_tokens_map, **template_kwargs}  # caller's kwargs win
        rendered = render_chat_template(template, conversations, tools=tools, documents=documents,
                                        add_generation_prompt=add_generation_prompt,
                                        continue_final_message=continue_final_message, **variables)
        if not tokenize:
            return rendered if batched else rendered[0]
        if return_dict or return_tensors == "np":
            encoded = self(rendered, padding=padding, truncation=truncation, max_length=max_length,
                           add_special_tokens=False)
            return encoded if return_dict else encoded["input_ids"]
        # return_dict=False without tensors: Python lists, unpadded unless padding was asked for.
        pad, truncate_to = self._strategies(padding, truncation, max_length)
        ids = self._encode_ids(rendered, False, truncate_to)
        if pad is not None:
            ids = self._pad(ids, pad, None)["input_ids"].tolist()
        return ids if batched else ids[0]

    def __repr__(self) -> str:
        return (f"Glm4Tokenizer(name_or_path={self.name_or_path!r}, vocab_size={self.vocab_size}, len={len(self)}, "
                f"padding_side={self.padding_side!r}, special_tokens={self.special_tokens_map})")


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
        return self.tokenizer.decode(self.tokenizer.known_ids(ids), skip_special_tokens=self.skip_special_tokens)

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
        if not is_int(token_id):
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
