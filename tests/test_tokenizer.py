"""Glm4Tokenizer / StreamDecoder / chat templates.

Two kinds of tests on the GLM-style tokenizer that tests/glm_tokenizer.py builds (real special-token
ids, trained byte-level BPE merges):
- independent ones, with the expected values written out (round trips, real ids, exact rendered
  prompts, streaming), which need neither torch nor transformers;
- parity with transformers' ``PreTrainedTokenizerFast`` loaded from the same directory (encode,
  decode, padded batches, properties, ``apply_chat_template`` for the GLM-4-0414 and GLM-Z1
  templates); each requests the ``hf`` fixture, which skips when transformers is missing.
"""
import json
import os
import shutil

import numpy as np
import pytest

from glm4rt.errors import Glm4rtError
from glm4rt.tokenizer import Glm4Tokenizer, StreamDecoder, TokenizerError
from glm_tokenizer import SPECIAL_TOKENS, build_glm_tokenizer

TEXTS = {
    "english": "The quick brown fox jumps over the lazy dog. It's 9:30, isn't it?",
    "chinese": "今天北京的天气怎么样？我们去公园散步吧，顺便买点水果。",
    "emoji": "Party time 🎉🎉 thumbs up 👍🏽 rocket 🚀 family 👨‍👩‍👧 flag 🇨🇳",
    "code": "def add(a, b):\n    return a + b  # sum\n\nif __name__ == '__main__':\n\tprint(add(1, 2))\n",
    "mixed": "GLM-4 是一个语言模型 (language model) 😀, see https://example.com/a?b=1&c=2 — 龘靐齉!",
    "specials": "[gMASK]<sop><|system|>\nYou are 助手<|user|>\nHi 👋<|assistant|>\nHello<|endoftext|>",
    "whitespace": "  leading spaces\n\n\ttabs and\r\nwindows newlines   trailing  ",
}
# Rare CJK characters and emoji that the small vocabulary splits into several byte tokens.
STREAM_TEXT = "你好，世界！今天天气很好🎉🎉。龘靐齉爩 😀👨‍👩‍👧 北京欢迎你🇨🇳，机器学习很有趣👍🏽"

SYSTEM_USER = [{"role": "system", "content": "你是一个乐于助人的助手。"},
               {"role": "user", "content": "Hello! 北京今天天气怎么样？"}]
MULTI_TURN = [
    {"role": "system", "content": "SYS"},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "<think>\nThe user greets me.\n</think>\n\nHello! 你好 😀"},
    {"role": "user", "content": "Write add(a, b) in Python."},
    {"role": "assistant", "content": "<think>easy</think>def add(a, b):\n    return a + b"},
    {"role": "user", "content": "Thanks 👍"},
]
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "查询指定城市的实时天气",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "城市名称，例如：北京"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "description": "温度单位"}},
            "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "search_web", "description": "在互联网上搜索信息 & 返回<摘要>",
        "parameters": {"type": "object", "properties": {
            "query": {"type": "string", "description": "搜索关键词"},
            "top_k": {"type": "integer", "description": "返回结果数量"}},
            "required": ["query"]}}},
]
TOOL_TURNS = [
    {"role": "user", "content": "北京天气怎么样？"},
    {"role": "assistant", "metadata": "get_weather", "content": '{"city": "北京"}'},
    {"role": "observation", "content": '{"city": "北京", "temperature": 23, "condition": "晴"}'},
    {"role": "assistant", "content": "北京今天晴，23°C。"},
    {"role": "user", "content": "上海呢？"},
]
CONVERSATIONS = {"system_user": SYSTEM_USER, "multi_turn": MULTI_TURN, "tool_turns": TOOL_TURNS}


@pytest.fixture(scope="module")
def glm_dir(tmp_path_factory):
    return build_glm_tokenizer(str(tmp_path_factory.mktemp("glm4_tok")), template="glm4")


@pytest.fixture(scope="module")
def z1_dir(tmp_path_factory):
    return build_glm_tokenizer(str(tmp_path_factory.mktemp("z1_tok")), template="z1")


@pytest.fixture(scope="module")
def tok(glm_dir):
    return Glm4Tokenizer.from_pretrained(glm_dir)


@pytest.fixture(scope="module")
def z1(z1_dir):
    return Glm4Tokenizer.from_pretrained(z1_dir)


@pytest.fixture(scope="module")
def hf(glm_dir):
    transformers = pytest.importorskip("transformers", reason="parity tests need transformers (pip install .[test])")
    return transformers.PreTrainedTokenizerFast.from_pretrained(glm_dir)


