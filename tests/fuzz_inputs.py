"""A seeded, time-bounded mutation fuzzer of what users hand the tokenizer, the chat template,
``generate`` and ``ChatSession``, each case run in a worker process on a tiny chat checkpoint
(tests/chat_model.py: a random GLM-4 at the real vocabulary size and the GLM-style test tokenizer).

    python tests/fuzz_inputs.py --cases 20000 --seconds 900    # the long local run
    python tests/fuzz_inputs.py --seed 0 --case 137            # replay one case, printing its call

Case ``i`` of seed ``s`` is one call whose arguments are drawn from ``random.Random(f"{s}:{i}")``:
the same seed and case number make the same call on any machine. Text is random Unicode, lone
surrogates (what Python makes of undecodable bytes), special-token and template syntax,
private-use characters, long runs, or no text at all (None, bytes, numbers); ids are
huge, negative, in the vocabulary's gaps, fractional, strings, nested, NumPy arrays of any dtype;
conversations have missing, unknown and mistyped roles and contents; options and sampling
arguments are of the wrong type or out of range. A third of the cases damage nothing, so valid
input reaches the code behind the checks too. The calls:

    encode    Glm4Tokenizer.encode, __call__ (one text or a batch), tokenize
    decode    decode, batch_decode, convert_ids_to_tokens
    stream    StreamDecoder.put and flush, with ids a model can make that the tokenizer lacks
    template  apply_chat_template with its options
    generate  Glm4ForCausalLM.generate with its sampling and length arguments
    chat      ChatSession (system, max_context) and two ask() turns

Outcomes, of which only the first is a pass:
  ok       a result that keeps the case's invariants (text survives encode + decode; decoded text
           is valid Unicode, and no id the vocabulary lacks was decoded to nothing; the GLM-4
           template leaves no message out; generated ids are in the vocabulary; a refused chat
           turn leaves the conversation as it was); or a ValueError / TypeError (glm4rt's own
           errors are ValueErrors) whose message names one of the arguments the case damaged, or
           an error valid arguments can meet (a full context, a batch of unequal lengths).
  crash    the worker died (a signal, an abort, an exit) without reporting.
  hang     no report within the case timeout.
  unclear  any other exception (AttributeError, OverflowError, jinja2's TemplateError ...), an
           error that names nothing the case damaged, an error on valid input, or a result that
           breaks an invariant.

Workers run many cases each (importing glm4rt and loading the checkpoint once); a worker that
crashes or hangs loses only the case it was running, and a fresh one takes the next.
"""
from __future__ import annotations

import argparse
import math
import os
import random
import shutil
import sys
import tempfile
import time
from typing import Any, Callable, Optional

import fuzz_worker

TESTS = os.path.dirname(os.path.abspath(__file__))
SPECIAL_TEXT = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<think>", "</think>", "<|user",
                "|>", "[gMASK]<sop>", "\U000f0000<|user|>\U000f0001", "\U000f0000", "\U000f0001",
                "{{ messages }}", "{% if %}", "{{ raise_exception('x') }}", "CONTINUE_FINAL_MESSAGE_TAG "]
ROLES = ["system", "user", "assistant", "observation"]
BAD_ROLES = ["tool", "", "User", "user ", "function", "developer", None, 5, b"user", ["user"], {"r": 1}, True]


