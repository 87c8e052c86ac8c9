"""The W&B sink: one run per collection, artifacts logged with the wandb SDK.

Versions are logged with `policy="immutable"` and `skip_cache=True` from ckptd's hard-link
snapshot with the md5 ckptd already computed, so the SDK neither copies nor re-hashes a
byte. Online, `wait()` returns once the version is committed; offline the SDK writes the
run's `.wandb` file under `state_dir/wandb/` for a later `wandb sync` (and `wait()` would
raise, so it is not called). wandb-core buffers that file until the run finishes, so an
offline publish returns `committed=False` and `recorded` later reads the run files back
(`offline_runs`) to tell which versions survived; one offline run id per collection is kept in
`state_dir/wandb/` and resumed at each start, so restarts add no runs. If wandb-core dies
under a live ckptd, the sink starts a new one and logs again what the lost run had not
written. `wandb sync` uploads each file from the path recorded at
`log_artifact`, long after ckptd released its snapshot: offline, the files are first
hard-linked into the offline run's own directory (`ckptd-files/`), where they stay with the
run until `wandb sync --clean` removes it.

The API key is read once, kept in memory only, and never logged: errors are reported with
it masked.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import urllib.parse
from collections.abc import Collection
from datetime import timedelta
from pathlib import Path
from typing import Any

from ckptd import references
from ckptd.config import Config
from ckptd.errors import CkptdError, PublishError, VersionLinked
from ckptd.sidecar import RUN_PATH_SHAPE, valid_run_path
from ckptd.sinks import (
    Capabilities,
    PublishedVersion,
    PublishRequest,
    RemoteVersion,
    SinkFile,
    StoredFile,
    StoredVersion,
    metadata,
    offline_runs,
)
from ckptd.sinks.reachability import Reachability

__all__ = ["WandbSink", "read_api_key"]

log = logging.getLogger(__name__)

_PERMANENT = re.compile(
    r"\b(401|403|404)\b|unauthori[sz]ed|forbidden|permission|not allowed|invalid|"
    r"authentication|api key|does not exist|not found",
    re.IGNORECASE,
)
_RETRY_AFTER = re.compile(r"retry[- ]after\D{0,5}(\d+(?:\.\d+)?)", re.IGNORECASE)
# What the public API says when a collection or a version does not exist (yet, or any more).
_MISSING_COLLECTION = re.compile(r"could not find artifact type", re.IGNORECASE)
_MISSING_VERSION = re.compile(r"not found|does not exist|could not find", re.IGNORECASE)
REFERENCE_MD5 = "ckptd_md5"  # in a reference entry's `extra`: ckptd's md5 of its bytes
_SDK_RETRIES = 1
_PROBE_TIMEOUT = 10.0  # seconds for the server to answer at all before a restore
_API_TIMEOUT = 60  # seconds for each public API call
_ONLINE = Capabilities(pipelines=True)
_OFFLINE = Capabilities(
    moves_aliases=False,
    lists_versions=False,
    records_lineage=False,
    confirms_later=True,
    reads=False,
    limits=(
        "offline mode: remote versions cannot be listed, deleted or moved from here (W&B "
        "gives them numbers at `wandb sync`)"
    ),
)
_FINISH_TIMEOUT = 30.0  # seconds a run may take to finish before ckptd stops waiting
_INIT_LOCK = threading.Lock()  # wandb.init is not safe to call from two threads at once
# What the SDK raises once its wandb-core process is gone: every run of this process is dead.
_SERVICE_LOST = {"ConnectionResetError", "BrokenPipeError", "MailboxClosedError"}


def read_api_key(config: Config, environ: dict[str, str] | None = None) -> str | None:
    """The API key: `wandb.api_key_file`, else systemd's credential, else WANDB_API_KEY."""
    env = os.environ if environ is None else environ
    path = config.wandb.api_key_file
    if path is None and "CREDENTIALS_DIRECTORY" in env:
        candidate = Path(env["CREDENTIALS_DIRECTORY"]) / "wandb-api-key"
        path = candidate if candidate.exists() else None
    if path is not None:
        try:
            key = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise CkptdError(
                f"wandb.api_key_file: cannot read {path}: {exc.strerror or exc}"
            ) from None
        if not key:
            raise CkptdError(f"wandb.api_key_file: {path} is empty")
        if path.stat().st_mode & 0o044:
            log.warning("wandb.api_key_file: %s is readable by group or others; chmod 600 it", path)
        return key
    return env.get("WANDB_API_KEY") or None


