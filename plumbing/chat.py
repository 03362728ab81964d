"""plumbing/chat.py — the network: one chat-completions client (label.py's reviser, eval.py's
judge) with its retries, the API key kept secret, the append-only JSONL cache of their answers, and
one download (hh-rlhf, behind --data hh-rlhf).
"""
from __future__ import annotations

import email.utils
import gzip
import json
import math
import os
import random
import re
import threading
import time
from dataclasses import dataclass
from datetime import timezone
from pathlib import Path
from urllib.parse import urlparse

import requests
import urllib3

from common import DataError, InputError
from plumbing import checkpoint

# ----------------------------------------------------------------------------------------------
# Network: one chat-completions client (label.py's reviser, eval.py's judge), an append-only JSONL
# cache for their answers, one download
# ----------------------------------------------------------------------------------------------
# label.py (the reviser) and eval.py (the judge) talk to any OpenAI-compatible
# chat-completions endpoint through ChatClient; both keep their answers in a JsonlCache;
# plumbing.download_hh_rlhf downloads hh-rlhf with download().
#
# The chat client, what it promises:
#   - The API key comes from the environment only (api_key_from_env). It is removed from every
#     text a server sends back (scrub) BEFORE that text is cut to a snippet, so no part of it can
#     survive in an error message, a cached answer, a summary or an exception.
#   - `timeout` bounds the whole request: connect, status line and headers, and the body. A server
#     that trickles its answer a byte at a time is cut off at the deadline and retried like a
#     timeout. (urllib3 bounds the connect and each read of the headers by the time left; a watchdog
#     shuts the socket at the deadline, which ends a body read in progress. A server that trickles
#     its headers themselves is bounded per read only, since urllib3 gives no hold on the socket
#     before the headers are in; the request then fails as a timeout as soon as they are.)
#   - What is retried, with exponential backoff and jitter (or the server's Retry-After, capped):
#         429, 5xx, timeouts, connection errors, a body that is not the expected JSON, a `null` or
#         non-string answer, and an answer the caller's parse() rejects (e.g. no delimiter)
#     401 / 403 / 404 and a malformed URL raise ChatFatal (bad key, base URL or model: no retry can
#     fix them); any other 4xx fails that one request without a retry.
#   - check() makes one tiny request, so a bad key, model or URL fails in one line before a long
#     run.
#   - Thread-safe: one requests.Session per thread; `calls` counts every HTTP request made.
#
#     client = ChatClient("https://api.openai.com/v1", "gpt-4-0125-preview",
#                         api_key_from_env("OPENAI_API_KEY", "https://api.openai.com/v1"))
#     client.check()                                     # raises ChatFatal with a one-line reason
#     reply = client.complete([{"role": "user", "content": "Say hi."}], temperature=0, max_tokens=8)
#     reply.value, reply.text, reply.error, reply.calls  # value is None when every try failed

LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")  # servers that may go without an API key


SNIPPET_CHARS = 300  # how much of a server's (scrubbed) text an error message shows


RETRY_AFTER_CAP = 120.0  # seconds: the longest Retry-After honoured (a longer one is cut to this)


FATAL_STATUS = (401, 403, 404)  # bad key, no access, wrong base URL or model name


DOWNLOAD_ATTEMPTS, DOWNLOAD_BACKOFF = 4, 0.5  # tries, and the first wait between them (s, doubling)


# ----------------------------------------------------------------------------------------------
# Secrets
# ----------------------------------------------------------------------------------------------
def api_key_from_env(env_name: str, api_base: str) -> str:
    """The API key from the environment variable `env_name` (never from a flag or a file). Only a
    localhost server may go without one; otherwise a missing key is a ChatFatal."""
    key = os.environ.get(env_name, "")
    if not key and urlparse(api_base).hostname not in LOCAL_HOSTS:
        raise ChatFatal(f"set the {env_name} environment variable to the API key for {api_base} "
                        "(only a localhost server may go without one)")
    return key


def scrub(text: str, secret: str) -> str:
    """Replace the API key wherever it shows up. Call it on the WHOLE text, before any cut: a key
    that straddles the cut would otherwise survive in part."""
    return text.replace(secret, "***") if secret and text else text


