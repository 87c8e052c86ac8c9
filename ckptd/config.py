"""The configuration contract: one frozen pydantic tree, loaded from YAML.

Defaults live only in these models. Loading does `${VAR}` interpolation on the raw YAML,
resolves relative paths against the config file's directory, and turns every validation
problem into one line that names the key path, the rule and the value.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ckptd import references
from ckptd.errors import ConfigError
from ckptd.sidecar import RUN_PATH_SHAPE, valid_run_path

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "AliasConfig",
    "BestRule",
    "Config",
    "DistributedConfig",
    "HuggingFaceConfig",
    "LocalRetention",
    "ObjectStoreReference",
    "PromoteRule",
    "PromoteWhen",
    "RemoteRetention",
    "Size",
    "WatchConfig",
    "load_config",
    "mask_secrets",
    "parse_duration",
    "parse_size",
    "parse_target",
    "secret_values",
]

DEFAULT_CONFIG_PATH = Path(__file__).with_name("config.example.yaml")

# `auto` and the names of ckptd.formats.auto.FORMATS (which imports this module, so the
# schema cannot be built from it; tests/test_formats.py holds the two to the same set).
Format = Literal[
    "auto", "file", "hf-trainer", "hf-pretrained", "lightning", "deepspeed", "torch-dcp",
    "orbax", "megatron", "nemo", "keras", "tensorflow",
]  # fmt: skip

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]i?b|b|%)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1, None: 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "pb": 10**15,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "pib": 2**50,
}  # fmt: skip
# W&B's own rules: artifact names are letters, digits, '-', '_' and '.'; aliases may not
# contain '/' or ':' (they separate entity/project/name:alias).
_ARTIFACT_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
_ALIAS = re.compile(r"^[^/:]{1,128}$")
_ENV_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD", re.IGNORECASE)
_SECRET_MIN = 6  # shorter values would mask ordinary words and numbers everywhere
MAX_YAML_NODES = 100_000  # nodes of the config with every alias expanded


def parse_duration(value: object) -> float:
    """`30s`, `5m`, `2h`, `7d`, `250ms` or a plain number of seconds, as seconds."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration such as 30s, 5m, 2h or 7d, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if match is None:
            raise ValueError(f"expected a duration such as 30s, 5m, 2h or 7d, got {value!r}")
        seconds = float(match[1]) * _DURATION_UNITS[match[2]]
    if seconds < 0:
        raise ValueError(f"a duration cannot be negative, got {value!r}")
    return seconds


class Size(BaseModel):
    """An amount of disk: absolute bytes, or a percentage of the filesystem."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    bytes: int | None = None
    percent: float | None = None

    def resolve(self, filesystem_bytes: int) -> int:
        """Bytes this size stands for on a filesystem of `filesystem_bytes`."""
        if self.percent is not None:
            return int(filesystem_bytes * self.percent / 100)
        return self.bytes or 0


def parse_size(value: object) -> Size:
    """`10GB`, `500MiB`, `10%` or a plain number of bytes."""
    if isinstance(value, Size):
        return value
    if isinstance(value, bool) or value is None:
        raise ValueError(f"expected a size such as 10GB, 500MiB or 10%, got {value!r}")
    match = _SIZE.match(str(value))
    if match is None:
        raise ValueError(f"expected a size such as 10GB, 500MiB or 10%, got {value!r}")
    number, unit = float(match[1]), (match[2] or "").lower() or None
    if unit == "%":
        if not 0 <= number <= 100:
            raise ValueError(f"a percentage must be between 0 and 100, got {value!r}")
        return Size(percent=number)
    return Size(bytes=int(number * _SIZE_UNITS[unit]))


Duration = Annotated[float, BeforeValidator(parse_duration)]
SizeValue = Annotated[Size, BeforeValidator(parse_size)]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _resolve_path(value: Path, info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base_dir")
    path = value.expanduser()
    if not path.is_absolute() and base is not None:
        path = Path(base) / path
    return Path(os.path.normpath(path))


def _positive(seconds: float) -> float:
    """A duration that must be more than zero (an interval, a timeout)."""
    if seconds <= 0:
        raise ValueError(f"must be more than 0s, got {seconds:g}s")
    return seconds


def valid_alias(alias: str) -> bool:
    """W&B's rule for aliases: 1 to 128 characters, without '/' or ':'."""
    return bool(_ALIAS.match(alias))


