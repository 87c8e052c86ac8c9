"""Promotion rules, their journal steps and the promotion step, without a network: real
SQLite journals, an injected clock, a recording target; and the Hub target's pure parts
(which files make a model, the model card)."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from ckptd.checkpoint import CheckpointInfo, FileState
from ckptd.config import Config, load_config
from ckptd.errors import ConfigError, PromotionRefused, PublishError
from ckptd.journal import Journal, NewRow
from ckptd.journal.rows import SCHEMA
from ckptd.promote import PARKED_PREFIX, Promoter, fired
from ckptd.retention.run import Retention
from ckptd.sinks import Capabilities, RemoteVersion
from ckptd.sinks.fetch import FetchedVersion
from ckptd.sinks.hub import base_model, model_card, model_files
from ckptd.sinks.promotion import Promotion
from tests.test_service_step import INLINE

TARGET = "registry:wandb-registry-model/demo"
HUB = "huggingface:org/demo"


def load(tmp_path: Path, promote: str, mode: str = "online") -> Config:
    path = tmp_path / "ckptd.yaml"
    path.write_text(
        f"wandb: {{mode: {mode}}}\nupload: {{retry: {{initial_delay: 2s, max_delay: 60s, "
        f"give_up_after: 1h}}}}\nwatch:\n  - path: ck\n    promote: {promote}\n"
    )
    return load_config(path)


@pytest.mark.parametrize(
    ("promote", "problem"),
    [
        ("[{when: {alias: best}, to: 'registry:model/demo'}]", "watch[0].promote[0].to: a "
         "promotion target is registry:wandb-registry-<registry>/<collection> or "
         "huggingface:<namespace>/<repo>, got 'registry:model/demo'"),
        ("[{when: {alias: best}, to: 'huggingface:demo'}]", "got 'huggingface:demo'"),
        ("[{when: {alias: best, final: best}, to: 'huggingface:o/r'}]",
         "watch[0].promote[0].when: give exactly one of `alias: NAME` or `final: NAME`"),
        ("[{when: {alias: best}, to: 'huggingface:o/r', aliases: [x]}]",
         "`aliases` apply to registry targets"),
        ("[{when: {alias: 'a:b'}, to: 'huggingface:o/r'}]", "without '/' or ':'"),
        ("[{when: {alias: best}, to: 'huggingface:o/r', after: 1}]",
         "watch[0].promote[0].after: unknown key"),
    ],
)  # fmt: skip
def test_bad_rules_are_config_errors_naming_the_key(
    tmp_path: Path, promote: str, problem: str
) -> None:
    """Each malformed rule is refused with its key path and what is wrong."""
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, promote)
    assert any(problem in line for line in caught.value.problems), caught.value.problems


def test_the_readme_promotion_example_is_a_valid_config(tmp_path: Path) -> None:
    """The README's promotion config loads as written, with its three rules."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```yaml\n(.*?)```", readme, re.DOTALL) if "promote:" in b]
    (tmp_path / "ckptd.yaml").write_text(block)
    config = load_config(tmp_path / "ckptd.yaml")
    assert [r.to for r in config.watch[0].promote] == [
        "registry:wandb-registry-model/demo", "huggingface:my-org/demo-model",
        "huggingface:my-org/demo-model-final",
    ]  # fmt: skip
    assert config.huggingface.private


