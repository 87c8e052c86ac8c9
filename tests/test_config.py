"""The configuration contract: defaults, units, interpolation, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from ckptd.config import DEFAULT_CONFIG_PATH, Size, load_config, parse_duration, parse_size
from ckptd.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "ckptd.yaml"
    path.write_text(text)
    return path


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    return info.value.problems


def test_embedded_default_is_offline_and_watches_checkpoints(tmp_path: Path) -> None:
    """The shipped default needs no account: offline mode, ./checkpoints beside the file."""
    config = load_config(DEFAULT_CONFIG_PATH)
    assert config.wandb.mode == "offline"
    assert config.watch[0].path == DEFAULT_CONFIG_PATH.parent / "checkpoints"
    assert config.watch[0].aliases.best[0].alias_name == "best"


def test_root_example_is_the_embedded_default() -> None:
    """config.example.yaml at the root is the same file the package embeds."""
    assert (REPO / "config.example.yaml").read_bytes() == DEFAULT_CONFIG_PATH.read_bytes()


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    """state_dir and watch paths are relative to the config's directory, not the cwd."""
    config = load_config(write(tmp_path, "state_dir: st\nwatch: [{path: ck}]\n"))
    assert config.state_dir == tmp_path / "st"
    assert config.watch[0].path == tmp_path / "ck"


def test_durations_and_sizes_parse() -> None:
    """Durations accept ms/s/m/h/d and sizes accept SI, IEC and percentages."""
    assert parse_duration("30s") == 30
    assert parse_duration("5m") == 300
    assert parse_duration("2h") == 7200
    assert parse_duration("7d") == 7 * 86400
    assert parse_duration("250ms") == 0.25
    assert parse_duration(3) == 3
    assert parse_size("10GB") == Size(bytes=10 * 10**9)
    assert parse_size("500MiB") == Size(bytes=500 * 2**20)
    assert parse_size("10%").resolve(1000) == 100
    for bad in ("5 minutes", "-1s", "", True):
        with pytest.raises(ValueError, match="duration"):
            parse_duration(bad)
    with pytest.raises(ValueError, match="size"):
        parse_size("lots")


def test_unknown_key_is_an_error_with_a_suggestion(tmp_path: Path) -> None:
    """A typo is never ignored: the error names the key path and the likely intended key."""
    found = problems(tmp_path, "watch:\n  - path: ck\n    setle: 5s\n")
    assert found == ["watch[0].setle: unknown key (did you mean 'settle'?)"]


def test_bad_enum_names_the_key_path_and_value(tmp_path: Path) -> None:
    """`mode: lowest` in a best rule names watch[0].aliases.best[1].mode and the value."""
    text = """
watch:
  - path: ck
    aliases:
      best:
        - {metric: val_loss}
        - {metric: acc, mode: lowest}
"""
    (line,) = problems(tmp_path, text)
    assert line.startswith("watch[0].aliases.best[1].mode: expected 'min' or 'max'")
    assert "'lowest'" in line


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    """Several mistakes give several lines, each with its own key."""
    text = "upload: {workers: 0, retry: {initial_delay: soon}}\nwatch: [{path: ck, rescan: x}]\n"
    found = problems(tmp_path, text)
    keys = sorted(line.split(":")[0] for line in found)
    assert keys == ["upload.retry.initial_delay", "upload.workers", "watch[0].rescan"]


def test_watch_is_required(tmp_path: Path) -> None:
    """A config with nothing to watch says so."""
    assert problems(tmp_path, "state_dir: x\n") == ["watch: required key is missing"]


def test_invalid_artifact_name_and_alias(tmp_path: Path) -> None:
    """Names W&B would refuse are caught at load time, with the value."""
    found = problems(
        tmp_path,
        "watch: [{path: ck, artifact: 'my model', aliases: {best: [{metric: m, alias: 'a/b'}]}}]",
    )
    assert any(line.startswith("watch[0].artifact:") and "'my model'" in line for line in found)
    assert any(line.startswith("watch[0].aliases.best[0].alias:") for line in found)


def test_env_interpolation(tmp_path: Path) -> None:
    """${VAR} and ${VAR:-default} are replaced; an unset variable without default is an error."""
    path = write(
        tmp_path, "wandb: {project: '${PROJ}', entity: '${ENT:-team}'}\nwatch: [{path: ck}]\n"
    )
    config = load_config(path, env={"PROJ": "p1"})
    assert (config.wandb.project, config.wandb.entity) == ("p1", "team")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert info.value.problems == [
        "wandb.project: environment variable PROJ is not set (in '${PROJ}')"
    ]


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    """A missing file or broken YAML names the file."""
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "watch: [\n"))