def _check_alias(alias: str) -> str:
    if not valid_alias(alias):
        raise ValueError(f"an alias is 1 to 128 characters without '/' or ':', got {alias!r}")
    return alias


class WandbConfig(_Model):
    mode: Literal["offline", "online"] = "offline"
    project: str = "ckptd-demo"
    entity: str | None = None
    base_url: str | None = None
    api_key_file: Path | None = None

    _resolve = field_validator("api_key_file")(
        lambda v, info: None if v is None else _resolve_path(v, info)
    )


class RetryConfig(_Model):
    initial_delay: Duration = 2.0
    max_delay: Duration = 300.0
    give_up_after: Duration = 7 * 86400.0

    @model_validator(mode="after")
    def _ordered(self) -> RetryConfig:
        if self.max_delay < self.initial_delay:
            raise ValueError(
                f"max_delay ({self.max_delay:g}s) is shorter than initial_delay "
                f"({self.initial_delay:g}s)"
            )
        return self


class UploadConfig(_Model):
    workers: int = Field(4, ge=1, le=64)
    retry: RetryConfig = RetryConfig()
    shutdown_timeout: Duration = 60.0
    # ckptd and its wandb-core beside a training job: low (nice 10, I/O best-effort 7),
    # idle (nice 19, I/O idle) or normal.
    priority: Literal["normal", "low", "idle"] = "low"
    max_read_rate: SizeValue | None = None  # bytes per second that hashing may read

    @field_validator("max_read_rate")
    @classmethod
    def _absolute_rate(cls, rate: Size | None) -> Size | None:
        if rate is not None and (rate.percent is not None or not rate.bytes):
            raise ValueError("expected bytes per second such as 200MB")
        return rate


class SidecarConfig(_Model):
    wait: Duration = 30.0
    # auto: wait only where a sidecar is expected (the entry has had one before, or neither
    # the name nor the framework gives the step); always: wait for every checkpoint; never.
    expect: Literal["auto", "always", "never"] = "auto"
    flat_metadata: bool = False  # flat form: keep non-numeric keys as metadata


class BestRule(_Model):
    metric: str = Field(min_length=1)
    mode: Literal["min", "max"] = "min"
    alias: str | None = None
    min_delta: float = Field(0.0, ge=0)

    _alias = field_validator("alias")(lambda v: None if v is None else _check_alias(v))

    @property
    def alias_name(self) -> str:
        """The alias this rule moves: `alias`, else `best-<metric>`."""
        return self.alias or f"best-{self.metric}"


class AliasConfig(_Model):
    latest: bool = True
    templates: tuple[str, ...] = ("step-{step}",)
    best: tuple[BestRule, ...] = ()

    @field_validator("templates")
    @classmethod
    def _templates_parse(cls, templates: tuple[str, ...]) -> tuple[str, ...]:
        for template in templates:
            try:
                template.format_map(_TemplateProbe())
            except (ValueError, IndexError) as exc:
                raise ValueError(f"template {template!r} does not parse: {exc}") from None
        return templates

    @model_validator(mode="after")
    def _unique_best_aliases(self) -> AliasConfig:
        names = [rule.alias_name for rule in self.best]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"two best rules move the same alias: {', '.join(duplicates)}")
        return self


class _TemplateProbe(dict[str, object]):
    """Stands in for every template field so that only the syntax is checked."""

    def __missing__(self, key: str) -> object:
        return 0


