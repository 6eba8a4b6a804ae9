"""A stand-in for ``kvplug serve`` that answers /health and /metrics but never finishes a completion
(except the runner's 64-token warm-up): what a stuck vLLM looks like to the bench's client.

Run as ``python stuck_server.py serve MODEL --port N ...`` (the runner's arguments; only --port is read).
"""

import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        body = b"# TYPE vllm:prompt_tokens counter\nvllm:prompt_tokens_total 0.0\n" if self.path == "/metrics" else b""
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        if len(req["prompt"]) != 64:  # stuck: one token, then nothing
            self.wfile.write(b'data: {"choices": [{"text": "a"}]}\n\n')
            self.wfile.flush()
            time.sleep(3600)
        for _ in range(req["max_tokens"]):
            self.wfile.write(b'data: {"choices": [{"text": "a"}]}\n\n')
        self.wfile.write(b"data: [DONE]\n\n")


if __name__ == "__main__":
    port = int(sys.argv[sys.argv.index("--port") + 1])
    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
