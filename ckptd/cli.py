"""The command line. The only place that turns errors into messages and exit codes.

Exit codes: 0 success, 1 runtime failure, 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from types import FrameType

from ckptd import __version__
from ckptd.config import (
    DEFAULT_CONFIG_PATH,
    Config,
    DistributedConfig,
    ObjectStoreReference,
    load_config,
    mask_secrets,
)
from ckptd.errors import CkptdError, ConfigError
from ckptd.journal import Journal, PromotionRow
from ckptd.promote import PARKED_PREFIX
from ckptd.topology import detect

__all__ = ["main"]

log = logging.getLogger("ckptd")

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
DEFAULT_DEADLINE = "5m"
_COMMANDS = ("run", "check", "status", "restore", "gc", "promote")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ckptd",
        description="Watch checkpoint directories and publish finished checkpoints to W&B.",
    )
    parser.add_argument("--version", action="version", version=f"ckptd {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def config_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--config", "-c", type=Path, default=None,
            help=f"YAML config file (default: the embedded {DEFAULT_CONFIG_PATH.name}: "
            "offline mode, watching ./checkpoints)",
        )  # fmt: skip

    run = commands.add_parser("run", help="run the daemon in the foreground (the default)")
    config_arg(run)
    run.add_argument(
        "--once", action="store_true",
        help="publish what is finished, wait until it has landed, and exit",
    )  # fmt: skip
    run.add_argument(
        "--until-file", type=Path, metavar="FILE", default=None,
        help="run until FILE exists (e.g. a training job's done marker), then publish what "
        "is left and exit as --once does",
    )  # fmt: skip
    run.add_argument(
        "--deadline", type=_duration_arg, metavar="DURATION", default=DEFAULT_DEADLINE,
        help="with --once or --until-file: exit at the latest this long after the batch began "
        "or after the last checkpoint it queued, whichever is later (default "
        f"{DEFAULT_DEADLINE}); exit 1 naming each checkpoint not published, which the "
        "journal keeps for a later start",
    )  # fmt: skip
    check = commands.add_parser("check", help="validate the config; exit 0 or print errors, exit 2")
    config_arg(check)
    status = commands.add_parser("status", help="journal summary per collection")
    config_arg(status)
    gc = commands.add_parser("gc", help="retention plan as a table; act unless --dry-run")
    config_arg(gc)
    gc.add_argument("--dry-run", action="store_true", help="show the plan, delete nothing")
    _restore_parser(commands.add_parser("restore", help="download a published checkpoint"))
    promote = commands.add_parser(
        "promote", help="link a published version to a Registry or release it on the Hub"
    )
    config_arg(promote)
    promote.add_argument(
        "artifact", metavar="ARTIFACT[:ALIAS|:vN]", help="a published version (default :latest)"
    )
    promote.add_argument(
        "--to", required=True, type=_target_arg, metavar="TARGET",
        help="registry:wandb-registry-<registry>/<collection> or huggingface:<namespace>/<repo>",
    )  # fmt: skip
    promote.add_argument(
        "--alias", action="append", default=[], type=_alias_arg, metavar="A",
        help="alias of the linked version (registry targets; repeatable)",
    )  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    # `ckptd --config FILE [--once]` is `ckptd run --config FILE [--once]`.
    first = args_list[0] if args_list else ""
    if first and not first.startswith("-") and first not in _COMMANDS:
        close = difflib.get_close_matches(first, _COMMANDS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        print(
            f"ckptd: unknown command {first!r}{hint} (commands: {', '.join(_COMMANDS)})",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if first not in _COMMANDS and first not in {"-h", "--help", "--version"}:
        args_list.insert(0, "run")
    args = _parser().parse_args(args_list)
    source = args.config or DEFAULT_CONFIG_PATH
    try:
        config = load_config(args.config)
        _supported(config, source)
        # A config that cannot run is a config error (exit 2) at start-up. `check` may run
        # where the key is not visible (systemd hands it over inside the unit): it says so.
        api_key = _key_for(config, source) if args.command in ("run", "promote") else None
    except ConfigError as exc:
        print(f"ckptd: invalid configuration {exc.source}:", file=sys.stderr)
        for problem in mask_secrets(exc.problems, os.environ):
            print(f"  {problem}", file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.command == "check":
            return _check(config, source)
        if args.command == "status":
            return _status(config)
        if args.command == "gc":
            return _gc(config, dry_run=args.dry_run)
        if args.command == "restore":
            return _restore(config, args)
        if args.command == "promote":
            return _promote(config, api_key, args)
        return _run(
            config, api_key, once=args.once, until_file=args.until_file, deadline=args.deadline
        )
    except CkptdError as exc:
        # A path such as api_key_file: "${WANDB_API_KEY}" puts a secret into messages.
        (message,) = mask_secrets([str(exc)], os.environ)
        print(f"ckptd: {message}", file=sys.stderr)
        return EXIT_FAILURE


def _duration_arg(text: str) -> float:
    from ckptd.config import parse_duration

    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive duration, got {text!r}")
    return seconds


def _run(
    config: Config,
    api_key: str | None,
    *,
    once: bool,
    until_file: Path | None = None,
    deadline: float = 300.0,
) -> int:
    from ckptd.logs import setup_logging
    from ckptd.priority import lower_priority
    from ckptd.service import Service
    from ckptd.sinks import factory

    setup_logging(config.log.format, config.log.level, [api_key or "", *_hub_token(config)])
    # Before any thread or wandb-core starts: they inherit it.
    running_at = lower_priority(config.upload.priority)
    log.info("running at %s (upload.priority: %s)", running_at, config.upload.priority)
    stop = threading.Event()
    signals_seen = 0

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen > 1:
            os.write(2, b"ckptd: second signal, aborting now; pending work stays queued\n")
            os._exit(EXIT_FAILURE)
        stop.set()
        service.wake.set()

    service = Service(
        config, lambda c: factory.build(c, api_key),
        promotion_targets=lambda spec: factory.promotion_target(config, spec, api_key),
    )  # fmt: skip
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    batch = False
    try:
        service.start()
        if not stop.is_set():
            service.run(stop, once=once, until_file=until_file, deadline=deadline)
        batch = once or (until_file is not None and not stop.is_set())
        if stop.is_set():
            log.info("signal received: stopping (a second signal aborts at once)")
    finally:
        # A batch run that returned has published all it could before its deadline; a
        # signal (or an error) drains the queue up to upload.shutdown_timeout first.
        service.shutdown(drain=not batch)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    code = EXIT_OK
    if batch and service.unpublished:
        for problem in service.unpublished:
            log.error("not published: %s", problem)
        code = EXIT_FAILURE
    if service.abandoned:
        # A publish still inside the SDK's own retries (an unreachable server) would hold
        # the interpreter's exit for minutes; its row stays queued in the journal.
        logging.shutdown()
        os._exit(code)
    return code


def _hub_token(config: Config) -> list[str]:
    """The Hugging Face token, to be masked in every log line (never shown)."""
    from ckptd.sinks.hub import read_token

    try:
        return [token] if (token := read_token(config)) else []
    except CkptdError:
        return []  # an unreadable token file is reported when a release needs it


def _target_arg(text: str) -> str:
    from ckptd.config import parse_target

    try:
        parse_target(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _promote(config: Config, api_key: str | None, args: argparse.Namespace) -> int:
    """`ckptd promote ARTIFACT[:REF] --to TARGET`: one version, at once."""
    from ckptd.logs import setup_logging
    from ckptd.promote import promote_now
    from ckptd.sinks import factory

    artifact, _, ref = str(args.artifact).partition(":")
    setup_logging(config.log.format, config.log.level, [api_key or "", *_hub_token(config)])
    if args.alias and not args.to.startswith("registry:"):
        raise CkptdError("--alias applies to registry targets; a Hub release is tagged step-N")
    sink = factory.build(config, api_key)
    if not sink.capabilities.reads:
        sink.close()
        limits = sink.capabilities.limits
        raise CkptdError(f"ckptd promote cannot read published versions: {limits}")
    target = factory.promotion_target(config, args.to, api_key)
    try:
        print(promote_now(config, sink, target, artifact, ref or "latest", tuple(args.alias)))
    finally:
        target.close()
        sink.close()
    return EXIT_OK


def _supported(config: Config, source: Path) -> None:
    """A ConfigError naming each key that asks the destination for what it cannot do."""
    from ckptd.sinks import factory

    if problems := factory.unsupported(config):
        raise ConfigError(str(source), problems)


def _key_for(config: Config, source: Path) -> str | None:
    """The destination's API key; a ConfigError where it needs one and none is there, or
    its file is unusable (systemd must not restart into the same failure every 5 s)."""
    from ckptd.sinks import factory

    try:
        key = factory.api_key(config)
    except CkptdError as exc:
        raise ConfigError(str(source), [str(exc)]) from None
    if (problem := factory.missing_credentials(config, key)) is not None:
        raise ConfigError(str(source), [problem])
    return key


def _check(config: Config, source: Path) -> int:
    """Say what the config will do: each watch entry, where it publishes, what it deletes,
    and whether the API key an online config needs is visible here."""
    from ckptd.retention.plan import describe

    count = len(config.watch)
    print(f"{source}: OK ({count} watch entr{'y' if count == 1 else 'ies'})")
    try:
        _key_for(config, source)
    except ConfigError as exc:
        print(
            f"  note: {exc.problems[0]}; under systemd, LoadCredential=wandb-api-key "
            "provides it at start. Started without one, ckptd exits 2."
        )
    for index, watch in enumerate(config.watch):
        print(f"  watch[{index}] {watch.path} -> {watch.artifact} ({watch.format})")
        print(f"    retention: {describe(watch.retention)}")
        if watch.reference is not None:
            reference = watch.reference
            where = reference.uri if isinstance(reference, ObjectStoreReference) else "file://"
            print(f"    reference: {where} (nothing uploaded; W&B holds references)")
        if watch.distributed is not None:
            print(f"    distributed: {_describe_distributed(watch.distributed)}")
        for rule in watch.promote:
            when = f"alias {rule.when.alias}" if rule.when.alias else f"final {rule.when.final}"
            aliases = f" with {', '.join(rule.aliases)}" if rule.aliases else ""
            print(f"    promote: when {when} -> {rule.to}{aliases}")
    return EXIT_OK


def _describe_distributed(distributed: DistributedConfig) -> str:
    """One line: this host's place in the job, and what the environment told."""
    role = "commits each version" if distributed.is_finisher else (
        f"rank {distributed.finisher} commits each version"
    )  # fmt: skip
    return (
        f"group {distributed.group!r}, rank {distributed.rank} of {distributed.hosts} hosts "
        f"({role}), timeout {distributed.timeout:g}s; detected in the environment: "
        f"{detect(os.environ).describe()} (values in the config win)"
    )