class RemoteRetention(_Model):
    # None keeps every version: ckptd deletes a version only where the config asks for it.
    keep_last: int | None = Field(None, ge=1)
    protect: tuple[str, ...] = ("latest", "best*", "production", "staging")
    keep_every: int | None = Field(None, ge=1)
    ttl: Duration | None = None


class LocalRetention(_Model):
    delete_after_upload: bool = False
    keep_last: int = Field(2, ge=0)
    min_free: SizeValue | None = None
    allow_offline: bool = False


class RetentionConfig(_Model):
    remote: RemoteRetention = RemoteRetention()
    local: LocalRetention = LocalRetention()


_REGISTRY_TARGET = re.compile(r"^wandb-registry-[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]{1,128}$")
_HUB_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
TARGET_KINDS = ("registry", "huggingface")


class PromoteWhen(_Model):
    """When a promotion rule fires for a version: `alias` as soon as the version gets that
    alias at publish (a best rule's alias, a template's, or one its sidecar names); `final`
    for the version that holds the alias when a batch run (`--once`, `--until-file`) ends."""

    alias: str | None = None
    final: str | None = None

    _aliases = field_validator("alias", "final")(lambda v: None if v is None else _check_alias(v))

    @model_validator(mode="after")
    def _one(self) -> PromoteWhen:
        if (self.alias is None) == (self.final is None):
            raise ValueError("give exactly one of `alias: NAME` or `final: NAME`")
        return self


def parse_target(text: str) -> tuple[str, str]:
    """`registry:wandb-registry-model/demo` or `huggingface:org/repo` as (kind, where);
    ValueError naming the accepted forms otherwise."""
    kind, sep, where = text.partition(":")
    if sep and kind == "registry" and _REGISTRY_TARGET.match(where):
        return kind, where
    if sep and kind == "huggingface" and _HUB_REPO.match(where) and ".." not in where:
        return kind, where
    raise ValueError(
        "a promotion target is registry:wandb-registry-<registry>/<collection> or "
        f"huggingface:<namespace>/<repo>, got {text!r}"
    )


class PromoteRule(_Model):
    when: PromoteWhen
    to: str
    aliases: tuple[str, ...] = ()  # registry: aliases of the linked version

    @field_validator("to")
    @classmethod
    def _target(cls, to: str) -> str:
        parse_target(to)
        return to

    _alias_names = field_validator("aliases")(lambda v: tuple(_check_alias(a) for a in v))

    @model_validator(mode="after")
    def _aliases_for_registry(self) -> PromoteRule:
        if self.aliases and not self.to.startswith("registry:"):
            raise ValueError(
                "`aliases` apply to registry targets; a Hugging Face release is tagged step-N"
            )
        return self


class HuggingFaceConfig(_Model):
    token_file: Path | None = None  # else HF_TOKEN
    endpoint: str | None = None  # else HF_ENDPOINT, else the public Hub
    private: bool = True  # repositories ckptd creates

    _resolve = field_validator("token_file")(
        lambda v, info: None if v is None else _resolve_path(v, info)
    )


class ObjectStoreReference(_Model):
    """The watched path is `local`, or under it, and `local` is a mount of the object store
    prefix `uri` (Mountpoint for S3, s3fs, gcsfuse)."""

    uri: str
    local: Path

    _resolve = field_validator("local")(_resolve_path)

    @field_validator("uri")
    @classmethod
    def _store_prefix(cls, uri: str) -> str:
        prefix = references.check_store_uri(uri)
        if (missing := references.missing_library(prefix)) is not None:
            raise ValueError(missing)
        return prefix


def _file_reference(value: str) -> str:
    if value != "file":
        raise ValueError(
            "expected 'file' (a shared filesystem) or {uri: s3://bucket/prefix/, local: "
            f"/mount/of/it}} (an object store mount), got {value!r}"
        )
    return value


