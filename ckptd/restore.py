"""`ckptd restore`: bring a published checkpoint back before training resumes.

The first reference that exists wins (`--alias best --alias latest`, or one `--version`).
The version's files are downloaded with the wandb public API into a hidden directory inside
the destination (a mount point such as an emptyDir cannot be renamed over, and a directory
beside it may be on another filesystem), checked against the manifest's md5 and size, and
then renamed into place one top-level entry at a time, so the training job sees each file
or checkpoint directory whole or not at all. A destination ckptd watches would publish the
restored files again, so restore into a directory of its own (`ckptd restore --config`
refuses a watched one).

Outcomes: a version restored; nothing published yet (the first start of a job: nothing is
written, not even the destination); or skipped because the destination already holds a
checkpoint (`if_missing`). Everything else raises `RestoreError`: a bad key, no network, a
corrupt download, or a collection that has versions but none under the names asked for
(starting training from scratch over existing checkpoints is never a silent fallback).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal, TypeVar

from ckptd import references
from ckptd.config import Config
from ckptd.errors import CkptdError
from ckptd.hashing import md5_b64
from ckptd.metrics import Reachability

__all__ = [
    "RestoreError",
    "Restored",
    "Target",
    "has_checkpoint",
    "refuse_references",
    "restore",
    "version_ref",
]

log = logging.getLogger(__name__)

STAGING_PREFIX = ".ckptd-restore-"
_VERSION = re.compile(r"^v?(\d+)$")
_API_TIMEOUT = 60  # seconds for each W&B API call
_PROBE_TIMEOUT = 10.0  # seconds for the server to answer at all
_T = TypeVar("_T")


class RestoreError(CkptdError):
    """Restoring failed for a reason that nothing but a fix or a retry resolves."""


class _NotFound(Exception):
    """The server answered that this project, collection, alias or version does not exist."""


@dataclass(frozen=True)
class Target:
    """Where published checkpoints live and how to reach them.

    `resolve` applies the precedence every ckptd command uses: command-line flags, then the
    config file (when one was given), then W&B's environment variables.
    """

    project: str
    entity: str | None = None
    base_url: str | None = None
    api_key: str | None = None

    @classmethod
    def resolve(
        cls,
        config: Config,
        *,
        explicit_config: bool,
        project: str | None,
        entity: str | None,
        api_key: str | None,
        environ: Mapping[str, str] | None = None,
    ) -> Target:
        env = os.environ if environ is None else environ
        wandb = config.wandb
        if explicit_config:
            project = project or wandb.project
            entity = entity or wandb.entity
        return cls(
            project=project or env.get("WANDB_PROJECT") or wandb.project,
            entity=entity or env.get("WANDB_ENTITY") or None,
            base_url=wandb.base_url or env.get("WANDB_BASE_URL") or None,
            api_key=api_key,
        )


@dataclass(frozen=True)
class Restored:
    """What `restore` did: `status` is `restored`, `empty` (nothing published yet) or
    `skipped` (the destination already had a checkpoint); `message` says it for a person."""

    status: Literal["restored", "empty", "skipped"]
    message: str
    ref: str | None = None
    version: str | None = None
    files: tuple[str, ...] = ()


def version_ref(text: str) -> str:
    """`v3` or `3` as the version reference `v3`; ValueError otherwise."""
    match = _VERSION.match(text.strip())
    if match is None:
        raise ValueError(f"expected a version such as v3, got {text!r}")
    return f"v{int(match[1])}"


def has_checkpoint(dest: Path) -> bool:
    """True if `dest` holds any file outside hidden names (temp files, restore staging)."""
    if not dest.is_dir():
        return False
    for _root, dirs, files in os.walk(dest):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        if any(not name.startswith(".") for name in files):
            return True
    return False


def restore(
    artifact: str,
    dest: Path,
    target: Target,
    *,
    refs: Iterable[str] = ("latest",),
    if_missing: bool = False,
    reference_roots: Iterable[Path] = (),
    reference_prefixes: Iterable[str] = (),
) -> Restored:
    """Download the first of `refs` (aliases or `vN`) that exists into `dest`.

    A version whose manifest references files elsewhere is refused unless each reference
    is an http(s) URL, a `file://` path under one of `reference_roots`, or an object under
    one of `reference_prefixes` (`s3://bucket/prefix/`): a reference is followed by the SDK
    with the caller's own credentials, so a hostile version could copy any local file, or
    any object those credentials can read, into `dest`."""
    refs = tuple(refs) or ("latest",)
    if if_missing and has_checkpoint(dest):
        return Restored("skipped", f"{dest} already holds a checkpoint; nothing restored")
    key = target.api_key
    api = _connect(target)
    entity = target.entity or _call(lambda: api.default_entity, "finding the default entity", key)
    if not entity:
        raise RestoreError("the API key has no default entity: pass --entity or wandb.entity")
    where = f"{entity}/{target.project}/{artifact}"
    for ref in refs:
        try:
            found = _artifact(api, f"{where}:{ref}", key)
        except _NotFound:
            log.info("%s:%s does not exist", where, ref)
            continue
        label = f"{where}:{found.version}"
        refuse_references(
            found.manifest.entries, label, tuple(reference_roots), tuple(reference_prefixes)
        )
        files = _download(found, label, dest, key)
        return Restored(
            "restored",
            f"restored {where}:{found.version} ({ref}) into {dest}: {len(files)} file(s)",
            ref=ref,
            version=found.version,
            files=files,
        )
    asked = ", ".join(refs)
    if "latest" not in refs:
        try:
            latest = _artifact(api, f"{where}:latest", key)
        except _NotFound:
            pass
        else:
            hint = "" if any(_VERSION.match(r) for r in refs) else " (end with --alias latest)"
            raise RestoreError(
                f"{where} has versions (latest is {latest.version}) but none named {asked}; "
                f"nothing restored{hint}"
            )
    return Restored("empty", f"nothing to restore: {where} has no version yet ({asked})")


def _connect(target: Target) -> Any:
    import wandb

    # Probe first: without a network the SDK says "AuthenticationError", after a long wait.
    host = target.base_url or str(wandb.Settings().base_url)
    unreachable = Reachability(host, timeout=_PROBE_TIMEOUT).problem(time.monotonic())
    if unreachable is not None:
        raise RestoreError(unreachable)
    overrides = {"base_url": target.base_url} if target.base_url else {}
    return _call(
        lambda: wandb.Api(overrides=overrides, api_key=target.api_key, timeout=_API_TIMEOUT),
        f"connecting to W&B{f' at {target.base_url}' if target.base_url else ''}",
        target.api_key,
    )


def _artifact(api: Any, name: str, api_key: str | None) -> Any:
    """The artifact version `name`; _NotFound when the server says it does not exist."""
    import wandb

    try:
        return api.artifact(name)
    except wandb.errors.CommError as exc:
        # The SDK wraps the "no such project / membership" answer as a ValueError inside
        # CommError; HTTP failures (401, 403, 5xx, timeouts) carry other inner errors.
        inner = getattr(exc, "exc", None)
        if type(inner) is ValueError and "not found" in str(inner):
            raise _NotFound(name) from None
        raise _failure(exc, f"looking up {name}", api_key) from None
    except Exception as exc:
        raise _failure(exc, f"looking up {name}", api_key) from None


def _call(action: Callable[[], _T], doing: str, api_key: str | None = None) -> _T:
    try:
        return action()
    except Exception as exc:
        raise _failure(exc, doing, api_key) from None


def _failure(exc: BaseException, doing: str, api_key: str | None) -> RestoreError:
    text = str(exc) or type(exc).__name__
    if api_key:
        text = text.replace(api_key, "<api-key>")
    return RestoreError(f"{doing}: {type(exc).__name__}: {text}")


def _download(artifact: Any, label: str, dest: Path, api_key: str | None) -> tuple[str, ...]:
    """Download, verify and move `artifact`'s files into `dest`; returns their names.
    On failure nothing is left behind: no staging directory, nor `dest` if this made it."""
    entries = artifact.manifest.entries
    names = sorted(entries)
    for name in names:
        path = PurePosixPath(name)
        if path.is_absolute() or ".." in path.parts or not path.parts:
            raise RestoreError(f"{label}: refusing a file named {name!r} in the manifest")
    created = not dest.exists()
    try:
        dest.mkdir(parents=True, exist_ok=True)
        _remove_stale_staging(dest)
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=dest))
    except OSError as exc:
        raise RestoreError(f"cannot write into {dest}: {exc.strerror or exc}") from None
    try:
        _call(
            lambda: artifact.download(root=str(staging), skip_cache=True),
            f"downloading {label}",
            api_key,
        )
        for name in names:
            _verify(staging / name, entries[name], f"{label}: {name}")
        try:
            _install(staging, dest)
        except OSError as exc:
            raise RestoreError(f"cannot move the download into {dest}: {exc}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):
                dest.rmdir()  # only if empty: never a file that was there or got in
        raise
    shutil.rmtree(staging, ignore_errors=True)
    return tuple(names)


def refuse_references(
    entries: Mapping[str, Any], label: str, roots: tuple[Path, ...], prefixes: tuple[str, ...] = ()
) -> None:
    """Raise RestoreError unless every reference entry points where the user allows: an
    http(s) URL, a `file://` path that resolves under one of `roots`, or an `s3://`/`gs://`
    object under one of `prefixes`."""
    real_roots = [Path(os.path.realpath(root)) for root in roots]
    for name, entry in sorted(entries.items()):
        ref = getattr(entry, "ref", None)
        if ref is None:
            continue
        url = urllib.parse.urlparse(str(ref))
        if url.scheme in ("http", "https"):
            continue
        if url.scheme == "file":
            target = Path(os.path.realpath(urllib.parse.unquote(url.path)))
            if any(target.is_relative_to(root) for root in real_roots):
                continue
            allowed = ", ".join(map(str, roots)) or "none"
            raise RestoreError(
                f"{label}: refusing {name!r}: it references {ref}, outside the directories "
                f"allowed by --allow-reference-root ({allowed})"
            )
        if url.scheme in references.OBJECT_STORE_SCHEMES:
            if any(str(ref).startswith(prefix) for prefix in prefixes):
                continue
            allowed = ", ".join(prefixes) or "none"
            raise RestoreError(
                f"{label}: refusing {name!r}: it references {ref}, outside the prefixes "
                f"allowed by --allow-reference-root or a watch entry's reference.uri ({allowed})"
            )
        raise RestoreError(
            f"{label}: refusing {name!r}: it references {ref}; only http(s) references, "
            "file:// and s3:// or gs:// under --allow-reference-root are followed"
        )


def _verify(path: Path, entry: Any, label: str) -> None:
    """The downloaded file has the manifest's size and md5. A reference's digest is what its
    store reports: an md5 for `file://`, a single-part S3 object's ETag and GCS's md5, which
    are checked; a multipart ETag is no md5, and the SDK compared it with the store's own
    before downloading, so its size is checked alone."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise RestoreError(f"{label}: missing from the download") from None
    if entry.size is not None and size != entry.size:
        raise RestoreError(f"{label}: {size} bytes downloaded, the manifest says {entry.size}")
    digest = str(entry.digest)
    if entry.ref is None:
        if md5_b64(path) != digest:
            raise RestoreError(f"{label}: md5 does not match the manifest (corrupt download)")
    elif references.is_md5(digest) and not references.md5_matches(digest, md5_b64(path)):
        raise RestoreError(
            f"{label}: md5 does not match the digest {digest} the manifest has for {entry.ref}"
        )


def _install(staging: Path, dest: Path) -> None:
    """Rename each top-level entry of `staging` into `dest`: directories first, then files
    (a marker file such as DeepSpeed's `latest` names a directory that is already there).
    An existing file is replaced atomically; an existing directory is moved aside first."""
    entries = sorted(staging.iterdir(), key=lambda p: (not p.is_dir(), p.name))
    aside = staging / ".replaced"
    for entry in entries:
        final = dest / entry.name
        if os.path.lexists(final) and (entry.is_dir() or final.is_dir()):
            aside.mkdir(exist_ok=True)
            final.rename(aside / entry.name)
        entry.replace(final)


def _remove_stale_staging(dest: Path) -> None:
    """Staging directories left by a restore that was killed half way."""
    for stale in dest.glob(f"{STAGING_PREFIX}*"):
        with contextlib.suppress(OSError):
            shutil.rmtree(stale)
