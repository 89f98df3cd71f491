"""``leantune serve``: one base model, many adapters, an OpenAI-compatible HTTP API.

Endpoints (Starlette on uvicorn; errors are OpenAI-style ``{"error": {...}}`` objects):

    GET  /v1/models                 the base and every adapter
    POST /v1/completions            {"model", "prompt", "max_tokens", "temperature", "top_p",
    POST /v1/chat/completions        "stop", "seed", "stream"} / {"model", "messages", ...}
    GET  /v1/adapters               each adapter with its version, path and manifest hash
    POST /v1/adapters               {"name", "path"}: load, or a new version under a name
    DELETE /v1/adapters/{name}      unload
    GET  /health, GET /metrics      liveness; Prometheus text

The engine (``Engine``) runs one thread that owns the model. Continuous batching: every
decode step runs all live sequences as one batch, each row with its own adapter (the
per-row selection of ``peft_core.adapters.adapter_rows``) and its own slot of the KV cache
(``SlotCache``: rows of different lengths, each masked to its own keys). A new request is
prefilled alone and joins between decode steps; a finished one leaves at once and the last
row moves into its slot. Adapter versions are separate adapters on the model
(``name__vN``): a swap points the name at the new version, requests in flight keep the one
they started with, and an old version is dropped when its last request ends.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from leantune.base import LeantuneError, ModelError, UsageError, VERSION

MAX_BODY = 1 << 20  # bytes of a request body


class APIError(Exception):
    """An OpenAI-style error: HTTP status, message, type and the offending parameter."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param=None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}