@pytest.fixture(scope="module")
def hf_z1(z1_dir):
    transformers = pytest.importorskip("transformers", reason="parity tests need transformers (pip install .[test])")
    return transformers.PreTrainedTokenizerFast.from_pretrained(z1_dir)


def _as_batch(values):
    """transformers' list output (1-D for one conversation) as a [batch, seq] array."""
    arr = np.asarray(values)
    return arr[None] if arr.ndim == 1 else arr


# ------------------------------------------------------------------------------------------------
# Independent of transformers
# ------------------------------------------------------------------------------------------------

def test_builder_is_fast(tmp_path):
    import time

    start = time.perf_counter()
    build_glm_tokenizer(str(tmp_path))
    assert time.perf_counter() - start < 2.0


def test_special_tokens_have_their_real_ids(tok):
    for idx, content in SPECIAL_TOKENS.items():
        assert tok.convert_tokens_to_ids(content) == idx
        assert tok.convert_ids_to_tokens(idx) == content
        assert tok.encode(content, add_special_tokens=False) == [idx]
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"
    assert tok.eos_token_id == tok.pad_token_id == 151329
    assert tok.bos_token is None and tok.bos_token_id is None
    assert tok.all_special_ids == sorted(SPECIAL_TOKENS)
    assert tok.special_tokens_map == {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    assert tok.padding_side == "left"
    assert tok.model_max_length == 128000
    assert len(tok) == tok.vocab_size and tok.vocab_size < 2000  # small trained vocab + the 14 specials
    assert tok.convert_tokens_to_ids(["<|user|>", "no-such-token"]) == [151336, None]
    assert set(tok.added_tokens_encoder) == set(SPECIAL_TOKENS.values())


def test_pad_token_is_assignable(glm_dir):
    t = Glm4Tokenizer.from_pretrained(glm_dir, pad_token=None)
    assert t.pad_token is None and t.pad_token_id is None
    with pytest.raises(ValueError, match="padding token"):
        t(["a", "bb"], padding=True)
    t.pad_token = t.eos_token
    assert t.pad_token_id == 151329 and t(["a", "bb cc"], padding=True)["input_ids"][0, 0] == 151329


def test_encode_prepends_gmask_sop(tok):
    ids = tok.encode("hello")
    assert ids[:2] == [151331, 151333] and ids[2:] == tok.encode("hello", add_special_tokens=False)
    assert tok.tokenize("[gMASK]<sop>hi")[:2] == ["[gMASK]", "<sop>"]


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_round_trip(tok, name):
    text = TEXTS[name]
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert tok.decode(np.array(ids)) == text  # arrays decode the same
    assert tok.decode(tok.encode(text)) == "[gMASK]<sop>" + text
    if name != "specials":
        assert tok.decode(tok.encode(text), skip_special_tokens=True) == text


def test_skip_special_tokens(tok):
    ids = tok.encode(TEXTS["specials"])
    assert tok.decode(ids, skip_special_tokens=True) == "\nYou are 助手\nHi 👋\nHello"
    assert tok.decode(ids) == "[gMASK]<sop>" + TEXTS["specials"]
    assert tok.convert_ids_to_tokens(ids[:3], skip_special_tokens=True) == []


def test_byte_level_splits_characters(tok):
    # The streaming test below is only meaningful if some characters span several tokens.
    ids = tok.encode("龘🎉", add_special_tokens=False)
    assert len(ids) > 2
    assert tok.decode(ids[:1]).endswith("\ufffd")


def test_batch_decode(tok):
    enc = tok([TEXTS["english"], TEXTS["chinese"]], padding=True)
    assert tok.batch_decode(enc["input_ids"], skip_special_tokens=True) == [TEXTS["english"], TEXTS["chinese"]]
    assert tok.decode(enc["input_ids"].tolist(), skip_special_tokens=True) == [TEXTS["english"], TEXTS["chinese"]]
    assert tok.batch_decode([]) == []


@pytest.mark.parametrize("side", ["left", "right"])
def test_call_pads_with_pad_token(tok, side):
    short, long = "hi", TEXTS["chinese"]
    enc = tok([short, long], padding=True, padding_side=side)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert ids.dtype == np.int64 and mask.dtype == np.int64 and ids.shape == mask.shape
    n_short, n_long = len(tok.encode(short)), len(tok.encode(long))
    assert ids.shape == (2, n_long) and mask[0].sum() == n_short and mask[1].all()
    row = ids[0].tolist()
    if side == "left":
        assert row == [151329] * (n_long - n_short) + tok.encode(short)
        assert mask[0].tolist() == [0] * (n_long - n_short) + [1] * n_short
    else:
        assert row == tok.encode(short) + [151329] * (n_long - n_short)
    assert enc.input_ids is ids  # attribute access, like BatchEncoding


def test_call_single_string_is_batch_of_one(tok):
    enc = tok("hello world")
    assert enc["input_ids"].shape == (1, len(tok.encode("hello world")))
    assert enc["input_ids"][0].tolist() == tok.encode("hello world")
    assert tok("hello", add_special_tokens=False)["input_ids"][0].tolist() == tok.encode("hello", False)


def test_call_truncation_and_errors(tok):
    enc = tok([TEXTS["english"], "hi"], padding=True, truncation=True, max_length=5)
    assert enc["input_ids"].shape == (2, 5)
    assert enc["input_ids"][0].tolist() == tok.encode(TEXTS["english"])[:5]
    assert tok.encode(TEXTS["english"], max_length=4) == tok.encode(TEXTS["english"])[:4]
    with pytest.raises(ValueError, match="padding=True"):
        tok(["hi", TEXTS["english"]])
    with pytest.raises(ValueError, match="NumPy"):
        tok("hi", return_tensors="pt")


def test_z1_readme_example(z1):
    """The rendering given in /work/shared/data/chat_templates/README.md."""
    chat = [{"role": "system", "content": "SYS"}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "<think>Greeting: answer politely.</think>Hello!"},
            {"role": "user", "content": "Weather?"}]
    expected = ("[gMASK]<sop><|system|>\nSYS<|user|>\nHi<|assistant|>\nHello!<|user|>\nWeather?"
                "<|assistant|>\n<think>")
    assert z1.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == expected
    assert z1.apply_chat_template(chat, tokenize=False) == expected[:-len("<|assistant|>\n<think>")]
    ids = z1.apply_chat_template(chat, add_generation_prompt=True, return_dict=False)
    assert ids == z1.encode(expected, add_special_tokens=False)
    assert ids[:2] == [151331, 151333] and ids.count(151331) == 1  # [gMASK] written once, by the template


