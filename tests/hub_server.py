"""A small Hugging Face hub on 127.0.0.1, for tests: the subset of the hub's HTTP API that
`huggingface_hub` (and through it `transformers`) uses to download a model repository.

- `GET /api/models/{repo}[/revision/{rev}]`: the repo info, with `sha` and `siblings`.
- `GET /api/models/{repo}/tree/{rev}/{folder}`: the files of a folder (transformers lists
  `additional_chat_templates`).
- `HEAD|GET /{repo}/resolve/{rev}/{file}`: a file with `X-Repo-Commit` and `ETag`. Weight
  files are stored as LFS on the real hub: their resolve answers 302 to a content URL
  (`/lfs/{sha256}`, the CDN's role) with `X-Linked-Etag` and `X-Linked-Size`; that URL
  serves the bytes, honouring `Range`.
- Errors with the hub's status codes and `X-Error-Code` headers, so huggingface_hub raises
  its own typed exceptions: an unknown or private repository is 401 `RepoNotFound` without
  a token (404 with one), an unknown revision 404 `RevisionNotFound`, a missing file 404
  `EntryNotFound` (with the commit), a gated repository's files 401 `GatedRepo` without a
  token and 403 with a token that has no access.

Repositories are built from folders (as `save_pretrained` writes them): each `add` is one
commit, on a branch, with optional tags. Every request is logged in `requests`.
"""

import hashlib
import http.server
import json
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".msgpack", ".model")


@dataclass
class Repo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> files
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag -> sha
    gated: bool = False
    private: bool = False


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    authorization: str | None
    range: str | None


class HubServer:
    """Start with `start()`, stop with `stop()`; `url` is the `HF_ENDPOINT` to use."""

    def __init__(self, *, tokens: tuple[str, ...] = ()):
        self.repos: dict[str, Repo] = {}
        self.tokens = set(tokens)  # tokens with access to gated and private repositories
        self.requests: list[Request] = []
        self.blobs: dict[str, bytes] = {}  # sha256 -> LFS content
        self._connections: set = set()  # open keep-alive connections, closed by `stop`
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ repositories

    def add(
        self,
        repo_id: str,
        folder: str | Path,
        *,
        branch: str = "main",
        tags: tuple[str, ...] = (),
        gated: bool = False,
        private: bool = False,
        drop: tuple[str, ...] = (),
    ) -> str:
        """Commits the files of `folder` (except `drop`) to `repo_id` on `branch`; returns the commit."""
        files = {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file() and p.name not in drop}
        digest = hashlib.sha1(repo_id.encode() + branch.encode())
        for name, content in files.items():
            digest.update(name.encode() + hashlib.sha256(content).digest())
        sha = digest.hexdigest()
        repo = self.repos.setdefault(repo_id, Repo())
        repo.gated, repo.private = repo.gated or gated, repo.private or private
        repo.commits[sha] = files
        for ref in (branch, *tags):
            repo.refs[ref] = sha
        for name, content in files.items():
            if name.endswith(LFS_SUFFIXES):
                self.blobs[hashlib.sha256(content).hexdigest()] = content
        return sha

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "HubServer":
        hub = self

        class Handler(_Handler):
            server_hub = hub

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stops listening and closes the client's open keep-alive connections, so that no
        request is answered afterwards."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()
            self._server = None
        for connection in list(self._connections):
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            connection.close()
        self._connections.clear()

    def files_fetched(self) -> list[str]:
        """The file names whose content was sent (GET of a resolve or of an LFS blob)."""
        names = {
            hashlib.sha256(c).hexdigest(): n
            for r in self.repos.values()
            for f in r.commits.values()
            for n, c in f.items()
        }
        fetched = []
        for request in self.requests:
            if request.method != "GET":
                continue
            if "/resolve/" in request.path:
                fetched.append(unquote(request.path.rsplit("/", 1)[1]))
            elif request.path.startswith("/lfs/"):
                fetched.append(names[request.path[5:]])
        return fetched


