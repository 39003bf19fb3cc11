"""A minimal production service with shadowpipe added (standard library HTTP server).

The lines a team adds are marked ``# shadowpipe``: create the emitter once, decorate the
predict function, return the request id to the caller, send feedback when the outcome is
known. Everything else is the service as it was.

Run it against the embedded stack (``shadowpipe stack up``) or any SHADOWPIPE_* settings::

    python docs/examples/example_service.py 8080 &
    curl -s -d '{"amount": 1250.0, "country": "DE"}' localhost:8080/predict
    # {"label": "review", "request_id": "3f0c...-0"}
    curl -s -d '{"request_id": "3f0c...-0", "label": "ok"}' localhost:8080/outcome
"""

from __future__ import annotations

import json
import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from shadowpipe.producers import Emitter, current_request_id  # shadowpipe

emitter = Emitter()  # shadowpipe: SHADOWPIPE_* settings; flushed at interpreter exit


@emitter.track(model="fraud", version="3")  # shadowpipe: features = first argument
def predict(features: dict[str, Any]) -> dict[str, Any]:
    risk = min(1.0, float(features.get("amount", 0.0)) / 2000.0)
    label = "review" if risk > 0.5 else "ok"
    return {"label": label, "probabilities": {"review": risk, "ok": 1.0 - risk}}


class Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        if self.path == "/predict":
            answer = predict(body)
            # shadowpipe: the id the outcome will be reported under
            self._reply({"label": answer["label"], "request_id": current_request_id()})
        elif self.path == "/outcome":
            # shadowpipe: the real outcome, seconds or days later, from any process
            emitter.emit_feedback(body["request_id"], body["label"])
            self._reply({"ok": True})
        else:
            self.send_error(404)

    def _reply(self, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def main(port: int) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    # Python's default SIGTERM kills without exit handlers: exit normally instead.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        emitter.close(timeout=5.0)  # shadowpipe: optional, atexit does it too


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 8080)