class Args:
    """The arguments of one case, drawn as it is built, with what an error about them must name."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.names: set[str] = set()      # words an error message may use to name what was damaged
        self.excusable: set[str] = set()  # words of errors that valid arguments can meet (a full context)
        # How many arguments this case may damage: a third of the cases none, so that valid input
        # reaches the code behind the checks too.
        self.budget = rng.choices([0, 1, 2, 3], weights=[4, 4, 2, 1])[0]

    def spoil(self, chance: float) -> bool:
        """Whether to damage the argument at hand: with ``chance``, while the budget lasts."""
        if self.budget and self.rng.random() < chance:
            self.budget -= 1
            return True
        return False

    def damaged(self, *names: str) -> None:
        self.names.update(names)

    def excuse(self, *words: str) -> None:
        self.excusable.update(words)

    # ---- text ----------------------------------------------------------------------------------
    def char(self) -> str:
        r = self.rng
        return chr(r.choice([r.randrange(0x20, 0x7F), r.randrange(0x20, 0x7F), r.randrange(0x80, 0x800),
                             r.randrange(0x4E00, 0xA000), r.randrange(0x1F300, 0x1FAFF), r.randrange(0x300, 0x370),
                             r.randrange(0x10000, 0x110000), r.choice([0, 9, 10, 13, 0x200D, 0xFEFF, 0xFFFD, 0xFFFE,
                                                                       0xFFFF, 0x202E, 0x85, 0x2028])]))

    def valid_text(self, limit: int = 60) -> str:
        r = self.rng
        pieces = [self.char() for _ in range(r.randrange(0, limit))]
        for _ in range(r.choice([0, 0, 1, 3])):
            pieces.insert(r.randrange(len(pieces) + 1), r.choice(SPECIAL_TEXT))
        text = "".join(pieces)
        if r.random() < 0.05:
            text = text * r.randrange(100, 400)  # long: up to ~20k characters
        return text

    def text(self, name: str, words: tuple[str, ...], limit: int = 60) -> Any:
        """Mostly valid text; else text with lone surrogates, or no text at all."""
        r = self.rng
        if not self.spoil(0.3):
            return self.valid_text(limit)
        self.damaged(name, *words)
        if r.random() < 0.7:
            text = list(self.valid_text(limit))
            for _ in range(r.randint(1, 3)):
                text.insert(r.randrange(len(text) + 1), chr(r.randrange(0xD800, 0xE000)))
            return "".join(text)
        return r.choice([None, 7, 2.5, b"bytes \xff", ["a", "b"], {"text": "x"}, True, object()])

    # ---- ids -----------------------------------------------------------------------------------
    def valid_ids(self, vocab: list[int]) -> list[int]:
        return [self.rng.choice(vocab) for _ in range(self.rng.randrange(0, 30))]

    def ids(self, vocab: list[int], words: tuple[str, ...] = ("token id",)) -> Any:
        """Valid ids, or ids with a bad one put in, or not ids at all."""
        import numpy as np

        r = self.rng
        ids = self.valid_ids(vocab)
        if not self.spoil(0.6):
            return np.array(ids, dtype=r.choice([np.int64, np.int32, np.uint32])) if r.random() < 0.2 else ids
        kind = r.choices(["bad_id", "array", "shape", "other"], weights=[5, 2, 1, 1])[0]
        self.damaged(*words)
        if kind == "bad_id":
            bad = r.choice([-1, -(2**31), 10**9, 2**32, 2**63, 2**64, 10**30, 5000, 151343, 151551, 151552,
                            1.5, 3.0, math.nan, math.inf, "3", None, True, b"1", [1, 2], np.float32(2.0)])
            ids.insert(r.randrange(len(ids) + 1), bad)
            return ids
        if kind == "array":
            dtype = r.choice([np.int8, np.int32, np.int64, np.uint64, np.float32, np.float64, bool, object])
            values = ids + r.choice([[], [-1], [2**40], [0.5]])
            try:
                return np.array(values, dtype=dtype)
            except (OverflowError, ValueError, TypeError):  # a value the dtype cannot hold
                return np.array(ids, dtype=np.int64).astype(dtype)
        if kind == "shape":
            return r.choice([[ids, ids[:2]], [[ids]], np.zeros((2, 2, 2), np.int64), np.int64(ids[0] if ids else 1),
                             [ids, 5], [[], []]])
        return r.choice([None, "hello", b"\x01\x02", {"input_ids": [1]}, 2.5, object()])

    # ---- options ---------------------------------------------------------------------------------
    def option(self, name: str, good: list, bad: list, words: tuple[str, ...] = ()) -> tuple[bool, Any]:
        """(given, value) of a keyword argument: left out, a good value, or a bad one."""
        r = self.rng
        if bad and self.spoil(0.25):
            self.damaged(name, *words)
            return True, r.choice(bad)
        if r.random() < 0.5 or not good:
            return False, None
        return True, r.choice(good)

    def options(self, table: dict[str, tuple[list, list]], words: Optional[dict[str, tuple[str, ...]]] = None) -> dict:
        out = {}
        for name, (good, bad) in table.items():
            given, value = self.option(name, good, bad, (words or {}).get(name, ()))
            if given:
                out[name] = value
        return out


# ---- the cases ----------------------------------------------------------------------------------

class Env:
    """What the cases run on, loaded once per worker."""

    def __init__(self, checkpoint: str) -> None:
        import glm4rt

        self.glm4rt = glm4rt
        self.model = glm4rt.Glm4ForCausalLM.from_pretrained(checkpoint)
        self.tok = glm4rt.Glm4Tokenizer.from_pretrained(checkpoint)
        self.vocab = sorted(self.tok.get_vocab().values())


class Broken(Exception):
    """A result that breaks the case's invariant."""