def snippet(text: str, limit: int = SNIPPET_CHARS) -> str:
    """An already scrubbed text as one line of at most `limit` characters (for an error message)."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


# ----------------------------------------------------------------------------------------------
# When to try again
# ----------------------------------------------------------------------------------------------
def backoff_delay(attempt: int, base: float, cap: float, rng=random) -> float:
    """Exponential backoff with jitter: uniform in [d/2, d], d = min(cap, base · 2^attempt)."""
    d = min(cap, base * 2.0 ** min(attempt, 60))
    return d / 2 + rng.random() * d / 2


def retry_after_seconds(value: str | None, cap: float = RETRY_AFTER_CAP,
                        now: float | None = None) -> float | None:
    """Retry-After as seconds to wait, in [0, cap]: a number of seconds, or an HTTP date.

    None when absent or unusable (nan, negative, not a number or a date): the caller's own backoff
    applies then. inf, 1e12 or a date far ahead wait `cap` seconds; a date in the past waits 0.
    """
    if not value or not value.strip():
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value.strip())
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when.tzinfo is None:  # "-0000": an HTTP date is always GMT
            when = when.replace(tzinfo=timezone.utc)
        seconds = max(0.0, when.timestamp() - (time.time() if now is None else now))
    if math.isnan(seconds) or seconds < 0:
        return None
    return min(seconds, cap)


# ----------------------------------------------------------------------------------------------
# One POST with a deadline on the whole request
# ----------------------------------------------------------------------------------------------
class RequestTimeout(requests.Timeout):
    """The whole request (connect, headers, body) did not finish within the timeout."""


def post_json(session: requests.Session, url: str, headers: dict, body: dict, timeout: float):
    """POST `body` as JSON; returns (status, response headers, body text). Raises RequestTimeout
    when the whole request takes longer than `timeout` seconds, requests.RequestException when it
    fails."""
    deadline = time.monotonic() + timeout
    try:  # connect, then each read of the status line and headers, within the time left
        resp = session.post(url, headers=headers, json=body, stream=True,
                            timeout=urllib3.util.Timeout(total=timeout, read=timeout))
    except requests.Timeout:
        raise RequestTimeout(f"no answer within {timeout:g} s") from None
    fired = threading.Event()

    def cut_off():  # at the deadline: end a body read in progress (a trickling server)
        fired.set()
        try:
            # urllib3 >= 2.3: shutdown wakes a blocked read
            getattr(resp.raw, "shutdown", resp.raw.close)()
        except (OSError, RuntimeError, ValueError):
            pass  # the read had just finished

    watchdog = threading.Timer(max(0.0, deadline - time.monotonic()), cut_off)
    watchdog.daemon = True
    watchdog.start()
    try:
        data = resp.content  # the body, read to its end (or cut off by the watchdog)
    except requests.RequestException:
        if fired.is_set():
            raise RequestTimeout(f"answer not complete within {timeout:g} s") from None
        raise
    finally:
        watchdog.cancel()
        resp.close()
    if fired.is_set():
        raise RequestTimeout(f"answer not complete within {timeout:g} s")
    return resp.status_code, resp.headers, data.decode("utf-8", errors="replace")


def answer_content(text: str) -> str | None:
    """choices[0].message.content of a chat-completions body, or None if the body is not that JSON
    or the content is not a string (null, a list, a number)."""
    try:
        content = json.loads(text)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    return content if isinstance(content, str) else None


# The errors ChatClient reports for a failure a later run may not meet again: the network, a
# timeout, 429, 5xx, a body cut off. Every other failure is an answer that came back and could not
# be used (no delimiter, not A / B / tie, another 4xx): at temperature 0 the same question gets the
# same answer, so a rerun does not pay for it again unless asked (--retry-failed).
TRANSIENT_ERRORS = ("timeout", "request failed", "HTTP 429", "HTTP 5", "malformed answer")


def transient_error(error: str) -> bool:
    """True for a failure worth asking again in a later run (see TRANSIENT_ERRORS)."""
    return str(error).startswith(TRANSIENT_ERRORS)


def failure_counts(errors) -> dict:
    """{"transient": n, "unusable": m} of a list of failure messages."""
    transient = sum(transient_error(e) for e in errors)
    return {"transient": transient, "unusable": len(errors) - transient}


def rerun_note(counts: dict, what: str = "pairs") -> str:
    """One line: the failures of each kind and the calls a rerun will make for them."""
    transient, unusable = counts["transient"], counts["unusable"]
    asks = (f"a rerun asks again for the {transient} transient ones (at least {transient + 1} "
            "calls with the test request)" if transient else "a rerun makes no calls for them")
    return (f"failed {what}: {transient} transient (network, timeout, 429, 5xx), {unusable} with "
            f"an unusable answer (not asked again unless --retry-failed); {asks}")


# ----------------------------------------------------------------------------------------------
# The chat client
# ----------------------------------------------------------------------------------------------
class ChatFatal(InputError):
    """An error no retry can fix (bad key, base URL or model): the run stops. The message is
    scrubbed."""


@dataclass
class Reply:
    """What complete() got: value (parse(text), or the text without a parse), None if every try
    failed; text, the last answer (scrubbed) or None; error, why the last try failed ("" on
    success); calls, the HTTP requests made."""
    value: object
    text: str | None
    error: str
    calls: int


class ChatClient:
    """An OpenAI-compatible chat-completions endpoint with the retry policy of this module's
    docstring."""

    def __init__(self, api_base: str, model: str, api_key: str = "",
                 key_env: str = "OPENAI_API_KEY", timeout: float = 60.0, max_retries: int = 5,
                 backoff_base: float = 1.0, backoff_cap: float = 60.0,
                 retry_after_cap: float = RETRY_AFTER_CAP, rng=random):
        self.url = api_base.rstrip("/") + "/chat/completions"
        self.model, self.key_env = model, key_env
        self._api_key = api_key  # sent in the Authorization header only; never shown
        self.timeout, self.max_retries = timeout, max_retries
        self.backoff_base, self.backoff_cap, self.retry_after_cap = (
            backoff_base,
            backoff_cap,
            retry_after_cap,
        )
        self.rng = rng
        self.calls = 0  # HTTP requests made, by all threads
        self._lock, self._local = threading.Lock(), threading.local()

    def __repr__(self):
        return f"ChatClient({self.url!r}, {self.model!r})"  # no key

    def scrub(self, text: str) -> str:
        return scrub(text, self._api_key)

    def _post(self, body: dict):
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()  # one keep-alive connection pool per thread
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        with self._lock:
            self.calls += 1
        return post_json(self._local.session, self.url, headers, body, self.timeout)

    def complete(self, messages: list[dict], parse=None, invalid: str = "unusable answer",
                 **params) -> Reply:
        """The answer to `messages` (params: temperature, max_tokens, ...), tried up to 1 +
        max_retries times. parse(answer) -> value, or None to ask again (e.g. no delimiter;
        `invalid` says why)."""
        body = {"model": self.model, "messages": messages, **params}
        return self._ask(body, answer_content, parse, invalid)

    def check(self):
        """One tiny request (max_tokens 1), retried like any other; raises ChatFatal with a one-line
        reason unless the endpoint answers with a chat-completions body (its content may be
        empty)."""
        body = {"model": self.model, "messages": [{"role": "user", "content": "Reply with OK."}],
                "max_tokens": 1, "temperature": 0}

        def read(text):  # any body with a list of choices will do
            try:
                return "" if isinstance(json.loads(text)["choices"], list) else None
            except (ValueError, KeyError, TypeError):
                return None

        reply = self._ask(body, read, None, "")
        if reply.value is None:
            raise ChatFatal(
                f"{self.url} failed a one-token test request ({reply.calls} tries): {reply.error}")

    def _ask(self, body: dict, read, parse, invalid: str) -> Reply:
        """The retry loop. read(body text) -> the answer, or None when the body is malformed;
        parse(answer) -> value, or None to ask again."""
        error, answer, wait = "", None, 0.0
        for attempt in range(self.max_retries + 1):
            time.sleep(wait)
            wait = backoff_delay(attempt, self.backoff_base, self.backoff_cap, self.rng)
            try:
                status, headers, text = self._post(body)
            except RequestTimeout as e:
                error = f"timeout: {e}"
                continue
            except requests.RequestException as e:
                reason = snippet(self.scrub(f"{type(e).__name__}: {e}"))
                # MissingSchema, InvalidURL, ...: the base URL is wrong
                if isinstance(e, ValueError):
                    raise ChatFatal(f"cannot send a request to {self.url}: {reason}") from None
                error = f"request failed: {reason}"
                continue
            # the whole text, before any cut: no piece of the key can survive
            text = self.scrub(text)
            if status in FATAL_STATUS:
                raise ChatFatal(f"HTTP {status} from {self.url}: {snippet(text)} (check the key in "
                                f"${self.key_env}, the base URL and the model name {self.model!r})")
            if status == 429 or status >= 500:
                error = f"HTTP {status}: {snippet(text)}"
                retry_after = retry_after_seconds(headers.get("Retry-After"), self.retry_after_cap)
                wait = wait if retry_after is None else retry_after  # the server knows best
                continue
            if status != 200:  # another 4xx: this request is wrong, asking again will not help
                return Reply(None, answer, f"HTTP {status}: {snippet(text)}", attempt + 1)
            content = read(text)
            if content is None:  # not JSON, no choices, a null or non-string content
                error = f"malformed answer: {snippet(text)}"
                continue
            answer = content
            value = content if parse is None else parse(content)
            if value is not None:
                return Reply(value, answer, "", attempt + 1)
            error = invalid
        return Reply(None, answer, error, self.max_retries + 1)


# ----------------------------------------------------------------------------------------------
# An append-only JSONL cache (label.py's answers, eval.py's verdicts)
# ----------------------------------------------------------------------------------------------
class JsonlCache:
    """Records kept by key in a JSONL file that only grows: a run appends each record as it arrives
    (flushed and fsynced), so a kill loses at most the records in flight, and a rerun reads them
    back.

    A line torn by a kill (or otherwise unreadable) is skipped with a warning; before the first
    append a torn last line is closed off with a newline, so the new record starts a line of its
    own. The first record of a key wins. fresh=True starts the file anew (the old records are
    dropped). Records that `valid` refuses (a failure kept with its error) are in `refused`, the
    last wins.
    """

    def __init__(self, path, fresh: bool = False, valid=None):
        self.path, self.records, self.refused, self._lock = Path(path), {}, {}, threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not fresh and self.path.exists():
            self._read(valid or (lambda record: True))
        self._file = open(self.path, "w" if fresh else "a", encoding="utf-8")
        if not fresh and self.path.stat().st_size and not self._ends_with_newline():
            self._file.write("\n")  # close off the torn last line

    def _read(self, valid):
        for record in checkpoint.read_jsonl_tolerant(self.path):
            if not isinstance(record.get("key"), str):
                continue
            if valid(record):
                self.records.setdefault(record["key"], record)
            else:
                self.refused[record["key"]] = record

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"

    def __contains__(self, key) -> bool:
        return key in self.records

    def get(self, key, default=None):
        return self.records.get(key, default)

    def add(self, record: dict):
        """Append one record (it must have a string "key"); safe to call from several threads."""
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self._lock:
            self.records.setdefault(record["key"], record)
            self._file.write(line)
            self._file.flush()
            os.fsync(self._file.fileno())  # on disk before the next record

    def close(self):
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ----------------------------------------------------------------------------------------------
# Download a file (hh-rlhf): resume, verify, atomic rename, retries with backoff
# ----------------------------------------------------------------------------------------------
class DownloadError(OSError):
    """A download that failed after its retries; the message is one line and names the URL."""


def short_reason(error: BaseException) -> str:
    """A one-line reason for a network error: the OS's words ("[Errno 111] Connection refused")
    when requests buried them in a long message, else the message itself."""
    text = " ".join(str(error).split())
    found = re.search(r"\[Errno -?\d+\] [^'\")(]+", text)
    return f"{type(error).__name__}: {found.group(0).strip() if found else snippet(text, 200)}"


def download(url: str, target: str | Path, verify=None, attempts: int | None = None,
             backoff_base: float | None = None, backoff_cap: float = 8.0, timeout: float = 60.0,
             desc: str | None = None) -> Path:
    """Download `url` to `target` (progress bar); returns target, at once if it already exists.

    A partial download is kept as `<target>.part`; the next attempt resumes it with an HTTP Range
    request (or starts over if the server ignores ranges). verify(path) may raise (OSError,
    EOFError) on a broken file; the finished file is renamed into place only after it passes, so
    `target` is never a broken file. Connection errors, timeouts (per read: a large file takes long)
    and 5xx are retried with backoff; any other HTTP error fails at once. Raises DownloadError (one
    line).
    """
    from tqdm import tqdm

    attempts = DOWNLOAD_ATTEMPTS if attempts is None else attempts
    backoff_base = DOWNLOAD_BACKOFF if backoff_base is None else backoff_base
    target = Path(target)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    reason = ""
    for attempt in range(attempts):
        if attempt:
            time.sleep(backoff_delay(attempt - 1, backoff_base, backoff_cap))
        have = part.stat().st_size if part.exists() else 0
        try:
            with requests.get(url, stream=True, timeout=(min(timeout, 10.0), timeout),
                              headers={"Range": f"bytes={have}-"} if have else {}) as resp:
                if resp.status_code == 416:  # range past the end: the part is complete
                    pass
                elif resp.status_code in (200, 206):
                    mode = "ab" if resp.status_code == 206 else "wb"
                    total = int(resp.headers.get("Content-Length", 0)) + (
                        have if mode == "ab" else 0
                    )
                    with (
                        open(part, mode) as f,
                        tqdm(
                            total=total or None,
                            initial=have if mode == "ab" else 0,
                            unit="B",
                            unit_scale=True,
                            desc=desc or target.name,
                        ) as bar,
                    ):
                        for chunk in resp.iter_content(1 << 16):
                            f.write(chunk)
                            bar.update(len(chunk))
                elif resp.status_code >= 500 or resp.status_code in (408, 429):
                    reason = f"HTTP {resp.status_code}"
                    continue
                else:
                    raise DownloadError(f"could not download {url}: HTTP {resp.status_code}")
            try:
                if verify is not None:
                    verify(part)
            except (OSError, EOFError) as e:
                part.unlink(missing_ok=True)  # complete but broken: start clean
                reason = f"downloaded file is broken ({type(e).__name__}: {snippet(str(e), 100)})"
                continue
            os.replace(part, target)
            return target
        except requests.RequestException as e:
            reason = short_reason(e)
    raise DownloadError(f"could not download {url} after {attempts} attempts ({reason})")


def verify_gzip(path: Path):
    """Raise (EOFError, gzip.BadGzipFile) if `path` is not a complete gzip file."""
    with gzip.open(path, "rb") as f:
        while f.read(1 << 20):
            pass


# ----------------------------------------------------------------------------------------------
# hh-rlhf, downloaded once for --data hh-rlhf[:SUBSET,...]
# ----------------------------------------------------------------------------------------------
HH_RLHF_URL = "https://huggingface.co/datasets/Anthropic/hh-rlhf/resolve/main"


HH_RLHF_SUBSETS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")


def download_hh_rlhf(subset: str = "harmless-base", split: str = "train", cache_dir=None,
                     base_url: str | None = None) -> Path:
    """Download one hh-rlhf file to the cache (download(): progress bar, resume, gzip check, atomic
    rename, retries with backoff). Without network: a one-line DataError that names the URL and says
    how to point --data at a local copy."""
    base_url = base_url or os.environ.get("HH_RLHF_URL", HH_RLHF_URL)
    cache_dir = Path(
        cache_dir or os.environ.get("TOKEN_RLHF_CACHE", Path.home() / ".cache" / "token-rlhf"))
    url = f"{base_url}/{subset}/{split}.jsonl.gz"
    try:
        return download(url, cache_dir / "hh-rlhf" / subset / f"{split}.jsonl.gz",
                        verify=verify_gzip, desc=f"hh-rlhf/{subset}")
    except DownloadError as e:
        raise DataError(
            f"hh-rlhf: {e}; without network, fetch that file elsewhere and give its path: "
            "--data path/to/train.jsonl.gz (any .jsonl or .jsonl.gz of hh-rlhf rows)"
        ) from None