def test_glm4_renderings(tok):
    assert tok.apply_chat_template(SYSTEM_USER, tokenize=False, add_generation_prompt=True) == (
        "[gMASK]<sop><|system|>\n你是一个乐于助人的助手。<|user|>\nHello! 北京今天天气怎么样？<|assistant|>\n")
    # GLM-4 keeps earlier reasoning (no </think> stripping); tool calls are assistant turns with
    # metadata, tool results are observation turns.
    text = tok.apply_chat_template(TOOL_TURNS, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    function = json.dumps(TOOLS[0]["function"], ensure_ascii=False, indent=4)
    assert text.startswith("[gMASK]<sop><|system|>\n# 可用工具\n\n## get_weather\n\n" + function +
                           "\n在调用上述函数时，请使用 Json 格式表示调用的参数。\n## search_web\n\n")
    assert '"description": "在互联网上搜索信息 & 返回<摘要>"' in text  # no \\u escapes, no HTML escaping
    assert text.endswith(
        "<|user|>\n北京天气怎么样？<|assistant|>get_weather\n{\"city\": \"北京\"}"
        "<|observation|>\n{\"city\": \"北京\", \"temperature\": 23, \"condition\": \"晴\"}"
        "<|assistant|>\n北京今天晴，23°C。<|user|>\n上海呢？<|assistant|>\n")
    multi = tok.apply_chat_template(MULTI_TURN, tokenize=False)
    assert "<|assistant|>\n<think>easy</think>def add(a, b):" in multi


def test_apply_chat_template_return_types(tok):
    text = tok.apply_chat_template(SYSTEM_USER, tokenize=False, add_generation_prompt=True)
    ids = tok.encode(text, add_special_tokens=False)
    out = tok.apply_chat_template(SYSTEM_USER, add_generation_prompt=True)
    assert set(out) == {"input_ids", "attention_mask"}
    assert out["input_ids"].dtype == np.int64 and out["input_ids"].tolist() == [ids]
    assert out["attention_mask"].tolist() == [[1] * len(ids)]
    assert tok.apply_chat_template(SYSTEM_USER, add_generation_prompt=True, return_dict=False) == ids
    arr = tok.apply_chat_template(SYSTEM_USER, add_generation_prompt=True, return_dict=False, return_tensors="np")
    assert arr.tolist() == [ids]
    batch = tok.apply_chat_template([SYSTEM_USER, MULTI_TURN], tokenize=False)
    assert isinstance(batch, list) and len(batch) == 2
    padded = tok.apply_chat_template([SYSTEM_USER, MULTI_TURN], padding=True)
    assert padded["input_ids"].shape[0] == 2 and padded["attention_mask"][0, 0] == 0  # left padding
    lists = tok.apply_chat_template([SYSTEM_USER, MULTI_TURN], return_dict=False)
    assert [len(x) for x in lists] == padded["attention_mask"].sum(1).tolist()


def test_apply_chat_template_options_and_errors(tok):
    with pytest.raises(ValueError, match="empty conversation"):
        tok.apply_chat_template([])
    with pytest.raises(ValueError, match="not compatible"):
        tok.apply_chat_template(SYSTEM_USER, add_generation_prompt=True, continue_final_message=True)
    with pytest.raises(ValueError, match="JSON schemas"):
        tok.apply_chat_template(SYSTEM_USER, tools=[len])
    prefill = SYSTEM_USER + [{"role": "assistant", "content": "北京今天"}]
    assert tok.apply_chat_template(prefill, tokenize=False, continue_final_message=True).endswith(
        "<|assistant|>\n北京今天")
    # None-valued keys are dropped before rendering (so .get("metadata", "") sees no key)
    with_none = [{"role": "user", "content": "hi", "metadata": None}]
    assert tok.apply_chat_template(with_none, tokenize=False) == "[gMASK]<sop><|user|>\nhi"
    with pytest.raises(NotImplementedError, match="sanitize_control_tokens is not supported"):
        tok.apply_chat_template(SYSTEM_USER, sanitize_control_tokens=True)  # not a template variable
    custom = "{% for m in messages %}{{ m.content }}|{{ eos_token }}|{{ extra }}{% endfor %}"
    assert tok.apply_chat_template(with_none, chat_template=custom, tokenize=False, extra=7) == "hi|<|endoftext|>|7"


def test_template_environment_is_transformers(tok):
    import jinja2

    chat = [{"role": "user", "content": "x"}]
    render = lambda t, **kw: tok.apply_chat_template(chat, chat_template=t, tokenize=False, **kw)  # noqa: E731
    assert render("{{ {'a': '<é>'} | tojson }}") == '{"a": "<é>"}'
    assert render("{{ {'b': 1, 'a': [1, 2]} | tojson(indent=2, sort_keys=True) }}") == \
        '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}'
    assert render("{% for i in range(5) %}{% if i == 2 %}{% break %}{% endif %}{{ i }}{% endfor %}") == "01"
    assert render("  {% if true %}\nA{% endif %}\n") == "A"  # lstrip_blocks + trim_blocks
    assert render("{% generation %}G{% endgeneration %}") == "G"
    assert len(render("{{ strftime_now('%Y') }}")) == 4
    assert render("{% set ns = namespace(n=1) %}{% set ns.n = 2 %}{{ ns.n }}") == "2"
    with pytest.raises(jinja2.exceptions.TemplateError, match="nope"):
        render("{{ raise_exception('nope') }}")
    with pytest.raises(jinja2.exceptions.SecurityError):
        render("{{ ''.__class__.__mro__ }}")
    with pytest.raises(TokenizerError, match="does not compile"):
        render("{% if %}")


def _stream(tokenizer, ids, skip_special_tokens=True):
    decoder = StreamDecoder(tokenizer, skip_special_tokens=skip_special_tokens)
    pieces = [decoder.put(i) for i in ids]
    return pieces, decoder.flush()


@pytest.mark.parametrize("skip", [True, False])
def test_stream_decoder(tok, skip):
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                  return_dict=False) + tok.encode(STREAM_TEXT, add_special_tokens=False) + [151336]
    pieces, tail = _stream(tok, ids, skip)
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) + tail == tok.decode(ids, skip_special_tokens=skip)
    assert tail == ""
    # Characters really were split: some tokens completed nothing
    body = tok.encode(STREAM_TEXT, add_special_tokens=False)
    assert any(tok.decode(body[:k]).endswith("\ufffd") for k in range(1, len(body)))
    assert sum(p == "" for p in pieces) > 5