def _check_text(text: Any) -> None:
    if not isinstance(text, str):
        raise Broken(f"decoded to a {type(text).__name__}, not a str")
    text.encode("utf-8")  # a lone surrogate raises UnicodeEncodeError, which is judged unclear


def case_encode(env: Env, a: Args) -> tuple[str, Callable[[], Any]]:
    text = a.text("text", ("surrogate", "string"), limit=80)
    call = a.rng.choice(["encode", "call", "batch", "tokenize"])
    kwargs = a.options({"add_special_tokens": ([True, False], [])})
    if call in ("call", "batch"):
        kwargs.update(a.options({"truncation": ([True, False, None, "longest_first"], ["yes", 2, "only_second"]),
                                 "max_length": ([2, 8, 64, 10**6], [1, 0, -1, 2.5, "8"]),
                                 "padding": ([True, False, "longest", "max_length"], ["sideways", 3])},
                                {"max_length": ("special tokens", "truncat"), "truncation": ("truncat",)}))
        a.excuse("max_length", "padding")  # too long for max_length padding; unequal lengths unpadded
    if call == "batch":
        text = [text, a.valid_text()]

    def run():
        if call == "tokenize":
            return env.tok.tokenize(text, **kwargs)
        if call != "encode":
            return env.tok(text, **kwargs)
        ids = env.tok.encode(text, **kwargs)
        if not kwargs.get("add_special_tokens", True) and env.tok.decode(ids) != text:
            raise Broken(f"decode(encode(text)) = {env.tok.decode(ids)!r:.80} differs from the text")  # BPE loses nothing
        return ids
    return f"{call}({text!r:.200}, **{kwargs})", run


def case_decode(env: Env, a: Args) -> tuple[str, Callable[[], Any]]:
    call = a.rng.choice(["decode", "decode", "batch_decode", "convert_ids_to_tokens"])
    ids = a.ids(env.vocab, ("token id", "integer"))
    if call == "batch_decode" and a.rng.random() < 0.5:
        ids = [ids, a.valid_ids(env.vocab)]
    skip = a.rng.choice([True, False])

    def run():
        if call == "convert_ids_to_tokens":
            return env.tok.convert_ids_to_tokens(ids, skip_special_tokens=skip)
        out = getattr(env.tok, call)(ids, skip_special_tokens=skip)
        for text in out if isinstance(out, list) else [out]:
            _check_text(text)
        flat = list(_ints(ids))
        if env.tok.known_ids(flat) != flat:  # transformers decodes such ids to "" without a word
            raise Broken("decoded ids the vocabulary lacks")
        return out
    return f"{call}({ids!r:.300}, skip_special_tokens={skip})", run


