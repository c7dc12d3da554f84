"""A local stand-in for the Hugging Face Hub, as far as `huggingface_hub.hf_hub_download` (2.5.0) needs one.

`HubServer` serves `{repo_id: {filename: bytes}}` under `/{repo_id}/resolve/{revision}/{filename}` the way the Hub
does: a HEAD or GET of a small file answers 200 with `X-Repo-Commit`, a git-blob `ETag` and `Content-Length`; an LFS
file (`LFS_SUFFIXES`) answers 302 with `X-Linked-Etag` (its SHA-256) and `X-Linked-Size`, to `http://localhost:PORT
/cdn/<sha256>`, another origin than `127.0.0.1` as the Hub's CDN is, so huggingface_hub stops at the redirect and
downloads from there, without the Authorization header, with `Range: bytes=N-` when it resumes. Unknown repos,
revisions and files answer 404 with the Hub's `X-Error-Code`. No Xet header is sent (`X-Xet-Hash`, the xet-auth link),
so every download is a plain HTTP GET. HTTP/1.0: one request per connection, so a stopped server refuses at once.

Switches: `cut_after[(repo_id, filename)] = N` sends the full length, then closes the connection after byte N of the
file, on every try and resume, so the download fails; `gated` holds repos that answer 401/403 `GatedRepo`.

The `hub` fixture starts one, points huggingface_hub at it (`HF_ENDPOINT`) and at a fresh cache (`HF_HOME`,
`HF_HUB_CACHE`) and yields it. huggingface_hub reads those variables into `huggingface_hub.constants` when it is
imported, so `point_hub_at` sets the constants as well. Another test module uses it with
`from hub_server import hub  # noqa: F401` and `hub.serve("timm/x", {"config.json": b"{}", ...})`.
"""

from __future__ import annotations

import hashlib
import http.server
import pathlib
import threading
from collections.abc import Iterator
from urllib.parse import unquote, urlsplit

import pytest

LFS_SUFFIXES = (".safetensors", ".bin", ".pth")