def test_stream_decoder_holds_incomplete_tail(tok):
    ids = tok.encode("ok 龘", add_special_tokens=False)
    pieces, tail = _stream(tok, ids[:-1])  # stop inside the last character
    assert "".join(pieces) == "ok "
    assert tail.endswith("\ufffd") and "".join(pieces) + tail == tok.decode(ids[:-1])
    decoder = StreamDecoder(tok)
    for i in ids:
        decoder.put(np.int64(i))
    decoder.reset()
    assert decoder.put(ids[0]) == tok.decode(ids[:1])


def test_stream_decoder_work_per_token_is_bounded(tok):
    class Counting:
        def __init__(self, inner):
            self.inner, self.longest = inner, 0

        def decode(self, ids, skip_special_tokens=False):
            self.longest = max(self.longest, len(ids))
            return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    ids = tok.encode(STREAM_TEXT * 20, add_special_tokens=False)
    counting = Counting(tok)
    pieces, tail = _stream(counting, ids)
    assert "".join(pieces) + tail == tok.decode(ids)
    assert len(ids) > 500 and counting.longest <= 12  # a window, never the whole stream


def test_stream_decoder_leaves_out_ids_the_tokenizer_lacks(tok):
    # A model's embedding can have more rows than its tokenizer has tokens (GLM-4: 151552 for 151343)
    ids = tok.encode("hello world", add_special_tokens=False)
    decoder = StreamDecoder(tok)
    pieces = [decoder.put(i) for i in [ids[0], 151500, 5000, *ids[1:]]]  # past the end; in a gap
    assert tok.known_ids([ids[0], 151500, 5000, *ids[1:]]) == ids
    assert "".join(pieces) + decoder.flush() == tok.decode(ids)
    with pytest.raises(ValueError, match="token_id must be >= 0, got -1"):
        decoder.put(-1)
    with pytest.raises(TypeError, match=r"token_id must be an integer, got 2.5 \(float\)"):
        decoder.put(2.5)