def _ints(value: Any):
    """The ints in (nested) ids, or in a BatchEncoding-like dict's input_ids."""
    if isinstance(value, dict):
        value = value["input_ids"]
    value = value.tolist() if hasattr(value, "tolist") else value
    if isinstance(value, (list, tuple)):
        for item in value:
            yield from _ints(item)
    else:
        yield value


def case_stream(env: Env, a: Args) -> tuple[str, Callable[[], Any]]:
    text = a.valid_text(40)
    ids = env.tok.encode(text, add_special_tokens=False)
    extra = a.rng.choice([[], [], [151400], [5000, 151551], [10**30]])  # ids a model may make that the tokenizer lacks
    if extra:
        ids.insert(a.rng.randrange(len(ids) + 1), extra[0])
    if a.spoil(0.5):
        a.damaged("token_id")
        ids.insert(a.rng.randrange(len(ids) + 1), a.rng.choice([-1, 2.5, "7", None, True]))
    skip = a.rng.choice([True, False])

    def run():
        decoder = env.glm4rt.StreamDecoder(env.tok, skip_special_tokens=skip)
        pieces = [decoder.put(i) for i in ids]
        whole = "".join(pieces) + decoder.flush()
        expected = env.tok.decode(env.tok.known_ids(ids), skip_special_tokens=skip)
        if whole != expected:
            raise Broken(f"stream {whole!r:.80} != decode {expected!r:.80}")
        _check_text(whole)
        return whole
    return f"stream({ids!r:.300}, skip_special_tokens={skip})", run


def _message(a: Args) -> Any:
    r = a.rng
    if a.spoil(0.05):
        a.damaged("message", "dict")
        return r.choice(["hi", None, 5, ["user", "hi"], ("role", "user")])
    message: dict = {}
    kind = r.choice(["bad_role", "no_role", "bad_content", "no_content"]) if a.spoil(0.2) else "good"
    if kind != "no_role":
        message["role"] = r.choice(BAD_ROLES) if kind == "bad_role" else r.choice(ROLES)
    if kind == "no_content":
        pass
    elif kind == "bad_content":
        message["content"] = r.choice([None, 7, 2.5, b"hi", ["hi"], [{"type": "text", "text": "hi"}], {"text": "x"}])
    else:
        message["content"] = a.text("content", ("surrogate", "message"))
    if r.random() < 0.15:
        message["metadata"] = r.choice(["get_weather", "", None, 5, {"a": 1}])
    if r.random() < 0.05:
        message[r.choice(["reasoning_content", "tool_calls", "name", 5])] = r.choice(["why", [{"x": 1}], None])
    if kind in ("bad_role", "no_role", "bad_content", "no_content"):
        a.damaged("message", "role", "content")
    return message


def _conversation(a: Args) -> Any:
    r = a.rng
    kind = r.choice(["empty", "other"]) if a.spoil(0.1) else r.choices(["list", "batch", "tuple"], weights=[8, 2, 1])[0]
    if kind == "empty":
        a.damaged("conversation", "empty")
        return r.choice([[], ()])
    if kind == "other":
        a.damaged("conversation", "message")
        return r.choice([None, "hello", {"role": "user", "content": "hi"}, 5, b"x"])
    messages = [_message(a) for _ in range(r.randint(1, 5))]
    if kind == "tuple":
        return tuple(messages)
    if kind == "batch":
        return [messages, [_message(a) for _ in range(r.randint(1, 3))]]
    return messages


_TEMPLATES = ["{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}",
              "{% for m in messages %}{% if m.role == 'user' %}U:{{ m.content }}{% endif %}{% endfor %}",
              "{{ messages[0]['content'] | upper }}"]