# `file`, or a mapping; the tag tells pydantic which, so that an error names only the one
# the user meant (tags hold '[' so that error paths leave them out).
Reference = Annotated[
    Annotated[Literal["file"], BeforeValidator(_file_reference), Tag("reference[file]")]
    | Annotated[ObjectStoreReference, Tag("reference[store]")],
    Discriminator(lambda v: "reference[file]" if isinstance(v, str) else "reference[store]"),
]


class DistributedConfig(_Model):
    """One checkpoint written by several hosts, published as one version (see topology)."""

    group: str = Field(min_length=1)  # the same on every host of a job, new for each job
    hosts: int = Field(ge=1)
    rank: int = Field(ge=0)
    finisher: int = Field(0, ge=0)  # the rank that commits each version
    timeout: Duration = 1800.0  # how long the finisher waits for every host's part
    # A directory every host reads and writes (NFS...) for the rendezvous, instead of W&B.
    rendezvous: Path | None = None

    _positive_timeout = field_validator("timeout")(_positive)
    _resolve = field_validator("rendezvous")(
        lambda v, info: None if v is None else _resolve_path(v, info)
    )

    @model_validator(mode="before")
    @classmethod
    def _from_environment(cls, value: object, info: ValidationInfo) -> object:
        """Fill group, hosts and rank that the config leaves out from the launcher's
        environment (ckptd.topology); what neither gives is an error naming both."""
        from ckptd.topology import detect

        if not isinstance(value, dict):
            return value
        env = (info.context or {}).get("env", os.environ)
        found = detect(env)
        filled = dict(value)
        missing = []
        for fact in ("group", "hosts", "rank"):
            if filled.get(fact) is None:
                detected = getattr(found, fact)
                if detected is None:
                    missing.append(fact)
                filled[fact] = detected
        if missing:
            raise ValueError(
                f"{', '.join(missing[:-1])}{' and ' if len(missing) > 1 else ''}{missing[-1]} "
                "not given and not found in the environment "
                "(SLURM, torchrun, PyTorchJob, JobSet or MPI variables); set "
                + ", ".join(f"{fact}: ${{VAR}}" for fact in missing)
            )
        return filled

    @model_validator(mode="after")
    def _ranks_in_range(self) -> DistributedConfig:
        for name, rank in (("rank", self.rank), ("finisher", self.finisher)):
            if rank >= self.hosts:
                raise ValueError(f"{name} {rank} is not below hosts ({self.hosts})")
        return self

    @property
    def is_finisher(self) -> bool:
        """Does this host commit the versions?"""
        return self.rank == self.finisher


DEFAULT_PATTERNS = ("*.pt", "*.pth", "*.ckpt", "*.safetensors", "*.bin", "*.keras", "*.h5")


