"""The exception tree. Library code raises these; only `ckptd.cli` turns them into exit codes."""


class CkptdError(Exception):
    """Root of every error ckptd raises on purpose."""


class ConfigError(CkptdError):
    """The configuration file is missing, unreadable or invalid.

    `problems` holds one line per problem, each naming the key path and the value.
    """

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))


class SidecarError(CkptdError):
    """A sidecar metrics file exists but cannot be used; the message names the file."""


class JournalError(CkptdError):
    """The journal database cannot be opened or written (disk full, read-only, locked)."""


class NewerJournal(JournalError):
    """The journal was written by a newer ckptd, whose schema this one does not know."""


class StateDirLocked(JournalError):
    """Another ckptd process holds the lock on this state directory."""


class PublishError(CkptdError):
    """Publishing to a sink failed. `transient` says whether retrying can help."""

    def __init__(self, message: str, *, transient: bool, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.transient = transient
        self.retry_after = retry_after


class VersionLinked(PublishError):
    """A version is linked into another collection (a registry); retention keeps it."""

    def __init__(self, message: str) -> None:
        super().__init__(message, transient=False)


class PromotionRefused(PublishError):
    """A target cannot take this one version (gone from W&B, no model files): that promotion
    fails, and the target's other promotions go on."""

    def __init__(self, message: str) -> None:
        super().__init__(message, transient=False)


class CheckpointChanged(CkptdError):
    """A checkpoint's files changed or vanished while ckptd was reading them."""
