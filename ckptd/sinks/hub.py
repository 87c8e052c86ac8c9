"""Promotion target `huggingface:<namespace>/<repo>`: release a published version's model
files on the Hugging Face Hub with `huggingface_hub`.

A release is: the repository (created private unless `huggingface.private: false`), one
commit holding the model files of an HF-loadable layout (`save_pretrained` directories,
Trainer checkpoints, PEFT adapters; never optimizer, scheduler, RNG or trainer state) and a
generated model card, and a tag `step-N` on that commit. The bytes come from the sink the
version was published to (`Sink.resolve`/`download`: W&B), checked against the md5s it
recorded, not from the training directory.

Idempotent: a repository that has the tag `step-N` already is left alone; without the tag
(a crash between commit and tag), `create_commit` finds every file unchanged (the Hub's
preupload answers each file's id), makes no commit, and the tag goes on the head.

The token (`huggingface.token_file`, else `HF_TOKEN`) is read once, kept in memory and
never logged: errors are reported with it masked.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ckptd.config import Config
from ckptd.errors import PromotionRefused, PublishError
from ckptd.sinks import Sink
from ckptd.sinks.fetch import FetchedVersion, fetch_version
from ckptd.sinks.promotion import Promotion

__all__ = ["HubTarget", "model_card", "model_files", "read_token"]

log = logging.getLogger(__name__)

# What `from_pretrained` reads: configs, weights, tokenizers, processors, adapters.
_MODEL_NAMES = frozenset({
    "config.json", "generation_config.json", "adapter_config.json",
    "model.safetensors.index.json", "pytorch_model.bin.index.json",
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "spiece.model",
    "sentencepiece.bpe.model", "preprocessor_config.json", "processor_config.json",
    "chat_template.json", "chat_template.jinja",
})  # fmt: skip
_MODEL_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "adapter_model.bin")
_PERMANENT_STATUS = {400, 401, 403, 404, 409, 422}


def model_files(root: Path, names: Iterable[str]) -> list[str]:
    """The files of a checkpoint (names relative to `root`) that make a Hub model: top-level
    model files only. PublishError(transient=False) if it is no HF-loadable layout."""
    chosen = sorted(
        name for name in names
        if "/" not in name
        and (name in _MODEL_NAMES or any(fnmatch.fnmatch(name, p) for p in _MODEL_PATTERNS))
    )  # fmt: skip
    if not {"config.json", "adapter_config.json"} & set(chosen):
        raise PromotionRefused(
            f"not an HF-loadable layout (no config.json or adapter_config.json at the top of "
            f"{', '.join(sorted(names)) or 'an empty version'}): nothing to release"
        )
    if not any(fnmatch.fnmatch(name, p) for name in chosen for p in _MODEL_PATTERNS):
        raise PromotionRefused("no model weights (*.safetensors, pytorch_model*.bin)")
    return chosen


def base_model(root: Path) -> str | None:
    """`_name_or_path` of config.json (or `base_model_name_or_path` of a PEFT adapter) when
    it names a Hub model, not a local directory."""
    for name, key in (("adapter_config.json", "base_model_name_or_path"),
                      ("config.json", "_name_or_path")):  # fmt: skip
        try:
            value = json.loads((root / name).read_text(encoding="utf-8")).get(key)
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(value, str) and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", value):
            return value
    return None


def model_card(repo: str, fetched: FetchedVersion, step: int, base: str | None) -> str:
    """The README.md of a release: step, metrics, the W&B version it came from, the base
    model. Deterministic (no dates): the same version gives the same card."""
    front = ["---", "tags:", "- ckptd"]
    if base is not None:
        front.append(f"base_model: {base}")
    front.append("---")
    link = f"[`{fetched.qualified}`]({fetched.url})" if fetched.url else f"`{fetched.qualified}`"
    lines = [
        *front, "", f"# {repo}", "",
        f"Checkpoint at step {step}, released by ckptd from the W&B artifact {link}.", "",
    ]  # fmt: skip
    if fetched.metrics:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {name} | {value} |" for name, value in sorted(fetched.metrics.items())]
        lines.append("")
    if base is not None:
        lines += [f"Base model: [`{base}`](https://huggingface.co/{base}).", ""]
    return "\n".join(lines)


def read_token(config: Config, environ: Mapping[str, str] | None = None) -> str | None:
    """The Hub token: `huggingface.token_file`, else HF_TOKEN."""
    env = os.environ if environ is None else environ
    path = config.huggingface.token_file
    if path is None:
        return env.get("HF_TOKEN") or None
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise PublishError(
            f"huggingface.token_file: cannot read {path}: {exc.strerror or exc}", transient=False
        ) from None
    return token or None


class HubTarget:
    """Releases versions into one Hub model repository. Cheap to construct."""

    def __init__(self, config: Config, repo: str, source: Sink) -> None:
        self.name = f"huggingface:{repo}"
        self.repo = repo
        self.config = config
        self._source = source  # where the versions are published: their bytes come from it
        self._token: str | None = None

    def promote(self, promotion: Promotion) -> str:
        tag = f"step-{promotion.step}"
        label = f"{promotion.collection}:{promotion.version}"
        api = self._api()
        try:
            api.create_repo(self.repo, private=self.config.huggingface.private, exist_ok=True)
            if tag in {ref.name for ref in api.list_repo_refs(self.repo).tags}:
                return f"{self.repo} has {tag} already: {label} is released"
            oid, committed = self._commit(api, promotion, tag)
            api.create_tag(self.repo, tag=tag, revision=oid)
        except PublishError:
            raise
        except Exception as exc:
            raise self._classify(exc, f"releasing {label} on {self.repo}") from exc
        made = "committed" if committed else "nothing changed since"
        return f"released {label} on {self.repo} ({made} {oid[:12]}, tag {tag})"

    def _commit(self, api: Any, promotion: Promotion, tag: str) -> tuple[str, bool]:
        """Upload the version's model files and card in one commit; (commit id, whether a
        commit was made: False where the head holds the same files already)."""
        from huggingface_hub import CommitOperationAdd

        root = _scratch(self.config.state_dir / "promote")
        try:
            fetched = fetch_version(self._source, promotion.collection, promotion.version, root)
            files = model_files(root, fetched.files)
            card = model_card(self.repo, fetched, promotion.step, base_model(root))
            operations = [CommitOperationAdd(name, str(root / name)) for name in files]
            operations.append(CommitOperationAdd("README.md", card.encode()))
            head = _head(api, self.repo)
            metrics = ", ".join(f"{k}={v}" for k, v in sorted(fetched.metrics.items()))
            info = api.create_commit(
                self.repo, operations,
                commit_message=f"step {promotion.step}" + (f": {metrics}" if metrics else "")
                + f" (W&B {fetched.qualified})",
                commit_description=f"Released by ckptd: {len(files)} model file(s) of "
                f"{fetched.qualified}, tagged {tag}.",
            )  # fmt: skip
            return info.oid, info.oid != head
        finally:
            shutil.rmtree(root, ignore_errors=True)

    def _api(self) -> Any:
        try:
            from huggingface_hub import HfApi
        except ImportError:
            raise PublishError(
                "the huggingface target needs huggingface_hub: pip install 'ckptd[huggingface]'",
                transient=False,
            ) from None
        if self._token is None:
            self._token = read_token(self.config)
            if self._token is None:
                raise PublishError(
                    "no Hugging Face token: set HF_TOKEN or huggingface.token_file",
                    transient=False,
                )
        from huggingface_hub.utils.tqdm import disable_progress_bars

        disable_progress_bars()  # tqdm bars on stderr would break `log.format: json`
        for noisy in ("httpx", "httpx2"):  # one INFO line per request, URLs included
            logging.getLogger(noisy).setLevel(logging.WARNING)
        endpoint = self.config.huggingface.endpoint or os.environ.get("HF_ENDPOINT") or None
        return HfApi(endpoint=endpoint, token=self._token)

    def _classify(self, exc: BaseException, doing: str) -> PublishError:
        text = str(exc) or type(exc).__name__
        if self._token:
            text = text.replace(self._token, "<hf-token>")
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if isinstance(exc, ValueError) and status is None:
            transient = False  # the library refused the input (an invalid card, a bad name)
        elif status is not None:
            transient = status not in _PERMANENT_STATUS
        else:
            transient = True  # network, timeouts
        return PublishError(f"{doing}: {type(exc).__name__}: {text}", transient=transient)

    def close(self) -> None:
        self._source.close()


def _scratch(parent: Path) -> Path:
    """A new download directory under `parent`, named for this process; those of processes
    that are gone (killed mid-release: the daemon, or a `ckptd promote`) are removed first."""
    parent.mkdir(parents=True, exist_ok=True)
    for stale in parent.glob("hub-*-*"):
        pid = stale.name.split("-")[1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"hub-{os.getpid()}-", dir=parent))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _head(api: Any, repo: str) -> str | None:
    """The commit `main` points at, or None in an empty repository."""
    for branch in api.list_repo_refs(repo).branches:
        if branch.name == "main":
            return str(branch.target_commit)
    return None
