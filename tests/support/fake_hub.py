"""A stateful loopback fake of the Hugging Face Hub, for driving the real `huggingface_hub`
2.x client in tests (point it here with `HfApi(endpoint=server.url)` or `HF_ENDPOINT`).

It speaks what the client sends to create a repository, commit files through the Hub's
commit API, and tag a commit, and keeps every byte it receives so that tests compare:

* `POST /api/repos/create` (`name`, `organization`, `visibility`): 409 if it exists.
* `GET /api/models/<repo>[/revision/<rev>]`: repository info (head `sha`, `private`,
  `siblings`); `GET /api/models/<repo>/refs`: branches and tags.
* `POST /api/validate-yaml`: the model card's front matter (must open and close with `---`).
* `POST /api/models/<repo>/preupload/<rev>`: per file, `uploadMode` (`lfs` for weight
  files and anything over 10 MB, else `regular`) and the `oid` the head holds for that path
  (sha256 for LFS files, the git blob sha1 for regular ones), from which the client drops
  unchanged files and skips a commit that would change nothing.
* `POST /<repo>.git/info/lfs/objects/batch`: the basic LFS transfer; objects the server has
  get no `upload` action. `PUT /lfs/<oid>?sig=...` (a presigned URL: no token needed)
  stores the bytes after checking their sha256.
* `POST /api/models/<repo>/commit/<rev>` (NDJSON: a header, then `file` with base64 content
  and `lfsFile` naming an uploaded object): a commit whose files are the head's plus these;
  an `lfsFile` whose object was never uploaded is refused (422), as the Hub does.
* `POST /api/models/<repo>/tag/<rev>`: a tag on a commit; 409 if the tag exists.

Xet storage (what the client uses when `hf_xet` is installed) is not spoken: tests set
`HF_HUB_DISABLE_XET=1`. Every other request needs `Authorization: Bearer <token>` (401
otherwise).
Only the standard library is used.
"""

from __future__ import annotations

import base64
import contextlib
import fnmatch
import hashlib
import json
import re
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["TOKEN", "FakeHubServer", "HubCommit", "HubRepo"]

TOKEN = "hf_fakehubtoken" + "0" * 20
_LFS_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.h5", "*.ckpt", "*.model", "*.onnx")
_LFS_SIZE = 10 * 1024 * 1024
_MAX_BODY = 512 * 1024 * 1024
_REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class HubCommit:
    """One commit: its id, title and description, and every file of the tree it makes."""

    oid: str
    title: str
    description: str
    files: Mapping[str, bytes]


@dataclass(frozen=True)
class HubRepo:
    """A snapshot of a repository: its commits (oldest first), tags (name -> commit id)."""

    repo_id: str
    private: bool
    commits: tuple[HubCommit, ...]
    tags: Mapping[str, str]

    @property
    def head(self) -> HubCommit | None:
        return self.commits[-1] if self.commits else None


@dataclass
class _Repo:
    repo_id: str
    private: bool
    commits: list[HubCommit] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)

    def head_files(self) -> Mapping[str, bytes]:
        return self.commits[-1].files if self.commits else {}


class _Failure(Exception):
    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.extra = extra  # more fields of the error's JSON body


def _lfs(path: str, size: int) -> bool:
    return size > _LFS_SIZE or any(fnmatch.fnmatch(path, p) for p in _LFS_PATTERNS)


def _oid(path: str, data: bytes) -> str:
    return hashlib.sha256(data).hexdigest() if _lfs(path, len(data)) else git_blob_sha1(data)


