"""The chat-completions client against a local fake server: answers, retries, concurrency limit, errors."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from avar_ops.grading.chat_client import ChatClient, ChatClientError


class FakeServer:
    """Replies per request from a script: ("ok", text) | (status, body) | ("sleep", seconds)."""

    def __init__(self, script=None, delay=0.0):
        self.script = list(script or [])
        self.delay = delay
        self.requests = []
        self.active = 0
        self.max_active = 0
        self.lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with owner.lock:
                    owner.requests.append((self.path, dict(self.headers), body))
                    step = owner.script.pop(0) if owner.script else ("ok", None)
                    owner.active += 1
                    owner.max_active = max(owner.max_active, owner.active)
                try:
                    time.sleep(owner.delay)
                    if step[0] == "sleep":
                        time.sleep(step[1])
                        step = ("ok", None)
                    if step[0] == "ok":
                        text = step[1] if step[1] is not None else "echo: " + body["messages"][-1]["content"]
                        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]})
                        status = 200
                    else:
                        status, data = step
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    self.wfile.write(data.encode())
                finally:
                    with owner.lock:
                        owner.active -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = "http://127.0.0.1:%d/v1" % self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _user(text):
    return [{"role": "user", "content": text}]


def test_complete_sends_model_key_and_defaults():
    with FakeServer() as server:
        client = ChatClient(server.url, "judge-7b", api_key="k", temperature=0.0, max_tokens=16)
        assert client.complete(_user("hi")) == "echo: hi"
        path, headers, body = server.requests[0]
        assert path == "/v1/chat/completions"
        assert headers["Authorization"] == "Bearer k"
        assert body == {"temperature": 0.0, "max_tokens": 16, "model": "judge-7b", "messages": _user("hi")}
        client.complete(_user("x"), max_tokens=4)
        assert server.requests[1][2]["max_tokens"] == 4


def test_retries_with_backoff_then_succeeds():
    with FakeServer([(503, "busy"), (429, "slow down"), ("ok", "fine")]) as server:
        client = ChatClient(server.url, "m", max_retries=3, backoff=0.01)
        assert client.complete(_user("q")) == "fine"
        assert len(server.requests) == 3


def test_gives_up_after_max_retries_and_on_client_errors():
    with FakeServer([(500, "e1"), (500, "e2"), (500, "e3")]) as server:
        client = ChatClient(server.url, "m", max_retries=2, backoff=0.01)
        with pytest.raises(ChatClientError, match="answered 500: e3") as info:
            client.complete(_user("q"))
        assert info.value.status == 500 and len(server.requests) == 3
    with FakeServer([(400, "bad model")]) as server:
        with pytest.raises(ChatClientError, match="400: bad model"):
            ChatClient(server.url, "m", max_retries=5, backoff=0.01).complete(_user("q"))
        assert len(server.requests) == 1  # a client error is not retried
    with FakeServer([(200, '{"choices": []}')]) as server:
        with pytest.raises(ChatClientError, match="unexpected chat-completions answer"):
            ChatClient(server.url, "m", max_retries=0).complete(_user("q"))


def test_timeout_is_retried_then_reported():
    with FakeServer([("sleep", 1.0), ("sleep", 1.0)]) as server:
        client = ChatClient(server.url, "m", timeout=0.2, max_retries=1, backoff=0.01)
        start = time.monotonic()
        with pytest.raises(ChatClientError, match="timed out"):
            client.complete(_user("q"))
        assert time.monotonic() - start < 5.0


def test_concurrency_limit_and_order():
    with FakeServer(delay=0.05) as server:
        client = ChatClient(server.url, "m", concurrency=2)
        answers = client.complete_many([_user(str(i)) for i in range(8)])
        assert answers == ["echo: %d" % i for i in range(8)]
        assert server.max_active == 2  # two in flight at once, never more


def test_bad_arguments():
    with pytest.raises(ValueError, match="base_url"):
        ChatClient("localhost:8000", "m")
    with pytest.raises(ValueError, match="model"):
        ChatClient("http://x", "")
    with pytest.raises(ValueError, match="concurrency"):
        ChatClient("http://x", "m", concurrency=0)
    with pytest.raises(ValueError, match="max_retries"):
        ChatClient("http://x", "m", max_retries=-1)
    with pytest.raises(ValueError, match="messages"):
        ChatClient("http://x", "m").complete("hello")


def test_judge_extracts_answers_for_the_checker():
    from avar_ops.eval.judge import Judge
    from avar_ops.grading.answers import AnswerChecker, AnswerSpec

    with FakeServer([("ok", " B "), ("ok", "NONE")]) as server:
        judge = Judge(ChatClient(server.url, "judge", concurrency=1))
        out = judge.extract(["Which one?", "How many?"], ["I would go with the second", "no idea"])
        assert out == ["<answer>B</answer>", "<answer></answer>"]
        assert judge.mode == "judge:judge"  # the model, not its address, names the mode
        body = server.requests[0][2]
        assert body["temperature"] == 0.0 and "I would go with the second" in body["messages"][-1]["content"]
    checker = AnswerChecker()
    right, empty = checker.check_many(out, [AnswerSpec("B", "choice", num_options=4), AnswerSpec("3", "number")])
    assert right.correct and right.method == "answer_tag"
    assert empty.status == "incorrect"