class _Pending:
    """A version logged online and not yet committed: `result` waits for wandb-core."""

    def __init__(self, sink: WandbSink, request: PublishRequest, logged: Any, generation: int):
        self._sink = sink
        self._request = request
        self._logged = logged
        self._generation = generation

    def result(self) -> PublishedVersion:
        return self._sink._committed(self._request, self._logged, self._generation)


class _Done:
    """A publish that had nothing left to wait for."""

    def __init__(self, version: PublishedVersion) -> None:
        self._version = version

    def result(self) -> PublishedVersion:
        return self._version


class WandbSink:
    """Publishes to W&B with the wandb SDK. Cheap to construct: runs start on first use."""

    def __init__(self, config: Config, api_key: str | None = None) -> None:
        self.config = config
        self.online = config.wandb.mode == "online"
        self.capabilities = _ONLINE if self.online else _OFFLINE
        self._api_key = api_key
        self._runs: dict[str, Any] = {}  # collection -> wandb Run; guarded by _lock
        self._lock = threading.Lock()
        self._api: Any = None
        self._lineage_skipped: set[str] = set()  # run paths told about offline; under _lock
        self._reachability: Reachability | None = None  # built on first use (reads wandb)
        self._offline = offline_runs.OfflineLedger(config.state_dir / "wandb")
        self._generation = 0  # bumped each time wandb-core is replaced; under _lock

    # -- the Sink contract ---------------------------------------------------------------

    def submit(self, request: PublishRequest) -> _Pending | _Done:
        generation = self._generation
        try:
            return self._submit(request, generation)
        except PublishError:
            raise
        except Exception as exc:
            raise self._sdk_failure(exc, request, generation) from exc

    def publish(self, request: PublishRequest) -> PublishedVersion:
        return self.submit(request).result()

    def _committed(self, request: PublishRequest, logged: Any, generation: int) -> PublishedVersion:
        """Wait for a version logged online to be committed; record its lineage."""
        try:
            logged.wait(timeout=int(300 + request.size / 5e6))
            if request.run_path is not None:
                self._record_lineage(
                    request.collection, request.type, logged.version, request.run_path
                )
            return PublishedVersion(version=logged.version)
        except PublishError:
            raise
        except Exception as exc:
            raise self._sdk_failure(exc, request, generation) from exc

    def _sdk_failure(
        self, exc: Exception, request: PublishRequest, generation: int
    ) -> PublishError:
        if type(exc).__name__ in _SERVICE_LOST:
            self._replace_service(generation)
        return self._classify(exc, f"publishing {request.collection}")

    def problem(self, now: float) -> str | None:
        if not self.online:
            return None  # offline mode records locally: nothing to reach
        if self._reachability is None:
            self._reachability = Reachability(self.base_url)
        return self._reachability.problem(now)

    @property
    def base_url(self) -> str:
        """The server the SDK talks to: `wandb.base_url`, else WANDB_BASE_URL, else the
        pinned SDK's own default (the SDK decides, so /readyz asks the same host)."""
        import wandb

        given = self.config.wandb.base_url or os.environ.get("WANDB_BASE_URL")
        return str(wandb.Settings(**({"base_url": given} if given else {})).base_url)

    def recorded(self, collection: str, keys: Collection[str]) -> set[str]:
        if self.online:
            return set(keys)
        return set(keys) & offline_runs.recorded_keys(self._offline.wandb_dir, collection)

    def move_alias(self, collection: str, type: str, alias: str, version: str) -> None:
        if not self.online:
            raise PublishError(
                f"cannot move alias {alias!r} in offline mode; it is fixed at `wandb sync`",
                transient=False,
            )
        try:
            artifact = self._public_api().artifact(self._qualified(collection, version), type)
            if alias not in artifact.aliases:
                artifact.aliases.append(alias)
                artifact.save()
        except Exception as exc:
            raise self._classify(exc, f"moving {alias!r} to {collection}:{version}") from exc

    def versions(self, collection: str, type: str) -> list[RemoteVersion]:
        if not self.online:
            raise PublishError("cannot list versions in offline mode", transient=False)
        try:
            path = self._qualified(collection, "").removesuffix(":")
            try:
                found = self._public_api().artifact_collection(type, path)
            except Exception as exc:
                if _MISSING_COLLECTION.search(str(exc)):
                    return []
                raise
            listed = [_remote_version(artifact) for artifact in found.artifacts()]
        except Exception as exc:
            raise self._classify(exc, f"listing the versions of {collection}") from exc
        return sorted(listed, key=lambda v: v.index)

    def links(self, collection: str, type: str, version: str) -> tuple[str, ...]:
        _, links = self._artifact_and_links(collection, type, version)
        return links

    def delete_version(self, collection: str, type: str, version: str) -> None:
        artifact, links = self._artifact_and_links(collection, type, version)
        if artifact is None:
            return  # gone already: deleted by hand, or by an earlier attempt
        if links:
            raise VersionLinked(f"{collection}:{version} is linked to {', '.join(links)}")
        try:
            artifact.delete(delete_aliases=True)
        except Exception as exc:
            raise self._classify(exc, f"deleting {collection}:{version}") from exc

    def _artifact_and_links(
        self, collection: str, type: str, version: str
    ) -> tuple[Any, tuple[str, ...]]:
        """The public API's artifact (None if it does not exist) and the registry collections
        it is linked into."""
        if not self.online:
            raise PublishError("versions cannot be looked up in offline mode", transient=False)
        try:
            try:
                artifact = self._public_api().artifact(self._qualified(collection, version), type)
            except Exception as exc:
                if _MISSING_VERSION.search(str(exc)):
                    return None, ()
                raise
            return artifact, tuple(linked.qualified_name for linked in artifact.linked_artifacts)
        except Exception as exc:
            raise self._classify(exc, f"looking up {collection}:{version}") from exc

    def classify(self, exc: BaseException, doing: str) -> PublishError:
        """`exc`, raised by the SDK while `doing` something, as a PublishError that says
        whether a retry can help; the API key masked."""
        return self._classify(exc, doing)

    def resolve(self, collection: str, ref: str) -> StoredVersion | None:
        if not self.online:
            raise PublishError(
                "offline mode: restore needs W&B online (a key and the network); versions "
                "recorded offline are on W&B once `wandb sync` uploaded them",
                transient=False,
            )
        unreachable = Reachability(self.base_url, timeout=_PROBE_TIMEOUT).problem(0.0)
        if unreachable is not None:  # without a network the SDK says "AuthenticationError"
            raise PublishError(unreachable, transient=True)
        at = f" at {self.config.wandb.base_url}" if self.config.wandb.base_url else ""
        try:
            api = self._public_api()
        except Exception as exc:
            raise self._classify(exc, f"connecting to W&B{at}") from None
        try:
            entity = self.config.wandb.entity or api.default_entity
        except Exception as exc:
            raise self._classify(exc, "finding the default entity") from None
        if not entity:
            raise PublishError(
                "the API key has no default entity: pass --entity or wandb.entity",
                transient=False,
            )
        name = f"{entity}/{self.config.wandb.project}/{collection}:{ref}"
        try:
            found = api.artifact(name)
        except Exception as exc:
            # The SDK wraps the "no such project / membership" answer as a ValueError inside
            # CommError; HTTP failures (401, 403, 5xx, timeouts) carry other inner errors.
            inner = getattr(exc, "exc", None)
            if (
                type(exc).__name__ == "CommError"
                and type(inner) is ValueError
                and ("not found" in str(inner))
            ):
                return None
            raise self._classify(exc, f"looking up {name}") from None
        entries = found.manifest.entries
        files = tuple(
            StoredFile(
                path, entry.size, _reference_md5(entry) if entry.ref else entry.digest, entry.ref
            )
            for path, entry in sorted(entries.items())
        )
        label = f"{entity}/{self.config.wandb.project}/{collection}:{found.version}"
        return StoredVersion(
            collection, found.version, label, files, handle=found,
            metadata=found.metadata or {}, url=getattr(found, "url", None),
        )  # fmt: skip

    def download(self, version: StoredVersion, dest: Path) -> None:
        try:
            version.handle.download(root=str(dest), skip_cache=True)
        except Exception as exc:
            raise self._classify(exc, f"downloading {version.label}") from None

    def close(self) -> None:
        with self._lock:
            runs, self._runs = list(self._runs.values()), {}
        for run in runs:
            # finish() flushes the run's last records; against an unreachable server it can
            # retry for minutes, so it runs aside and ckptd stops waiting after a while.
            # Nothing is lost: the journal, not the run, holds what was published.
            finisher = threading.Thread(
                target=self._finish, args=(run,), name="ckptd-wandb-finish", daemon=True
            )
            finisher.start()
            finisher.join(_FINISH_TIMEOUT)
            if finisher.is_alive():
                log.warning(
                    "W&B run %s did not finish in %.0fs; leaving it", run.id, _FINISH_TIMEOUT
                )
                return
        if runs and not self.online:
            # finish() can answer before wandb-core has closed the run files; its exit
            # closes them, so that `recorded` reads every record that finish() wrote.
            import wandb

            with _INIT_LOCK:
                try:
                    wandb.teardown()
                except Exception as exc:  # a dead wandb-core cannot be torn down; nothing to do
                    log.debug("tearing down W&B: %s", self._mask(exc))

    def _finish(self, run: Any) -> None:
        try:
            run.finish()
        except Exception as exc:  # a dying run must not stop the others from finishing
            log.warning("closing W&B run %s failed: %s", getattr(run, "id", "?"), self._mask(exc))

    # -- internals -------------------------------------------------------------------------

    def _submit(self, request: PublishRequest, generation: int) -> _Pending | _Done:
        """Log the version; online, the commit is waited for by the returned handle (and
        wandb-core commits a run's versions of one name in the order they were logged)."""
        if not self.online and self._offline.recorded_before(request.key):
            # Logged by an earlier ckptd that died before its journal said so: not twice.
            return _Done(PublishedVersion(version=None, committed=True))
        run = self._run(request.collection)
        if not self.online:
            self._log_lost_again(request.collection, run)
        logged = self._log(run, request)
        if not self.online:
            self._skip_lineage(request.run_path)
            return _Done(PublishedVersion(version=None, committed=False))
        return _Pending(self, request, logged, generation)

    def _log(self, run: Any, request: PublishRequest) -> Any:
        """`log_artifact` one version into `run`; offline, remember it until the run closes."""
        import wandb

        files = request.files if self.online else offline_runs.keep_for_sync(run.dir, request.files)
        artifact = wandb.Artifact(
            request.collection,
            type=request.type,
            description=request.description,
            metadata=metadata.encode(request),
        )
        for file in files:
            _add_file(artifact, file)
        if request.ttl is not None:
            artifact.ttl = timedelta(seconds=request.ttl)
        logged = run.log_artifact(artifact, aliases=list(request.aliases))
        if not self.online:
            self._offline.logged(request)
        return logged

    # -- offline durability ----------------------------------------------------------------

    def _replace_service(self, generation: int) -> None:
        """wandb-core died (killed, OOM): every run of this process died with it and lost
        what it had not written. Forget them; the next publish starts a new wandb-core and
        a new run, which first logs again what the lost run never wrote."""
        import wandb

        with self._lock:
            if generation != self._generation:
                return  # another thread replaced it already
            self._generation += 1
            self._runs = {}
        self._offline.runs_lost()
        log.warning("W&B's wandb-core process is gone; starting a new one for the next publish")
        with _INIT_LOCK:
            try:
                wandb.teardown()
            except Exception as exc:  # tearing down a dead connection fails; it is reset
                log.debug("tearing down the dead W&B connection: %s", exc)

    def _log_lost_again(self, collection: str, run: Any) -> None:
        """Log into `run` each version a dead run of `collection` had not written."""
        again = self._offline.take_lost(collection)
        if not again:
            return
        for index, request in enumerate(again):
            try:
                self._log(run, request)
            except Exception:
                self._offline.give_back(collection, again[index:])  # for the next run
                raise
        log.info("%s: logged %d version(s) again that W&B's dead run had not written",
                 collection, len(again))  # fmt: skip

    def _record_lineage(
        self, collection: str, artifact_type: str, version: str, run_path: str
    ) -> None:
        """Declare the committed `version` an output of the training run `run_path` too, so
        that W&B's lineage shows training run -> checkpoint. Never raises: the version is
        committed already, and a lineage failure is logged as one warning.

        No aliases are passed: the public API's `Run.log_artifact` then sends an empty alias
        list (it is wandb-core's own logging that adds `latest`), so the content-deduplicated
        `CreateArtifact` it sends adds the run to the version and moves no alias.
        """
        name = f"{collection}:{version}"
        try:
            name = self._qualified(collection, version)
            project = name.rsplit("/", 1)[0]
            if not valid_run_path(run_path):
                reason = f"a run path is {RUN_PATH_SHAPE}"
            elif run_path.rsplit("/", 1)[0] != project:
                reason = f"the run is not in {project}, and W&B records lineage within a project"
            else:
                api = self._public_api()
                api.run(run_path).log_artifact(api.artifact(name, artifact_type))
                log.info("recorded %s as an output of run %s", name, run_path)
                return
        except Exception as exc:
            reason = f"{type(exc).__name__}: {self._mask(exc)}"
        log.warning(
            "%s is published, but recording it as an output of run %s failed: %s",
            name, run_path, reason,
        )  # fmt: skip

    def _skip_lineage(self, run_path: str | None) -> None:
        """Offline, versions get no lineage (W&B has not created them yet): say so once per
        run path."""
        if run_path is None:
            return
        with self._lock:
            if run_path in self._lineage_skipped:
                return
            self._lineage_skipped.add(run_path)
        log.warning(
            "offline mode: versions are not recorded as outputs of run %s (lineage needs "
            "online mode)",
            run_path,
        )

    def _run(self, collection: str) -> Any:
        with self._lock:
            run = self._runs.get(collection)
            if run is not None:
                return run
        import wandb

        settings = wandb.Settings(
            mode=self.config.wandb.mode,
            silent=True,
            console="off",
            disable_git=True,
            save_code=False,
            x_disable_stats=True,
            x_disable_meta=True,
            x_disable_machine_info=True,
            x_save_requirements=False,
            # wandb-core's own retries of a failing server can run for many minutes inside
            # one call; bound them so that ckptd's journal-driven retry (which survives
            # restarts and does not hold up a shutdown) takes over.
            x_graphql_retry_max=_SDK_RETRIES,
            x_file_transfer_retry_max=_SDK_RETRIES,
            **({"base_url": self.config.wandb.base_url} if self.config.wandb.base_url else {}),
            **({"api_key": self._api_key} if self.online and self._api_key else {}),
        )
        state_dir = self.config.state_dir
        state_dir.mkdir(parents=True, exist_ok=True)
        # Offline, each collection keeps one run across restarts (resumed), so that a host
        # restarting ckptd daily does not collect a run per day.
        run_id = None if self.online else offline_runs.run_id(self._offline.wandb_dir, collection)
        with _INIT_LOCK:
            for empty in [] if self.online else self._offline.sweep_once():
                log.info("removed %s: W&B lost that run before writing a record", empty)
            run = wandb.init(
                project=self.config.wandb.project,
                entity=self.config.wandb.entity,
                job_type="checkpoint-upload",
                name=f"ckptd-{collection}",
                group=self._group(collection),
                dir=str(state_dir),
                reinit="create_new",
                settings=settings,
                id=run_id,
                resume=None if run_id is None else "allow",
            )
            _route_terminal_output()
        log.info("W&B run %s started for %s (%s)", run.id, collection, self.config.wandb.mode)
        with self._lock:
            self._runs[collection] = run
        return run

    def _group(self, collection: str) -> str | None:
        """A multi-node job's run group, where the upload runs of its hosts sit together."""
        groups = (w.distributed for w in self.config.watch if w.artifact == collection)
        return next((d.group for d in groups if d is not None), None)

    def _public_api(self) -> Any:
        if self._api is None:
            import wandb

            overrides = (
                {"base_url": self.config.wandb.base_url} if self.config.wandb.base_url else {}
            )
            self._api = wandb.Api(overrides=overrides, api_key=self._api_key, timeout=_API_TIMEOUT)
            _route_terminal_output()
        return self._api

    def _qualified(self, collection: str, version: str) -> str:
        entity = self.config.wandb.entity
        if entity is None:
            run = self._runs.get(collection)
            entity = run.entity if run is not None else self._public_api().default_entity
        return f"{entity}/{self.config.wandb.project}/{collection}:{version}"

    def _classify(self, exc: BaseException, doing: str) -> PublishError:
        """Turn any SDK failure into a PublishError that says whether a retry can help."""
        text = self._mask(exc)
        status = getattr(getattr(exc, "response", None), "status_code", None)
        retry_after = None
        if match := _RETRY_AFTER.search(text):
            retry_after = float(match[1])
        if isinstance(exc, TimeoutError | ConnectionError | OSError):
            transient = True
        elif status is not None:
            transient = status == 429 or status >= 500
        elif type(exc).__name__ in {"AuthenticationError", "UsageError", "UnsupportedError"}:
            transient = False
        else:
            transient = _PERMANENT.search(text) is None or "429" in text
        return PublishError(
            f"{doing}: {type(exc).__name__}: {text}", transient=transient, retry_after=retry_after
        )

    def _mask(self, exc: BaseException) -> str:
        text = str(exc) or type(exc).__name__
        if self._api_key:
            text = text.replace(self._api_key, "<api-key>")
        return text


