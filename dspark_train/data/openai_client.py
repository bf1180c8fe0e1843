"""A small OpenAI-compatible chat client (vLLM, SGLang) for `dspark data --server`; standard library only.

One urllib request per call (generation time dwarfs the connection). Trouble that passes (429, 5xx, a dropped
connection, a timeout) is retried with exponential backoff and jitter, all tries within data.server.deadline; what
does not pass comes back at once as a `ServerError`, `fatal` when no later request can do better (server gone,
overloaded, refusing the key, answering as another model), else the one prompt's failure. `Client.close` stops the
run's requests: none starts, and those in flight have their sockets shut down, so a fatal error or Ctrl-C ends the
process within seconds, not after data.server.timeout per request in flight. The API key is read from the
environment variable the recipe names and only ever sent as the Authorization header: never printed, never written.
"""
from __future__ import annotations

import http.client
import json
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Optional

from ..config import Recipe, RecipeError, ServerConfig

RETRY_STATUS = (408, 429, 500, 502, 503, 504)
FATAL_STATUS = (401, 403, 404, 429)  # every other request would get the same answer (429: after the retries)


class ServerError(Exception):
    """A request the server did not answer usefully. `fatal`: stop the run (rerun to resume); else the prompt's."""

    def __init__(self, message: str, fatal: bool):
        super().__init__(message)
        self.fatal = fatal


class Stopped(Exception):
    """The run is stopping (another request gave up): start nothing new."""


@dataclass
class Completion:
    text: str
    finished: bool  # finish_reason "stop"; "length" = cut at max_tokens
    token_ids: Optional[list[int]]  # the generated ids (vLLM's `return_token_ids`); None when the server sends none
    n_tokens: int  # usage.completion_tokens


def _message(raw: bytes) -> str:
    """The error text of an OpenAI-style error body ({"error": {"message"}} or vLLM's older {"message"})."""
    try:
        j = json.loads(raw)
        msg = (j.get("error") or {}).get("message") if isinstance(j.get("error"), dict) else j.get("message")
    except (ValueError, AttributeError):
        msg = None
    return " ".join(str(msg or raw[:200].decode("utf-8", "replace")).split())


def _tracked(base: type, client: "Client") -> type:
    """`base` (HTTPConnection or HTTPSConnection) that leaves its socket with `client` while its thread's request is
    in flight, and refuses to connect once the client is closed."""
    class Tracked(base):
        def connect(self):
            super().connect()
            with client._lock:
                if client.stop.is_set():
                    self.sock.close()
                    raise Stopped
                client._sockets[threading.get_ident()] = self.sock  # one request in flight per thread
    return Tracked


class _HTTP(urllib.request.HTTPHandler):
    def __init__(self, conn):
        super().__init__()
        self.conn = conn

    def http_open(self, req):
        return self.do_open(self.conn, req)


class _HTTPS(urllib.request.HTTPSHandler):
    def __init__(self, conn):
        super().__init__()
        self.conn = conn

    def https_open(self, req):
        return self.do_open(self.conn, req, context=self._context)


