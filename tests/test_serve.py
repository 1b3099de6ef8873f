"""``glm4rt serve`` driven by the official ``openai`` client on 127.0.0.1, and the engine under it.

The checkpoint is tests/chat_model.py's tiny GLM-4 with the GLM test tokenizer (greedy replies are
text tokens and never stop early). Every expected token sequence comes from ``generate`` run
alone (in batch-invariant mode), never from the server itself.
"""
import http.client
import json
import signal
import socket
import subprocess
import threading
import time

import numpy as np
import pytest

openai = pytest.importorskip("openai", reason="the server tests need the test extra (openai)")
pytest.importorskip("uvicorn", reason="the server tests need the test extra (uvicorn)")

import glm4rt  # noqa: E402
from chat_model import build_chat_checkpoint  # noqa: E402
from glm4rt.engine import EngineParams, Glm4Engine  # noqa: E402
from glm4rt.server import run_server  # noqa: E402
from helpers import glm4rt_command  # noqa: E402

API_KEY = "test-key"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_chat_checkpoint(str(tmp_path_factory.mktemp("serve_glm4")), template="glm4")


@pytest.fixture(scope="module")
def loaded(checkpoint):
    model = glm4rt.Glm4ForCausalLM.from_pretrained(checkpoint)
    tok = glm4rt.Glm4Tokenizer.from_pretrained(checkpoint)
    return model, tok