class FakeHubServer:
    """The loopback Hub. Cheap to construct; `start()` binds 127.0.0.1 on a free port."""

    def __init__(self, token: str = TOKEN) -> None:
        self.token = token
        self._lock = threading.Lock()
        self._repos: dict[str, _Repo] = {}
        self._objects: dict[str, bytes] = {}  # sha256 -> bytes uploaded through LFS
        self._requests: list[tuple[str, str]] = []
        self._faults: list[list[Any]] = []  # [method, path prefix, status, times left]
        self._server: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> Self:
        server = _HTTPServer(("127.0.0.1", 0), _Handler)
        server.fake = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, name="fake-hub", kwargs={"poll_interval": 0.05}
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server.close_connections()
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    # -- inspection ------------------------------------------------------------------------

    def repo(self, repo_id: str) -> HubRepo | None:
        with self._lock:
            repo = self._repos.get(repo_id)
            if repo is None:
                return None
            return HubRepo(repo.repo_id, repo.private, tuple(repo.commits), dict(repo.tags))

    def fail(self, method: str, prefix: str, status: int, times: int = 1) -> None:
        """Answer the next `times` requests `method prefix...` with `status` (after the
        token check), doing nothing else."""
        with self._lock:
            self._faults.append([method, prefix, status, times])

    def drop_tag(self, repo_id: str, tag: str) -> None:
        """Remove a tag, as if the client had died between its commit and its tag."""
        with self._lock:
            del self._repos[repo_id].tags[tag]

    def requests(self) -> list[tuple[str, str]]:
        """(method, path) of every request, in arrival order."""
        with self._lock:
            return list(self._requests)

    # -- the API ---------------------------------------------------------------------------

    def _sign(self, path: str) -> str:
        return hashlib.sha256(f"{self.token}:{path}".encode()).hexdigest()[:32]

    def handle(
        self,
        method: str,
        path: str,
        query: Mapping[str, str],
        headers: Mapping[str, str],
        body: bytes,
    ) -> Any:
        """Answer one request: the JSON to send, or raise _Failure."""
        with self._lock:
            self._requests.append((method, path))
            # Upload URLs are presigned (as S3's are): the signature, not the token, admits.
            signed = path.startswith("/lfs/") and query.get("sig") == self._sign(path)
            if not signed and headers.get("authorization") != f"Bearer {self.token}":
                raise _Failure(401, "Invalid credentials in Authorization header")
            for fault in self._faults:
                if fault[3] > 0 and fault[0] == method and path.startswith(fault[1]):
                    fault[3] -= 1
                    raise _Failure(fault[2], "injected fault")
            for pattern, handler in _ROUTES:
                match = re.fullmatch(pattern[1], path)
                if match and pattern[0] == method:
                    return handler(self, body, **match.groupdict())
        raise _Failure(404, f"no route for {method} {path}")

    def _create_repo(self, body: bytes) -> Any:
        payload = json.loads(body)
        if payload.get("type", "model") != "model":
            raise _Failure(400, "only model repositories here")
        repo_id = f"{payload.get('organization') or 'user'}/{payload['name']}"
        url = {"url": f"{self.url}/{repo_id}"}
        if repo_id in self._repos:  # the Hub names the existing repo's URL in its 409
            raise _Failure(409, "You already created this model repo", **url)
        self._repos[repo_id] = _Repo(repo_id, private=payload.get("visibility") == "private")
        return url

    def _find(self, repo: str) -> _Repo:
        found = self._repos.get(repo)
        if found is None:
            raise _Failure(404, f"Repository Not Found for url: {repo}")
        return found

    def _info(self, body: bytes, repo: str, rev: str = "main") -> Any:
        found = self._find(repo)
        head = self._revision(found, rev)
        files = next((c.files for c in found.commits if c.oid == head), {})
        return {
            "id": repo, "modelId": repo, "sha": head, "private": found.private,
            "siblings": [{"rfilename": name} for name in sorted(files)], "tags": [],
        }  # fmt: skip

    def _refs(self, body: bytes, repo: str) -> Any:
        found = self._find(repo)
        head = found.commits[-1].oid if found.commits else None
        branches = [{"name": "main", "ref": "refs/heads/main", "targetCommit": head}]
        return {
            "branches": branches if head else [],
            "converts": [],
            "tags": [
                {"name": name, "ref": f"refs/tags/{name}", "targetCommit": oid}
                for name, oid in sorted(found.tags.items())
            ],
        }

    def _validate_yaml(self, body: bytes) -> Any:
        content = json.loads(body).get("content", "")
        if content.startswith("---") and "\n---" not in content[3:]:
            raise _Failure(400, "the YAML front matter is not closed")
        return {"errors": [], "warnings": []}

    def _preupload(self, body: bytes, repo: str, rev: str) -> Any:
        found = self._find(repo)
        self._revision(found, unquote(rev))
        head = found.head_files()
        files = []
        for item in json.loads(body)["files"]:
            path, size = item["path"], int(item["size"])
            present = head.get(path)
            files.append({
                "path": path,
                "uploadMode": "lfs" if _lfs(path, size) else "regular",
                "shouldIgnore": False,
                "oid": None if present is None else _oid(path, present),
            })  # fmt: skip
        return {"files": files, "commitOid": found.commits[-1].oid if found.commits else None}

    def _lfs_batch(self, body: bytes, repo: str) -> Any:
        self._find(repo)
        payload = json.loads(body)
        if payload.get("operation") != "upload" or "basic" not in payload.get("transfers", []):
            raise _Failure(400, "only basic LFS uploads here")
        objects = []
        for obj in payload["objects"]:
            answer: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self._objects:
                where = f"/lfs/{obj['oid']}"
                href = f"{self.url}{where}?sig={self._sign(where)}"
                answer["actions"] = {"upload": {"href": href}}
            objects.append(answer)
        return {"transfer": "basic", "objects": objects}

    def _lfs_put(self, body: bytes, oid: str) -> Any:
        if hashlib.sha256(body).hexdigest() != oid:
            raise _Failure(400, f"the bytes do not hash to {oid}")
        self._objects[oid] = body
        return {}

    def _commit(self, body: bytes, repo: str, rev: str) -> Any:
        found = self._find(repo)
        self._revision(found, unquote(rev))
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise _Failure(400, "a commit starts with its header")
        header = lines[0]["value"]
        head = found.commits[-1].oid if found.commits else None
        if header.get("parentCommit") not in (None, head):
            raise _Failure(412, "the parent commit is not the head of main")
        files = dict(found.head_files())
        for line in lines[1:]:
            value = line["value"]
            if line["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif line["key"] == "lfsFile":
                data = self._objects.get(value["oid"])
                if data is None or ("size" in value and len(data) != value["size"]):
                    raise _Failure(422, f"LFS object {value['oid']} was not uploaded")
                files[value["path"]] = data
            elif line["key"] == "deletedFile":
                files.pop(value["path"], None)
            else:
                raise _Failure(400, f"unknown commit operation {line['key']!r}")
        seed = json.dumps([head, header, {k: _oid(k, v) for k, v in sorted(files.items())}])
        oid = hashlib.sha1(seed.encode()).hexdigest()
        found.commits.append(
            HubCommit(oid, header.get("summary", ""), header.get("description", ""), files)
        )
        return {"commitUrl": f"{self.url}/{repo}/commit/{oid}", "commitOid": oid,
                "pullRequestUrl": None}  # fmt: skip

    def _tag(self, body: bytes, repo: str, rev: str) -> Any:
        found = self._find(repo)
        tag = json.loads(body)["tag"]
        if tag in found.tags:
            raise _Failure(409, f"Tag {tag} already exists")
        found.tags[tag] = self._revision(found, unquote(rev))
        return {}

    def _revision(self, repo: _Repo, rev: str) -> str | None:
        """The commit `rev` (main, a tag or a commit id) names; None for main of an empty repo."""
        if rev == "main":
            return repo.commits[-1].oid if repo.commits else None
        if rev in repo.tags:
            return repo.tags[rev]
        if any(c.oid == rev for c in repo.commits):
            return rev
        raise _Failure(404, f"Invalid rev id: {rev}")


_ROUTES: list[tuple[tuple[str, str], Any]] = [
    (("POST", r"/api/repos/create"), FakeHubServer._create_repo),
    (("POST", r"/api/validate-yaml"), FakeHubServer._validate_yaml),
    (("GET", rf"/api/models/{_REPO}/refs"), FakeHubServer._refs),
    (("GET", rf"/api/models/{_REPO}/revision/(?P<rev>[^/]+)"), FakeHubServer._info),
    (("GET", rf"/api/models/{_REPO}"), FakeHubServer._info),
    (("POST", rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)"), FakeHubServer._preupload),
    (("POST", rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)"), FakeHubServer._commit),
    (("POST", rf"/api/models/{_REPO}/tag/(?P<rev>[^/]+)"), FakeHubServer._tag),
    (("POST", rf"/{_REPO}\.git/info/lfs/objects/batch"), FakeHubServer._lfs_batch),
    (("PUT", r"/lfs/(?P<oid>[0-9a-f]{64})"), FakeHubServer._lfs_put),
]


class _HTTPServer(ThreadingHTTPServer):
    """One named thread per connection; `close_connections` ends the kept-alive ones that a
    client left open, so that stopping the server leaves no thread behind."""

    daemon_threads = True
    fake: FakeHubServer

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(address, handler)
        self._connections: dict[socket.socket, threading.Thread] = {}
        self._guard = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(
            target=self.process_request_thread, args=(request, client_address),
            name="fake-hub-connection", daemon=True,
        )  # fmt: skip
        with self._guard:
            self._connections[request] = thread
        thread.start()

    def shutdown_request(self, request: Any) -> None:
        with self._guard:
            self._connections.pop(request, None)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self._guard:
            open_ = list(self._connections.items())
        for sock, thread in open_:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            thread.join(5)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def _serve(self, method: str) -> None:
        fake: FakeHubServer = self.server.fake  # type: ignore[attr-defined]
        try:
            body = self._body()
            headers = {k.lower(): v for k, v in self.headers.items()}
            url = urlsplit(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            answer = fake.handle(method, url.path, query, headers, body)
            self._send(200, answer)
        except _Failure as exc:
            answer = {"error": str(exc), **exc.extra}
            self._send(exc.status, answer, {"X-Error-Message": str(exc)})

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while (size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)) > 0:
                parts.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(parts)
        length = int(self.headers.get("Content-Length") or 0)
        if length > _MAX_BODY:
            raise _Failure(413, "request too large")
        return self.rfile.read(length)

    def _send(self, status: int, answer: Any, headers: Mapping[str, str] | None = None) -> None:
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)