class WatchConfig(_Model):
    path: Path
    artifact: str = "model-checkpoint"
    type: str = "model"
    format: Format = "auto"
    patterns: tuple[str, ...] = DEFAULT_PATTERNS
    recursive: bool = False
    observer: Literal["auto", "inotify", "polling"] = "auto"
    poll_interval: Duration = 2.0
    rescan: Duration = 600.0
    settle: Duration = 5.0
    incomplete_after: Duration = 600.0
    sidecar: SidecarConfig = SidecarConfig()
    aliases: AliasConfig = AliasConfig()
    retention: RetentionConfig = RetentionConfig()
    description: str | None = None
    run_path: str | None = None
    shared: bool = False  # this entry shares its collection with another on purpose
    promote: tuple[PromoteRule, ...] = ()
    # Record where the files already are instead of uploading them (see ckptd.references).
    reference: Reference | None = None
    distributed: DistributedConfig | None = None  # a multi-node job: one version, many hosts

    _resolve = field_validator("path")(_resolve_path)

    @field_validator("artifact")
    @classmethod
    def _artifact_name(cls, name: str) -> str:
        if not _ARTIFACT_NAME.match(name):
            raise ValueError(
                f"an artifact name is 1 to 128 letters, digits, '-', '_' or '.', got {name!r}"
            )
        return name

    @field_validator("run_path")
    @classmethod
    def _run_path_shape(cls, run_path: str | None) -> str | None:
        if run_path is not None and not valid_run_path(run_path):
            raise ValueError(f"a run path is {RUN_PATH_SHAPE}, got {run_path!r}")
        return run_path

    @field_validator("patterns")
    @classmethod
    def _patterns_nonempty(cls, patterns: tuple[str, ...]) -> tuple[str, ...]:
        if not patterns:
            raise ValueError("at least one pattern is needed")
        return patterns

    _positive_poll = field_validator("poll_interval")(_positive)

    @model_validator(mode="after")
    def _reference_fits(self) -> WatchConfig:
        """A mount must hold the watched path, and the referenced files are the only copy:
        local retention deleting them would delete the version's contents."""
        reference = self.reference
        if isinstance(reference, ObjectStoreReference) and not self.path.is_relative_to(
            reference.local
        ):
            raise ValueError(
                f"reference.local must be the watched path ({self.path}) or contain it (the "
                f"files must be inside the mount of {reference.uri}), got {reference.local}"
            )
        local = self.retention.local
        if reference is not None and (local.delete_after_upload or local.min_free is not None):
            deleting = "delete_after_upload: true" if local.delete_after_upload else "min_free"
            raise ValueError(
                "retention.local cannot delete the files that reference versions point at "
                f"(the versions would lose their contents), got {deleting} with reference"
            )
        return self


AUTO_LISTEN = ("127.0.0.1", tuple(range(9480, 9500)))


class MetricsConfig(_Model):
    # host:port, host:first-last (the first free port of the range), auto (127.0.0.1 and
    # the first free port of 9480-9499: several daemons on one host need no editing), null.
    listen: str | None = "auto"
    stall_after: Duration = 300.0  # /healthz fails when a coordinator step takes longer

    _positive_stall = field_validator("stall_after")(_positive)

    @field_validator("listen")
    @classmethod
    def _host_port(cls, listen: str | None) -> str | None:
        if listen is not None and listen != "auto" and _ports(listen) is None:
            raise ValueError(
                "expected host:port (127.0.0.1:9480), a port range (127.0.0.1:9480-9499) or "
                f"auto, got {listen!r}"
            )
        return listen

    @property
    def address(self) -> tuple[str, tuple[int, ...]] | None:
        """(host, the ports to try in order), or None when metrics are off."""
        if self.listen is None:
            return None
        if self.listen == "auto":
            return AUTO_LISTEN
        host, _, _ = self.listen.rpartition(":")
        ports = _ports(self.listen)
        assert ports is not None  # validated
        return host.strip("[]"), ports


def _ports(listen: str) -> tuple[int, ...] | None:
    """The ports of `host:port` or `host:first-last`, or None if it is neither."""
    host, sep, spec = listen.rpartition(":")
    first, dash, last = spec.partition("-")
    if not (sep and host and first.isdigit() and (last.isdigit() if dash else True)):
        return None
    low, high = int(first), int(last) if dash else int(first)
    if not 0 <= low <= high <= 65535 or (dash and low == 0):
        return None
    return tuple(range(low, high + 1))


class LogConfig(_Model):
    format: Literal["text", "json"] = "text"
    level: Literal["debug", "info", "warning", "error"] = "info"