def case_template(env: Env, a: Args) -> tuple[str, Callable[[], Any]]:
    conversation = _conversation(a)
    kwargs = a.options({
        "add_generation_prompt": ([True, False], []),
        "continue_final_message": ([True, False], ["content", "reasoning_content", "nope"]),
        "tokenize": ([True, False], []),
        "return_dict": ([True, False], []),
        "padding": ([True, False, "longest"], ["sideways", 3]),
        "truncation": ([True, False], ["yes", 2]),
        "max_length": ([4, 16, 512], [0, -3, 2.5, "9"]),
        "return_tensors": ([None, "np"], ["pt", 5]),
        "tools": ([[{"type": "function", "function": {"name": "get_weather", "parameters": {}}}], None, []],
                  ["get_weather", [len], [5], {"name": "x"}]),
        "documents": ([[{"title": "t", "text": "x"}], None], [["doc"], [5]]),
        "chat_template": ([None, *_TEMPLATES], ["{% if %}", "no_such_named_template {{", 5]),
        "enable_thinking": ([True, False], []),
    }, {"max_length": ("special tokens", "truncat"), "tools": ("json schema",), "documents": ("dict",),
        "chat_template": ("template",), "continue_final_message": ("final message",),
        "return_tensors": ("numpy",)})
    if isinstance(conversation, list) and conversation and isinstance(conversation[0], list):
        a.excuse("padding")  # a batch of unequal lengths needs it
    if kwargs.get("chat_template") == _TEMPLATES[1]:
        a.excuse("role")  # it renders user messages only, and refuses the others
    if kwargs.get("continue_final_message") and kwargs.get("add_generation_prompt"):
        a.damaged("continue_final_message", "add_generation_prompt")
    if kwargs.get("continue_final_message"):
        a.damaged("continue_final_message", "final message")  # only an assistant message can be continued

    def run():
        out = env.tok.apply_chat_template(conversation, **kwargs)
        if kwargs.get("tokenize", True) is False:
            for text in out if isinstance(out, list) else [out]:
                if not isinstance(text, str):
                    raise Broken(f"rendered a {type(text).__name__}")
            if kwargs.get("chat_template") is None and not kwargs.get("continue_final_message"):
                # the GLM-4 template writes every message it is given; a message it drops is lost
                chats = conversation if isinstance(conversation[0], list) else [conversation]
                for chat, text in zip(chats, out if isinstance(out, list) else [out]):
                    lost = [m for m in chat if isinstance(m.get("content"), str) and m["content"] not in text]
                    if lost:
                        raise Broken(f"messages left out of the rendered text: {lost!r:.200}")
        return out
    return f"apply_chat_template({conversation!r:.400}, **{kwargs!r:.300})", run


