"""plumbing/chat.py: ChatClient against a loopback server that injects faults (the key never shown,
whatever the offset; the whole-request timeout against a trickling server; Retry-After; what is
retried and what is fatal; the test request; one session per thread), the append-only JSONL cache,
and the download's failure."""
import concurrent.futures as cf
import gzip
import http.server
import json
import socket
import threading
import time

import pytest
import requests

import common
import plumbing
from chat_server import SECRET, ChatServer, key_fragment
from plumbing import chat


@pytest.fixture(autouse=True)
def no_proxy_env(monkeypatch):
    for name in (
        "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def serve():
    servers = []

    def start(*behaviours, answer="hello"):
        """A server that plays `behaviours` in order, one per call, then "ok"."""
        queue = list(behaviours)
        servers.append(
            ChatServer(
                lambda messages: ("t", answer), lambda tag, n: queue.pop(0) if queue else "ok"
            )
        )
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def client_for(server_or_url, **kw):
    url = getattr(server_or_url, "url", server_or_url)
    kw = {"timeout": 0.5, "max_retries": 2, "backoff_base": 0.01, "backoff_cap": 0.02, **kw}
    return chat.ChatClient(url, "test-model", SECRET, **kw)


HELLO = [{"role": "user", "content": "Say hello."}]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed when the with-block ends: connections are refused


# ----------------------------------------------------------------------------------------------
# Retry-After and backoff
# ----------------------------------------------------------------------------------------------
def test_retry_after_parses_seconds_and_dates_validates_and_caps():
    parse = chat.retry_after_seconds
    assert parse("2") == 2.0 and parse(" 0.5 ") == 0.5 and parse("0") == 0.0
    assert parse(None) is None and parse("") is None and parse("soon") is None
    # unusable: the client's own backoff applies
    assert parse("nan") is None and parse("-5") is None
    assert parse("inf") == parse("1e12") == parse("1e999") == chat.RETRY_AFTER_CAP  # never a crash
    assert parse("300", cap=7.5) == 7.5 and parse("inf", cap=7.5) == 7.5
    now = time.time()
    date = lambda t: time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(t))  # noqa: E731
    assert parse(date(now + 30), now=now) == pytest.approx(30, abs=1.0)
    assert parse(date(now - 3600), now=now) == 0.0  # already past
    assert parse(date(now + 10**8), now=now) == chat.RETRY_AFTER_CAP  # years ahead
    no_zone = time.strftime("%a, %d %b %Y %H:%M:%S -0000", time.gmtime(now + 30))
    assert parse(no_zone, now=now) == pytest.approx(30, abs=1.0)
    assert parse("Mon, 99 Foo 2024 99:99:99 GMT") is None


def test_backoff_doubles_up_to_the_cap_with_jitter():
    import random
    rng = random.Random(0)
    delays = [chat.backoff_delay(k, 1.0, 8.0, rng) for k in range(6)]
    assert 0.5 <= delays[0] <= 1.0 and 1.0 <= delays[1] <= 2.0 and 4.0 <= delays[3] <= 8.0
    assert all(4.0 <= d <= 8.0 for d in delays[3:])
    assert len({chat.backoff_delay(2, 1.0, 8.0, rng) for _ in range(5)}) > 1  # jitter
    assert chat.backoff_delay(5000, 1.0, 8.0, rng) <= 8.0  # no overflow after very many retries