@pytest.fixture(scope="module")
def server(loaded):
    """A server in a thread of this process: (base URL, engine)."""
    model, tok = loaded
    engine = Glm4Engine(model, tok, parallel=4, ctx=256, prefill_chunk=16, max_waiting=4)
    ready = threading.Event()
    urls = []

    def on_ready(url):
        urls.append(url)
        ready.set()

    t = threading.Thread(target=run_server, args=(engine, tok, "tiny-glm4"),
                         kwargs=dict(port=0, api_key=API_KEY, ready=on_ready), daemon=True)
    t.start()
    assert ready.wait(30), "the server did not start"
    yield urls[0], engine
    engine.shutdown()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def _alone(model, ids, n):
    with glm4rt.batch_invariant():
        out = model.generate(np.array([ids]), max_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


def _chat_ids(tok, messages):
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tok.encode(text, add_special_tokens=False)


def test_chat_completion_equals_generate(client, loaded):
    model, tok = loaded
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    r = client.chat.completions.create(model="tiny-glm4", messages=messages, max_tokens=12, temperature=0)
    ids = _chat_ids(tok, messages)
    expected = _alone(model, ids, 12)
    assert r.choices[0].message.content == tok.decode(expected, skip_special_tokens=True)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 12
    assert r.usage.total_tokens == len(ids) + 12
    assert r.model == "tiny-glm4" and r.object == "chat.completion"


def test_streaming_chat_and_usage(client, loaded):
    model, tok = loaded
    messages = [{"role": "user", "content": "Stream, please"}]
    stream = client.chat.completions.create(model="tiny-glm4", messages=messages, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            finish = c.finish_reason or finish
    expected = tok.decode(_alone(model, _chat_ids(tok, messages), 10), skip_special_tokens=True)
    assert "".join(pieces) == expected
    assert finish == "length" and usage.completion_tokens == 10


def test_completions_text_and_token_ids(client, loaded):
    model, tok = loaded
    ids = tok.encode("The quick brown fox", add_special_tokens=False)
    expected = _alone(model, ids, 8)
    r = client.completions.create(model="tiny-glm4", prompt="The quick brown fox", max_tokens=8, temperature=0)
    assert r.choices[0].text == tok.decode(expected, skip_special_tokens=True)
    r2 = client.completions.create(model="tiny-glm4", prompt=ids, max_tokens=8, temperature=0, logprobs=2)
    assert r2.choices[0].text == r.choices[0].text
    lp = r2.choices[0].logprobs
    assert len(lp.token_logprobs) == 8 and all(v <= 0 for v in lp.token_logprobs)
    # The first token's log-probability under the model's distribution, from the model alone.
    with glm4rt.batch_invariant():
        logits = model(np.array([ids])).logits[0, -1].astype(np.float64)
    reference = logits[expected[0]] - logits.max() - np.log(np.exp(logits - logits.max()).sum())
    assert abs(lp.token_logprobs[0] - reference) < 1e-12
    assert all(1 <= len(top) <= 2 for top in lp.top_logprobs)  # (tokens with the same text share a key)
    chunks = list(client.completions.create(model="tiny-glm4", prompt=ids, max_tokens=8, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text


def test_stop_strings_end_the_text_before_them(client, loaded):
    model, tok = loaded
    ids = tok.encode("Once upon a time", add_special_tokens=False)
    full = tok.decode(_alone(model, ids, 20), skip_special_tokens=True)
    stop = full[len(full) // 2:len(full) // 2 + 2]
    assert stop.strip(), full
    r = client.completions.create(model="tiny-glm4", prompt=ids, max_tokens=20, temperature=0, stop=[stop])
    assert r.choices[0].text == full[:full.find(stop)]
    assert r.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model="tiny-glm4", prompt=ids, max_tokens=20, temperature=0,
                                            stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full[:full.find(stop)]
    # A stop string the text ends with the start of: held back to the end, then sent, streamed too.
    tail_stop = full[-1] + "\u00a7"
    chunks = list(client.completions.create(model="tiny-glm4", prompt=ids, max_tokens=20, temperature=0,
                                            stop=tail_stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full


def test_eight_concurrent_clients_each_get_their_generate(server, loaded):
    """8 clients at once (4 slots, 4 waiting), prompts of 1 to 60 tokens, greedy: every reply equals
    generate of that prompt alone; sampled requests with a seed repeat exactly under load."""
    model, tok = loaded
    rng = np.random.default_rng(5)
    text_ids = [i for i in tok.get_vocab().values() if i < 151329]
    prompts = [rng.choice(text_ids, size=n).tolist() for n in (1, 60, 7, 33, 2, 19, 45, 12)]
    expected = [_alone(model, p, 10) for p in prompts]
    results = [None] * 8

    def worker(i):
        c = openai.OpenAI(base_url=server[0] + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
        r = c.completions.create(model="tiny-glm4", prompt=prompts[i], max_tokens=10, temperature=0, logprobs=0)
        results[i] = r.choices[0]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i in range(8):
        got = results[i].text
        assert got == tok.decode(expected[i], skip_special_tokens=True), i

    c = openai.OpenAI(base_url=server[0] + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
    sampled = dict(model="tiny-glm4", prompt=prompts[3], max_tokens=10, temperature=0.8, top_p=0.9, seed=11)
    alone = c.completions.create(**sampled).choices[0].text
    busy = []
    others = [threading.Thread(target=lambda p=p: c.completions.create(model="tiny-glm4", prompt=p, max_tokens=10))
              for p in prompts[:3]]
    for t in others:
        t.start()
    busy.append(c.completions.create(**sampled).choices[0].text)
    for t in others:
        t.join(120)
    assert busy == [alone]


def test_prefix_reuse_counts_cached_tokens(client, loaded):
    model, tok = loaded
    turn1 = [{"role": "user", "content": "Remember the number seven and tell me a story about it"}]
    r1 = client.chat.completions.create(model="tiny-glm4", messages=turn1, max_tokens=6, temperature=0)
    turn2 = turn1 + [{"role": "assistant", "content": r1.choices[0].message.content},
                     {"role": "user", "content": "And now?"}]
    r2 = client.chat.completions.create(model="tiny-glm4", messages=turn2, max_tokens=6, temperature=0)
    assert r2.usage.prompt_tokens_details.cached_tokens >= len(_chat_ids(tok, turn1))
    assert r2.choices[0].message.content == tok.decode(_alone(model, _chat_ids(tok, turn2), 6),
                                                       skip_special_tokens=True)


def test_models_health_tokenize_detokenize_metrics(server, client, loaded):
    _, tok = loaded
    assert [m.id for m in client.models.list().data] == ["tiny-glm4"]
    url = server[0]
    host, port = url.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("GET", "/health")
    r = conn.getresponse()
    assert r.status == 200 and json.loads(r.read()) == {"status": "ok"}
    body = json.dumps({"prompt": "hello world"})
    auth = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    conn.request("POST", "/tokenize", body, auth)
    r = conn.getresponse()
    ids = json.loads(r.read())["tokens"]
    assert ids == tok.encode("hello world", add_special_tokens=False)
    conn.request("POST", "/detokenize", json.dumps({"tokens": ids}), auth)
    assert json.loads(conn.getresponse().read())["prompt"] == "hello world"
    conn.request("GET", "/metrics", headers=auth)
    text = conn.getresponse().read().decode()
    assert "glm4rt_generation_tokens_total" in text and "glm4rt_queue_length" in text


def _post(url, path, body, headers=None, raw=None):
    host, port = url.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    h = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json", **(headers or {})}
    conn.request("POST", path, raw if raw is not None else json.dumps(body), h)
    r = conn.getresponse()
    return r.status, json.loads(r.read() or b"{}")


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": ""}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 5}, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 0}, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": 3}, "stop"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, "stream"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
])
def test_bad_requests_get_openai_errors(server, body, param):
    status, err = _post(server[0], "/v1/chat/completions", body)
    assert status == 400 and err["error"]["param"] == param and err["error"]["message"]


def test_limits_and_auth(server, client):
    url = server[0]
    status, err = _post(url, "/v1/chat/completions", None, raw="{not json")
    assert status == 400 and "JSON" in err["error"]["message"]
    status, err = _post(url, "/v1/completions", {"prompt": "x " * 400, "max_tokens": 1})
    assert status == 400 and "context" in err["error"]["message"]
    status, err = _post(url, "/v1/completions", {"prompt": "hello", "max_tokens": 10_000})
    assert status == 400 and "max_tokens" in err["error"]["message"]
    status, err = _post(url, "/v1/completions", {"prompt": "a" * (5 * 2**20)})
    assert status == 413
    status, err = _post(url, "/v1/completions", {"prompt": "hello"}, headers={"Authorization": "Bearer nope"})
    assert status == 401 and err["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    # The server still answers.
    assert client.completions.create(model="tiny-glm4", prompt="ok", max_tokens=2).choices[0].text is not None


def test_client_disconnect_frees_the_slot(server, client):
    url, engine = server
    stream = client.completions.create(model="tiny-glm4", prompt="go on", max_tokens=200, stream=True)
    next(iter(stream))
    stream.close()
    deadline = time.time() + 20
    while engine.running and time.time() < deadline:
        time.sleep(0.05)
    assert engine.running == 0


def test_queue_full_gets_429(loaded):
    """A queue limit of 0 with one slot busy: the next request gets 429 at once."""
    model, tok = loaded
    engine = Glm4Engine(model, tok, parallel=1, ctx=256, max_waiting=0)
    try:
        h = engine.submit([5, 6, 7], EngineParams(max_tokens=200))
        deadline = time.time() + 10
        while engine.running == 0 and time.time() < deadline:
            time.sleep(0.01)
        with pytest.raises(glm4rt.engine.QueueFullError):
            engine.submit([5, 6], EngineParams(max_tokens=2))
        h.cancel()
        assert h.result()[2].reason == "cancelled"
    finally:
        engine.shutdown()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_cli_serve_stops_on_a_signal_with_streams_open(checkpoint, sig):
    """Open streams end with an error event, the process exits (uvicorn re-raises SIGTERM after
    its clean shutdown, the conventional exit status of a daemon stopped by it; Ctrl-C exits 0),
    with no traceback."""
    port = _free_port()
    proc = subprocess.Popen(glm4rt_command("serve", "--model", checkpoint, "--port", str(port), "--ctx", "2048"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}/v1" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
        stream = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=2000, stream=True)
        it = iter(stream)
        next(it)
        proc.send_signal(sig)
        with pytest.raises(openai.APIError, match="shutting down"):
            for _ in it:
                pass
        assert proc.wait(30) == (0 if sig == signal.SIGINT else -signal.SIGTERM)
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_serve_without_a_model_serves_the_demo_model():
    port = _free_port()
    proc = subprocess.Popen(glm4rt_command("serve", "--port", str(port), "--ctx", "512"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}/v1" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
        assert [m.id for m in c.models.list()] == ["glm4rt-demo"]
        r = c.chat.completions.create(model="glm4rt-demo", messages=[{"role": "user", "content": "John 3:16"}],
                                      max_tokens=24, temperature=0)
        assert r.choices[0].message.content.strip() and r.usage.completion_tokens > 0
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    assert "using the demo model" in proc.stderr.read()


# ---- a trained model: real GLM-4 tool calls and GLM-Z1 thinking ------------------------------------

@pytest.fixture(scope="module")
def trained_servers():
    """Servers of the tiny model trained on a tool call, its answer and a thinking reply:
    {"glm4": url, "z1": url} (tests/trained_chat.py)."""
    pytest.importorskip("torch", reason="training the tool-call model needs the test extra (torch)")
    from trained_chat import cached_trained_chat_models, learnt_replies

    dirs = cached_trained_chat_models()
    urls, engines = {}, []
    model = glm4rt.Glm4ForCausalLM.from_pretrained(dirs["glm4"])
    toks = {name: glm4rt.Glm4Tokenizer.from_pretrained(d) for name, d in dirs.items()}
    assert all(learnt_replies(model, toks["glm4"], toks["z1"])), "the training did not learn the replies"
    for name in dirs:
        engine = Glm4Engine(model, toks[name], parallel=2, ctx=256)
        engines.append(engine)
        ready = threading.Event()

        def on_ready(url, name=name, ready=ready):
            urls[name] = url
            ready.set()
        threading.Thread(target=run_server, args=(engine, toks[name], "trained"), kwargs=dict(port=0, ready=on_ready),
                         daemon=True).start()
        assert ready.wait(30)
    yield urls
    for engine in engines:
        engine.shutdown()


def _stream_message(stream):
    """A streamed chat reply put together: content, reasoning_content, tool_calls, finish_reason."""
    content, reasoning, calls, finish = [], [], {}, None
    for chunk in stream:
        for c in chunk.choices:
            d = c.delta
            content.append(d.content or "")
            reasoning.append(getattr(d, "reasoning_content", None) or "")
            for call in d.tool_calls or []:
                entry = calls.setdefault(call.index, {"id": None, "name": "", "arguments": ""})
                entry["id"] = call.id or entry["id"]
                entry["name"] += (call.function.name or "") if call.function else ""
                entry["arguments"] += (call.function.arguments or "") if call.function else ""
            finish = c.finish_reason or finish
    return "".join(content), "".join(reasoning), [calls[k] for k in sorted(calls)], finish


@pytest.mark.parametrize("stream", [False, True])
def test_tool_call_round_trip(trained_servers, stream):
    from trained_chat import ANSWER, QUESTION, TOOL_RESULT, WEATHER_TOOL

    c = openai.OpenAI(base_url=trained_servers["glm4"] + "/v1", api_key="none", max_retries=0, timeout=60)
    r = c.chat.completions.create(model="trained", messages=QUESTION, tools=[WEATHER_TOOL], max_tokens=40,
                                  temperature=0, stream=stream)
    if stream:
        content, _, calls, finish = _stream_message(r)
        assert content == ""
    else:
        msg, finish = r.choices[0].message, r.choices[0].finish_reason
        assert msg.content is None
        calls = [{"id": t.id, "name": t.function.name, "arguments": t.function.arguments} for t in msg.tool_calls]
    assert finish == "tool_calls" and len(calls) == 1
    assert calls[0]["name"] == "get_weather" and json.loads(calls[0]["arguments"]) == {"location": "Paris"}
    assert calls[0]["id"].startswith("call_")

    messages = QUESTION + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": calls[0]["id"], "type": "function",
             "function": {"name": calls[0]["name"], "arguments": calls[0]["arguments"]}}]},
        {"role": "tool", "tool_call_id": calls[0]["id"], "content": TOOL_RESULT}]
    r = c.chat.completions.create(model="trained", messages=messages, tools=[WEATHER_TOOL], max_tokens=40,
                                  temperature=0, stream=stream)
    if stream:
        content, _, calls, finish = _stream_message(r)
        assert calls == []
    else:
        content, finish = r.choices[0].message.content, r.choices[0].finish_reason
        assert r.choices[0].message.tool_calls is None
    assert content == ANSWER and finish == "stop"


def test_tool_choice_none_leaves_the_tools_out(trained_servers):
    from trained_chat import QUESTION, WEATHER_TOOL

    url = trained_servers["glm4"]
    status, body = _post(url, "/tokenize", {"messages": QUESTION, "tools": [WEATHER_TOOL], "tool_choice": "none"})
    status2, body2 = _post(url, "/tokenize", {"messages": QUESTION})
    assert status == status2 == 200 and body["tokens"] == body2["tokens"]


@pytest.mark.parametrize("stream", [False, True])
def test_z1_reasoning_content(trained_servers, stream):
    from trained_chat import GREETING, REPLY, THINKING

    c = openai.OpenAI(base_url=trained_servers["z1"] + "/v1", api_key="none", max_retries=0, timeout=60)
    r = c.chat.completions.create(model="trained", messages=GREETING, max_tokens=40, temperature=0, stream=stream)
    if stream:
        content, reasoning, _, finish = _stream_message(r)
    else:
        msg, finish = r.choices[0].message, r.choices[0].finish_reason
        content, reasoning = msg.content, msg.reasoning_content
    assert (reasoning, content, finish) == (THINKING, REPLY, "stop")
