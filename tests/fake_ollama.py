"""A loopback HTTP server that replays Ollama's real wire format (no Ollama server can be installed here).

NDJSON streaming from POST /api/chat (one JSON object per line, a final `done: true` object,
per-token `logprobs` when asked), an `{"error": ...}` line in the middle of a stream, HTTP 404
with `{"error": "model '...' not found"}` for an unknown model, load/unload replies
(`done_reason: "load"` / `"unload"`), GET /api/ps, and POST /api/pull's progress stream (status
lines, per-layer digest/total/completed, `{"error": ...}` for a tag the registry lacks).
"""

from __future__ import annotations

import json
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

CREATED = "2026-11-21T10:00:00.000000Z"
ANSWER = [("The", -0.05), (" sky", -0.4), (" is", -0.01), (" blue", -1.2), (".", -0.3)]


class FakeOllama(BaseHTTPRequestHandler):
    requests: list[tuple[str, dict]] = []
    loaded: set[str] = set()

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _json(self, status: int, obj: dict) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _ndjson(self, lines: list[dict]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for obj in lines:
            data = (json.dumps(obj) + "\n").encode()
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")

    def do_GET(self):
        if self.path == "/api/ps":
            self._json(200, {"models": [{"name": m, "model": m, "size": 1, "digest": "0" * 64, "details": {},
                                         "expires_at": CREATED, "size_vram": 0} for m in self.loaded]})
        else:
            self._json(404, {"error": "not found"})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.requests.append((self.path, body))
        model = body.get("model")
        if self.path == "/api/pull":
            return self._ndjson(self._pull_lines(body["model"]))
        if model == "missing:latest":
            return self._json(404, {"error": f"model '{model}' not found"})
        if not body.get("messages"):  # load or unload
            unload = body.get("keep_alive") == 0
            (self.loaded.discard if unload else self.loaded.add)(model)
            return self._json(200, {"model": model, "created_at": CREATED, "message": {"role": "assistant", "content": ""},
                                    "done_reason": "unload" if unload else "load", "done": True})
        lines = []
        for text, lp in ANSWER:
            line = {"model": model, "created_at": CREATED, "message": {"role": "assistant", "content": text}, "done": False}
            if body.get("logprobs") and model != "nologprobs:latest":
                line["logprobs"] = [{"token": text, "logprob": lp, "bytes": list(text.encode())}]
            lines.append(line)
        if model == "crashes:latest":
            lines = lines[:2] + [{"error": "an error was encountered while running the model: unexpected EOF"}]
        else:
            lines.append({"model": model, "created_at": CREATED, "message": {"role": "assistant", "content": ""},
                          "done": True, "done_reason": "stop", "total_duration": 1000, "load_duration": 10,
                          "prompt_eval_count": 12, "prompt_eval_duration": 100, "eval_count": 5, "eval_duration": 500})
        self._ndjson(lines)


    @staticmethod
    def _pull_lines(tag: str) -> list[dict]:
        if tag == "missing:latest":  # what Ollama streams when the registry has no such tag
            return [{"status": "pulling manifest"}, {"error": "pull model manifest: file does not exist"}]
        digest, total = "sha256:" + "74701a8c35f6" * 5 + "abcd", 1_321_082_688
        return [{"status": "pulling manifest"},
                *({"status": f"pulling {digest[7:19]}", "digest": digest, "total": total, "completed": done}
                  for done in (0, total // 2, total)),
                {"status": "verifying sha256 digest"}, {"status": "writing manifest"}, {"status": "success"}]


@contextmanager
def fake_ollama() -> Iterator[str]:
    """Serve on 127.0.0.1 (a free port) in a thread; yields the host URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeOllama)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