@dataclass
class Client:
    base: str  # http://host:port, no /v1
    timeout: float
    max_retries: int
    backoff: float
    headers: dict = field(repr=False)  # carries the API key: kept out of repr
    deadline: float = ServerConfig.deadline
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self):
        self._lock, self._sockets = threading.Lock(), {}
        self._opener = urllib.request.build_opener(_HTTP(_tracked(http.client.HTTPConnection, self)),
                                                   _HTTPS(_tracked(http.client.HTTPSConnection, self)))

    @classmethod
    def from_config(cls, cfg: ServerConfig, src: str) -> "Client":
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if cfg.api_key_env:
            key = os.environ.get(cfg.api_key_env)
            if not key:
                raise RecipeError(f"{src}: data.server.api_key_env: environment variable {cfg.api_key_env} is not set")
            headers["Authorization"] = f"Bearer {key}"
        base = cfg.url.rstrip("/").removesuffix("/v1")
        return cls(base, cfg.timeout, cfg.max_retries, cfg.backoff, headers, cfg.deadline)

    def close(self) -> None:
        """Stop: no request or retry starts any more, and the requests in flight are cut (their threads get a
        connection error at once instead of waiting up to data.server.timeout for an answer nobody will read)."""
        with self._lock:
            self.stop.set()
            sockets = list(self._sockets.values())
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:  # already closed: that request is over
                pass

    def _once(self, path: str, body: Optional[dict], timeout: float) -> tuple[int, bytes]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, headers=self.headers)
        try:
            try:
                with self._opener.open(req, timeout=timeout) as r:
                    return r.status, r.read()
            except urllib.error.HTTPError as e:
                return e.code, e.read()
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:  # refused, reset, cut mid-answer
            why = getattr(e, "reason", e)  # urllib wraps what the socket raised
            if isinstance(why, TimeoutError):
                limit = (f"within data.server.timeout={self.timeout:g}s" if timeout >= self.timeout else
                         f"before data.server.deadline={self.deadline:g}s")
                raise ServerError(f"no answer {limit}", fatal=True) from None
            raise ServerError(f"connection failed ({type(why).__name__}: {why})", fatal=True) from None
        finally:
            with self._lock:
                self._sockets.pop(threading.get_ident(), None)

    def call(self, path: str, body: Optional[dict] = None, retries: Optional[int] = None) -> dict:
        """GET `path` (POST `body`) → the JSON object answered; transient failures retried `retries` times
        (default max_retries), the n-th after backoff·2ⁿ⁻¹ seconds ×U(0.5, 1.5), at most a minute, every try and
        wait within `deadline` seconds of the first try."""
        retries = self.max_retries if retries is None else retries
        end = time.monotonic() + self.deadline
        for attempt in range(retries + 1):
            if self.stop.is_set():
                raise Stopped
            try:
                status, raw = self._once(path, body, min(self.timeout, max(end - time.monotonic(), 0.001)))
            except ServerError as e:
                if self.stop.is_set():  # cut by close(): nobody waits for this answer
                    raise Stopped from None
                err = e
            else:
                if status == 200:
                    try:
                        j = json.loads(raw)
                    except ValueError as e:
                        raise ServerError(f"malformed response: not JSON ({e})", fatal=False) from None
                    if not isinstance(j, dict):
                        raise ServerError("malformed response: not a JSON object", fatal=False)
                    return j
                err = ServerError(f"HTTP {status}: {_message(raw)}", fatal=status in FATAL_STATUS)
                if status not in RETRY_STATUS:
                    raise err
            left = end - time.monotonic()
            if attempt == retries or left <= 0:
                break
            self.stop.wait(min(min(60.0, self.backoff * 2 ** attempt) * random.uniform(0.5, 1.5), left))
            if time.monotonic() >= end:
                break
        tries, late = attempt + 1, time.monotonic() >= end and "deadline" not in str(err)
        if retries:
            err.args = (f"{err} (tried {tries} times" + (f"; data.server.deadline={self.deadline:g}s reached)" if late
                                                          else ")"),)
        raise err

    def chat(self, model: str, messages: list[dict], max_tokens: int, law: dict, seed: int, stop_token_ids: list[int],
             token_ids: bool = True) -> Completion:
        """One chat completion (`chat_body`). `token_ids` asks for the generated ids with vLLM's extension
        `return_token_ids` (→ choices[0].token_ids); a server without it ignores it or, if strict, refuses it
        (data.server.token_check=0 leaves it out). An answer from another model than `model` is fatal."""
        j = self.call("/v1/chat/completions", chat_body(model, messages, max_tokens, law, seed, stop_token_ids,
                                                        token_ids))
        try:
            choice = j["choices"][0]
            text, reason = choice["message"]["content"], choice["finish_reason"]
        except (KeyError, IndexError, TypeError):
            raise ServerError("malformed response: no choices[0].message.content / finish_reason", False) from None
        if "model" not in j:
            raise ServerError("malformed response: no model", fatal=False)
        if j["model"] != model:  # a router or an alias: not the target's answers, whatever it is
            raise ServerError(f"the answer comes from model {j['model']!r}, not {model!r} as asked; set "
                              "data.server.model to the name the server answers with for target.model (vLLM: the "
                              "first --served-model-name)", fatal=True)
        if not isinstance(text, str) or not text.strip():
            raise ServerError("malformed response: empty content", fatal=False)
        if reason not in ("stop", "length"):
            raise ServerError(f"malformed response: finish_reason {reason!r}", fatal=False)
        ids = choice.get("token_ids")
        if ids is not None and not (isinstance(ids, list) and all(type(i) is int for i in ids)):
            raise ServerError("malformed response: token_ids is not a list of ints", fatal=False)
        usage = j.get("usage") if isinstance(j.get("usage"), dict) else {}
        n = usage.get("completion_tokens")
        return Completion(text, reason == "stop", ids, n if type(n) is int else len(ids or ()))


def chat_body(model: str, messages: list[dict], max_tokens: int, law: dict, seed: int, stop_token_ids: list[int],
              token_ids: bool = True) -> dict:
    """The request of one chat completion rendered with the server's own chat template, sampled by `law` (the
    recipe's temperature, top_k, top_p: generate.sampling_law) and nothing else, stopping at `stop_token_ids`
    (chat.stop_token_ids: where the target's turn ends). top_k, min_p, repetition_penalty and stop_token_ids are
    sent explicitly (vLLM and SGLang extensions): left out, the server takes them from the model's
    generation_config, and then samples another law than the in-process path."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "seed": seed,
            "temperature": law["temperature"], "top_p": law["top_p"], "top_k": law["top_k"] or -1,  # -1: off
            "min_p": 0.0, "repetition_penalty": 1.0, "stop_token_ids": list(stop_token_ids)}
    return {**body, "return_token_ids": True} if token_ids else body


def connect(recipe: Recipe) -> tuple[Client, str]:
    """A client for data.server and the model name to ask for, checked against the server's /v1/models first
    (one try: an unreachable server or another model is one line, before any prompt is sent)."""
    cfg, src = recipe.data.server, recipe.source
    client = Client.from_config(cfg, src)
    try:
        listed = client.call("/v1/models", retries=0).get("data")
        served = [m["id"] for m in listed]
    except ServerError as e:
        raise RecipeError(f"{src}: data.server.url: {client.base}/v1/models: {e}; start the server or fix the "
                          "URL (or data.server.api_key_env)") from None
    except (KeyError, TypeError):
        raise RecipeError(f"{src}: data.server.url: {client.base}/v1/models is not an OpenAI model list") from None
    target = recipe.target.model
    wanted = cfg.model or (target if target and not target.startswith("pypi:") else None)
    if wanted is None and len(served) == 1:  # a pypi: or inline target: the server names it
        return client, served[0]
    if wanted not in served:
        listed = ", ".join(map(repr, served)) or "no model"
        raise RecipeError(f"{src}: data.server.model: {client.base} serves {listed}"
                          + (f", not {wanted!r}" if wanted else "") + "; set data.server.model to the served name "
                          "of target.model (or serve it under that name: vllm serve --served-model-name)")
    return client, wanted
