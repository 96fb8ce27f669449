"""`kcache serve` end to end: the real server in a subprocess on 127.0.0.1, driven by the official openai client (and
raw HTTP where the client would refuse to send the bad input). Plus the AsyncEngine's failure and shutdown paths."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

KEY = "sk-test"
MODEL = "tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model, log_path, *args, startup_s=180):
    """`python -m kcache serve` on a free port; returns (process, base url) once /health answers."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "kcache", "serve", "--model", str(model), "--port", str(port), *args],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + startup_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, open(log_path).read()
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"the server did not start:\n{open(log_path).read()}")


def stop(proc) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=60)


@pytest.fixture(scope="module")
def server(tiny_chat_model, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    proc, url = start_server(tiny_chat_model, log, "--served-model-name", MODEL, "--api-key", KEY, "--max-model-len", "256",
                             "--max-body-mb", "0.5", "--top-n", "8", "--device-cache-gb", "0.01", "--host-cache-gb", "0.01")
    yield url
    assert stop(proc) == 0, open(log).read()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)


def metric(url: str, name: str, labels: str = "") -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(f"{name}{labels} "):
            return float(line.split()[-1])
    return 0.0


def wait_for(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


GREEDY = dict(temperature=0, extra_body={"ignore_eos": True})
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def test_completion_and_usage(client):
    r = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=5, **GREEDY)
    c = r.choices[0]
    assert r.object == "text_completion" and r.model == MODEL and r.id.startswith("cmpl-")
    assert c.finish_reason == "length" and c.text
    assert r.usage.completion_tokens == 5 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + 5


def test_chat_and_usage(client):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, **GREEDY)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 4 and r.usage.prompt_tokens > 10  # the chat template's tokens count


def test_chat_stream_equals_whole_answer(client):
    whole = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, **GREEDY)
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    tokens = lambda u: (u.prompt_tokens, u.completion_tokens, u.total_tokens)  # noqa: E731
    assert chunks[-1].choices == [] and tokens(chunks[-1].usage) == tokens(whole.usage)
    assert all(c.usage is None for c in chunks[:-1])


def test_completion_stream_and_stop_string(client):
    free = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=16, **GREEDY).choices[0].text
    stop = free[len(free) // 2:len(free) // 2 + 3]  # three characters from the middle: the answer must end before them
    want = free[:free.index(stop)]
    stopped = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=16, stop=[stop], **GREEDY)
    assert stopped.choices[0].text == want and stopped.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=16, stop=stop,
                                            stream=True, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks) == want  # nothing of the stop string leaked into the stream
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_a_repeated_prompt_is_served_from_the_prefix_cache(client, server):
    prompt = "The quick brown fox jumps over the lazy dog. " * 6  # several 16-token blocks
    hits = metric(server, "kcache_prefix_cache_hits_total")
    first = client.completions.create(model=MODEL, prompt=prompt + "First", max_tokens=6, **GREEDY)
    second = client.completions.create(model=MODEL, prompt=prompt + "Second", max_tokens=6, **GREEDY)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= 48 and cached % 16 == 0 and cached < second.usage.prompt_tokens  # whole blocks of the shared text
    assert metric(server, "kcache_prefix_cache_hits_total") - hits >= cached
    again = client.completions.create(model=MODEL, prompt=prompt + "First", max_tokens=6, **GREEDY)
    assert again.choices[0].text == first.choices[0].text  # served from the cache, the same greedy answer
    assert metric(server, "kcache_prefix_cache_blocks") > 0 and 0 < metric(server, "kcache_prefix_cache_hit_rate") <= 1


def test_models_health_metrics(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}  # no key needed for probes
    text = httpx.get(f"{server}/metrics").text
    for name in ("kcache_requests_total", "kcache_prompt_tokens_total", "kcache_generation_tokens_total",
                 "kcache_requests_waiting", "kcache_requests_running", "kcache_cache_blocks_used",
                 "kcache_device_cache_used_bytes", "kcache_host_cache_used_bytes", "kcache_attention_mass_kept_bucket",
                 "kcache_time_to_first_token_seconds_bucket", "kcache_time_per_output_token_seconds_bucket"):
        assert f"\n{name}" in text, name


