"""A small client for OpenAI-compatible chat-completions endpoints (vLLM, SGLang, TGI, hosted APIs).

Used by the evaluation's optional answer judge and by the training data synthesis. Standard library only:
requests go to ``{base_url}/chat/completions``; at most `concurrency` are in flight at once (across threads);
connection errors, timeouts, 408/409/429 and 5xx answers are retried with exponential backoff and jitter;
anything else fails at once with the server's message. `cancel()` ends every request in flight within
moments (their connections are shut down) and fails every later one, without retries.
"""

from __future__ import annotations

import http.client
import json
import random
import socket
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence

_RETRIED_STATUS = {408, 409, 429}


class ChatClientError(RuntimeError):
    """A request that failed for good (after the retries, or with a status that retrying cannot fix)."""

    def __init__(self, message: str, status: Optional[int] = None):
        super().__init__(message)
        self.status = status


class _Connections:
    """The HTTP connections a client has open, so that `cancel` can shut them down under a blocked read."""

    def __init__(self):
        self.lock = threading.Lock()
        self.open = set()

    def tracked(self, http_class):
        registry = self

        class Tracked(http_class):
            def connect(self):
                super().connect()
                with registry.lock:
                    registry.open.add(self)

            def close(self):
                with registry.lock:
                    registry.open.discard(self)
                super().close()

        return Tracked

    def shut_down(self) -> None:
        with self.lock:
            conns = list(self.open)
        for conn in conns:
            sock = getattr(conn, "sock", None)
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def _opener(registry: _Connections):
    class HTTP(urllib.request.HTTPHandler):
        def do_open(self, http_class, req, **kwargs):
            return super().do_open(registry.tracked(http_class), req, **kwargs)

    class HTTPS(urllib.request.HTTPSHandler):
        def do_open(self, http_class, req, **kwargs):
            return super().do_open(registry.tracked(http_class), req, **kwargs)

    return urllib.request.build_opener(HTTP(), HTTPS())


class ChatClient:
    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: Optional[str] = None,
        timeout: float = 120.0,
        max_retries: int = 4,
        concurrency: int = 8,
        backoff: float = 1.0,
        **defaults,
    ):
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ValueError("base_url: expected an http(s) URL, got %r" % (base_url,))
        if not isinstance(model, str) or not model:
            raise ValueError("model: expected a model name, got %r" % (model,))
        if not timeout > 0:
            raise ValueError("timeout: expected seconds > 0, got %r" % (timeout,))
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError("max_retries: expected an integer >= 0, got %r" % (max_retries,))
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError("concurrency: expected an integer >= 1, got %r" % (concurrency,))
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key = api_key
        self.timeout = float(timeout)
        self.max_retries = max_retries
        self.concurrency = concurrency
        self.backoff = float(backoff)
        self.defaults = defaults  # extra request fields (temperature, max_tokens, …) sent with every request
        self._slots = threading.BoundedSemaphore(concurrency)
        self._cancelled = threading.Event()
        self._connections = _Connections()
        self._opener = _opener(self._connections)

    def cancel(self) -> None:
        """Fail the requests in flight now (their connections are shut down) and every later one."""
        self._cancelled.set()
        self._connections.shut_down()

    def _check_cancelled(self) -> None:
        if self._cancelled.is_set():
            raise ChatClientError("%s: cancelled" % self.url)

    def complete(self, messages: Sequence[Dict], **params) -> str:
        """The assistant message's text for one conversation (`params` override the defaults)."""
        if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) for m in messages):
            raise ValueError("messages: expected a list of {'role', 'content'} dicts, got %r" % (messages,))
        body = dict(self.defaults, **params)
        body.update(model=self.model, messages=list(messages))
        payload = json.dumps(body).encode()
        for attempt in range(self.max_retries + 1):
            self._check_cancelled()
            try:
                with self._slots:
                    self._check_cancelled()
                    reply = self._post(payload)
                return _message_text(reply)
            except ChatClientError as exc:
                self._check_cancelled()
                retryable = exc.status is None or exc.status in _RETRIED_STATUS or exc.status >= 500
                if not retryable or attempt == self.max_retries:
                    raise
            self._cancelled.wait(self.backoff * (2**attempt) * (0.5 + random.random()))
        raise AssertionError("unreachable")  # the loop either returns or raises

    def check_reachable(self, timeout: float = 5.0) -> None:
        """ChatClientError when nothing answers at the server's address (refused, unknown host, timeout); any HTTP
        answer, even an error status, counts as reachable. Costs one GET of `{base_url}/models`."""
        url = self.url[: -len("/chat/completions")] + "/models"
        headers = {"Authorization": "Bearer " + self.api_key} if self.api_key else {}
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout):
                return
        except urllib.error.HTTPError:
            return
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
            raise ChatClientError("%s does not answer (%s)" % (url, getattr(exc, "reason", exc))) from None

    def complete_many(self, conversations: Sequence[Sequence[Dict]], **params) -> List[str]:
        """`complete` for many conversations, `concurrency` at a time; results in input order."""
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(lambda m: self.complete(m, **params), conversations))

    def _post(self, payload: bytes) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = "Bearer " + self.api_key
        request = urllib.request.Request(self.url, data=payload, headers=headers, method="POST")
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                return json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")[:300]
            raise ChatClientError("%s answered %d: %s" % (self.url, exc.code, detail), exc.code) from exc
        except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException, OSError) as exc:
            raise ChatClientError("%s: %s" % (self.url, getattr(exc, "reason", exc))) from exc
        except json.JSONDecodeError as exc:
            raise ChatClientError("%s: the answer is not JSON (%s)" % (self.url, exc), 502) from exc


def _message_text(reply: dict) -> str:
    try:
        content = reply["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError) as exc:
        raise ChatClientError("unexpected chat-completions answer: %s" % json.dumps(reply)[:300], 502) from exc
    return content or ""