def git_blob_sha1(data: bytes) -> str:
    """The id git gives a file's content: the Hub's ETag of a file not in LFS."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubServer:
    """The Hub's `/resolve` and a CDN for LFS files, on 127.0.0.1 (a thread); see the module docstring."""

    def __init__(self) -> None:
        self.repos: dict[str, dict[str, bytes]] = {}
        self.cut_after: dict[tuple[str, str], int] = {}
        self.gated: set[str] = set()
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header) of each request
        self._httpd = _QuietServer(("127.0.0.1", 0), _handler(self))
        self.port = self._httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def serve(self, repo_id: str, files: dict[str, bytes]) -> str:
        """Serve (or replace) a repo; returns its commit hash, which changes with its content as a new commit would."""
        self.repos[repo_id] = dict(files)
        return self.commit(repo_id)

    def commit(self, repo_id: str) -> str:
        """The 40-hex commit of a repo's current content."""
        digest = hashlib.sha1(repo_id.encode())
        for name, data in sorted(self.repos[repo_id].items()):
            digest.update(name.encode() + b"\0" + git_blob_sha1(data).encode())
        return digest.hexdigest()

    def stop(self) -> None:
        """Stop serving and free the port: connections to it are refused from now on."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()


class _QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:  # a client hanging up early: expected with cut_after
        pass


def _handler(hub: HubServer) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def log_message(self, format: str, *args) -> None:
            pass

        def do_HEAD(self) -> None:
            self._answer(body=False)

        def do_GET(self) -> None:
            self._answer(body=True)

        def _answer(self, body: bool) -> None:
            path = urlsplit(self.path).path
            hub.requests.append((self.command, path, self.headers.get("Range")))
            if path.startswith("/cdn/"):
                self._cdn(path.removeprefix("/cdn/"), body)
            elif "/resolve/" in path:
                repo_id, _, rest = path.lstrip("/").partition("/resolve/")
                revision, _, filename = rest.partition("/")
                self._resolve(unquote(repo_id), unquote(revision), unquote(filename), body)
            else:
                self._error(404, "EntryNotFound", "Not a /resolve URL")

        def _resolve(self, repo_id: str, revision: str, filename: str, body: bool) -> None:
            if repo_id not in hub.repos:
                return self._error(404, "RepoNotFound", "Repository not found")
            commit = hub.commit(repo_id)
            if repo_id in hub.gated:
                status = 403 if self.headers.get("Authorization") else 401
                return self._error(status, "GatedRepo", f"Access to model {repo_id} is restricted.", commit)
            if revision not in ("main", commit):
                return self._error(404, "RevisionNotFound", "Invalid rev id", commit)
            data = hub.repos[repo_id].get(filename)
            if data is None:
                return self._error(404, "EntryNotFound", "Entry not found", commit)
            if not filename.endswith(LFS_SUFFIXES):
                return self._send(data, body, {"X-Repo-Commit": commit, "ETag": f'"{git_blob_sha1(data)}"'},
                                  hub.cut_after.get((repo_id, filename)))
            sha256 = hashlib.sha256(data).hexdigest()
            self.send_response(302)
            self.send_header("Location", f"http://localhost:{hub.port}/cdn/{sha256}")
            self.send_header("X-Repo-Commit", commit)
            self.send_header("ETag", f'"{git_blob_sha1(data)}"')  # the pointer file's; X-Linked-Etag takes precedence
            self.send_header("X-Linked-Etag", f'"{sha256}"')
            self.send_header("X-Linked-Size", str(len(data)))
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _cdn(self, sha256: str, body: bool) -> None:
            for repo_id, files in hub.repos.items():
                for filename, data in files.items():
                    if hashlib.sha256(data).hexdigest() == sha256:
                        return self._send(data, body, {"ETag": f'"{sha256}"'}, hub.cut_after.get((repo_id, filename)))
            self._error(404, None, "No such object")

        def _send(self, data: bytes, body: bool, headers: dict[str, str], cut: int | None) -> None:
            """200, or 206 for `Range: bytes=START-`; with `cut`, the body stops at byte `cut` of the file."""
            start = 0
            range_ = self.headers.get("Range", "")
            if range_.startswith("bytes=") and range_.endswith("-"):
                start = int(range_[len("bytes="):-1])
                if start >= len(data):
                    return self._error(416, None, "Range Not Satisfiable")
            self.send_response(206 if start else 200)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(data) - start))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            if body:
                end = len(data) if cut is None else max(start, min(cut, len(data)))
                self.wfile.write(data[start:end])
                self.wfile.flush()
            self.close_connection = True

        def _error(self, status: int, code: str | None, message: str, commit: str | None = None) -> None:
            self.send_response(status)
            if code is not None:
                self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
            if commit is not None:
                self.send_header("X-Repo-Commit", commit)
            payload = f'{{"error": "{message}"}}'.encode()
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

    return Handler


def point_hub_at(monkeypatch: pytest.MonkeyPatch, endpoint: str, home: pathlib.Path) -> None:
    """Point huggingface_hub at `endpoint` with an empty cache and no token under `home`, online: the environment
    variables (for subprocesses) and the `huggingface_hub.constants` read from them at import (for this process)."""
    from huggingface_hub import constants

    cache, token = home / "hub", home / "token"
    variables = {"HF_ENDPOINT": endpoint, "HF_HOME": home, "HF_HUB_CACHE": cache, "HF_TOKEN_PATH": token}
    for name, value in variables.items():
        monkeypatch.setenv(name, str(value))
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    template = endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    values = {"ENDPOINT": endpoint, "HUGGINGFACE_CO_URL_TEMPLATE": template,
              "HF_HOME": str(home), "HF_HUB_CACHE": str(cache), "HF_TOKEN_PATH": str(token),
              "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
              "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json"), "HF_HUB_OFFLINE": False}
    for name, value in values.items():
        monkeypatch.setattr(constants, name, value)
    # huggingface_hub 2.5.0 GETs {ENDPOINT}/api/agent-harnesses (3 s timeout) for its User-Agent, at most once a day:
    # a fresh copy of its cache keeps that request out of the tests
    home.mkdir(parents=True, exist_ok=True)
    (home / ".agent_harnesses.json").write_text('{"standardEnvVars": [], "harnesses": {}}')


@pytest.fixture
def hub(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    """A `HubServer` that huggingface_hub downloads from, into an empty cache `tmp_path / "hf" / "hub"`."""
    import huggingface_hub

    server = HubServer()
    point_hub_at(monkeypatch, server.url, tmp_path / "hf")
    try:
        yield server
    finally:
        server.stop()
        huggingface_hub.close_session()  # the shared client's pool holds no connection to a later test's server