def case_generate(env: Env, a: Args) -> tuple[str, Callable[[], Any]]:
    import numpy as np

    prompt = np.array([env.tok.encode(a.valid_text(12) or "hi")])
    mask = None
    r = a.rng
    if a.spoil(0.15):
        a.damaged("input_ids", "token", "attention_mask", "shape", "prompt", "batch")
        prompt = r.choice([prompt[0].tolist() + [151552], np.array([[]], np.int64), prompt.astype(np.float32),
                           prompt[None], -prompt, [[1, 2], [3]], "hello"])
    elif a.spoil(0.1):
        a.damaged("attention_mask")
        mask = r.choice([np.ones((1, 2)), np.zeros_like(prompt), [[1]], "ones"])
    kwargs = a.options({
        "max_new_tokens": ([0, 1, 3, 6], [-1, 2.5, "3", True, None, math.nan, 10**9, [2]]),
        "max_length": ([8, 30], [2.5, "20", -5]),
        "do_sample": ([True, False], ["yes", 1, None]),
        "temperature": ([0.7, 1.0, 1.5], [0.0, -1.0, "0.7", math.nan, math.inf, [1.0]]),
        "top_k": ([0, 1, 5, 50], [-1, 2.5, "5", True]),
        "top_p": ([0.9, 1.0], [0.0, 1.5, "0.5", math.nan]),
        "min_p": ([None, 0.05], [-0.1, 1.1, "0.1"]),
        "repetition_penalty": ([1.0, 1.3], [0.0, -1.0, "1.1", True]),
        "eos_token_id": ([151329, [151329, 151336], []], ["151329", -1, 2.5, [None], {"a": 1}]),
        "pad_token_id": ([151329, 0], [-1, "0", [1], 2.5]),
        "stop_strings": ([["\n"], "."], ["", [""], 5, [5]]),
        "seed": ([0, 7, 2**40], [-1, "7", 2.5, [1, 2]]),
    }, {"max_new_tokens": ("context",), "max_length": ("context",)})
    a.excuse("context")  # random text can be a long prompt
    if "max_new_tokens" not in kwargs and "max_length" not in kwargs:
        kwargs["max_new_tokens"] = 4
    if "stop_strings" in kwargs:
        if a.spoil(0.2):
            a.damaged("tokenizer")
        else:
            kwargs["tokenizer"] = env.tok
    if a.spoil(0.05):
        a.damaged("unexpected")
        kwargs[r.choice(["num_beams", "typical_p", "bogus"])] = 2

    def run():
        out = env.model.generate(prompt, attention_mask=mask, **kwargs)
        if not isinstance(out, np.ndarray) or out.dtype != np.int64 or out.ndim != 2:
            raise Broken(f"generate returned {type(out).__name__} {getattr(out, 'dtype', '')}")
        if (out < 0).any() or (out >= env.model.config.vocab_size).any():
            raise Broken("generated ids outside the model's vocabulary")
        return out.shape
    return f"generate({prompt!r:.200}, attention_mask={mask!r:.60}, **{kwargs!r:.400})", run


def case_chat(env: Env, a: Args) -> tuple[str, Callable[[], Any]]:
    session_kwargs = a.options({"max_context": ([None, 40, 4096, 10**6], [0, -1, 2.5, "60"])})
    if a.rng.random() < 0.5:
        session_kwargs["system"] = a.text("system", ("surrogate", "message"))
    turns = []
    for _ in range(2):
        content = a.text("content", ("surrogate", "message"), limit=40)
        overrides = a.options({"role": (["user", "observation"], ["tool", "", None, 5]),
                               "max_new_tokens": ([0, 1, 4], [-1, 2.5, "3"]),
                               "temperature": ([0.8], ["hot", -1.0]),
                               "do_sample": ([True, False], ["no"])},
                              {"role": ("message",)})
        overrides.setdefault("max_new_tokens", 4)
        turns.append((content, overrides))
    a.excuse("context")  # a long message fills the context

    def run():
        session = env.glm4rt.ChatSession(env.model, env.tok, **session_kwargs)
        replies = []
        for content, overrides in turns:
            before = [dict(m) for m in session.messages]
            try:
                replies.append(session.ask(content, **overrides))
            except (ValueError, TypeError):
                if session.messages != before:
                    raise Broken("a refused turn changed the conversation") from None
                raise
            _check_text(replies[-1])
        return replies
    return f"ChatSession(**{session_kwargs!r:.200}) then ask {turns!r:.500}", run


CASES = [(case_encode, 4), (case_decode, 4), (case_stream, 2), (case_template, 5), (case_generate, 3),
         (case_chat, 2)]


def make_case(env: Env, seed: int, number: int) -> tuple[Args, str, Callable[[], Any]]:
    rng = random.Random(f"{seed}:{number}")
    kind = rng.choices([c for c, _ in CASES], weights=[w for _, w in CASES])[0]
    args = Args(rng)
    desc, run = kind(env, args)
    return args, desc, run


def judge(args: Args, run: Callable[[], Any]) -> tuple[str, str]:
    """(outcome, why) of running one case in this process."""
    try:
        run()
        return "ok", "result"
    except Broken as e:
        return "unclear", f"wrong result: {e}"
    except (ValueError, TypeError) as e:
        message = f"{type(e).__name__}: {e}"
        if isinstance(e, UnicodeError):
            return "unclear", message
        if any(n.lower() in message.lower() for n in args.names | args.excusable):
            return "ok", type(e).__name__
        if not args.names:
            return "unclear", f"error on valid input: {message}"
        return "unclear", f"names none of {sorted(args.names)}: {message}"
    except Exception as e:  # noqa: BLE001 - every other exception is the finding
        return "unclear", f"{type(e).__name__}: {e}"