def test_api_key(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.post(f"{server}/v1/completions", json={"model": MODEL, "prompt": "hi"}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    bad = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


OK = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
CHAT_OK = {"model": MODEL, "messages": CHAT, "max_tokens": 2}
BAD = {
    "malformed JSON": ("completions", b'{"model": "tiny", "prompt": ', 400, None),
    "not an object": ("completions", b"[1, 2]", 400, None),
    "unknown model": ("completions", {**OK, "model": "gpt-4"}, 404, "model"),
    "missing prompt": ("completions", {"model": MODEL}, 400, "prompt"),
    "missing messages": ("chat/completions", {"model": MODEL}, 400, "messages"),
    "missing model": ("chat/completions", {"messages": CHAT}, 400, "model"),
    "negative max_tokens": ("completions", {**OK, "max_tokens": -1}, 400, "max_tokens"),
    "temperature NaN": ("completions", b'{"model": "tiny", "prompt": "hi", "temperature": NaN}', 400, "temperature"),
    "negative temperature": ("chat/completions", {**CHAT_OK, "temperature": -0.5}, 400, "temperature"),
    "top_p 0": ("completions", {**OK, "top_p": 0}, 400, "top_p"),
    "top_p above 1": ("chat/completions", {**CHAT_OK, "top_p": 1.5}, 400, "top_p"),
    "prompt longer than context": ("completions", {**OK, "prompt": "word " * 300}, 400, "prompt"),
    "max_tokens past context": ("completions", {**OK, "max_tokens": 1000}, 400, "max_tokens"),
    "token id outside vocab": ("completions", {**OK, "prompt": [10**7]}, 400, None),
    "n > 1": ("chat/completions", {**CHAT_OK, "n": 2}, 400, "n"),
    "image content": ("chat/completions", {**CHAT_OK, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "messages.0.content"),
    "other kcache settings": ("completions", {**OK, "kcache": {"top_n": 32}}, 400, "kcache"),
    "bad kcache field": ("completions", {**OK, "kcache": {"top_m": 8}}, 400, "kcache"),
    "oversized body": ("completions", {**OK, "prompt": "x" * (1 << 20)}, 413, None),
    # valid JSON (json.dumps escapes it as \\ud83d) that the tokenizer refuses
    "lone surrogate in a chat message": ("chat/completions", {**CHAT_OK, "messages": [{"role": "user", "content": "\ud83d hi"}]},
                                         400, "messages"),
    "lone surrogate in a prompt": ("completions", {**OK, "prompt": "\ud83d hi"}, 400, "prompt"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_a_clear_4xx(server, case):
    path, body, status, param = BAD[case]
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(f"{server}/v1/{path}", content=body if isinstance(body, bytes) else json.dumps(body), headers=headers)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and error["message"]
    assert httpx.get(f"{server}/health").status_code == 200


def test_client_sees_errors_matching_kcache_and_nulls_are_accepted(client):
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=-3)
    with pytest.raises(openai.BadRequestError, match="per server, not per request"):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=2, extra_body={"kcache": {"top_n": 32}})
    r = client.completions.create(model=MODEL, prompt="hi", max_tokens=2, temperature=None,  # null: the default
                                  extra_body={"kcache": {"top_n": 8}})
    assert r.usage.completion_tokens >= 1


def test_disconnect_mid_stream_frees_blocks(client, server):
    aborted = metric(server, "kcache_requests_total", '{status="abort"}')
    stream = client.completions.create(model=MODEL, prompt="Tell me a long story", max_tokens=200, stream=True, **GREEDY)
    for _ in range(3):
        next(stream)
    assert metric(server, "kcache_cache_blocks_used") > 0
    stream.close()
    wait_for(lambda: metric(server, "kcache_cache_blocks_used") == 0, timeout=5)
    assert metric(server, "kcache_requests_total", '{status="abort"}') == aborted + 1
    assert metric(server, "kcache_requests_running") == 0


def test_disconnect_while_waiting_for_a_whole_answer_frees_blocks(server):
    aborted = metric(server, "kcache_requests_total", '{status="abort"}')
    # The client gives up and closes the connection: 200 tokens take this tiny model about 1 s on a 2-core CPU (and
    # took a whole second's timeout at times), so it leaves after 0.2 s.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server}/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=0.2,
                   json={"model": MODEL, "prompt": "Tell me a long story", "max_tokens": 200, "ignore_eos": True})
    wait_for(lambda: metric(server, "kcache_cache_blocks_used") == 0, timeout=5)
    assert metric(server, "kcache_requests_total", '{status="abort"}') == aborted + 1


def test_load_32_concurrent_streams(server):
    """200 streamed requests, 32 at a time: every one completes, and the cache is empty afterwards."""
    async def main():
        aclient = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=300)
        gate = asyncio.Semaphore(32)

        async def one(i):
            async with gate:
                stream = await aclient.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": f"request {i}"}], max_tokens=1 + i % 3,
                    stream=True, stream_options={"include_usage": True}, **GREEDY)
                chunks = [c async for c in stream]
                assert chunks[-1].usage.completion_tokens == 1 + i % 3
                return [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]

        results = await asyncio.gather(*(one(i) for i in range(200)), return_exceptions=True)
        await aclient.close()
        return results

    before = metric(server, "kcache_requests_total", '{status="length"}')
    results = asyncio.run(main())
    failures = [r for r in results if isinstance(r, BaseException)]
    assert not failures, failures[:3]
    assert all(r == ["length"] for r in results)
    assert metric(server, "kcache_requests_total", '{status="length"}') == before + 200
    for gauge in ("kcache_cache_blocks_used", "kcache_device_cache_used_bytes", "kcache_host_cache_used_bytes",
                  "kcache_requests_running", "kcache_requests_waiting"):
        assert metric(server, gauge) == 0, gauge