# -- the KV cache of the decode batch ------------------------------------------------------
class SlotCache:
    """Keys and values of ``slots`` rows, each with its own length: (slots, n_kv, max_len, hd)
    per layer. Rows 0 .. B-1 are the live sequences (kept packed); a decode step writes each
    row's new key at its own length and the mask hides every key past it."""

    def __init__(self, cfg, slots: int, max_len: int, dtype):
        shape = (slots, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.max_len = max_len
        self.lens = torch.zeros(slots, dtype=torch.long)
        self.rows = 0  # live rows this step
        self.span = 0  # keys visible this step: max(lens) + 1

    # the model's forward adds the step's token count; lengths are kept per row instead
    length = property(lambda self: 0, lambda self, value: None)

    def update(self, layer: int, k, v):
        B = k.shape[0]  # k, v: (B, n_kv, 1, hd)
        idx = torch.arange(B)
        self.k[layer][idx, :, self.lens[:B]] = k[:, :, 0]
        self.v[layer][idx, :, self.lens[:B]] = v[:, :, 0]
        return self.k[layer][:B, :, :self.span], self.v[layer][:B, :, :self.span]

    def put(self, row: int, kv, n: int):
        """Copy a prefilled single-row KVCache of ``n`` positions into ``row``."""
        for layer in range(len(self.k)):
            self.k[layer][row, :, :n] = kv.k[layer][0, :, :n]
            self.v[layer][row, :, :n] = kv.v[layer][0, :, :n]
        self.lens[row] = n

    def move(self, src: int, dst: int):
        n = int(self.lens[src])
        for layer in range(len(self.k)):
            self.k[layer][dst, :, :n] = self.k[layer][src, :, :n]
            self.v[layer][dst, :, :n] = self.v[layer][src, :, :n]
        self.lens[dst] = n


# -- requests ------------------------------------------------------------------------------
@dataclass
class Sequence:
    prompt: list
    adapter: str  # the adapter version on the model, or BASE
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list = field(default_factory=list)
    emit: object = None  # callable(event) called from the engine thread
    tokens: list = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    cancelled: bool = False
    generator: object = None
    t_submit: float = field(default_factory=time.perf_counter)
    t_first: float | None = None
    decoder: object = None


class Engine:
    """Owns the model: admits requests, runs the decode batch, streams tokens back."""

    def __init__(self, model, tokenizer, *, base_name: str, adapter_root: Path | None = None,
                 max_batch: int = 8, max_tokens: int = 512, max_queue: int = 64, context: int | None = None):
        from leantune.peft_core.adapters import BASE

        self.model, self.tok, self.base_name = model.eval(), tokenizer, base_name
        self.BASE = BASE
        self.adapter_root = adapter_root.resolve() if adapter_root else None
        self.max_batch, self.max_tokens = max_batch, max_tokens
        cfg = model.config
        self.context = min(context or cfg.max_position_embeddings, cfg.max_position_embeddings)
        dtype = model.model.embed_tokens.weight.dtype
        self.cache = SlotCache(cfg, max_batch, self.context, dtype)
        self.pending: queue.Queue = queue.Queue(maxsize=max_queue)
        self.live: list[Sequence] = []
        self.adapters: dict[str, dict] = {}  # public name -> {"version", "path", "sha256", "internal"}
        self.refs: dict[str, int] = {}  # internal adapter -> live sequences using it
        self.retired: set[str] = set()  # replaced or deleted versions still in use
        self.lock = threading.RLock()  # the model: adapter loads vs decode steps
        self.wake = threading.Event()
        self.running = True
        self.metrics = {"requests": 0, "tokens_in": 0, "tokens_out": 0, "ttft_sum": 0.0, "ttft_count": 0,
                        "batch_sum": 0, "steps": 0, "errors": 0, "decode_s": 0.0, "prefill_s": 0.0,
                        "prefills": 0}
        self.thread = threading.Thread(target=self._loop, name="leantune-engine", daemon=True)
        self.thread.start()

    # adapters ----------------------------------------------------------------------------
    def check_path(self, path: str) -> Path:
        p = Path(path).resolve()
        if self.adapter_root is None:
            raise APIError(403, "adapter loading is off: start the server with --adapter-root", param="path")
        if p != self.adapter_root and self.adapter_root not in p.parents:
            raise APIError(403, f"{path} is not under the adapter root {self.adapter_root}", param="path")
        return p

    def load(self, name: str, path) -> dict:
        from leantune.peft_core.adapters import load_adapter

        if not isinstance(name, str) or not name or "." in name or "__" in name or name == self.base_name:
            raise APIError(400, "adapter name must be a non-empty string without '.' or '__', "
                                "other than the base's", param="name")
        path = Path(path)
        weights = path / "adapter_model.safetensors"
        with self.lock:
            version = self.adapters.get(name, {}).get("version", 0) + 1
            internal = f"{name}__v{version}"
            try:
                load_adapter(self.model, path, internal, activate=False)
            except LeantuneError as e:
                raise APIError(400, str(e), param="path") from None
            digest = hashlib.sha256(weights.read_bytes() + (path / "adapter_config.json").read_bytes()).hexdigest()
            old = self.adapters.get(name)
            self.adapters[name] = {"version": version, "path": str(path), "sha256": digest, "internal": internal}
            if old:
                self._retire(old["internal"])
            return self.describe(name)

    def unload(self, name: str):
        with self.lock:
            if name not in self.adapters:
                raise APIError(404, f"no adapter {name!r}", param="name")
            self._retire(self.adapters.pop(name)["internal"])

    def _retire(self, internal: str):
        """Delete a version now if no request uses it, else when its last one ends. Locked."""
        from leantune.peft_core.adapters import delete_adapter

        if self.refs.get(internal, 0):
            self.retired.add(internal)
        else:
            delete_adapter(self.model, internal)

    def describe(self, name: str) -> dict:
        a = self.adapters[name]
        return {"name": name, "version": a["version"], "path": a["path"], "sha256": a["sha256"]}

    def resolve(self, model: str) -> str:
        if model in (self.base_name, "base"):
            return self.BASE
        with self.lock:
            if model in self.adapters:
                return self.adapters[model]["internal"]
        raise APIError(404, f"the model {model!r} does not exist (GET /v1/models lists them)",
                       param="model", kind="not_found_error")

    # requests ----------------------------------------------------------------------------
    def submit(self, seq: Sequence):
        if len(seq.prompt) + seq.max_tokens > self.context:
            raise APIError(400, f"the prompt ({len(seq.prompt)} tokens) plus max_tokens ({seq.max_tokens}) "
                                f"exceed the context of {self.context} tokens", param="max_tokens")
        with self.lock:  # the version is held from now on, even if swapped before admission
            internal = seq.adapter
            if internal != self.BASE:
                self.refs[internal] = self.refs.get(internal, 0) + 1
        try:
            self.pending.put_nowait(seq)
        except queue.Full:
            self._release(seq)
            raise APIError(429, "the queue is full; retry later", kind="rate_limit_error") from None
        self.metrics["requests"] += 1
        self.metrics["tokens_in"] += len(seq.prompt)
        self.wake.set()

    def _release(self, seq: Sequence):
        from leantune.peft_core.adapters import delete_adapter

        with self.lock:
            if seq.adapter == self.BASE:
                return
            self.refs[seq.adapter] -= 1
            if not self.refs[seq.adapter] and seq.adapter in self.retired:
                self.retired.discard(seq.adapter)
                delete_adapter(self.model, seq.adapter)

    def queue_depth(self) -> int:
        return self.pending.qsize()

    # the engine thread -------------------------------------------------------------------
    def _loop(self):
        while self.running:
            try:
                self._admit()
                if self.live:
                    self._step()
                else:
                    self.wake.wait(0.05)
                    self.wake.clear()
            except Exception as e:  # a broken step fails its requests, never the server
                self.metrics["errors"] += 1
                for seq in self.live:
                    self._finish(seq, "error", error=f"{type(e).__name__}: {e}")
                self.live = []

    @torch.no_grad()
    def _admit(self):
        from leantune.peft_core.adapters import adapter_rows
        from leantune.peft_core.model import KVCache

        while len(self.live) < self.max_batch:
            try:
                seq = self.pending.get_nowait()
            except queue.Empty:
                break
            if seq.cancelled:
                self._release(seq)
                continue
            t0 = time.perf_counter()
            n = len(seq.prompt)
            kv = KVCache(self.model.config, 1, n, self.cache.k[0].device, self.cache.k[0].dtype)
            ids = torch.tensor([seq.prompt])
            with self.lock, adapter_rows(self.model, [seq.adapter]):
                hidden = self.model.model(ids, torch.arange(n)[None], None, kv)
                logits = self.model.lm_head(hidden[:, -1])
            row = len(self.live)
            self.cache.put(row, kv, n)
            self.metrics["prefill_s"] += time.perf_counter() - t0
            self.metrics["prefills"] += 1
            if seq.temperature > 0:
                seq.generator = torch.Generator().manual_seed(0 if seq.seed is None else seq.seed)
            self.live.append(seq)
            self._emit_token(seq, logits[0])
        self._compact()  # a request done at its first token leaves before the next step

    @torch.no_grad()
    def _step(self):
        from leantune.peft_core.adapters import adapter_rows

        t0 = time.perf_counter()
        B = len(self.live)
        lens = self.cache.lens[:B]
        self.cache.span = int(lens.max()) + 1
        ids = torch.tensor([[s.tokens[-1]] for s in self.live])
        positions = lens[:, None].clone()  # (B, 1): each row's next position
        mask = (torch.arange(self.cache.span)[None, :] <= lens[:, None])[:, None, None, :]  # (B, 1, 1, S)
        with self.lock, adapter_rows(self.model, [s.adapter for s in self.live]):
            logits = self.model(ids, positions, mask, self.cache)[:, -1]  # (B, V)
        self.cache.lens[:B] += 1
        self.metrics["steps"] += 1
        self.metrics["batch_sum"] += B
        self.metrics["decode_s"] += time.perf_counter() - t0
        for seq, row in zip(list(self.live), logits):
            self._emit_token(seq, row)
        self._compact()

    def _emit_token(self, seq: Sequence, logits):
        from leantune.peft_core.generate import sample_next

        if seq.cancelled:
            seq.finish_reason = "cancelled"
            return
        token = int(sample_next(logits[None].float(), seq.temperature, seq.top_p, seq.generator)[0])
        seq.tokens.append(token)
        self.metrics["tokens_out"] += 1
        if seq.t_first is None:
            seq.t_first = time.perf_counter()
            self.metrics["ttft_sum"] += seq.t_first - seq.t_submit
            self.metrics["ttft_count"] += 1
        if token in self.tok.eos_token_ids:
            seq.finish_reason = "stop"
            piece = seq.decoder.flush()
            seq.text += piece
            if piece:
                seq.emit({"text": piece})
            return
        piece = seq.decoder.push(token)
        text = seq.text + piece
        cut = min((i for i in (text.find(s) for s in seq.stop) if i >= 0), default=-1)
        if cut >= 0:
            piece, seq.finish_reason = piece[:max(0, cut - len(seq.text))], "stop"
            text = text[:cut]
        elif len(seq.tokens) >= seq.max_tokens:
            piece += seq.decoder.flush()
            text = seq.text + piece
            seq.finish_reason = "length"
        seq.text = text
        if piece:
            seq.emit({"text": piece})

    def _compact(self):
        """Drop finished rows; the last live row moves into each freed slot."""
        i = 0
        while i < len(self.live):
            seq = self.live[i]
            if seq.finish_reason is None and int(self.cache.lens[i]) + 1 < self.context:
                i += 1
                continue
            last = len(self.live) - 1
            if i != last:
                self.cache.move(last, i)
            self.live[i] = self.live[last]
            self.live.pop()
            self._finish(seq, seq.finish_reason or "length")

    def _finish(self, seq: Sequence, reason: str, error: str | None = None):
        seq.finish_reason = reason
        self._release(seq)
        seq.emit({"done": True, "finish_reason": reason, "error": error,
                  "usage": {"prompt_tokens": len(seq.prompt), "completion_tokens": len(seq.tokens),
                            "total_tokens": len(seq.prompt) + len(seq.tokens)}})

    def close(self):
        self.running = False
        self.wake.set()
        self.thread.join(timeout=10)

    def prometheus(self) -> str:
        m = self.metrics
        lines = [f"leantune_requests_total {m['requests']}", f"leantune_tokens_in_total {m['tokens_in']}",
                 f"leantune_tokens_out_total {m['tokens_out']}", f"leantune_queue_depth {self.queue_depth()}",
                 f"leantune_live_sequences {len(self.live)}", f"leantune_engine_errors_total {m['errors']}",
                 f"leantune_time_to_first_token_seconds_sum {m['ttft_sum']:.6f}",
                 f"leantune_time_to_first_token_seconds_count {m['ttft_count']}",
                 f"leantune_batch_size_sum {m['batch_sum']}", f"leantune_decode_steps_total {m['steps']}",
                 f"leantune_decode_seconds_total {m['decode_s']:.6f}",
                 f"leantune_prefill_seconds_total {m['prefill_s']:.6f}", f"leantune_prefills_total {m['prefills']}",
                 f"leantune_model_threads {torch.get_num_threads()}"]
        return "\n".join(lines) + "\n"


# -- the HTTP layer ------------------------------------------------------------------------
def _number(body: dict, key: str, default, lo, hi, kind=float):
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise APIError(400, f"{key} must be a {'integer' if kind is int else 'number'}", param=key)
    if not lo <= value <= hi:
        raise APIError(400, f"{key} must be in [{lo}, {hi}], got {value}", param=key)
    return kind(value)


def build_app(engine: Engine, api_key: str | None = None):
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.routing import Route

    def error(e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    def guarded(handler):
        async def endpoint(request):
            try:
                if api_key is not None:
                    given = request.headers.get("authorization", "")
                    if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                        raise APIError(401, "invalid or missing API key", kind="authentication_error")
                return await handler(request)
            except APIError as e:
                return error(e)
            except Exception as e:  # one line, never a traceback to the client
                return error(APIError(500, f"internal error: {type(e).__name__}: {e}", kind="server_error"))
        return endpoint

    async def read_json(request) -> dict:
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > MAX_BODY):
            raise APIError(413, f"the request body is over {MAX_BODY} bytes")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY:
                raise APIError(413, f"the request body is over {MAX_BODY} bytes")
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):
            raise APIError(400, "the body is not valid JSON") from None
        if not isinstance(data, dict):
            raise APIError(400, "the body must be a JSON object")
        return data

    def parse(body: dict, chat: bool) -> tuple[Sequence, str]:
        model = body.get("model")
        if not isinstance(model, str):
            raise APIError(400, "model is required", param="model")
        if body.get("n", 1) != 1:
            raise APIError(400, "only n = 1 is supported", param="n")
        if chat:
            msgs = body.get("messages")
            if not isinstance(msgs, list) or not msgs or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in msgs):
                raise APIError(400, "messages must be a non-empty list of {role, content} strings", param="messages")
            try:
                text = engine.tok.apply_chat_template(msgs, add_generation_prompt=True)
            except LeantuneError as e:
                raise APIError(400, f"chat template: {e}", param="messages") from None
            ids = engine.tok.encode(text)
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if not isinstance(prompt, str):
                raise APIError(400, "prompt must be a string", param="prompt")
            ids = engine.tok.encode(prompt, add_special_tokens=True)
        if not ids:
            raise APIError(400, "the prompt is empty after tokenization", param="prompt")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
            raise APIError(400, "stop must be a string or a list of up to 4 strings", param="stop")
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise APIError(400, "seed must be an integer", param="seed")
        seq = Sequence(prompt=ids, adapter=engine.resolve(model),
                       max_tokens=_number(body, "max_tokens", min(16 if not chat else 256, engine.max_tokens),
                                          1, engine.max_tokens, int),
                       temperature=_number(body, "temperature", 0.0, 0.0, 2.0),
                       top_p=_number(body, "top_p", 1.0, 1e-9, 1.0), seed=seed, stop=stop)
        return seq, model

    def completion(chat: bool):
        async def handler(request):
            body = await read_json(request)
            seq, model = parse(body, chat)
            from leantune.peft_core.tokenizer import StreamDecoder

            seq.decoder = StreamDecoder(engine.tok, skip_special_tokens=True)
            loop = asyncio.get_running_loop()
            events: asyncio.Queue = asyncio.Queue()

            def emit(ev):  # from the engine thread
                try:
                    loop.call_soon_threadsafe(events.put_nowait, ev)
                except RuntimeError:  # the client's event loop is gone
                    seq.cancelled = True

            seq.emit = emit
            engine.submit(seq)
            rid = f"{'chatcmpl' if chat else 'cmpl'}-{os.urandom(12).hex()}"
            created = int(time.time())
            kind = "chat.completion" if chat else "text_completion"

            def chunk(text=None, finish=None, first=False):
                if chat:
                    delta = ({"role": "assistant"} if first else {}) | ({"content": text} if text else {})
                    choice = {"index": 0, "delta": delta, "finish_reason": finish}
                else:
                    choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
                return {"id": rid, "object": kind + (".chunk" if chat else ""), "created": created,
                        "model": model, "choices": [choice]}

            if body.get("stream"):
                async def sse():
                    try:
                        if chat:
                            yield f"data: {json.dumps(chunk(first=True))}\n\n"
                        while True:
                            ev = await events.get()
                            if ev.get("done"):
                                last = chunk(finish=ev["finish_reason"])
                                last["usage"] = ev["usage"]
                                yield f"data: {json.dumps(last)}\n\n"
                                yield "data: [DONE]\n\n"
                                return
                            yield f"data: {json.dumps(chunk(ev['text']))}\n\n"
                    finally:
                        seq.cancelled = True  # a client gone mid-stream frees its row
                return StreamingResponse(sse(), media_type="text/event-stream")

            try:
                while True:
                    ev = await events.get()
                    if ev.get("done"):
                        break
            except asyncio.CancelledError:
                seq.cancelled = True
                raise
            if ev.get("error"):
                raise APIError(500, f"generation failed: {ev['error']}", kind="server_error")
            message = {"role": "assistant", "content": seq.text}
            choice = ({"index": 0, "message": message, "finish_reason": ev["finish_reason"]} if chat else
                      {"index": 0, "text": seq.text, "finish_reason": ev["finish_reason"], "logprobs": None})
            return JSONResponse({"id": rid, "object": kind, "created": created, "model": model,
                                 "choices": [choice], "usage": ev["usage"]})
        return handler

    async def models(request):
        data = [{"id": engine.base_name, "object": "model", "owned_by": "leantune"}]
        with engine.lock:
            data += [{"id": n, "object": "model", "owned_by": "leantune", "parent": engine.base_name}
                     for n in sorted(engine.adapters)]
        return JSONResponse({"object": "list", "data": data})

    async def adapters(request):
        if request.method == "GET":
            with engine.lock:
                return JSONResponse({"object": "list", "data": [engine.describe(n) for n in sorted(engine.adapters)]})
        body = await read_json(request)
        if not isinstance(body.get("path"), str):
            raise APIError(400, "path is required", param="path")
        path = engine.check_path(body["path"])
        result = await asyncio.get_running_loop().run_in_executor(None, engine.load, body.get("name"), path)
        return JSONResponse(result)

    async def delete(request):
        engine.unload(request.path_params["name"])
        return JSONResponse({"deleted": request.path_params["name"]})

    async def health(request):
        return JSONResponse({"status": "ok", "version": VERSION})

    async def metrics(request):
        return PlainTextResponse(engine.prometheus())

    routes = [Route("/v1/models", guarded(models), methods=["GET"]),
              Route("/v1/completions", guarded(completion(False)), methods=["POST"]),
              Route("/v1/chat/completions", guarded(completion(True)), methods=["POST"]),
              Route("/v1/adapters", guarded(adapters), methods=["GET", "POST"]),
              Route("/v1/adapters/{name}", guarded(delete), methods=["DELETE"]),
              Route("/health", health, methods=["GET"]),
              Route("/metrics", guarded(metrics), methods=["GET"])]

    async def not_found(request, exc):
        return error(APIError(getattr(exc, "status_code", 404), f"{request.method} {request.url.path}: "
                              f"{getattr(exc, 'detail', 'not found')}", kind="not_found_error"))

    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})