# ----------------------------------------------------------------------------------------------
# The key
# ----------------------------------------------------------------------------------------------
def test_key_is_scrubbed_before_any_cut_at_every_offset(serve):
    """The server echoes the key at character offset k of its error body, for every k up to past
    the snippet length: every cut position straddles the key for some k. Before the fix, label.py
    cut at 200 and eval.py at 300 characters before scrubbing, and up to 55 of the 56 characters
    survived."""
    offsets = range(chat.SNIPPET_CHARS + 2)
    server = serve(*[f"echo500:{k}" for k in offsets], *[f"echo401:{k}" for k in offsets])
    client = client_for(server, max_retries=0)
    for k in offsets:  # retried errors: the text a failed pair reports
        reply = client.complete(HELLO)
        assert reply.value is None and reply.error.startswith("HTTP 500")
        assert key_fragment(reply.error) < 4, (k, reply.error)
    for k in offsets:  # fatal errors: the one line a run stops with
        with pytest.raises(chat.ChatFatal) as info:
            client.complete(HELLO)
        message = str(info.value)
        assert "HTTP 401" in message and "\n" not in message and key_fragment(message) < 4, (
            k,
            message,
        )
        if k < chat.SNIPPET_CHARS - 4:
            assert "***" in message  # where the key was
    assert client.calls == 2 * len(offsets)
    # an answer that echoes the key is scrubbed whole
    server = serve("okkey:123")
    reply = client_for(server).complete(HELLO)
    assert reply.value.endswith("hello") and "***" in reply.text and key_fragment(reply.text) < 4
    assert SECRET not in repr(client) and SECRET not in repr(reply)


def test_api_key_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("MY_KEY", SECRET)
    assert chat.api_key_from_env("MY_KEY", "https://api.example.com/v1") == SECRET
    monkeypatch.delenv("MY_KEY")
    # localhost: no key needed
    assert chat.api_key_from_env("MY_KEY", "http://localhost:8000/v1") == ""
    with pytest.raises(chat.ChatFatal, match="set the MY_KEY environment variable"):
        chat.api_key_from_env("MY_KEY", "https://api.example.com/v1")


# ----------------------------------------------------------------------------------------------
# Timeout, retries, fatal errors
# ----------------------------------------------------------------------------------------------
def test_timeout_bounds_the_whole_request_against_a_trickling_server(serve):
    """A byte every 0.2 s: each read returns in time, so a per-read timeout never fires (before the
    fix a 64-byte answer took 12.8 s with --timeout 0.5); the deadline cuts it at 0.5 s and it is
    retried like a timeout."""
    server = serve("trickle:0.2")
    start = time.monotonic()
    reply = client_for(server).complete(HELLO)
    (_, _, first, _), (_, _, second, _) = server.calls
    assert reply.value == "hello" and reply.calls == 2
    # cut at the 0.5 s deadline, then retried (the upper bounds leave room for a loaded machine;
    # without the deadline one answer takes 12.8 s)
    assert 0.45 <= second - first <= 2.0, second - first
    assert time.monotonic() - start < 4.0
    server = serve("trickle:0.2", "trickle:0.2")
    start = time.monotonic()
    reply = client_for(server, max_retries=1).complete(HELLO)
    assert reply.value is None and reply.error.startswith("timeout") and reply.calls == 2
    assert time.monotonic() - start < 4.0
    server = serve("slow:0.8")  # silent until after the deadline
    reply = client_for(server, max_retries=0).complete(HELLO)
    assert reply.value is None and reply.error.startswith("timeout")


def test_faults_are_retried_with_backoff_and_retry_after_capped(serve):
    server = serve("429:inf", "429:1e12", "429:nan", "500", "badjson", "null", "say:", "429:-3")
    client = client_for(server, max_retries=8, retry_after_cap=0.2)
    reply = client.complete(HELLO, parse=lambda text: text or None, invalid="empty answer")
    assert reply.value == "hello" and reply.calls == 9 and client.calls == 9
    times = [t for _, _, t, _ in server.calls]
    # inf, 1e12: the cap
    assert 0.19 <= times[1] - times[0] <= 1.0 and 0.19 <= times[2] - times[1] <= 1.0
    assert times[3] - times[2] < 0.15  # nan: ignored, the 0.01 s backoff
    # retries run out: the last reason is reported
    server = serve("null", "null", "null")
    reply = client_for(server).complete(HELLO)
    assert reply.value is None and reply.error.startswith("malformed answer") and reply.calls == 3
    server = serve("say:no", "say:no", "say:no")
    reply = client_for(server).complete(HELLO, parse=lambda text: None, invalid="no delimiter")
    assert (reply.value, reply.text, reply.error, reply.calls) == (None, "no", "no delimiter", 3)