class Config(_Model):
    state_dir: Path = Path(".ckptd")
    wandb: WandbConfig = WandbConfig()
    upload: UploadConfig = UploadConfig()
    watch: tuple[WatchConfig, ...] = Field(min_length=1)
    metrics: MetricsConfig = MetricsConfig()  # `metrics: null` turns the endpoints off
    log: LogConfig = LogConfig()
    huggingface: HuggingFaceConfig = HuggingFaceConfig()

    _resolve = field_validator("state_dir")(_resolve_path)

    @field_validator("metrics", mode="before")
    @classmethod
    def _metrics_off(cls, value: object) -> object:
        return {"listen": None} if value is None else value

    @model_validator(mode="after")
    def _distinct_watches(self) -> Config:
        """Each checkpoint belongs to one entry, and each collection to one entry unless the
        entries say they share it: two jobs in one collection make `latest` jump between
        their steps, and a file under two entries would be published twice."""
        problems = []
        for later, watch in enumerate(self.watch):
            for earlier, other in enumerate(self.watch[:later]):
                overlap = _overlap(other.path, watch.path)
                if overlap:
                    problems.append(
                        f"watch[{later}] ({watch.path}) {overlap} watch[{earlier}] "
                        f"({other.path}): a checkpoint under both would be published twice; "
                        "watch one of them"
                    )
                elif watch.artifact == other.artifact and not (watch.shared and other.shared):
                    problems.append(
                        f"watch[{earlier}] and watch[{later}] both publish to "
                        f"{watch.artifact!r}: `latest` would jump between their steps; give "
                        "each its own `artifact:`, or set `shared: true` on both"
                    )
        for index, watch in enumerate(self.watch):
            if watch.distributed is not None and self.wandb.mode != "online":
                problems.append(
                    f"watch[{index}].distributed: needs wandb.mode: online (W&B merges the "
                    "hosts' parts into one version on its server; offline mode cannot)"
                )
            if watch.distributed is not None and watch.reference is not None:
                problems.append(
                    f"watch[{index}].distributed: cannot be combined with reference (each "
                    "host uploads its part; references of several hosts are not merged)"
                )
        if problems:
            raise ValueError("\n".join(problems))
        return self


def _overlap(first: Path, second: Path) -> str:
    """How watch path `second` overlaps `first` ('' if it does not)."""
    if first == second:
        return "is the same directory as"
    if second.is_relative_to(first):
        return "is inside"
    if first.is_relative_to(second):
        return "contains"
    return ""


def load_config(path: Path | str | None, env: dict[str, str] | None = None) -> Config:
    """Read, interpolate and validate a config file; raise ConfigError naming every problem.

    `path=None` loads the embedded default (offline mode, watching ./checkpoints) with
    relative paths resolved against the current directory. No message carries the value of
    a secret environment variable (see `mask_secrets`).
    """
    source = DEFAULT_CONFIG_PATH if path is None else Path(path)
    base_dir = Path.cwd() if path is None else Path(os.path.abspath(source)).parent  # noqa: PTH100 - resolve() would follow a symlinked config
    environ = os.environ if env is None else env
    try:
        text = source.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else None
        raise ConfigError(str(source), [f"cannot read the file: {reason or exc}"]) from None
    raw = _parse_yaml(text, str(source))
    problems: list[str] = []
    raw = _interpolate(raw, environ, "", problems)
    if problems:
        raise ConfigError(str(source), mask_secrets(problems, environ))
    try:
        return Config.model_validate(raw, context={"base_dir": base_dir, "env": environ})
    except ValidationError as exc:
        raise ConfigError(str(source), mask_secrets(_describe(exc, raw), environ)) from None


