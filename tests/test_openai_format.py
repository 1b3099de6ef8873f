"""OpenAI messages to GLM-4's chat template and back: tool calls, tool results, Z1 reasoning."""
import json

import pytest

from glm4rt.openai_format import (ReasoningSplitter, RequestError, may_be_tool_call, parse_tool_calls,
                                  template_messages)

TOOLS = {"get_weather", "search"}


def test_tool_call_parsed_from_glm4_reply():
    calls = parse_tool_calls('get_weather\n{"location": "北京", "unit": "c"}', TOOLS)
    assert len(calls) == 1 and calls[0]["type"] == "function" and calls[0]["id"].startswith("call_")
    assert calls[0]["function"]["name"] == "get_weather"
    assert json.loads(calls[0]["function"]["arguments"]) == {"location": "北京", "unit": "c"}


def test_two_calls_and_surrounding_whitespace():
    calls = parse_tool_calls('\nsearch\n{"q": "a"}\nget_weather\n{"location": "x"}\n', TOOLS)
    assert [c["function"]["name"] for c in calls] == ["search", "get_weather"]


@pytest.mark.parametrize("text", [
    "The weather is fine.",                    # plain text
    'unknown_tool\n{"a": 1}',                  # not a tool of the request
    'get_weather\n{"location": ',              # JSON cut off
    'get_weather\n["not", "an", "object"]',    # arguments must be an object
    'get_weather\n{"a": 1} and then text',     # text after the call
    'get_weather\n__import__("os").system("x")',  # never evaluated
])
def test_text_that_is_no_tool_call(text):
    assert parse_tool_calls(text, TOOLS) is None


def test_may_be_tool_call_while_streaming():
    assert may_be_tool_call("get_w", TOOLS) and may_be_tool_call("get_weather\n{", TOOLS)
    assert not may_be_tool_call("The", TOOLS) and not may_be_tool_call("getter\n", TOOLS)


def test_messages_for_the_template():
    msgs = template_messages([
        {"role": "developer", "content": "rules"},
        {"role": "user", "content": [{"type": "text", "text": "weather "}, {"type": "text", "text": "in Paris?"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"location": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny."},
    ])
    assert msgs == [
        {"role": "system", "content": "rules"},
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "metadata": "get_weather", "content": '{"location": "Paris"}'},
        {"role": "observation", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny."},
    ]


@pytest.mark.parametrize("messages", [None, [], "hi", [{"role": "bot", "content": "x"}], [42],
                                      [{"role": "assistant", "tool_calls": [{"function": {}}]}]])
def test_bad_messages(messages):
    with pytest.raises(RequestError):
        template_messages(messages)


def _split(pieces, thinking):
    s = ReasoningSplitter(thinking)
    out = [s.feed(p) for p in pieces] + [s.feed("", final=True)]
    return "".join(r for r, _ in out), "".join(a for _, a in out)


@pytest.mark.parametrize("pieces", [["Let me think.</think>\nThe answer."],
                                    ["Let me", " think.</th", "ink>", "\nThe answer."],
                                    list("Let me think.</think>\nThe answer.")])
def test_reasoning_split_when_the_template_opened_think(pieces):
    assert _split(pieces, thinking=True) == ("Let me think.", "The answer.")


@pytest.mark.parametrize("pieces", [["<think>Hmm.</think>Yes."], list("<think>Hmm.</think>Yes."),
                                    ["\n<thi", "nk>Hmm.", "</think>Yes."]])
def test_reasoning_split_when_the_model_opens_think(pieces):
    assert _split(pieces, thinking=False) == ("Hmm.", "Yes.")


def test_no_reasoning_and_unfinished_reasoning():
    assert _split(["Just ", "an answer <b>"], thinking=False) == ("", "Just an answer <b>")
    assert _split(["still thinking </thi"], thinking=True) == ("still thinking </thi", "")