class _SdkTerminal:
    """Where the SDK's own `wandb: ...` terminal lines go instead of stderr: ckptd's log,
    so that `log.format: json` stays one JSON object per line."""

    _log = logging.getLogger("ckptd.sinks.wandb.sdk")

    def info(self, msg: str) -> None:
        self._log.info("%s", _plain(msg))

    def warning(self, msg: str) -> None:
        self._log.warning("%s", _plain(msg))

    def error(self, msg: str) -> None:
        self._log.error("%s", _plain(msg))


def _plain(msg: str) -> str:
    """The SDK's line without its `wandb: WARNING` prefix: the record's level says it."""
    text = msg.removeprefix("wandb: ")
    for level in ("WARNING ", "ERROR "):
        text = text.removeprefix(level)
    return text


def _route_terminal_output() -> None:
    """Send the SDK's terminal lines to logging. Its setup (on the first `wandb.init` or
    `wandb.Api` of the process) installs stderr, so this follows each of them."""
    import wandb

    wandb.termsetup(wandb.Settings(silent=True), _SdkTerminal())


def _remote_version(artifact: Any) -> RemoteVersion:
    """A listed artifact as retention sees it; `step` only from metadata ckptd wrote."""
    ours = metadata.decode(artifact.metadata)
    return RemoteVersion(
        version=artifact.version,
        index=int(artifact.version.lstrip("v")),
        step=None if ours is None else ours.step,
        aliases=tuple(artifact.aliases),
        size=int(artifact.size or 0),
        linked=bool(artifact.is_link),
        metrics={} if ours is None else ours.metrics,
    )