# ---- bad input: the exception names the argument and the value (issue 18) -----------------------

def test_decode_negative_id_is_a_value_error(tok):
    # was: OverflowError from tokenizers
    with pytest.raises(ValueError, match=r"token id -1 at position 0 is not in the vocabulary \(869 tokens, ids 0 to 151342\)"):
        tok.decode([-1])
    with pytest.raises(ValueError, match="token id -1 at position 2 "):
        tok.decode(np.array([1, 2, -1]))


def test_decode_id_past_the_vocabulary_is_a_value_error(tok):
    # was: "" (tokenizers skips ids it does not know)
    with pytest.raises(ValueError, match="token id 1000000000 at position 0 is not in the vocabulary"):
        tok.decode([10**9])
    with pytest.raises(ValueError, match=f"token id {2**64} at position 1 "):
        tok.decode([1, 2**64])
    with pytest.raises(ValueError, match="token id 5000 at position 0 "):  # a gap in this vocabulary
        tok.decode([5000])
    with pytest.raises(ValueError, match="token id 151343 at position 1 "):
        tok.batch_decode([[1], [1, 151343]])
    assert tok.decode([151342]) == "<|end_of_video|>" and tok.decode([]) == ""


@pytest.mark.parametrize("ids, message", [
    ([1.5], r"token ids must be integers, got 1.5 \(float\) at position 0"),
    (np.array([1.0, 2.0]), r"token ids must be integers, got 1.0 \(float\) at position 0"),
    ([1, "3"], r"token ids must be integers, got '3' \(str\) at position 1"),
    ([True], r"token ids must be integers, got True \(bool\) at position 0"),
    (None, "token ids must be an integer or a sequence of integers, got NoneType"),
    ("abc", "token ids must be an integer or a sequence of integers, got str"),
])
def test_decode_non_integer_ids_are_a_type_error(tok, ids, message):
    with pytest.raises(TypeError, match=message):
        tok.decode(ids)


def test_convert_ids_to_tokens_checks_ids(tok):
    assert tok.convert_ids_to_tokens([151337, 5000]) == ["<|assistant|>", None]  # unknown: None, as transformers
    with pytest.raises(ValueError, match=r"token id -1 at position 0 is out of range \[0, 2\*\*32\)"):
        tok.convert_ids_to_tokens(-1)
    with pytest.raises(TypeError, match=r"token ids must be integers, got 2.5 \(float\) at position 1"):
        tok.convert_ids_to_tokens([1, 2.5])


def test_encode_lone_surrogate_is_a_value_error(tok):
    # Python keeps undecodable bytes as lone surrogates; tokenizers refused them with a TypeError
    # that said nothing about the text
    text = b"hi \xff".decode("utf-8", "surrogateescape")
    message = r"text has a lone surrogate '\\udcff' at index 3, which is not a character"
    for call in (tok.encode, tok.tokenize, tok, lambda t: tok([t, "ok"], padding=True)):
        with pytest.raises(ValueError, match=message):
            call(text)
    with pytest.raises(ValueError, match="lone surrogate"):
        tok.apply_chat_template([{"role": "user", "content": text}])
    with pytest.raises(TypeError, match="text must be a string or a list of strings, got bytes"):
        tok.encode(b"hi")
    with pytest.raises(TypeError, match="text must be a string or a list of strings, got NoneType"):
        tok(None)