def test_config_is_frozen(tmp_path: Path) -> None:
    """The loaded tree cannot be changed by accident at run time."""
    config = load_config(write(tmp_path, "watch: [{path: ck}]\n"))
    with pytest.raises(Exception, match="frozen"):
        config.watch[0].settle = 1  # type: ignore[misc]


def test_duplicate_best_alias_is_refused(tmp_path: Path) -> None:
    """Two rules that would fight over one alias are a config error."""
    found = problems(
        tmp_path,
        "watch: [{path: ck, aliases: {best: [{metric: a, alias: best},"
        " {metric: b, alias: best}]}}]",
    )
    assert found[0].startswith("watch[0].aliases:") and "best" in found[0]


def test_two_entries_in_one_collection_are_refused_unless_both_share_it(tmp_path: Path) -> None:
    """Two jobs without `artifact:` would share `model-checkpoint` and `latest` would jump
    between them: refused, naming both entries, unless both say `shared: true`."""
    (found,) = problems(tmp_path, "watch: [{path: jobA}, {path: jobB}]\n")
    assert found.startswith("watch[0] and watch[1] both publish to 'model-checkpoint'")
    assert "shared: true" in found
    assert problems(tmp_path, "watch: [{path: a, shared: true}, {path: b}]\n")
    config = load_config(
        write(tmp_path, "watch: [{path: a, shared: true}, {path: b, shared: true}]\n")
    )
    assert [w.artifact for w in config.watch] == ["model-checkpoint"] * 2


def test_overlapping_watch_paths_are_refused(tmp_path: Path) -> None:
    """A directory inside another watched one (or the same one twice, in two collections)
    would publish the same file twice: refused, naming both entries and paths."""
    (found,) = problems(
        tmp_path, "watch: [{path: jobA, recursive: true}, {path: jobA/checkpoints, artifact: b}]\n"
    )
    assert found == (
        f"watch[1] ({tmp_path / 'jobA/checkpoints'}) is inside watch[0] ({tmp_path / 'jobA'}): "
        "a checkpoint under both would be published twice; watch one of them"
    )
    (found,) = problems(tmp_path, "watch: [{path: x/y, artifact: a}, {path: x, artifact: b}]\n")
    assert "watch[1]" in found and "contains watch[0]" in found
    (found,) = problems(tmp_path, "watch: [{path: x, artifact: a}, {path: x, artifact: b}]\n")
    assert "is the same directory as watch[0]" in found


def test_shape_errors_say_list_and_mapping_and_metrics_null_turns_metrics_off(
    tmp_path: Path,
) -> None:
    """A string where a list belongs says "list" (not pydantic's "tuple"), a scalar where a
    mapping belongs says "mapping", and `metrics: null` is accepted, as the example says."""
    found = problems(tmp_path, 'watch: [{path: x, patterns: "*.pt"}]\nwandb: 3\n')
    assert sorted(found) == [
        "wandb: expected a mapping, got 3",
        "watch[0].patterns: expected a list, got '*.pt'",
    ]
    config = load_config(write(tmp_path, "watch: [{path: x}]\nmetrics: null\n"))
    assert config.metrics.address is None


def test_metrics_listen_takes_a_port_a_range_or_auto(tmp_path: Path) -> None:
    """`auto` (the default) tries 127.0.0.1:9480-9499; a range tries its ports in order;
    anything else is refused, naming the key."""
    assert load_config(write(tmp_path, "watch: [{path: x}]\n")).metrics.address == (
        "127.0.0.1", tuple(range(9480, 9500)),
    )  # fmt: skip
    ranged = load_config(
        write(tmp_path, "metrics: {listen: '0.0.0.0:9500-9502'}\nwatch: [{path: x}]\n")
    )
    assert ranged.metrics.address == ("0.0.0.0", (9500, 9501, 9502))
    for bad in ("9480", "host:95-90", "host:x", "host:1-70000"):
        (found,) = problems(tmp_path, f"metrics: {{listen: '{bad}'}}\nwatch: [{{path: x}}]\n")
        assert found.startswith("metrics.listen: expected host:port"), found


def test_a_yaml_error_names_the_file_and_line(tmp_path: Path) -> None:
    """A syntax error points at the config file, not PyYAML's "<unicode string>"."""
    path = write(tmp_path, "watch: [{path: ck]\n")
    (found,) = problems(tmp_path, "watch: [{path: ck]\n")
    assert "<unicode string>" not in found
    assert f"in {path}, line 1, column 18" in found