def _parse_yaml(text: str, source: str) -> dict[str, Any]:
    """The YAML document as a mapping; refuses one whose aliases expand past MAX_YAML_NODES
    (a few hundred bytes of nested aliases can stand for billions of nodes)."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is not None and _expanded_size(node, {}) > MAX_YAML_NODES:
            raise ConfigError(
                source,
                [f"the YAML expands to more than {MAX_YAML_NODES} nodes (nested aliases?)"],
            )
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:  # PyYAML calls a string "<unicode string>": name the file
        message = str(exc).replace('"<unicode string>"', source).replace("<unicode string>", source)
        raise ConfigError(source, [f"not valid YAML: {message}"]) from None
    except RecursionError:
        raise ConfigError(source, ["the YAML nests too deeply"]) from None
    if not isinstance(raw, dict):
        raise ConfigError(source, ["expected a mapping of keys at the top level"])
    return raw


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """How many nodes `node` stands for with aliases expanded (each shared node is counted
    once per use, computed once)."""
    if id(node) in sizes:
        return sizes[id(node)]
    sizes[id(node)] = 1  # a recursive alias counts once rather than forever
    total = 1
    if isinstance(node, yaml.SequenceNode):
        total += sum(_expanded_size(child, sizes) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        total += sum(
            _expanded_size(key, sizes) + _expanded_size(value, sizes) for key, value in node.value
        )
    sizes[id(node)] = total
    return total


def secret_values(env: Mapping[str, str]) -> dict[str, str]:
    """Values of environment variables whose names say they hold a secret (KEY, TOKEN,
    SECRET, PASSWORD), longest first, each with the `${NAME}` to show instead."""
    found = {
        value: f"${{{name}}}"
        for name, value in env.items()
        if _SECRET_NAME.search(name) and len(value) >= _SECRET_MIN
    }
    return dict(sorted(found.items(), key=lambda item: -len(item[0])))


def mask_secrets(lines: list[str], env: Mapping[str, str]) -> list[str]:
    """`lines` with every secret environment value replaced by its `${NAME}`."""
    secrets = secret_values(env)
    out = []
    for line in lines:
        for value, shown in secrets.items():
            line = line.replace(value, shown)
        out.append(line)
    return out


def _interpolate(node: Any, env: Any, where: str, problems: list[str]) -> Any:
    """Replace `${VAR}` and `${VAR:-default}` in every string of the raw YAML tree."""
    if isinstance(node, dict):
        return {k: _interpolate(v, env, _join(where, k), problems) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, env, f"{where}[{i}]", problems) for i, v in enumerate(node)]
    if not isinstance(node, str):
        return node

    def substitute(match: re.Match[str]) -> str:
        name, default = match[1], match[2]
        if name in env:
            return str(env[name])
        if default is not None:
            return default
        problems.append(f"{where}: environment variable {name} is not set (in {node!r})")
        return match[0]

    return _ENV_VAR.sub(substitute, node)


def _join(prefix: str, key: object) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _describe(exc: ValidationError, raw: Any) -> list[str]:
    """One line per pydantic error: `key.path: rule, got value`."""
    lines = []
    errors = exc.errors(include_url=False)
    for error in errors:
        loc = [part for part in error["loc"] if not _is_pydantic_tag(part)]
        if error["type"] == "too_short" and any(
            other["loc"][: len(error["loc"])] == error["loc"] and other is not error
            for other in errors
        ):
            continue  # a list emptied by its items' own errors: those lines say it all
        where = ""
        for part in loc:
            where = f"{where}[{part}]" if isinstance(part, int) else _join(where, part)
        kind = error["type"]
        if kind == "extra_forbidden":
            lines.append(f"{where}: unknown key{_suggest(loc, raw)}")
        elif kind == "missing":
            lines.append(f"{where}: required key is missing")
        else:
            message = str(error["msg"]).removeprefix("Value error, ")
            message = message.replace("Input should be", "expected")
            message = message.replace("a valid tuple", "a list")
            message = re.sub(r"a valid dictionary or instance of \w+", "a mapping", message)
            if not where and kind == "value_error":
                lines.extend(message.splitlines())  # across entries: each names its keys
                continue
            if "got " not in message:
                message = f"{message}, got {error['input']!r}"
            lines.append(f"{where or '(top level)'}: {message}")
    return lines


def _is_pydantic_tag(part: object) -> bool:
    # Unions and validators add tags such as 'function-before[...]' to the location.
    return isinstance(part, str) and ("[" in part or part in {"tuple", "list"})


def _suggest(loc: list[Any], raw: Any) -> str:
    """`(did you mean 'settle'?)` for an unknown key close to a known one."""
    model: Any = Config
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return ""
        annotation = field.annotation
        inner = getattr(annotation, "__args__", None)
        model = inner[0] if inner else annotation
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return ""
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