def test_chat_message_with_unknown_role_is_refused(tok):
    # The GLM templates render system, user, assistant and observation and dropped any other role
    for role in ("tool", "User", ""):
        with pytest.raises(ValueError, match=rf"message 1 has role '{role}', which the chat template does not "
                                             r"render \(it renders 'assistant', 'observation', 'system', 'user'\)"):
            tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": role, "content": "b"}])


def test_chat_message_without_role_is_refused(tok):
    for message in ({"content": "x"}, {"role": None, "content": "x"}):
        with pytest.raises(ValueError, match="message 0 has no 'role'"):
            tok.apply_chat_template([message], tokenize=False)
    with pytest.raises(TypeError, match=r"message 0: role must be a string, got 5 \(int\)"):
        tok.apply_chat_template([{"role": 5, "content": "x"}], tokenize=False)


@pytest.mark.parametrize("content, error, message", [
    (None, ValueError, r"message 0 \(role 'user'\) has no content: give a string \(''"),
    (7, TypeError, r"message 0 \(role 'user'\): content must be a string or a list of content-block dicts, got int 7"),
    (b"hi", TypeError, r"content must be a string or a list of content-block dicts, got bytes b'hi'"),
    (["hi"], TypeError, r"content must be a string or a list of content-block dicts, got list \['hi'\]"),
])
def test_chat_message_content_must_be_text(tok, content, error, message):
    with pytest.raises(error, match=message):
        tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False)


def test_chat_roles_come_from_the_template(tok):
    # an assistant message may leave content out (a tool call, or reasoning alone)
    assert tok.apply_chat_template([{"role": "assistant"}], tokenize=False) == "[gMASK]<sop><|assistant|>\n"
    # a template that writes the role out renders any role; one that compares it knows its roles
    chatml = "{% for m in messages %}{% if m.role == 'system' %}S{% endif %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    assert tok.apply_chat_template([{"role": "tool", "content": "x"}], chat_template=chatml, tokenize=False) == "<tool>x"
    only = "{% for m in messages | selectattr('role', 'equalto', 'system') %}{{ m.content }}{% endfor %}" \
           "{% for m in messages %}{% if m['role'] in ['user', 'bot'] %}{{ m.content }}{% endif %}{% endfor %}"
    assert tok.apply_chat_template([{"role": "bot", "content": "x"}], chat_template=only, tokenize=False) == "x"
    with pytest.raises(ValueError, match=r"role 'assistant', .* \(it renders 'bot', 'system', 'user'\)"):
        tok.apply_chat_template([{"role": "assistant", "content": "x"}], chat_template=only, tokenize=False)


def test_max_length_must_be_an_integer(tok):
    # found by tests/fuzz_inputs.py: "'<' not supported between instances of 'str' and 'int'"
    with pytest.raises(TypeError, match=r"max_length must be an integer or None, got '8' \(str\)"):
        tok("hello", max_length="8")
    with pytest.raises(TypeError, match=r"max_length must be an integer or None, got 2.5 \(float\)"):
        tok.apply_chat_template([{"role": "user", "content": "x"}], truncation=True, max_length=2.5)
    with pytest.raises(ValueError, match="max_length must be >= 0, got -1"):
        tok("hello", max_length=-1)


@pytest.mark.parametrize("bad", [2.5, 7, None, "abc"])
def test_batch_decode_of_no_sequences_is_a_type_error(tok, bad):
    # found by tests/fuzz_inputs.py: "object of type 'float' has no len()"
    with pytest.raises(TypeError, match="batch_decode takes a list of token id sequences or a 2-D array, got "):
        tok.batch_decode(bad)


@pytest.mark.parametrize("conversation", [None, "hello", {"role": "user", "content": "x"}])
def test_conversation_must_be_a_list(tok, conversation):
    with pytest.raises(TypeError, match="a conversation must be a list of message dicts, got "):
        tok.apply_chat_template(conversation)


def test_from_pretrained_options(glm_dir, tmp_path):
    right = Glm4Tokenizer.from_pretrained(glm_dir, padding_side="right", local_files_only=True, revision=None)
    assert right.padding_side == "right"
    assert right(["a", "abc def"], padding=True)["attention_mask"][0, -1] == 0
    # chat_template.jinja beside the config takes precedence over tokenizer_config.json's template
    d = tmp_path / "jinja"
    shutil.copytree(glm_dir, d)
    (d / "chat_template.jinja").write_text("JINJA{{ messages[0].content }}", encoding="utf-8")
    t = Glm4Tokenizer.from_pretrained(str(d))
    assert t.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == "JINJAx"