class _Handler(http.server.BaseHTTPRequestHandler):
    server_hub: HubServer
    protocol_version = "HTTP/1.1"

    def setup(self):
        super().setup()
        self.server_hub._connections.add(self.connection)

    def finish(self):
        super().finish()
        self.server_hub._connections.discard(self.connection)

    def log_message(self, format, *args):  # quiet: requests are recorded in `HubServer.requests`
        pass

    def do_HEAD(self):
        self._answer(body=False)

    def do_GET(self):
        self._answer(body=True)

    # ------------------------------------------------------------------ routing

    def _answer(self, *, body: bool) -> None:
        hub = self.server_hub
        path = urlsplit(self.path).path
        auth = self.headers.get("Authorization")
        hub.requests.append(Request(self.command, path, auth, self.headers.get("Range")))
        if path.startswith("/api/models/"):
            rest = path[len("/api/models/") :]
            repo_id, tree, where = rest.partition("/tree/")
            if tree:
                revision, _, folder = where.partition("/")
                return self._tree(unquote(repo_id), unquote(revision), unquote(folder), auth, body)
            repo_id, _, revision = rest.partition("/revision/")
            return self._info(unquote(repo_id), unquote(revision) or "main", auth, body)
        if path.startswith("/lfs/"):
            return self._content(hub.blobs.get(path[5:]), body)
        repo_id, sep, rest = path.lstrip("/").partition("/resolve/")
        if sep:
            revision, _, filename = rest.partition("/")
            return self._resolve(unquote(repo_id), unquote(revision), unquote(filename), auth, body)
        self._error(404, None, "Not found", body)

    def _access(self, repo: Repo | None, auth: str | None) -> tuple[int, str] | None:
        """The refusal of a request for `repo`'s info, or None."""
        token_ok = auth is not None and auth.removeprefix("Bearer ") in self.server_hub.tokens
        if repo is None or (repo.private and not token_ok):
            return (401 if auth is None else 404), "RepoNotFound"
        return None

    def _commit(self, repo: Repo, revision: str) -> str | None:
        if revision in repo.commits:
            return revision
        return repo.refs.get(revision)

    def _revision(self, repo_id: str, revision: str, auth: str | None, body: bool) -> tuple[Repo, str] | None:
        """The repository and commit a request names, or None after answering its error."""
        repo = self.server_hub.repos.get(repo_id)
        refused = self._access(repo, auth)
        if refused:
            self._error(refused[0], refused[1], "Repository not found", body)
            return None
        sha = self._commit(repo, revision)
        if sha is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", body)
            return None
        return repo, sha

    def _info(self, repo_id: str, revision: str, auth: str | None, body: bool) -> None:
        found = self._revision(repo_id, revision, auth, body)
        if found is None:
            return None
        repo, sha = found
        info = {
            "_id": hashlib.md5(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "modelId": repo_id,
            "author": repo_id.split("/")[0] if "/" in repo_id else None,
            "sha": sha,
            "private": repo.private,
            "gated": "manual" if repo.gated else False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "library_name": "transformers",
            "lastModified": "2024-01-01T00:00:00.000Z",
            "createdAt": "2024-01-01T00:00:00.000Z",
            "siblings": [{"rfilename": name} for name in sorted(repo.commits[sha])],
        }
        self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"}, body)

    def _tree(self, repo_id: str, revision: str, folder: str, auth: str | None, body: bool) -> None:
        """The files directly in `folder` (all our repositories are flat: only the root has any)."""
        found = self._revision(repo_id, revision, auth, body)
        if found is None:
            return None
        repo, sha = found
        if folder.strip("/"):
            return self._error(404, "EntryNotFound", f"{folder} does not exist on {revision}", body)
        entries = [
            {"type": "file", "oid": hashlib.sha1(content).hexdigest(), "size": len(content), "path": name}
            for name, content in sorted(repo.commits[sha].items())
        ]
        self._send(200, json.dumps(entries).encode(), {"Content-Type": "application/json"}, body)

    def _resolve(self, repo_id: str, revision: str, filename: str, auth: str | None, body: bool) -> None:
        hub = self.server_hub
        repo = hub.repos.get(repo_id)
        refused = self._access(repo, auth)
        if refused:
            return self._error(refused[0], refused[1], "Repository not found", body)
        if repo.gated and (auth is None or auth.removeprefix("Bearer ") not in hub.tokens):
            if auth is None:
                message = f"Access to model {repo_id} is restricted. You must have access to it and be authenticated"
                return self._error(401, "GatedRepo", message, body)
            message = f"Access to model {repo_id} is restricted and you are not in the authorized list"
            return self._error(403, "GatedRepo", message, body)
        sha = self._commit(repo, revision)
        if sha is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", body)
        content = repo.commits[sha].get(filename)
        if content is None:
            return self._error(404, "EntryNotFound", "Entry not found", body, {"X-Repo-Commit": sha})
        headers = {"X-Repo-Commit": sha}
        git_blob = hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()
        if filename.endswith(LFS_SUFFIXES):  # LFS: the resolve redirects to the content, as to the CDN
            digest = hashlib.sha256(content).hexdigest()
            headers.update(
                {
                    "ETag": f'"{git_blob}"',
                    "X-Linked-Etag": f'"{digest}"',
                    "X-Linked-Size": str(len(content)),
                    "Location": f"{hub.url}/lfs/{digest}",
                }
            )
            return self._send(302, b"", headers, body)
        headers["ETag"] = f'"{git_blob}"'
        self._content(content, body, headers)

    # ------------------------------------------------------------------ responses

    def _content(self, content: bytes | None, body: bool, headers: dict[str, str] | None = None) -> None:
        if content is None:
            return self._error(404, None, "Not found", body)
        headers = dict(headers or {})
        status, start = 200, 0
        wanted = self.headers.get("Range")
        if wanted and wanted.startswith("bytes=") and wanted[6:].split("-")[0].isdigit():
            start = int(wanted[6:].split("-")[0])
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(content) - 1}/{len(content)}"
        headers["Accept-Ranges"] = "bytes"
        self._send(status, content[start:], headers, body)

    def _error(
        self, status: int, code: str | None, message: str, body: bool, headers: dict[str, str] | None = None
    ) -> None:
        headers = {**(headers or {}), "X-Error-Message": message, "Content-Type": "application/json"}
        if code is not None:
            headers["X-Error-Code"] = code
        self._send(status, json.dumps({"error": message}).encode(), headers, body)

    def _send(self, status: int, payload: bytes, headers: dict[str, str], body: bool) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if body:
            self.wfile.write(payload)


def use_hub(monkeypatch, server: HubServer | str, home: Path, *, token: str | None = None) -> None:
    """The environment of a fresh process talking to `server` (a `HubServer` or an endpoint
    URL) with its cache under `home`: HF_ENDPOINT and HF_HOME set, HF_HUB_OFFLINE unset
    (the conftest sets it for the session), HF_TOKEN as given. huggingface_hub read
    HF_HUB_OFFLINE when it was imported and built its HTTP session from it, so its flag is
    set to what this environment says and its sessions are rebuilt."""
    import huggingface_hub.constants
    from huggingface_hub.utils import reset_sessions

    monkeypatch.setenv("HF_ENDPOINT", server if isinstance(server, str) else server.url)
    monkeypatch.setenv("HF_HOME", str(home))
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    if token is not None:
        monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    reset_sessions()


def subprocess_env(server: HubServer | str, home: Path, **extra: str) -> dict[str, str]:
    """`os.environ` for a child process using `server` and the cache under `home`."""
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN")}
    env.update(HF_ENDPOINT=server if isinstance(server, str) else server.url, HF_HOME=str(home), **extra)
    return env