def _status(config: Config) -> int:
    journal = Journal(config.state_dir)
    if not journal.path.exists():
        print(f"no journal in {config.state_dir} yet: nothing detected")
        return EXIT_OK
    journal.open(exclusive=False)
    try:
        rows = journal.rows()
        parked = journal.parked()
        drops = journal.drops()
        promotions = journal.promotions()
    finally:
        journal.close()
    parked_targets = {k: v for k, v in parked.items() if k.startswith(PARKED_PREFIX)}
    parked = {k: v for k, v in parked.items() if k not in parked_targets}
    collections = sorted(
        {r.collection for r in rows}
        | set(parked)
        | {d.collection for d in drops}
        | {w.artifact for w in config.watch}
    )
    for collection in collections:
        mine = [r for r in rows if r.collection == collection]
        counts = Counter(r.state for r in mine)
        published = [r for r in mine if r.state in ("published", "aliased")]
        last = max(published, key=lambda r: r.updated_at, default=None)
        unconfirmed = sum(not r.durable for r in published)
        print(
            f"{collection}: {len(published) - unconfirmed} published, "
            + (f"{unconfirmed} logged offline but unconfirmed, " if unconfirmed else "")
            + f"{counts['ready'] + counts['hashed'] + counts['upserted']} pending, "
            f"{counts['failed']} failed, "
            f"{counts['superseded']} superseded, {sum(d.collection == collection for d in drops)} "
            "dropped" + (f"; last {last.version or '<offline>'} (step {last.step})" if last else "")
        )
        if collection in parked:
            reason, _ = parked[collection]
            print(f"  PARKED: {reason}")
        for row in mine:
            if row.state in ("ready", "hashed", "upserted", "failed") and row.last_error:
                print(f"  {row.state} {row.relpath} (step {row.step}): {row.last_error}")
        for drop in (d for d in drops if d.collection == collection):
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(drop.at))
            detail = f": {drop.detail}" if drop.detail else ""
            print(f"  dropped {drop.path} ({drop.reason}, {when}){detail}")
    _promotion_status(promotions, parked_targets)
    address = config.state_dir / "metrics.address"
    if address.exists():  # written by a running daemon
        print(f"metrics: http://{address.read_text().strip()}/metrics")
    return EXIT_OK