def build_engine(model_dir, adapters=(), adapter_root=None, quant: str = "none", max_batch: int = 8,
                 max_tokens: int = 512) -> Engine:
    """Load the base (dense fp32, or 4-bit) and the named adapters."""
    from leantune.peft_core.checkpoint import load_model
    from leantune.peft_core.tokenizer import Tokenizer

    if max_batch < 1 or max_tokens < 1:
        raise UsageError("--max-batch/--max-tokens", "must be at least 1")
    tok = Tokenizer.from_dir(model_dir)
    model = load_model(model_dir, dtype=torch.float32, quant=None if quant == "none" else quant)
    engine = Engine(model, tok, base_name=Path(model_dir).resolve().name,
                    adapter_root=Path(adapter_root) if adapter_root else None,
                    max_batch=max_batch, max_tokens=max_tokens)
    for spec in adapters:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise UsageError("--adapter", f"{spec!r}: expected NAME=DIR")
        try:
            engine.load(name, path)
        except APIError as e:
            raise ModelError(path, e.message) from None
    return engine


def add_serve_parser(sub):
    s = sub.add_parser("serve", help="serve the base and adapters behind an OpenAI-compatible API")
    s.add_argument("model_dir", help="the base model folder")
    s.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="an adapter to serve as model NAME (repeatable)")
    s.add_argument("--adapter-root", help="POST /v1/adapters may load folders under this one only "
                                          "(unset: loading at run time is off)")
    s.add_argument("--quant", default="none", choices=["none", "nf4", "fp4"], help="the base in 4 bits")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on")
    s.add_argument("--port", type=int, default=8000, help="port")
    s.add_argument("--api-key-env", metavar="VAR", help="require `Authorization: Bearer $VAR` (unset: no key)")
    s.add_argument("--max-batch", type=int, default=8, help="sequences decoded together")
    s.add_argument("--max-tokens", type=int, default=512, help="the cap on max_tokens")
    s.add_argument("--threads", type=int, default=None,
                   help="torch threads of the model (default: the usable cores less one, at least 1)")
    s.set_defaults(func=cmd_serve)