def test_promotion_needs_online_mode(tmp_path: Path) -> None:
    """Offline versions have no number until `wandb sync`: a rule there is a config error
    (exit 2) for `check` and at start, naming the key."""
    from tests.conftest import CKPTD

    load(tmp_path, f"[{{when: {{alias: best}}, to: '{TARGET}'}}]", mode="offline")  # loads
    for command in ("check", "run"):
        done = subprocess.run(
            [*CKPTD, command, "--config", str(tmp_path / "ckptd.yaml")],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 2, done.stderr
        assert "watch[0].promote: promotion needs wandb.mode online" in done.stderr


def test_alias_rules_fire_for_the_aliases_a_version_gets(tmp_path: Path) -> None:
    """`fired` names each alias rule whose alias the version got, with the rule's aliases;
    `final` rules never fire at publish."""
    config = load(
        tmp_path,
        f"[{{when: {{alias: best}}, to: '{TARGET}', aliases: [candidate]}}, "
        f"{{when: {{alias: release}}, to: '{HUB}'}}, {{when: {{final: best}}, to: '{HUB}'}}]",
    )
    rules = config.watch[0].promote
    assert fired(rules, ["latest", "step-5"]) == []
    assert fired(rules, ["latest", "best"]) == [(TARGET, ("candidate",))]
    assert fired(rules, ["release", "best"]) == [(TARGET, ("candidate",)), (HUB, ())]


FILES = (FileState("ckpt.pt", 10, 1, 2, 3),)


def published(journal: Journal, step: int, aliases: tuple[str, ...], promotions: list) -> int:
    new = NewRow(
        collection="model-checkpoint", watch_path=Path("/w"), relpath=f"ckpt_{step}.pt",
        fingerprint="f", format="file", step=step, files=FILES, info=CheckpointInfo(step=step),
        snapshot=None,
    )  # fmt: skip
    row_id = journal.add(new, 1.0)
    assert row_id is not None
    journal.mark_hashed(row_id, 2.0, md5s={"ckpt.pt": "x"}, digest=f"d{step}")
    journal.mark_published(
        row_id, 3.0, version=f"v{step}", aliases=aliases, best={}, promotions=promotions
    )
    journal.mark_aliased(row_id, 4.0)
    return row_id


def test_an_old_journal_gains_promotions_and_a_rule_fires_once_per_version(
    tmp_path: Path,
) -> None:
    """A schema-2 journal opens with the promotions table; a promotion is queued with its
    publish, and queuing the same version and target again changes nothing."""
    state = tmp_path / "state"
    state.mkdir()
    db = sqlite3.connect(state / "journal.sqlite3")
    db.executescript(SCHEMA)
    db.execute("ALTER TABLE checkpoints ADD COLUMN durable INTEGER NOT NULL DEFAULT 1")
    db.execute("INSERT INTO meta VALUES ('schema_version', '2')")
    db.commit()
    db.close()
    with Journal(state) as journal:
        row_id = published(journal, 5, ("best",), [(TARGET, ("candidate",))])
        (queued,) = journal.promotions()
        assert (queued.checkpoint_id, queued.version, queued.step, queued.target) == (
            row_id, "v5", 5, TARGET,
        )  # fmt: skip
        assert (queued.aliases, queued.state) == (("candidate",), "pending")
        assert not journal.queue_promotion(row_id, TARGET, ("candidate",), 9.0)
        assert journal.queue_promotion(row_id, HUB, (), 9.0)
        assert [p.target for p in journal.promotions()] == [TARGET, HUB]


class Recording:
    """A promotion target that records what it is asked and fails as told."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.promoted: list[Promotion] = []
        self.failures: list[PublishError] = []
        self.closed = False

    def promote(self, promotion: Promotion) -> str:
        if self.failures:
            raise self.failures.pop(0)
        self.promoted.append(promotion)
        return f"promoted {promotion.version}"

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[Config, Journal, Recording]]:
    config = load(
        tmp_path, f"[{{when: {{alias: best}}, to: '{TARGET}'}}, {{when: {{final: best}}, "
        f"to: '{HUB}'}}]"
    )  # fmt: skip
    journal = Journal(tmp_path / "state").open()
    target = Recording(TARGET)
    yield config, journal, target
    journal.close()


def drive(promoter: Promoter, now: float) -> None:
    """One promotion step; with the inline executor, what it starts is done on return."""
    promoter.run_once(now)


def test_transient_failures_back_off_and_permanent_ones_park_the_target(
    setup: tuple[Config, Journal, Recording],
) -> None:
    """A transient failure retries after a backoff; a permanent one parks the target with
    its queue kept; unparked, the promotion lands once and is done."""
    config, journal, target = setup
    promoter = Promoter(config, journal, lambda spec: target, threading.Event(), lambda: 100.0)
    promoter.start(INLINE.make)
    try:
        published(journal, 1, ("best",), [(TARGET, ())])
        target.failures = [
            PublishError("timeout", transient=True), PublishError("403", transient=False),
        ]  # fmt: skip
        drive(promoter, 100.0)
        (pending,) = journal.promotions(("pending",))
        assert pending.attempts == 1 and pending.next_attempt_at > 100.0
        assert pending.last_error == "timeout"
        drive(promoter, 100.5)  # not due yet: nothing runs
        assert len(target.failures) == 1
        drive(promoter, pending.next_attempt_at)  # fails for good: parked at the next step
        drive(promoter, 10_000.0)  # parks the target: nothing runs
        assert f"{PARKED_PREFIX}{TARGET}" in journal.parked()
        assert target.promoted == [] and len(journal.promotions(("pending",))) == 1
        journal.unpark()
        drive(promoter, 10_000.0)
        (done,) = journal.promotions()
        assert (done.state, done.result) == ("done", "promoted v1")
        assert [p.version for p in target.promoted] == ["v1"]
        counted = {
            outcome: promoter.metrics.registry.get_sample_value(
                "ckptd_promotions_total", {"target": TARGET, "outcome": outcome}
            )
            for outcome in ("retry", "parked", "done")
        }
        assert counted == {"retry": 1.0, "parked": 1.0, "done": 1.0}
    finally:
        promoter.shutdown()
    assert target.closed


def test_a_version_the_target_refuses_fails_alone(
    setup: tuple[Config, Journal, Recording],
) -> None:
    """A version the target cannot take (gone, no model files) fails with its reason and is
    reported as unfinished; the target is not parked and the next version is promoted."""
    config, journal, target = setup
    promoter = Promoter(config, journal, lambda spec: target, threading.Event(), lambda: 50.0)
    promoter.start(INLINE.make)
    try:
        published(journal, 1, ("best",), [(TARGET, ())])
        published(journal, 2, ("best",), [(TARGET, ())])
        target.failures = [PromotionRefused("model-checkpoint:v1 does not exist on W&B")]
        drive(promoter, 50.0)
        drive(promoter, 50.0)
        assert [(p.version, p.state) for p in journal.promotions()] == [
            ("v1", "failed"), ("v2", "done"),
        ]  # fmt: skip
        assert journal.parked() == {}
        assert promoter.unfinished(since=0.0) == [
            f"model-checkpoint:v1 not promoted to {TARGET} (failed: model-checkpoint:v1 does "
            "not exist on W&B)"
        ]
        assert promoter.unfinished(since=51.0) == []
    finally:
        promoter.shutdown()


def test_final_rules_promote_the_holder_when_a_batch_ends(
    setup: tuple[Config, Journal, Recording],
) -> None:
    """`final: best` queues the version holding best at the end, once."""
    config, journal, target = setup
    promoter = Promoter(config, journal, lambda spec: target, threading.Event(), lambda: 1.0)
    first = published(journal, 1, ("best",), [])
    published(journal, 2, ("latest",), [])
    assert promoter.plan_final(5.0)
    assert not promoter.plan_final(6.0)
    (queued,) = journal.promotions()
    assert (queued.checkpoint_id, queued.target) == (first, HUB)


def test_model_files_are_what_from_pretrained_reads() -> None:
    """A Trainer checkpoint gives its config, generation config and weights; never optimizer,
    scheduler, RNG or trainer state; a PEFT adapter gives its adapter files; a directory
    without a config is no HF layout."""
    trainer = ["config.json", "generation_config.json", "model.safetensors", "optimizer.pt",
               "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin",
               "tokenizer.json", "README.md", "nested/config.json"]  # fmt: skip
    assert model_files(Path("/x"), trainer) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
    ]  # fmt: skip
    adapter = ["adapter_config.json", "adapter_model.safetensors", "README.md"]
    assert model_files(Path("/x"), adapter) == ["adapter_config.json", "adapter_model.safetensors"]
    sharded = ["config.json", "model-00001-of-00002.safetensors",
               "model-00002-of-00002.safetensors", "model.safetensors.index.json"]  # fmt: skip
    assert model_files(Path("/x"), sharded) == sorted(sharded)
    with pytest.raises(PublishError, match="not an HF-loadable layout") as caught:
        model_files(Path("/x"), ["model.pt", "optimizer.pt"])
    assert not caught.value.transient
    with pytest.raises(PublishError, match="no model weights"):
        model_files(Path("/x"), ["config.json", "optimizer.pt"])


def test_the_card_names_step_metrics_version_and_base_model(tmp_path: Path) -> None:
    """The card carries the step, each metric, the W&B version and its link, and the base
    model from config.json; a local path is no base model; the same input, the same card."""
    (tmp_path / "config.json").write_text(json.dumps({"_name_or_path": "openai-community/gpt2"}))
    base = base_model(tmp_path)
    assert base == "openai-community/gpt2"
    fetched = FetchedVersion(
        collection="model-checkpoint", version="v3",
        qualified="team/proj/model-checkpoint:v3", step=500, metrics={"val_loss": 0.25},
        url="https://wandb.example/team/proj/artifacts/model/model-checkpoint/v3",
    )  # fmt: skip
    card = model_card("org/demo", fetched, 500, base)
    assert card.startswith("---\ntags:\n- ckptd\nbase_model: openai-community/gpt2\n---\n")
    assert "Checkpoint at step 500" in card and "| val_loss | 0.25 |" in card
    assert "[`team/proj/model-checkpoint:v3`](https://wandb.example/" in card
    assert card == model_card("org/demo", fetched, 500, base)
    (tmp_path / "config.json").write_text(json.dumps({"_name_or_path": "/data/run/ckpt"}))
    assert base_model(tmp_path) is None


class Listing:
    """A sink that lists fixed versions and records deletions (retention's side only)."""

    capabilities = Capabilities()

    def __init__(self, versions: list[RemoteVersion]) -> None:
        self.listed = versions
        self.deleted: list[str] = []

    def versions(self, collection: str, type: str) -> list[RemoteVersion]:
        return self.listed

    def links(self, collection: str, type: str, version: str) -> tuple[str, ...]:
        return ()

    def delete_version(self, collection: str, type: str, version: str) -> None:
        self.deleted.append(version)


def test_retention_keeps_a_version_until_its_promotion_lands(tmp_path: Path) -> None:
    """A version queued for promotion is kept by remote retention (`queued for promotion`)
    even when no alias protects it any more; once promoted, the rules apply as before."""
    path = tmp_path / "ckptd.yaml"
    path.write_text(
        "wandb: {mode: online}\nwatch:\n  - path: ck\n    artifact: model-checkpoint\n"
        f"    retention: {{remote: {{keep_last: 1}}}}\n    promote: [{{when: {{alias: best}}, "
        f"to: '{TARGET}'}}]\n"
    )
    config = load_config(path)
    with Journal(tmp_path / "state") as journal:
        published(journal, 1, ("best",), [(TARGET, ())])
        published(journal, 2, (), [])
        sink = Listing([RemoteVersion(f"v{s}", s, s, (), 10) for s in (1, 2)])
        retention = Retention(config, journal, sink)  # the listing half of a Sink
        result = retention.run(config.watch[0], 10.0, dry_run=True)
        assert [(d.version, d.action, d.reason) for d in result.decisions] == [
            ("v1", "keep", "queued for promotion"), ("v2", "keep", "among the newest 1 by step"),
        ]  # fmt: skip
        (pending,) = journal.promotions()
        journal.update_promotion(pending.id, 11.0, state="done")
        retention.run(config.watch[0], 12.0)
        assert sink.deleted == ["v1"]


def test_download_directories_of_dead_processes_are_removed(tmp_path: Path) -> None:
    """A release killed mid-download leaves its directory; the next one removes it, and
    leaves a live process's alone."""
    from ckptd.sinks.hub import _scratch

    gone = tmp_path / f"hub-{2**22 + 12345}-x"  # above any pid_max (2**22): never live
    gone.mkdir()
    live = tmp_path / f"hub-{os.getppid()}-y"
    live.mkdir()
    mine = _scratch(tmp_path)
    assert mine.name.startswith(f"hub-{os.getpid()}-") and mine.is_dir()
    assert not gone.exists() and live.exists()


def test_promote_command_refuses_bad_input_before_any_network(tmp_path: Path) -> None:
    """A malformed target is a usage error (2); an offline config, or --alias for a Hub
    release, is refused with a message naming the problem (1)."""
    from tests.conftest import CKPTD

    def promote(*args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "WANDB_API_KEY": "k" * 40}
        command = [*CKPTD, "promote", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)

    bad = promote("model-checkpoint:best", "--to", "hub:org/x")
    assert bad.returncode == 2 and "a promotion target is registry:" in bad.stderr
    offline = promote("model-checkpoint:best", "--to", HUB)  # the embedded config: offline
    assert offline.returncode == 1
    assert "ckptd promote cannot read published versions: " in offline.stderr
    config = tmp_path / "ckptd.yaml"
    config.write_text(f"wandb: {{mode: online}}\nwatch: [{{path: {tmp_path}}}]\n")
    alias = promote("--config", str(config), "model-checkpoint:v3", "--to", HUB, "--alias", "x")
    assert alias.returncode == 1 and "--alias applies to registry targets" in alias.stderr


def test_the_hub_token_comes_from_the_token_file_else_hf_token(tmp_path: Path) -> None:
    """`huggingface.token_file` wins over HF_TOKEN; an unreadable file is a permanent error
    naming the key and the file."""
    from ckptd.sinks.hub import read_token

    token_file = tmp_path / "hf-token"
    token_file.write_text("hf_fromfile\n")
    path = tmp_path / "ckptd.yaml"
    path.write_text(f"huggingface: {{token_file: {token_file}}}\nwatch: [{{path: ck}}]\n")
    assert read_token(load_config(path), {"HF_TOKEN": "hf_env"}) == "hf_fromfile"
    path.write_text("watch: [{path: ck}]\n")
    assert read_token(load_config(path), {"HF_TOKEN": "hf_env"}) == "hf_env"
    assert read_token(load_config(path), {}) is None
    path.write_text(f"huggingface: {{token_file: {tmp_path / 'gone'}}}\nwatch: [{{path: ck}}]\n")
    with pytest.raises(
        PublishError, match=r"huggingface\.token_file: cannot read .*gone"
    ) as caught:
        read_token(load_config(path), {})
    assert not caught.value.transient