def test_sigterm_stops_accepting_aborts_in_flight_and_exits_0(tiny_chat_model, tmp_path):
    proc, url = start_server(tiny_chat_model, tmp_path / "server.log", "--shutdown-grace", "2", "--device-cache-gb", "0.01",
                             "--host-cache-gb", "0.01")
    with httpx.stream("POST", f"{url}/v1/completions", timeout=60, json={
            "model": str(tiny_chat_model), "prompt": "hi", "max_tokens": 1000, "stream": True, "ignore_eos": True}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: _refused(url), timeout=5)  # new connections are refused during the grace period
        events = [line for line in lines if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert "shut down" in json.loads(events[-2][6:])["error"]["message"]  # 1000 tokens take longer than the grace
    assert proc.wait(timeout=30) == 0, (tmp_path / "server.log").read_text()


def _refused(url: str) -> bool:
    """No new request is served: the connection is refused, or (while the listening socket closes) accepted by the
    kernel's backlog and then dropped without a response."""
    try:
        httpx.get(f"{url}/health", timeout=1)
        return False
    except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError):
        return True


# ---- AsyncEngine in-process: a failing step, shutdown ----------------------------------------------------------------


@pytest.fixture(scope="module")
def core(tiny_chat_model):
    from kcache.config import EngineConfig
    from kcache.engine.llm_engine import LLMEngine

    return LLMEngine(EngineConfig(model=str(tiny_chat_model), device="cpu", max_model_len=256,
                                  device_cache_bytes=1 << 23, host_cache_bytes=1 << 23))


def test_engine_error_fails_its_requests_clearly_then_serves_again(core, monkeypatch):
    from kcache.config import SamplingParams
    from kcache.engine.async_engine import AsyncEngine, EngineError

    real_step, calls = core.step, []

    def flaky_step():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("device lost")
        return real_step()

    monkeypatch.setattr(core, "step", flaky_step)
    params = SamplingParams(max_tokens=5, ignore_eos=True)

    async def main():
        engine = AsyncEngine(core)
        with pytest.raises(EngineError, match="device lost"):
            async for _ in engine.generate("hello", params):
                pass
        outs = [o async for o in engine.generate("hello", params)]
        await engine.shutdown()
        return outs, engine

    outs, engine = asyncio.run(main())
    assert outs[-1].finished and len(outs[-1].token_ids) == 5
    assert engine.stats.step_errors == 1 and core.blocks.num_used == 0


def test_engine_shutdown_fails_leftovers_and_refuses_new_requests(core):
    from kcache.config import SamplingParams
    from kcache.engine.async_engine import AsyncEngine, EngineShutdownError

    async def main():
        engine = AsyncEngine(core)
        stream = engine.generate("hello", SamplingParams(max_tokens=200, ignore_eos=True))
        await anext(stream)
        engine.begin_shutdown(0.0)
        with pytest.raises(EngineShutdownError, match="shut down before this request finished"):
            async for _ in stream:
                pass
        await engine.shutdown()
        with pytest.raises(EngineShutdownError):
            await anext(engine.generate("hello", SamplingParams()))

    asyncio.run(main())
    assert core.blocks.num_used == 0


@pytest.mark.slow
def test_bundled_model_answers_paris(tmp_path):
    proc, url = start_server("smollm2", tmp_path / "server.log", "--top-n", "32")
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
        r = client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=32, temperature=0)
        assert "Paris" in r.choices[0].message.content
    finally:
        assert stop(proc) == 0