def default_threads() -> int:
    """The model's torch threads when serving: the usable cores less one, at least 1. Decoding
    is bound by memory bandwidth, so one thread fewer costs the decode step little, while the
    HTTP layer (the event loop that streams every token) and clients on the same box keep a
    core instead of preempting a thread the others wait for at each op (vLLM's CPU backend
    also leaves a core to its frontend). Measured on 2 cores (AMD EPYC, 2026-12-03): a decode
    step of 8 rows 123 ms with one thread against 133 ms with two, alone; under load (8
    streaming clients on the same box) 133 ms against 180 ms."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, cores - 1)


def cmd_serve(args):
    try:
        import uvicorn
    except ImportError:
        raise UsageError("serve", "needs the serve extra: pip install 'leantune[serve]'") from None
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise UsageError("--api-key-env", f"the environment variable {args.api_key_env} is empty or unset")
    threads = default_threads() if args.threads is None else args.threads
    if threads < 1:
        raise UsageError("--threads", f"must be at least 1, got {threads}")
    torch.set_num_threads(threads)
    engine = build_engine(args.model_dir, args.adapter, args.adapter_root, args.quant, args.max_batch, args.max_tokens)
    print(f"serving {engine.base_name} and {len(engine.adapters)} adapter(s) on http://{args.host}:{args.port} "
          f"({threads} model thread{'s' if threads > 1 else ''})", flush=True)
    try:
        uvicorn.run(build_app(engine, api_key), host=args.host, port=args.port, log_level="warning")
    finally:
        engine.close()
