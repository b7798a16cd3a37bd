"""A real S3-compatible server (moto's) on 127.0.0.1, counting the bytes it moves.

The counts are taken on the server side of the socket, per key prefix, so a test
can compare what a push or fetch transferred with what the other side lacked
without trusting compstore's own counters.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from urllib.parse import unquote

from werkzeug.serving import make_server


class S3Server:
    def __init__(self):
        from moto.moto_server.werkzeug_app import (DomainDispatcherApplication, MotoRequestHandler,
                                                   create_backend_app)

        self.received = Counter()  # PUT payload bytes, by the key's folder ("packs", "index", ...)
        self.sent = Counter()  # GET body bytes, by folder
        self.lock = threading.Lock()
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
        app = DomainDispatcherApplication(create_backend_app)
        self._server = make_server("127.0.0.1", 0, self._counting(app), threaded=True,
                                   request_handler=MotoRequestHandler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _counting(self, app):
        def wsgi(environ, start_response):
            folder = _folder(environ.get("PATH_INFO", ""))
            method = environ["REQUEST_METHOD"]
            if method == "PUT":  # payload bytes, without aws-chunked framing
                n = environ.get("HTTP_X_AMZ_DECODED_CONTENT_LENGTH") or environ.get("CONTENT_LENGTH")
                with self.lock:
                    self.received[folder] += int(n or 0)
            body = app(environ, start_response)
            if method != "GET":
                return body
            chunks = list(body)
            with self.lock:
                self.sent[folder] += sum(len(c) for c in chunks)
            return chunks
        return wsgi

    def reset_counts(self) -> None:
        with self.lock:
            self.received.clear()
            self.sent.clear()

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join()


def _folder(path: str) -> str:
    """/bucket/prefix/packs/<sha>.pack -> "packs" (the folder right above the object)."""
    parts = unquote(path).strip("/").split("/")
    return parts[-2] if len(parts) >= 3 else ""
