"""A small OpenAI-compatible chat client (vLLM, SGLang) for `dspark data --server`; standard library only.

One urllib request per call (generation time dwarfs the connection). Trouble that passes (429, 5xx, a dropped
connection, a timeout) is retried with exponential backoff and jitter; what does not pass comes back at once as a
`ServerError`, `fatal` when no later request can do better (server gone, overloaded, refusing the key), else the
one prompt's failure. The API key is read from the environment variable the recipe names and only ever sent as
the Authorization header: never printed, never written.
"""
from __future__ import annotations

import http.client
import json
import os
import random
import threading
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


@dataclass
class Client:
    base: str  # http://host:port, no /v1
    timeout: float
    max_retries: int
    backoff: float
    headers: dict = field(repr=False)  # carries the API key: kept out of repr
    stop: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def from_config(cls, cfg: ServerConfig, src: str) -> "Client":
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if cfg.api_key_env:
            key = os.environ.get(cfg.api_key_env)
            if not key:
                raise RecipeError(f"{src}: data.server.api_key_env: environment variable {cfg.api_key_env} is not set")
            headers["Authorization"] = f"Bearer {key}"
        base = cfg.url.rstrip("/").removesuffix("/v1")
        return cls(base, cfg.timeout, cfg.max_retries, cfg.backoff, headers)

    def _once(self, path: str, body: Optional[dict]) -> tuple[int, bytes]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, headers=self.headers)
        try:
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    return r.status, r.read()
            except urllib.error.HTTPError as e:
                return e.code, e.read()
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:  # refused, reset, cut mid-answer
            why = getattr(e, "reason", e)  # urllib wraps what the socket raised
            if isinstance(why, TimeoutError):
                raise ServerError(f"no answer within data.server.timeout={self.timeout:g}s", fatal=True) from None
            raise ServerError(f"connection failed ({type(why).__name__}: {why})", fatal=True) from None

    def call(self, path: str, body: Optional[dict] = None, retries: Optional[int] = None) -> dict:
        """GET `path` (POST `body`) → the JSON object answered; transient failures retried `retries` times
        (default max_retries), the n-th after backoff·2ⁿ⁻¹ seconds ×U(0.5, 1.5), at most a minute."""
        retries = self.max_retries if retries is None else retries
        for attempt in range(retries + 1):
            if self.stop.is_set():
                raise Stopped
            try:
                status, raw = self._once(path, body)
            except ServerError as e:
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
            if attempt < retries:
                self.stop.wait(min(60.0, self.backoff * 2 ** attempt) * random.uniform(0.5, 1.5))
        if retries:
            err.args = (f"{err} (tried {retries + 1} times)",)
        raise err

    def chat(self, model: str, messages: list[dict], max_tokens: int, temperature: float, top_p: float,
             seed: int, token_ids: bool = True) -> Completion:
        """One chat completion rendered with the server's own chat template. `token_ids` asks for the generated
        ids with vLLM's extension `return_token_ids` (→ choices[0].token_ids); a server without it ignores it or,
        if strict, refuses it (data.server.token_check=0 leaves it out)."""
        body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature,
                "top_p": top_p, "seed": seed}
        j = self.call("/v1/chat/completions", {**body, "return_token_ids": True} if token_ids else body)
        try:
            choice = j["choices"][0]
            text, reason = choice["message"]["content"], choice["finish_reason"]
        except (KeyError, IndexError, TypeError):
            raise ServerError("malformed response: no choices[0].message.content / finish_reason", False) from None
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
