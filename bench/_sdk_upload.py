"""The raw-SDK baseline: publish checkpoints with the wandb SDK from one script, no ckptd.

`python -m bench._sdk_upload --collection C [--policy immutable --skip-cache] [--pipelined]
PATH...` logs each PATH (a file, or a directory with `add_dir`) as a version of C and waits
for it; `--pipelined` logs them all first and waits afterwards. A tiny warm-up version (run
start-up, first connection) is logged before the clock starts. Prints one `RESULT {json}`
line with the times in `time.time()` seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import wandb


def settings() -> Any:
    """The same quiet run settings ckptd uses, so both pay for the same work."""
    return wandb.Settings(
        silent=True,
        console="off",
        disable_git=True,
        save_code=False,
        x_disable_stats=True,
        x_disable_meta=True,
        x_disable_machine_info=True,
        x_save_requirements=False,
    )


def artifact_of(collection: str, path: Path, policy: str, skip_cache: bool) -> Any:
    artifact = wandb.Artifact(collection, type="model", metadata={"source": str(path)})
    if path.is_dir():
        artifact.add_dir(str(path), skip_cache=skip_cache, policy=policy)
    else:
        artifact.add_file(str(path), name=path.name, skip_cache=skip_cache, policy=policy)
    return artifact


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--collection", required=True)
    parser.add_argument("--policy", choices=["mutable", "immutable"], default="mutable")
    parser.add_argument("--skip-cache", action="store_true")
    parser.add_argument("--pipelined", action="store_true")
    parser.add_argument("paths", nargs="+", type=Path)
    args = parser.parse_args()

    run = wandb.init(project=os.environ.get("WANDB_PROJECT"), settings=settings())
    with tempfile.TemporaryDirectory() as tmp:
        warm = Path(tmp) / "warm.bin"
        warm.write_bytes(os.urandom(1024))
        run.log_artifact(artifact_of(f"{args.collection}-warm", warm, "immutable", True)).wait()

    items: list[dict[str, float]] = []
    pending: list[tuple[dict[str, float], Any]] = []
    t0 = time.time()
    for path in args.paths:
        item = {"log_start": time.time()}
        artifact = artifact_of(args.collection, path, args.policy, args.skip_cache)
        logged = run.log_artifact(artifact)
        item["log_end"] = time.time()
        items.append(item)
        if args.pipelined:
            pending.append((item, logged))
        else:
            logged.wait()
            item["wait_end"] = time.time()
    for item, logged in pending:
        logged.wait()
        item["wait_end"] = time.time()
    t_end = time.time()
    run.finish()
    result = {"t0": t0, "t_end": t_end, "finished": time.time(), "items": items}
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
