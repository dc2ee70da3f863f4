"""An OpenAI-compatible chat-completions client (vLLM, llama.cpp server, Ollama, hosted APIs).

Standard library only (http.client). Settings come from `LLMConfig` or from the environment:
GEOMELD_LLM_ENDPOINT (base URL such as ``http://127.0.0.1:8000/v1``, or the full
``.../chat/completions`` URL), GEOMELD_LLM_MODEL, GEOMELD_LLM_API_KEY, and any other field as
GEOMELD_LLM_<FIELD> (GEOMELD_LLM_CACHE_DIR, GEOMELD_LLM_TEMPERATURE, ...). The key is sent as a
bearer header and nowhere else: never logged, never in errors, the cache, or the provenance.

Robustness: every request has a total deadline (connect + send + reading the body chunk by
chunk), so a server that trickles bytes cannot hang the build; timeouts, connection errors,
429 and 5xx are retried with exponential backoff; other 4xx are not; a malformed body is an
error. A semaphore limits concurrent requests per client. Successful responses are cached on
disk as JSON, keyed by everything that shapes them (tile id, prompt hash, model, candidate
index, seed, temperature, max_tokens), so a rebuild with a cache is byte-identical; a cache
that cannot be written is skipped with a warning. After ``breaker_failures`` consecutive
failed samples the client stops calling for ``breaker_cooldown_s`` (callers fall back at once
instead of waiting out timeouts per sample); cached completions are still served meanwhile.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import json
import logging
import os
import pathlib
import socket
import threading
import time
import urllib.parse
from typing import Any, Mapping

MAX_RESPONSE_BYTES = 1 << 20


class LLMError(Exception):
  """A failed completion; `reason` is a short machine-readable cause."""

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason = reason
    self.detail = detail


@dataclasses.dataclass
class LLMConfig:
  endpoint: str
  model: str
  api_key: str = dataclasses.field(default="", repr=False)
  timeout_s: float = 30.0  # total per request
  retries: int = 2
  backoff_s: float = 0.5
  max_concurrency: int = 4
  temperature: float = 0.7
  max_tokens: int = 200
  cache_dir: str | None = None
  breaker_failures: int = 5
  breaker_cooldown_s: float = 60.0

  @classmethod
  def from_env(cls, env: Mapping[str, str] | None = None, **overrides) -> "LLMConfig":
    """Each field from `overrides`, else GEOMELD_LLM_<FIELD>, else its default."""
    env = os.environ if env is None else env
    values = {}
    for f in dataclasses.fields(cls):
      var = "GEOMELD_LLM_" + f.name.upper()
      if overrides.get(f.name) is not None:
        values[f.name] = overrides.pop(f.name)
      elif env.get(var):
        parse = {"float": float, "int": int}.get(str(f.type), str)
        try:
          values[f.name] = parse(env[var])
        except ValueError:
          raise ValueError(f"{var}={env[var]!r} is not a valid {f.type}") from None
    if overrides:
      raise ValueError(f"unknown llm settings {sorted(overrides)}")
    if not values.get("endpoint") or not values.get("model"):
      raise ValueError("the llm captioner needs an endpoint and a model: set "
                       "GEOMELD_LLM_ENDPOINT and GEOMELD_LLM_MODEL or pass endpoint=/model=")
    return cls(**values)


def _chat_url(endpoint: str) -> urllib.parse.SplitResult:
  url = urllib.parse.urlsplit(endpoint.rstrip("/"))
  if url.scheme not in ("http", "https") or not url.hostname:
    raise ValueError(f"llm endpoint must be an http(s) URL, got {endpoint!r}")
  path = url.path
  if not path.endswith("/chat/completions"):
    path += "/chat/completions"
  return url._replace(path=path)


class ChatClient:
  """Thread-safe; one instance per worker process is enough."""

  def __init__(self, config: LLMConfig):
    self.config = config
    self._url = _chat_url(config.endpoint)
    self._slots = threading.BoundedSemaphore(max(1, int(config.max_concurrency)))
    self._lock = threading.Lock()
    self._consecutive_failures = 0
    self._open_until = 0.0
    self._cache = pathlib.Path(config.cache_dir) if config.cache_dir else None

  # -- cache -----------------------------------------------------------------------------
  def cache_key(self, tile_id: str, prompt_hash: str, index: int, seed: int) -> str:
    c = self.config
    # The endpoint too: a local server (llama.cpp, Ollama) may serve other weights under the
    # same model name, and its answers must not pass for another server's.
    return hashlib.sha256(f"{tile_id}|{prompt_hash}|{c.model}|{self._url}|{index}|{seed}|"
                          f"{c.temperature}|{c.max_tokens}".encode()).hexdigest()

  def _cache_get(self, key: str) -> str | None:
    if self._cache is None:
      return None
    p = self._cache / key[:2] / f"{key}.json"
    try:
      content = json.loads(p.read_text())["content"]
      return content if isinstance(content, str) and content.strip() else None
    except (OSError, ValueError, KeyError, TypeError):
      return None

  def _cache_put(self, key: str, tile_id: str, content: str) -> None:
    if self._cache is None:
      return
    d = self._cache / key[:2]
    tmp = d / f".{key}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
      d.mkdir(parents=True, exist_ok=True)
      tmp.write_text(json.dumps({"tile_id": tile_id, "model": self.config.model,
                                 "content": content}))
      os.replace(tmp, d / f"{key}.json")  # atomic: readers never see half a file
    except OSError as e:  # the completion itself is good: a full or read-only disk costs only the cache
      logging.warning("llm cache %s not written: %s", self._cache, e)

  # -- circuit breaker -------------------------------------------------------------------
  def available(self) -> bool:
    with self._lock:
      return time.monotonic() >= self._open_until

  def record_outcome(self, ok: bool) -> None:
    with self._lock:
      if ok:
        self._consecutive_failures = 0
        return
      self._consecutive_failures += 1
      if self._consecutive_failures >= self.config.breaker_failures:
        self._open_until = time.monotonic() + self.config.breaker_cooldown_s
        self._consecutive_failures = 0

  # -- requests --------------------------------------------------------------------------
  def complete(self, messages: list[dict[str, str]], *, tile_id: str, prompt_hash: str,
               index: int, seed: int) -> tuple[str, bool]:
    """One completion: (content, from_cache). Raises LLMError after the retries, or at once
    ("circuit_open") while the breaker is open and the cache has no answer."""
    key = self.cache_key(tile_id, prompt_hash, index, seed)
    cached = self._cache_get(key)
    if cached is not None:
      return cached, True
    if not self.available():
      raise LLMError("circuit_open")
    body = json.dumps({"model": self.config.model, "messages": messages,
                       "temperature": self.config.temperature,
                       "max_tokens": self.config.max_tokens, "seed": int(seed),
                       "stream": False}).encode()
    last: LLMError | None = None
    for attempt in range(self.config.retries + 1):
      if attempt:
        time.sleep(self.config.backoff_s * (2 ** (attempt - 1)))
      try:
        with self._slots:
          content = self._post(body)
        self._cache_put(key, tile_id, content)
        return content, False
      except LLMError as e:
        last = e
        if e.reason not in ("timeout", "connection", "http_5xx", "http_429"):
          break
    assert last is not None
    raise last

  def _post(self, body: bytes) -> str:
    cfg = self.config
    deadline = time.monotonic() + cfg.timeout_s
    conn_cls = (http.client.HTTPSConnection if self._url.scheme == "https"
                else http.client.HTTPConnection)
    conn = conn_cls(self._url.hostname, self._url.port, timeout=cfg.timeout_s)
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if cfg.api_key:
      headers["Authorization"] = f"Bearer {cfg.api_key}"
    path = self._url.path + (f"?{self._url.query}" if self._url.query else "")
    try:
      conn.request("POST", path, body=body, headers=headers)
      # Keep the socket: http.client drops conn.sock once a closing response is read.
      sock = conn.sock
      sock.settimeout(max(0.05, deadline - time.monotonic()))
      resp = conn.getresponse()
      chunks, size = [], 0
      while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
          raise LLMError("timeout", f"response not complete within {cfg.timeout_s:.1f} s")
        sock.settimeout(remaining)
        chunk = resp.read1(65536)
        if not chunk:
          break
        size += len(chunk)
        if size > MAX_RESPONSE_BYTES:
          raise LLMError("response_too_large", f"over {MAX_RESPONSE_BYTES} bytes")
        chunks.append(chunk)
      status = resp.status
    except (socket.timeout, TimeoutError):
      raise LLMError("timeout", f"no complete response within {cfg.timeout_s:.1f} s") from None
    except (ConnectionError, http.client.HTTPException, OSError) as e:
      raise LLMError("connection", type(e).__name__) from None
    finally:
      conn.close()
    raw = b"".join(chunks)
    if status == 429:
      raise LLMError("http_429", "rate limited")
    if status >= 500:
      raise LLMError("http_5xx", f"status {status}")
    if status != 200:
      raise LLMError("http_4xx", f"status {status}")
    return parse_completion(raw)


def parse_completion(raw: bytes) -> str:
  """The first choice's message content of a chat-completions body, or LLMError."""
  try:
    data: Any = json.loads(raw.decode("utf-8"))
    choice = data["choices"][0]
    content = choice["message"]["content"]
  except (UnicodeDecodeError, ValueError, KeyError, IndexError, TypeError):
    raise LLMError("malformed_response", f"{len(raw)} bytes, not a chat completion") from None
  # A completion cut at max_tokens ("length") or filtered is not a caption; never cached.
  if choice.get("finish_reason") not in (None, "stop"):
    raise LLMError("truncated_response", f"finish_reason {choice.get('finish_reason')!r}")
  if not isinstance(content, str) or not content.strip():
    raise LLMError("empty_response", "choice has no text")
  return content.strip()