def test_bad_key_model_or_url_is_fatal_at_once_and_other_4xx_fail_one_request(serve):
    for status in ("401", "403", "404"):
        server = serve(status)
        client = client_for(server)
        with pytest.raises(chat.ChatFatal, match=f"HTTP {status} from {server.url}"):
            client.complete(HELLO)
        assert client.calls == 1  # no retry
    with pytest.raises(chat.ChatFatal, match="cannot send a request to localhost:8000/v1/chat"):
        client_for("localhost:8000/v1").complete(HELLO)  # no scheme: fatal at once, not retried
    server = serve("400")
    reply = client_for(server).complete(HELLO)
    assert (
        reply.value is None
        and reply.error == "HTTP 400: refused, request had Bearer ***"
        and reply.calls == 1
    )


def test_connection_refused_is_retried_then_reported(serve):
    start = time.monotonic()
    reply = client_for(f"http://127.0.0.1:{closed_port()}/v1").complete(HELLO)
    assert reply.value is None and reply.calls == 3 and "Connection" in reply.error
    assert time.monotonic() - start < 1.0


def test_check_is_one_tiny_request_and_fails_in_one_line(serve):
    server = serve()
    client = client_for(server)
    client.check()
    assert client.calls == 1 and len(server.calls) == 1
    server = serve("null")  # a body with choices is enough: content may be empty for one token
    client_for(server).check()
    for behaviour in ("401", "404"):
        with pytest.raises(chat.ChatFatal) as info:
            client_for(serve(behaviour)).check()
        assert f"HTTP {behaviour}" in str(info.value) and "\n" not in str(info.value)
        assert key_fragment(str(info.value)) < 4
    refused = r"failed a one-token test request \(3 tries\): request failed: ConnectionError"
    with pytest.raises(chat.ChatFatal, match=refused):
        client_for(f"http://127.0.0.1:{closed_port()}/v1").check()
    with pytest.raises(chat.ChatFatal, match="\\(3 tries\\): malformed answer"):
        client_for(serve("badjson", "badjson", "badjson")).check()


def test_one_session_per_thread_and_every_call_counted(serve, monkeypatch):
    sessions, make = [], requests.Session

    def counted_session():
        sessions.append(make())
        return sessions[-1]

    monkeypatch.setattr(chat.requests, "Session", counted_session)
    server = serve(*["500"] * 6)
    client = client_for(server, max_retries=3)
    with cf.ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda _: client.complete(HELLO), range(24)))
    assert all(r.value == "hello" for r in replies)
    assert client.calls == sum(r.calls for r in replies) == 24 + 6 == len(server.calls)
    assert 1 <= len(sessions) <= 4  # one per worker thread, not one per request


# ----------------------------------------------------------------------------------------------
# The append-only JSONL cache
# ----------------------------------------------------------------------------------------------
def test_jsonl_cache_survives_a_torn_last_line(tmp_path, capsys):
    path = tmp_path / "cache.jsonl"
    path.write_text('{"key": "a", "verdict": "A"}\n{"key": "b", "verd')  # killed mid-write
    with chat.JsonlCache(path) as cache:
        assert "a" in cache and "b" not in cache
        assert "line 2: unreadable" in capsys.readouterr().err
        cache.add({"key": "c", "verdict": "B"})
    with chat.JsonlCache(path, valid=lambda r: r.get("verdict") in ("A", "B")) as again:
        assert again.get("c") == {"key": "c", "verdict": "B"} and again.get("a")["verdict"] == "A"
    assert path.read_text().splitlines()[-1] == '{"key": "c", "verdict": "B"}'  # its own line
    with chat.JsonlCache(path, fresh=True) as fresh:
        assert "a" not in fresh
    assert path.read_text() == ""


