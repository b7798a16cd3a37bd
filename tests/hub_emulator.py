"""A Hugging Face Hub emulated on 127.0.0.1 for tests: the endpoints huggingface_hub uses
to pull a model repo, and a count of the bytes it serves.

    hub = HubEmulator()                        # serves on 127.0.0.1:<free port>
    commit = hub.add_repo("org/tiny", folder)  # one commit: every file of the folder
    ... HF_ENDPOINT=hub.url ...
    hub.served_bytes                           # body bytes of every GET /resolve

A repo added with `xet=True` is also served the Xet way (tests/xet_cas.py): tree
entries and resolve responses carry its real Xet hash (X-Xet-Hash, and
X-Xet-Refresh-Route to GET /api/models/{repo}/xet-read-token/{rev}), and a CAS
under /cas serves GET /v1/reconstructions/{hash} and /v2/reconstructions/{hash}
(both with Range) and GET /xorbs/default/{hash} (Range required), counting
`xet_served_bytes`. Chunks are deduplicated across every Xet repo, as on the Hub.

Endpoints: GET /api/models/{repo}[/revision/{rev}] (model_info), GET
/api/models/{repo}/tree/{rev}[/{path}] (list_repo_tree, one page), HEAD and GET
/{repo}/resolve/{rev}/{path} with X-Repo-Commit, ETag / X-Linked-Etag (sha256 for
LFS files, the git blob sha1 otherwise), X-Linked-Size and Range. Errors carry
X-Error-Code as the Hub does: RepoNotFound (401, also for a private repo without a
token), GatedRepo (403), RevisionNotFound and EntryNotFound (404).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

LFS_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt")


def publish_with_extras(family: dict[str, Path], repo: Path) -> Path:
    """D (fp16 files beside the default ones) laid out as pipeline repos are published:
    a single-file checkpoint and a LoRA at its root, a VAE folder its model_index.json
    does not name (as SDXL base 1.0's vae_1_0), an OpenVINO file, a README and the
    model card's sample image."""
    shutil.copytree(family["D"], repo)
    shutil.copy(family["B"] / "unet/diffusion_pytorch_model.safetensors", repo / "x_1.0.safetensors")
    shutil.copy(family["C"] / "text_encoder/model.safetensors", repo / "x_lora.safetensors")
    shutil.copytree(family["B"] / "vae", repo / "vae_1_0")
    (repo / "unet" / "openvino_model.xml").write_text("<net/>\n")  # OpenVINO: another framework's
    (repo / "README.md").write_text("# X\n")
    (repo / "grid.jpg").write_bytes(os.urandom(300_000))  # as FLUX.1-dev's dev_grid.jpg
    return repo


@contextmanager
def huggingface_hub_default_endpoint(url: str):
    """huggingface_hub's own functions (those diffusers calls) at `url`, for the duration:
    they read HF_ENDPOINT when huggingface_hub was imported (compstore reads it per pull)."""
    import huggingface_hub.constants as constants
    from huggingface_hub import hf_api

    saved = constants.ENDPOINT, constants.HUGGINGFACE_CO_URL_TEMPLATE, hf_api.api.endpoint
    constants.ENDPOINT = hf_api.api.endpoint = url
    constants.HUGGINGFACE_CO_URL_TEMPLATE = url + "/{repo_id}/resolve/{revision}/{filename}"
    try:
        yield
    finally:
        constants.ENDPOINT, constants.HUGGINGFACE_CO_URL_TEMPLATE, hf_api.api.endpoint = saved


def xet_hash(data: bytes) -> str:
    """A stand-in for a file's Xet hash (64 hex digits; the real one is a Merkle hash)."""
    return hashlib.sha256(b"xet:" + data).hexdigest()


def _unquoted(match: re.Match) -> tuple:
    return tuple(None if g is None else unquote(g) for g in match.groups())


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    private: bool = False
    gated: bool = False
    tampered: dict[str, bytes] = field(default_factory=dict)  # path -> bytes served instead
    # Tree listings carry xetHash only when asked: huggingface_hub's own downloads then
    # try Xet transfers, which this emulator does not serve (issue 8).
    xet_hashes: bool = False
    cuts: dict[str, list[int]] = field(default_factory=dict)  # path -> per GET: bytes sent, then a drop
    ignore_range: bool = False  # serve whole files, 200, whatever Range asks (as some mirrors do)
    xet_files: dict[str, dict[str, str]] = field(default_factory=dict)  # commit -> path -> Xet hash


class HubEmulator:
    def __init__(self, token: str = "hf_test_token", xet_schemes: str = "best"):
        from xet_cas import ContentStore

        self.repos: dict[str, Repo] = {}
        self.token = token
        self.cas = ContentStore(xet_schemes)
        self.xet_token = "xet_emulated_token"
        self.xet_served_bytes = 0  # xorb bytes sent by the CAS
        self.xet_requests: list[str] = []  # CAS paths asked for, in order
        self.served_bytes = 0
        self.served_files: list[str] = []
        self.served_per_file: dict[str, int] = {}
        self.latency = 0.0  # seconds each file GET waits before its answer, as a far server would
        self.in_flight = self.max_in_flight = 0  # file GETs being answered: now, and at most
        self.gates: dict[tuple[str, str], threading.Event] = {}  # (repo, path) -> its GETs wait (30 s at most)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def add_repo(self, repo_id: str, folder: Path, *, private: bool = False, gated: bool = False,
                 xet: bool = False) -> str:
        files = {p.relative_to(folder).as_posix(): p.read_bytes()
                 for p in sorted(Path(folder).rglob("*")) if p.is_file()}
        commit = hashlib.sha1(json.dumps(sorted((k, hashlib.sha256(v).hexdigest())
                                                for k, v in files.items())).encode()).hexdigest()
        repo = self.repos.setdefault(repo_id, Repo(private=private, gated=gated))
        repo.commits[commit] = files
        repo.refs["main"] = commit
        if xet:
            repo.xet_files[commit] = {p: self.cas.add_file(data) for p, data in files.items()
                                      if p.endswith(LFS_SUFFIXES)}
        return commit

    def reset_counts(self) -> None:
        with self._lock:
            self.served_bytes = 0
            self.served_files = []
            self.served_per_file = {}
            self.xet_served_bytes = 0
            self.xet_requests = []
            self.max_in_flight = 0

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _error(self, status: int, code: str, commit: str | None = None) -> None:
                self.send_response(status)
                self.send_header("X-Error-Code", code)
                self.send_header("X-Error-Message", code)
                if commit:
                    self.send_header("X-Repo-Commit", commit)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _repo(self, repo_id: str):
                repo = hub.repos.get(repo_id)
                authed = self.headers.get("authorization") == f"Bearer {hub.token}"
                if repo is None or (repo.private and not authed):
                    self._error(401, "RepoNotFound")
                    return None
                return repo

            def _json(self, value) -> None:
                body = json.dumps(value).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                self._serve(head=False)

            def do_HEAD(self):
                self._serve(head=True)

            def _serve(self, head: bool) -> None:
                # matched quoted, each part unquoted: a revision's slashes come %2F-encoded
                # (`refs/pr/1`), as huggingface_hub sends them and the Hub reads them
                path = urlparse(self.path).path
                if path.startswith("/cas/"):
                    return self._cas(unquote(path[len("/cas"):]), head)
                m = re.match(r"^/api/models/([^/]+/[^/]+)/xet-read-token/([^/]+)$", path)
                if m:
                    return self._xet_token(*_unquoted(m))
                m = re.match(r"^/api/models/([^/]+/[^/]+)(?:/(revision|tree)/([^/]+)(?:/(.*))?)?$", path)
                if m:
                    repo_id, kind, rev, sub = _unquoted(m)
                    return self._api(repo_id, kind or "revision", rev or "main", sub)
                m = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
                if m:
                    return self._resolve(*_unquoted(m), head=head)
                self._error(404, "NotFound")

            def _commit(self, repo: Repo, rev: str) -> str | None:
                commit = repo.refs.get(rev, rev if rev in repo.commits else None)
                if commit is None:
                    self._error(404, "RevisionNotFound")
                return commit

            def _api(self, repo_id, kind, rev, sub) -> None:
                repo = self._repo(repo_id)
                if repo is None:
                    return
                commit = self._commit(repo, rev)
                if commit is None:
                    return
                files = repo.commits[commit]
                if kind == "revision":
                    return self._json({"id": repo_id, "sha": commit, "private": repo.private,
                                       "gated": repo.gated, "siblings": [{"rfilename": p} for p in files]})
                prefix = f"{sub.rstrip('/')}/" if sub else ""
                entries = []
                for p, data in sorted(files.items()):
                    if not p.startswith(prefix):
                        continue
                    entry = {"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": p}
                    if p.endswith(LFS_SUFFIXES):
                        entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data),
                                        "pointerSize": 134}
                        if p in repo.xet_files.get(commit, {}):
                            entry["xetHash"] = repo.xet_files[commit][p]
                        elif repo.xet_hashes:
                            entry["xetHash"] = xet_hash(data)
                    entries.append(entry)
                self._json(entries)

            def _resolve(self, repo_id, rev, file_path, head: bool) -> None:
                repo = self._repo(repo_id)
                if repo is None:
                    return
                if repo.gated and self.headers.get("authorization") != f"Bearer {hub.token}":
                    return self._error(403, "GatedRepo")
                commit = self._commit(repo, rev)
                if commit is None:
                    return
                files = repo.commits[commit]
                if file_path not in files:
                    return self._error(404, "EntryNotFound", commit)
                if head:
                    return self._answer(repo, commit, repo_id, file_path, head)
                with hub._lock:
                    hub.in_flight += 1
                    hub.max_in_flight = max(hub.max_in_flight, hub.in_flight)
                try:
                    if (repo_id, file_path) in hub.gates:
                        hub.gates[repo_id, file_path].wait(30)
                    time.sleep(hub.latency)
                    self._answer(repo, commit, repo_id, file_path, head)
                finally:
                    with hub._lock:
                        hub.in_flight -= 1

            def _answer(self, repo, commit, repo_id, file_path, head: bool) -> None:
                data = repo.commits[commit][file_path]
                etag = (hashlib.sha256(data).hexdigest() if file_path.endswith(LFS_SUFFIXES)
                        else git_blob_sha1(data))
                body = repo.tampered.get(file_path, data)
                start, end = 0, len(body) - 1
                rng = None if repo.ignore_range else self.headers.get("Range")
                if rng:
                    m = re.match(r"bytes=(\d+)-(\d*)", rng)
                    start = int(m.group(1))
                    end = int(m.group(2)) if m.group(2) else len(body) - 1
                self.send_response(206 if rng else 200)
                self.send_header("X-Repo-Commit", commit)
                self.send_header("ETag", f'"{etag}"')
                self.send_header("X-Linked-Etag", f'"{etag}"')
                self.send_header("X-Linked-Size", str(len(data)))
                if file_path in repo.xet_files.get(commit, {}):
                    self.send_header("X-Xet-Hash", repo.xet_files[commit][file_path])
                    self.send_header("X-Xet-Refresh-Route",
                                     f"{hub.url}/api/models/{repo_id}/xet-read-token/{commit}")
                self.send_header("Content-Length", str(end - start + 1))
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(body)}")
                self.end_headers()
                if not head:
                    chunk = body[start : end + 1]
                    cut = repo.cuts[file_path].pop(0) if repo.cuts.get(file_path) else None
                    if cut is not None:  # an interrupted transfer: some bytes, then the drop
                        chunk = chunk[:cut]
                        self.close_connection = True
                    with hub._lock:  # counted first: the client may look once it has the bytes
                        hub.served_bytes += len(chunk)
                        hub.served_files.append(file_path)
                        hub.served_per_file[file_path] = hub.served_per_file.get(file_path, 0) + len(chunk)
                    self.wfile.write(chunk)

            # -- Xet ---------------------------------------------------------------------
            def _xet_token(self, repo_id: str, rev: str) -> None:
                repo = self._repo(repo_id)
                if repo is None or self._commit(repo, rev) is None:
                    return
                if not repo.xet_files:
                    return self._error(404, "EntryNotFound")
                exp = int(time.time()) + 3600
                body = json.dumps({"accessToken": hub.xet_token, "exp": exp,
                                   "casUrl": f"{hub.url}/cas"}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("X-Xet-Cas-Url", f"{hub.url}/cas")
                self.send_header("X-Xet-Access-Token", hub.xet_token)
                self.send_header("X-Xet-Token-Expiration", str(exp))
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _cas(self, path: str, head: bool) -> None:
                with hub._lock:
                    hub.xet_requests.append(path)
                rng = self.headers.get("Range")
                m_rng = re.match(r"^bytes=(\d+)-(\d+)$", rng or "")
                m = re.match(r"^/v([12])/reconstructions/([0-9a-f]{64})$", path)
                if m:
                    if self.headers.get("authorization") != f"Bearer {hub.xet_token}":
                        return self._error(401, "Unauthorized")
                    if m.group(2) not in hub.cas.files:
                        return self._error(404, "NotFound")
                    size = hub.cas.files[m.group(2)].size
                    first, last = (int(m_rng.group(1)), int(m_rng.group(2))) if m_rng else (0, None)
                    if first >= max(size, 1):
                        return self._error(416, "RangeNotSatisfiable")
                    return self._json(hub.cas.reconstruction(m.group(2), first, last,
                                                             url=f"{hub.url}/cas", v2=m.group(1) == "2"))
                m = re.match(r"^/xorbs/default/([0-9a-f]{64})$", path)
                if m and m.group(1) in hub.cas.xorbs:
                    if not m_rng:  # the protocol: xorb bytes only by the ranges a reconstruction gave
                        return self._error(403, "RangeRequired")
                    data = hub.cas.xorbs[m.group(1)].data
                    start, end = int(m_rng.group(1)), min(int(m_rng.group(2)), len(data) - 1)
                    body = data[start:end + 1]
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    if not head:
                        with hub._lock:  # counted first, as above
                            hub.xet_served_bytes += len(body)
                        self.wfile.write(body)
                    return
                self._error(404, "NotFound")

        return Handler
