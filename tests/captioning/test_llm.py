"""The OpenAI-compatible client and the 'llm' caption stage against a real loopback server."""

import http.server
import json
import pathlib
import threading
import time

import pytest

from data_prep.captioning import eval as cap_eval
from data_prep.captioning import llm
from data_prep.captioning import orchestrator
from data_prep.captioning import realiser
from data_prep.captioning import stage as stage_lib

SECRET = "sk-test-never-store-me"


class _Handler(http.server.BaseHTTPRequestHandler):
  def log_message(self, *args):  # keep pytest output clean
    return

  def do_POST(self):  # noqa: N802 (http.server naming)
    srv = self.server
    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
    srv.hits += 1
    srv.auth.append(self.headers.get("Authorization"))
    srv.prompts.append(body["messages"])
    mode = srv.mode
    if mode == "500":
      self.send_response(500)
      self.end_headers()
      return
    if mode == "sleep":
      time.sleep(1.5)
    payload = (b"{not json" if mode == "malformed" else json.dumps(
        {"choices": [{"message": {"role": "assistant", "content": srv.content}}]}).encode())
    self.send_response(200)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", str(len(payload)))
    self.end_headers()
    if mode == "trickle":  # a slow stream: a byte every 0.2 s, well past the deadline
      for b in payload[:40]:
        self.wfile.write(bytes([b]))
        self.wfile.flush()
        time.sleep(0.2)
      return
    self.wfile.write(payload)


class _QuietServer(http.server.ThreadingHTTPServer):
  def handle_error(self, request, client_address):
    # The client hangs up on slow replies by design; the broken pipe is expected.
    return


@pytest.fixture(scope="module")
def server():
  srv = _QuietServer(("127.0.0.1", 0), _Handler)
  srv.daemon_threads = True
  srv.mode, srv.content, srv.hits, srv.auth, srv.prompts = "ok", "", 0, [], []
  thread = threading.Thread(target=srv.serve_forever, daemon=True)
  thread.start()
  yield srv
  srv.shutdown()
  srv.server_close()


@pytest.fixture(scope="module")
def tile():
  return cap_eval.synthetic_tile(10, seed=0)


def _stage(server, tmp_path, **kw):
  opts = dict(endpoint=f"http://127.0.0.1:{server.server_address[1]}/v1", model="test-model",
              api_key=SECRET, timeout_s=0.6, retries=1, backoff_s=0.05, max_concurrency=2,
              cache_dir=str(tmp_path / "cache"))
  opts.update(kw)
  return stage_lib.make_caption_stage("llm", k=2, seed=0, **opts)


def test_success_is_verified_cached_and_keeps_the_key_secret(server, tile, tmp_path):
  rec = orchestrator.orchestrate(tile.example)
  good = realiser.realise(rec, 1, seed=3)[0]
  server.mode, server.content = "ok", good + " The tile also shows snow on a volcano near Atlantis."
  server.hits, server.auth, server.prompts = 0, [], []
  st = _stage(server, tmp_path)
  out = st.process(tile.example)
  prov = json.loads(out["caption_provenance"])
  assert prov["backend"] == "llm" and prov["captioner"] == "llm" and prov["fallback"] is None
  assert prov["model"] == "test-model" and server.hits == 2
  assert server.auth == [f"Bearer {SECRET}"] * 2
  assert "Atlantis" not in out["captions"][0] and "snow" not in out["captions"][0]
  assert out["captions"][0] == orchestrator_free_verify(good, rec)
  # The system message is the fixed instruction text; tile data only in the user message.
  assert server.prompts[0][0]["content"] == orchestrator.SYSTEM_PROMPT
  # Second run: served from the on-disk cache, no request.
  out2 = _stage(server, tmp_path).process(tile.example)
  assert server.hits == 2 and out2["captions"] == out["captions"]
  assert all(r["cached"] for r in json.loads(out2["caption_provenance"])["requests"])
  stored = "".join(p.read_text() for p in pathlib.Path(tmp_path / "cache").rglob("*.json"))
  assert stored and SECRET not in stored
  assert SECRET not in out["caption_provenance"] and SECRET not in repr(st.llm_config)


def orchestrator_free_verify(caption, rec):
  from data_prep.captioning import verifier  # pylint: disable=g-import-not-at-top
  return verifier.verify(caption, rec).caption


@pytest.mark.parametrize("mode,reason", [("500", "http_5xx"), ("malformed", "malformed_response"),
                                         ("sleep", "timeout"), ("trickle", "timeout")])
def test_faults_fall_back_to_the_realiser_in_bounded_time(server, tile, tmp_path, mode, reason):
  server.mode, server.content, server.hits = mode, "Mostly forest.", 0
  st = _stage(server, tmp_path)
  t0 = time.monotonic()
  out = st.process(tile.example)
  elapsed = time.monotonic() - t0
  # k=2 requests, 2 at a time, 2 tries of <= 0.6 s each plus 0.05 s backoff: well under 3 s.
  assert elapsed < 3.0, elapsed
  prov = json.loads(out["caption_provenance"])
  assert prov["fallback"]["reason"] == "llm_unavailable"
  assert reason in prov["fallback"]["detail"]
  assert prov["captioner"] == "agentic" and out["captions"][0].strip()
  retried = mode != "malformed"  # a malformed body is not retried; faults that may pass are
  assert server.hits == (4 if retried else 2)


