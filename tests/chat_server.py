"""A chat-completions server on 127.0.0.1 that injects faults, shared by the tests of
plumbing/chat.py, label.py (the reviser) and eval.py (the judge).

    server = ChatServer(answer, plan)      # answer(messages) -> (tag, good answer text)
    ...server.url...                       # http://127.0.0.1:PORT/v1
    server.calls                           # [(tag, behaviour, monotonic time,
                                           #   Authorization header)]
    server.close()

`plan(tag, n)` picks the behaviour of the n-th call (0-based) for one tag (a pair, a prompt; called
under the server's lock, so a plan may also pop from a shared queue). Behaviours, "name:arg":
    ok                200, the good answer               say:TEXT      200, TEXT as the answer
    okkey:K           the good answer, after K characters and the request's Authorization header
    null              200, content null                  badjson       200, a body cut off mid-JSON
    429:S             429 with Retry-After: S            500           500 "oops"
    500key            500 echoing the Authorization header
    echo500:K         500, the key at character offset K of the body (echo401:K, echojson:K alike:
                      401, and 200 with a malformed body)
    400, 401, ...     that status, echoing the Authorization header
    slow:S            sleep S seconds, then ok           trickle:S     200 headers at once, then the
                                                                       body one byte every S seconds
Calls after the first `hold_after` wait until `release` is set (a server that stalls).
"""
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class ChatServer:
    def __init__(self, answer, plan=None, hold_after=None):
        self.answer, self.plan, self.hold_after = answer, plan or (lambda tag, n: "ok"), hold_after
        self.release = threading.Event()
        self.calls, self.lock = [], threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real endpoints
            # headers and body go out at once (no 40 ms delayed-ACK stall)
            disable_nagle_algorithm = True

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                tag, text = server.answer(body["messages"])
                auth = self.headers.get("Authorization", "")
                with server.lock:
                    n = sum(1 for c in server.calls if c[0] == tag)
                    behaviour = server.plan(tag, n)
                    server.calls.append((tag, behaviour, time.monotonic(), auth))
                    held = server.hold_after is not None and len(server.calls) > server.hold_after
                if held:
                    server.release.wait(30)
                try:
                    server.respond(self, behaviour, text, auth)
                except OSError:
                    pass  # the client gave up (a timeout)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()

    @staticmethod
    def respond(handler, behaviour, text, auth):
        name, _, arg = behaviour.partition(":")
        key = auth.removeprefix("Bearer ")

        def send(status, payload: str, headers=(), trickle=None):
            data = payload.encode()
            handler.send_response(status)
            for k, v in headers:
                handler.send_header(k, v)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            if trickle is None:
                handler.wfile.write(data)
                return
            for k in range(len(data)):
                handler.wfile.write(data[k:k + 1])
                handler.wfile.flush()
                time.sleep(trickle)

        def reply(content, **kw):
            send(200,
                 json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}),
                 **kw)

        if name == "slow":
            time.sleep(float(arg or 1.0))
        if name in ("ok", "slow"):
            reply(text)
        elif name == "okkey":
            reply("e" * int(arg or 0) + f"(request had {auth})\n{text}")
        elif name == "say":
            reply(arg)
        elif name == "null":
            reply(None)
        elif name == "trickle":
            reply(text, trickle=float(arg or 0.2))
        elif name == "badjson":
            send(200, '{"choices": [{"mess')
        elif name == "429":
            send(429, '{"error": "slow down"}', [("Retry-After", arg)] if arg else [])
        elif name == "500":
            send(500, "oops")
        elif name == "500key":
            send(500, f"internal error handling {auth}")
        elif name.isdigit():
            send(int(name), f"refused, request had {auth}")
        elif name.startswith("echo"):
            status = {"echo500": 500, "echo401": 401, "echojson": 200}[name]
            send(status, "e" * int(arg) + key + " was the key you sent")
        else:
            raise ValueError(f"unknown behaviour {behaviour!r}")

    def calls_for(self, tag):
        return [c for c in self.calls if c[0] == tag]

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


# an API key: no piece of it looks like English, hex or an id
SECRET = "sk-test-" + "Qz7Wx2Kv9Jq4Yp6Lm3Rn8Ts" * 2


def key_fragment(text: str) -> int:
    """Length of the longest piece of the key's secret part (after "sk-test-") that appears in
    text."""
    secret, best = SECRET.removeprefix("sk-test-"), 0
    for i in range(len(secret)):
        while i + best < len(secret) and secret[i:i + best + 1] in text:
            best += 1
    return best
