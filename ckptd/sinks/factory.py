"""The one place that chooses a sink from the config, and what it needs to start.

Today the destination is W&B (online, or offline into run files for `wandb sync`); a second
destination adds itself here and nowhere else.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from ckptd.config import Config
from ckptd.errors import CkptdError
from ckptd.sinks import Sink
from ckptd.sinks.promotion import PromotionTarget

__all__ = [
    "api_key", "build", "missing_credentials", "promotion_target", "reader", "restore_config",
    "unsupported",
]  # fmt: skip


def api_key(config: Config, environ: Mapping[str, str] | None = None) -> str | None:
    """The destination's secret (the W&B API key), read once; never logged."""
    from ckptd.sinks.wandb import read_api_key

    return read_api_key(config, None if environ is None else dict(environ))


def missing_credentials(config: Config, key: str | None) -> str | None:
    """Why the configured destination cannot be used with `key`, else None."""
    if config.wandb.mode == "online" and not key:
        return (
            "wandb.mode is online but no API key was found: set wandb.api_key_file or "
            "WANDB_API_KEY (or use mode: offline)"
        )
    return None


def unsupported(config: Config) -> list[str]:
    """What the config asks of the destination that it cannot do, one line per key."""
    if config.wandb.mode == "online":
        return []
    return [
        f"watch[{index}].promote: promotion needs wandb.mode online (offline versions get "
        "their numbers only at `wandb sync`)"
        for index, watch in enumerate(config.watch)
        if watch.promote
    ]


def build(config: Config, key: str | None) -> Sink:
    """The sink the daemon, `ckptd gc` and `ckptd promote` publish to."""
    from ckptd.sinks.wandb import WandbSink

    return WandbSink(config, key)


def promotion_target(config: Config, spec: str, key: str | None) -> PromotionTarget:
    """The promotion target `spec` (`registry:...`, `huggingface:...`) of the daemon and of
    `ckptd promote`; a Hub release reads the version's bytes from the sink `build` makes."""
    from ckptd.sinks.promotion import open_target

    return open_target(config, spec, key, build(config, key))


def restore_config(
    config: Config,
    *,
    explicit_config: bool,
    project: str | None,
    entity: str | None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Where `ckptd restore` reads from: command-line flags, then the config file (when one
    was given), then W&B's environment variables, then the defaults."""
    env = os.environ if environ is None else environ
    wandb = config.wandb
    if explicit_config:
        project = project or wandb.project
        entity = entity or wandb.entity
    where = wandb.model_copy(
        update={
            "mode": "online",
            "project": project or env.get("WANDB_PROJECT") or wandb.project,
            "entity": entity or env.get("WANDB_ENTITY") or None,
            "base_url": wandb.base_url or env.get("WANDB_BASE_URL") or None,
        }
    )
    return config.model_copy(update={"wandb": where})


def reader(
    config: Config,
    key: str | None,
    *,
    explicit_config: bool,
    project: str | None = None,
    entity: str | None = None,
) -> Sink:
    """The sink `ckptd restore` reads from (see `restore_config`); CkptdError where it
    cannot read at all."""
    if not key:
        offline = explicit_config and config.wandb.mode == "offline"
        raise CkptdError(
            ("offline mode: restore needs W&B online (a key and the network); versions "
             "recorded offline are on W&B once `wandb sync` uploaded them. " if offline else "")
            + "No W&B API key: set WANDB_API_KEY, wandb.api_key_file in --config, or "
            "systemd's LoadCredential=wandb-api-key"
        )  # fmt: skip
    where = restore_config(config, explicit_config=explicit_config, project=project, entity=entity)
    return build(where, key)