def test_unreachable_server_and_circuit_breaker(tile, tmp_path):
  st = stage_lib.make_caption_stage(
      "llm", k=1, endpoint="http://127.0.0.1:9/v1", model="m", timeout_s=0.5, retries=0,
      breaker_failures=2, breaker_cooldown_s=30.0)
  for _ in range(2):
    prov = json.loads(st.process(tile.example)["caption_provenance"])
    assert prov["fallback"]["detail"] == "connection"
  prov = json.loads(st.process(tile.example)["caption_provenance"])
  assert prov["fallback"]["detail"] == "circuit_open"


def test_cache_serves_while_the_breaker_is_open_and_keys_the_seed(server, tile, tmp_path):
  server.mode, server.content, server.hits = "ok", "Mostly forest, in Slovenia.", 0
  st = _stage(server, tmp_path)
  first = st.process(tile.example)
  hits = server.hits
  client = st.client()
  client._open_until = time.monotonic() + 60.0  # pylint: disable=protected-access
  again = st.process(tile.example)  # every completion is cached: the open breaker does not matter
  assert again["captions"] == first["captions"] and server.hits == hits
  assert json.loads(again["caption_provenance"])["fallback"] is None
  other_seed = stage_lib.make_caption_stage("llm", llm_config=st.llm_config, k=st.k, seed=st.seed + 1)
  assert other_seed.client().cache_key("t", "p", 0, 1) != client.cache_key("t", "p", 0, 2)
  prov = json.loads(other_seed.process(tile.example)["caption_provenance"])
  assert not any(r.get("cached") for r in prov["requests"])  # another seed: not the cached answers


def test_an_unwritable_cache_costs_only_the_cache(server, tile, tmp_path):
  server.mode, server.content, server.hits = "ok", "Mostly forest, in Slovenia.", 0
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  config = llm.LLMConfig(endpoint=f"http://127.0.0.1:{server.server_address[1]}/v1", model="m", cache_dir=str(blocker / "cache"))
  out = stage_lib.make_caption_stage("llm", llm_config=config, k=1).process(tile.example)
  assert json.loads(out["caption_provenance"])["captioner"] == "llm"


def test_config_from_env_and_errors(monkeypatch):
  monkeypatch.setenv("GEOMELD_LLM_ENDPOINT", "http://127.0.0.1:1234/v1")
  monkeypatch.setenv("GEOMELD_LLM_MODEL", "qwen")
  monkeypatch.setenv("GEOMELD_LLM_API_KEY", SECRET)
  monkeypatch.setenv("GEOMELD_LLM_CACHE_DIR", "/tmp/llm-cache")
  monkeypatch.setenv("GEOMELD_LLM_TEMPERATURE", "0.0")
  cfg = llm.LLMConfig.from_env()
  assert (cfg.model, cfg.api_key) == ("qwen", SECRET) and SECRET not in repr(cfg)
  assert (cfg.cache_dir, cfg.temperature) == ("/tmp/llm-cache", 0.0)
  assert llm.LLMConfig.from_env(temperature=0.5).temperature == 0.5
  monkeypatch.setenv("GEOMELD_LLM_MAX_TOKENS", "many")
  with pytest.raises(ValueError, match="GEOMELD_LLM_MAX_TOKENS='many'"):
    llm.LLMConfig.from_env()
  with pytest.raises(ValueError, match="GEOMELD_LLM_ENDPOINT"):
    llm.LLMConfig.from_env(env={})
  with pytest.raises(ValueError, match="http"):
    llm.ChatClient(llm.LLMConfig(endpoint="ftp://x", model="m"))
  with pytest.raises(ValueError, match="unknown captioner"):
    stage_lib.make_caption_stage("gpt")
  with pytest.raises(llm.LLMError, match="malformed"):
    llm.parse_completion(b'{"choices": []}')
  cut = b'{"choices": [{"message": {"content": "Mostly forest and"}, "finish_reason": "length"}]}'
  with pytest.raises(llm.LLMError, match="finish_reason 'length'"):
    llm.parse_completion(cut)
  done = cut.replace(b'"length"', b'"stop"')
  assert llm.parse_completion(done) == "Mostly forest and"
  # Two servers with one model name never share cached answers.
  a = llm.ChatClient(llm.LLMConfig(endpoint="http://a:8000/v1", model="m"))
  b = llm.ChatClient(llm.LLMConfig(endpoint="http://b:8000/v1", model="m"))
  assert a.cache_key("t", "p", 0, 0) != b.cache_key("t", "p", 0, 0)


def test_stage_runs_inside_the_builds_beam_runner(tile):
  beam = pytest.importorskip("apache_beam")
  from apache_beam.testing import util as beam_util  # pylint: disable=g-import-not-at-top
  st = stage_lib.make_caption_stage("agentic", k=2)
  with beam.Pipeline(runner="FnApiRunner") as p:  # what run_build uses without --runner
    captions = (p | beam.Create([tile.example]) | beam.Map(st.process)
                | beam.Map(lambda ex: ex["captions"][0]))
    expected = st.process(tile.example)["captions"][0]
    beam_util.assert_that(captions, beam_util.equal_to([expected]))