# ---- the worker: runs cases, reports on a private pipe -------------------------------------------

def worker_main(checkpoint: str) -> None:
    """Read "seed number" lines from stdin; write one JSON report per line."""
    env = Env(checkpoint)

    def run_case(line: str) -> dict:
        seed, number = map(int, line.split())
        args, desc, run = make_case(env, seed, number)
        outcome, why = judge(args, run)
        return {"outcome": outcome, "why": why[:2000], "desc": desc}

    fuzz_worker.serve(run_case)


class Worker(fuzz_worker.Worker):
    """The worker process that runs cases against one chat checkpoint."""

    def __init__(self, checkpoint: str, log_dir: str) -> None:
        super().__init__([os.path.abspath(__file__), "--worker", checkpoint], log_dir)

    def run(self, seed: int, number: int, timeout: float) -> dict:
        """The worker's report on a case, or a crash / hang report."""
        report = self.request(f"{seed} {number}", timeout)
        if "failure" in report:
            return {"outcome": report["failure"], "why": report["message"]}
        return report


# ---- running and reporting --------------------------------------------------------------------

class Report:
    """The outcomes of a run: ``(number, outcome, why, desc)`` per case."""

    def __init__(self, seed: int, results: list[tuple[int, str, str, str]], seconds: float) -> None:
        self.seed, self.results, self.seconds = seed, results, seconds

    def count(self, outcome: str) -> int:
        return sum(r[1] == outcome for r in self.results)

    @property
    def failures(self) -> list[tuple[int, str, str, str]]:
        return [r for r in self.results if r[1] != "ok"]

    def line(self) -> str:
        return (f"fuzz: {len(self.results)} cases, {self.count('crash')} crashes, {self.count('hang')} hangs, "
                f"{self.count('unclear')} unclear errors (seed {self.seed}, {self.seconds:.0f} s)")

    def details(self) -> str:
        lines = [self.line()]
        for number, outcome, why, desc in self.failures:
            lines.append(f"  case {number} [{outcome}] {desc[:500]}\n      {why[:600]}\n"
                         f"      replay: python tests/fuzz_inputs.py --seed {self.seed} --case {number}")
        return "\n".join(lines)


def run(seed: int = 0, cases: int = 300, seconds: float = 60.0, timeout: float = 30.0,
        only: Optional[int] = None) -> Report:
    """Run cases ``0 .. cases - 1`` of ``seed`` (or only case ``only``) in a worker process, starting
    no case after ``seconds``."""
    sys.path.insert(0, TESTS)
    from chat_model import build_chat_checkpoint

    start = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="glm4rt-fuzz-inputs-")
    try:
        checkpoint = build_chat_checkpoint(os.path.join(workdir, "chat"), template="glm4")
        worker = Worker(checkpoint, workdir)
        results = []
        for number in [only] if only is not None else range(cases):
            if time.monotonic() - start > seconds:
                break
            report = worker.run(seed, number, timeout)
            results.append((number, report["outcome"], report["why"], report.get("desc", "")))
        worker.close()
        return Report(seed, results, time.monotonic() - start)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: Optional[list[str]] = None) -> int:
    parser = fuzz_worker.arg_parser(__doc__)
    parser.add_argument("--case", type=int, default=None, help="run only this case number, and print its call")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return 0
    report = run(args.seed, args.cases, args.seconds, args.timeout, only=args.case)
    print(report.details())
    if args.case is not None:
        number, outcome, why, desc = report.results[0]
        print(f"case {number}: {outcome} ({why[:2000]})\n  {desc}")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
