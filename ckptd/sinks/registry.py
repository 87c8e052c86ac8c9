"""Promotion target `registry:wandb-registry-<registry>/<collection>`: link a published
version into a W&B Registry collection with aliases, with the wandb public API.

`Artifact.link` resolves the registry's organization from the version's entity
(`FetchOrgInfoFromEntity`) and sends `LinkArtifact`; the registry collection is created by
the first link. Before linking, the version's existing links (`FetchLinkedArtifacts`) are
read: a version already linked there with every alias asked for is left alone, so a
promotion repeated after a crash links nothing twice.
"""

from __future__ import annotations

import logging
from typing import Any

from ckptd.config import Config
from ckptd.errors import PromotionRefused, PublishError
from ckptd.sinks.promotion import Promotion
from ckptd.sinks.wandb import WandbSink

__all__ = ["RegistryTarget"]

log = logging.getLogger(__name__)


class RegistryTarget:
    """Links versions into one Registry collection. Cheap to construct."""

    def __init__(self, config: Config, where: str, api_key: str | None) -> None:
        self.name = f"registry:{where}"
        self.where = where  # wandb-registry-model/demo
        # The W&B sink's public-API connection, entity lookup and error classification:
        # a link is made by the same client, to the same server, as the publish.
        self._wandb = WandbSink(config, api_key)

    def promote(self, promotion: Promotion) -> str:
        label = f"{promotion.collection}:{promotion.version}"
        try:
            found = self._wandb.resolve(promotion.collection, promotion.version)
            if found is None:
                raise PromotionRefused(f"{label} does not exist on W&B (deleted?)")
            artifact = found.handle
            present = self._linked_here(artifact)
            wanted = set(promotion.aliases)
            if present is not None and wanted <= set(present.aliases):
                return f"{label} is linked to {present.qualified_name} already"
            linked = artifact.link(self.where, aliases=list(promotion.aliases))
        except PublishError:
            raise
        except Exception as exc:
            raise self._wandb.classify(exc, f"linking {label} to {self.where}") from exc
        aliases = ", ".join(promotion.aliases) or "no aliases"
        return f"linked {label} to {linked.qualified_name} ({aliases})"

    def _linked_here(self, artifact: Any) -> Any:
        """The membership of `artifact` in this registry collection, or None."""
        registry, _, collection = self.where.partition("/")
        for linked in artifact.linked_artifacts:
            if linked.project == registry and linked.name.partition(":")[0] == collection:
                return linked
        return None

    def close(self) -> None:
        self._wandb.close()