def _promotion_status(promotions: list[PromotionRow], parked: dict[str, tuple[str, float]]) -> None:
    """One line per target (done, pending, failed), then each pending or failed promotion."""
    targets = {p.target for p in promotions} | {k.removeprefix(PARKED_PREFIX) for k in parked}
    for target in sorted(targets):
        mine = [p for p in promotions if p.target == target]
        counts = Counter(p.state for p in mine)
        print(f"promote {target}: {counts['done']} done, {counts['pending']} pending, "
              f"{counts['failed']} failed")  # fmt: skip
        if f"{PARKED_PREFIX}{target}" in parked:
            print(f"  PARKED: {parked[PARKED_PREFIX + target][0]}")
        for p in mine:
            if p.state != "done":
                error = f": {p.last_error}" if p.last_error else ""
                print(f"  {p.state} {p.collection}:{p.version} (step {p.step}){error}")


def _gc(config: Config, *, dry_run: bool) -> int:
    import textwrap

    from ckptd.errors import StateDirLocked
    from ckptd.logs import setup_logging
    from ckptd.retention.run import Retention
    from ckptd.sinks import factory

    api_key = factory.api_key(config)
    setup_logging(config.log.format, config.log.level, [api_key or ""])
    if (problem := factory.missing_credentials(config, api_key)) is not None:
        raise CkptdError(problem)
    journal = Journal(config.state_dir)
    try:
        journal.open(exclusive=not dry_run)
    except StateDirLocked as exc:
        raise CkptdError(
            f"{exc}. `ckptd gc` deletes only while the daemon is stopped (a running daemon "
            "applies retention itself after each publish): stop it, or use --dry-run"
        ) from None
    sink = factory.build(config, api_key)
    try:
        retention = Retention(config, journal, sink)
        before, planned, now = len(journal.deletions()), 0, time.time()
        for watch in config.watch:
            plan = retention.run(watch, now, dry_run=dry_run)
            planned += len(plan.deletions)
            print(f"{watch.artifact} ({watch.path}):")
            print(textwrap.indent(plan.table(), "  "))
        deleted = len(journal.deletions()) - before
        failures = retention.failures()
    finally:
        sink.close()
        journal.close()
    for target, error in failures.items():
        print(f"ckptd: {target}: {error}", file=sys.stderr)
    if dry_run:
        print(f"dry run: {planned} deletion(s) planned, nothing deleted")
    else:
        print(f"deleted {deleted} of {planned} planned; each is recorded in the journal")
    return EXIT_FAILURE if failures else EXIT_OK