def _add_file(artifact: Any, file: SinkFile) -> None:
    """Add a file with ckptd's own md5 (no re-hash, no copy); fall back to the public call
    if this SDK's artifact does not take a precomputed digest. A file with a `ref` is added
    as that reference."""
    if file.ref is not None:
        _add_reference(artifact, file, file.ref)
        return
    add_local = getattr(artifact, "_add_local_file", None)
    if (
        add_local is not None
        and getattr(artifact, "_digest_algorithm", None) is not None
        and (artifact._digest_algorithm.name == "MANIFEST_MD5")
    ):
        add_local(
            file.name, str(file.path), digest=file.md5_b64, skip_cache=True, policy="immutable"
        )
        return
    artifact.add_file(str(file.path), name=file.name, skip_cache=True, policy="immutable")


def _add_reference(artifact: Any, file: SinkFile, ref: str) -> None:
    """Record `file` as a reference to `ref`, uploading nothing.

    `file://`: with ckptd's md5 (the SDK's checksum would read the file once more).
    `s3://`, `gs://`: the SDK's `add_reference` asks the store for the object's ETag and
    size, and they must say the object holds the bytes ckptd detected as finished; where they
    do not (a mount that has not uploaded the file yet, an object that was replaced), the
    publish fails as transient and is retried. An ETag is an md5 only for an object uploaded
    in one part and not encrypted with SSE-KMS or SSE-C; for the others the size is all a
    store can vouch for. ckptd's own md5 goes into the entry's `extra` (`md5`), for
    `ckptd restore` to check the bytes it fetches against what was published.
    """
    if urllib.parse.urlsplit(ref).scheme == "file":
        (entry,) = artifact.add_reference(ref, name=file.name, checksum=False)
        entry.digest = file.md5_b64
        entry.size = file.size
        return
    entries = artifact.add_reference(ref, name=file.name, checksum=True)
    # A key that is not an object is read by the SDK as a prefix: whatever it lists is wrong.
    entry = entries[0] if len(entries) == 1 and entries[0].ref == ref else None
    if entry is None:
        raise PublishError(f"{file.name}: {ref} is not in the object store", transient=True)
    if entry.size != file.size:
        raise PublishError(
            f"{file.name}: {ref} holds {entry.size} bytes, the finished file {file.size}: "
            "the mount has not uploaded it (yet)",
            transient=True,
        )
    if references.md5_matches(str(entry.digest), file.md5_b64) is False and _etag_is_md5(ref):
        raise PublishError(
            f"{file.name}: {ref} has ETag {entry.digest}, which is not the md5 of the finished "
            "file: the mount has not uploaded it (yet), or the object was replaced",
            transient=True,
        )
    entry.extra[REFERENCE_MD5] = file.md5_b64