def test_loading_errors(glm_dir, tmp_path):
    with pytest.raises(FileNotFoundError):
        Glm4Tokenizer.from_pretrained(str(tmp_path / "missing"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Glm4Tokenizer.from_pretrained(str(empty))
    bad = tmp_path / "bad"
    shutil.copytree(glm_dir, bad)
    (bad / "tokenizer_config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(TokenizerError, match="tokenizer_config.json"):
        Glm4Tokenizer.from_pretrained(str(bad))
    (bad / "tokenizer.json").write_text('{"model": 3}', encoding="utf-8")
    with pytest.raises(Glm4rtError, match="tokenizer.json"):
        Glm4Tokenizer.from_pretrained(str(bad))
    assert issubclass(TokenizerError, ValueError)
    no_template = tmp_path / "no_template"
    shutil.copytree(glm_dir, no_template)
    cfg = json.loads((no_template / "tokenizer_config.json").read_text(encoding="utf-8"))
    del cfg["chat_template"]
    (no_template / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    with pytest.raises(ValueError, match="chat_template is not set"):
        Glm4Tokenizer.from_pretrained(str(no_template)).apply_chat_template([{"role": "user", "content": "x"}])


# ------------------------------------------------------------------------------------------------
# Parity with transformers
# ------------------------------------------------------------------------------------------------

def test_transformers_loads_the_same_vocabulary(tok, hf):
    assert len(tok) == len(hf) and tok.vocab_size == hf.vocab_size
    assert tok.get_vocab() == hf.get_vocab()
    assert tok.all_special_ids == hf.all_special_ids and tok.all_special_tokens == hf.all_special_tokens
    assert tok.special_tokens_map == hf.special_tokens_map
    assert (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id) == (hf.eos_token_id, hf.pad_token_id,
                                                                       hf.bos_token_id)
    assert tok.added_tokens_encoder == hf.added_tokens_encoder
    assert tok.padding_side == hf.padding_side and tok.model_max_length == hf.model_max_length
    for idx, content in SPECIAL_TOKENS.items():
        assert hf.convert_tokens_to_ids(content) == idx
    ids = list(range(0, tok.vocab_size, 7)) + sorted(SPECIAL_TOKENS)
    assert tok.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)
    assert tok.convert_ids_to_tokens(ids, skip_special_tokens=True) == hf.convert_ids_to_tokens(
        ids, skip_special_tokens=True)


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_encode_decode_match_transformers(tok, hf, name):
    text = TEXTS[name]
    for add in (True, False):
        assert tok.encode(text, add_special_tokens=add) == hf.encode(text, add_special_tokens=add)
    assert tok.tokenize(text) == hf.tokenize(text)
    ids = hf.encode(text)
    for skip in (False, True):
        assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    prefix = ids[:len(ids) // 2 + 1]  # may end inside a character
    assert tok.decode(prefix) == hf.decode(prefix)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches_transformers(tok, hf, side):
    texts = [TEXTS[k] for k in sorted(TEXTS)]
    ours = tok(texts, padding=True, padding_side=side)
    theirs = hf(texts, padding=True, padding_side=side, return_tensors="np")
    for key in ("input_ids", "attention_mask"):
        np.testing.assert_array_equal(ours[key], theirs[key])
    ours = tok(texts, padding="max_length", truncation=True, max_length=12, padding_side=side)
    theirs = hf(texts, padding="max_length", truncation=True, max_length=12, padding_side=side, return_tensors="np")
    for key in ("input_ids", "attention_mask"):
        np.testing.assert_array_equal(ours[key], theirs[key])
    assert tok.batch_decode(ours["input_ids"], skip_special_tokens=True) == hf.batch_decode(
        theirs["input_ids"], skip_special_tokens=True)
    assert tok.batch_decode(ours["input_ids"]) == hf.batch_decode(theirs["input_ids"])


def test_default_padding_side_matches_transformers(tok, hf):
    texts = ["hi", TEXTS["code"]]
    np.testing.assert_array_equal(tok(texts, padding=True)["input_ids"],
                                  hf(texts, padding=True, return_tensors="np")["input_ids"])


@pytest.mark.parametrize("template", ["glm4", "z1"])
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("gen", [True, False])
@pytest.mark.parametrize("with_tools", [False, True])
def test_chat_template_matches_transformers(tok, z1, hf, hf_z1, template, conversation, gen, with_tools):
    ours, theirs = (tok, hf) if template == "glm4" else (z1, hf_z1)
    chat = CONVERSATIONS[conversation]
    kwargs = dict(add_generation_prompt=gen, tools=TOOLS if with_tools else None)
    text = ours.apply_chat_template(chat, tokenize=False, **kwargs)
    assert text == theirs.apply_chat_template(chat, tokenize=False, **kwargs)
    assert ours.apply_chat_template(chat, return_dict=False, **kwargs) == \
        theirs.apply_chat_template(chat, return_dict=False, **kwargs)
    out, ref = ours.apply_chat_template(chat, **kwargs), theirs.apply_chat_template(chat, **kwargs)
    for key in ("input_ids", "attention_mask"):
        np.testing.assert_array_equal(out[key], _as_batch(ref[key]))


def test_chat_template_batch_and_options_match_transformers(tok, hf):
    batch = [SYSTEM_USER, TOOL_TURNS, MULTI_TURN]
    assert tok.apply_chat_template(batch, tokenize=False) == hf.apply_chat_template(batch, tokenize=False)
    assert tok.apply_chat_template(batch, return_dict=False) == hf.apply_chat_template(batch, return_dict=False)
    ours = tok.apply_chat_template(batch, padding=True, add_generation_prompt=True)
    theirs = hf.apply_chat_template(batch, padding=True, add_generation_prompt=True, return_tensors="np")
    for key in ("input_ids", "attention_mask"):
        np.testing.assert_array_equal(ours[key], theirs[key])
    prefill = SYSTEM_USER + [{"role": "assistant", "content": "北京今天  "}]
    kw = dict(tokenize=False, continue_final_message=True)
    assert tok.apply_chat_template(prefill, **kw) == hf.apply_chat_template(prefill, **kw)
    custom = "{{ bos_token }}|{{ eos_token }}|{{ pad_token }}|{{ enable_thinking }}|{{ messages | length }}"
    kw = dict(tokenize=False, chat_template=custom, enable_thinking=False)
    assert tok.apply_chat_template(SYSTEM_USER, **kw) == hf.apply_chat_template(SYSTEM_USER, **kw)


def test_stream_decoder_matches_transformers_decode(tok, hf):
    ids = hf.encode(STREAM_TEXT) + [151329]
    pieces, tail = _stream(tok, ids)
    assert "".join(pieces) + tail == hf.decode(ids, skip_special_tokens=True)


def _edited_copy(src, dst, **changes):
    shutil.copytree(src, dst)
    path = os.path.join(dst, "tokenizer_config.json")
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    for key, value in changes.items():
        cfg[key] = value
    with open(path, "w", encoding="utf-8") as f:
        json.dump(cfg, f, ensure_ascii=False)
    return str(dst)


def test_config_variants_match_transformers(glm_dir, tmp_path, hf):
    """Config-only tokens and model-specific named tokens load as in transformers; the clean-up of
    spaces that the config asks for is skipped for BPE by transformers 5, and glm4rt never does it."""
    import transformers

    with open(os.path.join(glm_dir, "tokenizer_config.json"), encoding="utf-8") as f:
        decoder = json.load(f)["added_tokens_decoder"]
    decoder["151343"] = {"content": "<tool_call>", "lstrip": False, "normalized": False, "rstrip": False,
                         "single_word": False, "special": False}
    d = _edited_copy(glm_dir, tmp_path / "variant", added_tokens_decoder=decoder, image_token="<|begin_of_image|>",
                     clean_up_tokenization_spaces=True, model_max_length=16)
    ours, theirs = Glm4Tokenizer.from_pretrained(d), transformers.PreTrainedTokenizerFast.from_pretrained(d)
    assert len(ours) == len(theirs) and ours.get_vocab() == theirs.get_vocab()
    assert ours.special_tokens_map == theirs.special_tokens_map
    assert ours.all_special_ids == theirs.all_special_ids
    text = "call <tool_call> now , ok . isn't it ?" + TEXTS["specials"]
    assert ours.encode(text) == theirs.encode(text)
    ids = theirs.encode(text)
    for skip in (False, True):
        assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)
    np.testing.assert_array_equal(ours([text, "hi"], padding=True, truncation=True)["input_ids"],
                                  theirs([text, "hi"], padding=True, truncation=True, return_tensors="np")["input_ids"])
    custom = "{{ image_token }}|{{ eos_token }}"
    chat = [{"role": "user", "content": "x"}]
    assert ours.apply_chat_template(chat, chat_template=custom, tokenize=False) == \
        theirs.apply_chat_template(chat, chat_template=custom, tokenize=False)