def _restore_parser(p: argparse.ArgumentParser) -> None:
    from ckptd.restore import version_ref

    p.description = (
        "Download the first of the given aliases (or the version) that exists into DIR. "
        "Exit 0 when restored, when nothing is published yet, or when --if-missing skipped; "
        "1 on a real error (key, network, corrupt download, none of the aliases exists)."
    )
    p.add_argument("artifact", metavar="ARTIFACT", help="artifact collection name")
    p.add_argument("--to", required=True, type=Path, metavar="DIR", help="destination")
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--alias", action="append", default=[], type=_alias_arg, metavar="A",
        help="alias to try, in order (repeatable; default: latest)",
    )  # fmt: skip
    which.add_argument("--version", type=version_ref, metavar="vN", help="a version instead")
    p.add_argument("--project", help="W&B project (default: config, then WANDB_PROJECT)")
    p.add_argument("--entity", help="W&B entity (default: config, WANDB_ENTITY, the key's)")
    p.add_argument(
        "--if-missing", action="store_true", help="do nothing when DIR already has a checkpoint"
    )
    p.add_argument(
        "--allow-reference-root", action="append", default=[], type=_reference_root,
        metavar="DIR|URI",
        help="follow file:// references under DIR, or s3:// and gs:// references under URI "
        "(s3://bucket/prefix/) (repeatable); the reference of each watch entry in --config "
        "that publishes ARTIFACT is allowed too; any other reference is refused",
    )  # fmt: skip
    p.add_argument(
        "--config", "-c", type=Path, default=None,
        help="config file for project, entity, base_url and api_key_file",
    )  # fmt: skip