def _etag_is_md5(ref: str) -> bool:
    """Whether the store's digest of object `ref` is the md5 of its bytes when it looks like
    one: not for S3 objects encrypted with SSE-KMS or SSE-C. Asked only when it differs from
    the file's md5, with the client settings the wandb SDK's own S3 handler uses."""
    url = urllib.parse.urlsplit(ref)
    if url.scheme != "s3":
        return True  # GCS reports the md5 of the bytes, whatever the encryption
    import boto3

    client = boto3.session.Session().client(
        "s3", endpoint_url=os.getenv("AWS_S3_ENDPOINT_URL"), region_name=os.getenv("AWS_REGION")
    )
    head = client.head_object(Bucket=url.netloc, Key=url.path[1:])
    encrypted = str(head.get("ServerSideEncryption", "")).startswith("aws:kms")
    return not (encrypted or "SSECustomerAlgorithm" in head)


def _reference_md5(entry: Any) -> str | None:
    """The base64 md5 of the bytes a reference entry points at, where it is known: recorded
    by ckptd at publishing, or the digest of a `file://` reference (the SDK's is an md5);
    None for an object's ETag, which is not always an md5 (multipart, SSE-KMS)."""
    recorded = (entry.extra or {}).get(REFERENCE_MD5)
    if isinstance(recorded, str):
        return recorded
    if str(entry.ref).startswith("file://"):
        return str(entry.digest)
    return None