# ----------------------------------------------------------------------------------------------
# The download
# ----------------------------------------------------------------------------------------------
class _FailingHandler(http.server.BaseHTTPRequestHandler):
    calls = 0

    def do_GET(self):
        type(self).calls += 1
        self.send_response(503)
        self.send_header("Content-Length", "4")
        self.end_headers()
        self.wfile.write(b"down")

    def log_message(self, *args):
        pass


def test_download_failure_is_one_line_naming_the_url_and_the_local_way(tmp_path, monkeypatch):
    monkeypatch.setattr(chat, "DOWNLOAD_BACKOFF", 0.01)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FailingHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        for base in (f"http://127.0.0.1:{server.server_port}", f"http://127.0.0.1:{closed_port()}"):
            monkeypatch.setenv("HH_RLHF_URL", base)
            start = time.monotonic()
            with pytest.raises(common.DataError) as info:
                common.load_pairs(plumbing.data_paths("hh-rlhf:harmless-base", cache_dir=tmp_path))
            message = str(info.value)
            assert time.monotonic() - start < 1.0 and "\n" not in message, message
            assert (
                f"could not download {base}/harmless-base/train.jsonl.gz after 4 attempts"
                in message
            )
            assert "--data path/to/train.jsonl.gz" in message and ".jsonl.gz" in message
        assert _FailingHandler.calls == 4  # 503 is retried
        assert "HTTP 503" in str(info.value) or "Connection refused" in str(info.value)
    finally:
        server.shutdown()
        server.server_close()
    assert not list(tmp_path.rglob("*.gz"))  # nothing half-written in the cache


def test_download_retries_a_server_error_then_succeeds(tmp_path, monkeypatch):
    monkeypatch.setattr(chat, "DOWNLOAD_BACKOFF", 0.01)
    payload = gzip.compress(b'{"chosen": "\\n\\nHuman: hi\\n\\nAssistant: yes", '
                            b'"rejected": "\\n\\nHuman: hi\\n\\nAssistant: no"}\n')

    class Flaky(http.server.BaseHTTPRequestHandler):
        seen = []

        def do_GET(self):
            self.seen.append(self.path)
            status, body = (503, b"down") if len(self.seen) == 1 else (200, payload)
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        target = chat.download(f"http://127.0.0.1:{server.server_port}/f.jsonl.gz",
                               tmp_path / "f.jsonl.gz", verify=chat.verify_gzip)
    finally:
        server.shutdown()
        server.server_close()
    assert len(Flaky.seen) == 2 and target.read_bytes() == payload
    assert [json.loads(gzip.decompress(payload))] == [row for _, row in common.read_rows(target)]


def test_label_without_network_exits_with_one_line(tiny_dir, tmp_path):
    """`--data hh-rlhf` without network: before the fix a raw traceback (OSError from requests)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = ("import sys, plumbing, label; from plumbing import chat; chat.DOWNLOAD_BACKOFF = 0.01; "
            "plumbing.cli(lambda: label.main(sys.argv[1:]))")
    env = {k: v for k, v in __import__("os").environ.items() if "proxy" not in k.lower()}
    env.update(HH_RLHF_URL=f"http://127.0.0.1:{closed_port()}",
               TOKEN_RLHF_CACHE=str(tmp_path / "cache"))
    start = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable, "-c", code, "--reviser", "chosen", "--data", "hh-rlhf:harmless-base",
            "--tokenizer", str(tiny_dir), "--out", str(tmp_path / "labels.jsonl"),
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: hh-rlhf: could not download http://127.0.0.1:")
    assert "Connection refused" in lines[0] and "--data path/to/train.jsonl.gz" in lines[0]
    assert time.monotonic() - start < 30  # the interpreter's start, then four quick refusals