def _reference_root(text: str) -> Path | str:
    """A directory, or an object store prefix (as given, with a trailing '/')."""
    from ckptd import references

    if "://" not in text:
        return Path(text)
    try:
        return references.check_store_uri(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _reference_allowed(
    config: Config | None, artifact: str, given: list[Path | str]
) -> tuple[list[Path], list[str]]:
    """(directories, object store prefixes) whose references restore may follow: those given
    by --allow-reference-root, and the reference of each watch entry publishing `artifact`
    (its versions reference exactly there)."""
    roots = [root for root in given if isinstance(root, Path)]
    prefixes = [root for root in given if isinstance(root, str)]
    for watch in () if config is None else config.watch:
        if watch.artifact != artifact or watch.reference is None:
            continue
        if isinstance(watch.reference, ObjectStoreReference):
            prefixes.append(watch.reference.uri)
        else:
            roots.append(watch.path)
    return roots, prefixes


def _alias_arg(text: str) -> str:
    from ckptd.config import valid_alias

    if not valid_alias(text):
        raise argparse.ArgumentTypeError(f"an alias has no '/' or ':', got {text!r}")
    return text


def _refuse_watched(dest: Path, config: Config) -> None:
    """Files restored into a directory ckptd watches would be published again as new
    versions (and could take `latest` from the checkpoints they are copies of)."""
    target = Path(os.path.realpath(dest))
    for index, watch in enumerate(config.watch):
        root = Path(os.path.realpath(watch.path))
        if target.is_relative_to(root):
            raise CkptdError(
                f"refusing to restore into {dest}: it is inside watch[{index}].path "
                f"({watch.path}), so ckptd would publish the restored files again; restore "
                "into a directory of its own and point the training job at it"
            )


def _restore(config: Config, args: argparse.Namespace) -> int:
    from ckptd.logs import setup_logging
    from ckptd.restore import has_checkpoint, restore
    from ckptd.sinks import factory

    if args.config is not None:
        _refuse_watched(args.to, config)
    if args.if_missing and has_checkpoint(args.to):  # before any key or network is needed
        print(f"{args.to} already holds a checkpoint; nothing restored")
        return EXIT_OK
    api_key = factory.api_key(config)
    setup_logging(config.log.format, config.log.level, [api_key or ""])
    sink = factory.reader(
        config, api_key, explicit_config=args.config is not None,
        project=args.project, entity=args.entity,
    )  # fmt: skip
    refs = [args.version] if args.version else args.alias or ["latest"]
    watched = config if args.config is not None else None
    roots, prefixes = _reference_allowed(watched, args.artifact, args.allow_reference_root)
    try:
        result = restore(
            args.artifact, args.to, sink, refs=refs, if_missing=args.if_missing,
            reference_roots=roots, reference_prefixes=prefixes,
        )  # fmt: skip
    finally:
        sink.close()
    print(result.message)
    return EXIT_OK
