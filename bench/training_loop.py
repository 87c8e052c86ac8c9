"""The training loop: what publishing checkpoints costs the job that writes them.

A CPU training-like loop (one thread, a fixed amount of matrix work per step) writes a
`torch.save` checkpoint of S MiB every K steps, in four ways:
  (a) nothing else: the reference;
  (b) in-process wandb with default settings, as training scripts do it today: `wandb.init`,
      then per checkpoint `Artifact.add_file` + `run.log_artifact`, `run.finish()` at the end;
      online against the loopback server, and offline;
  (c) ckptd running beside it (online, loopback server), started before the job.
Reported: the job's wall time (for (b) including `init` and `finish`, which waits for the
uploads) and the time the loop is blocked per checkpoint (`torch.save`, plus `add_file` and
`log_artifact` for (b)). The work per step is calibrated once, then the same for every run.
The variants take turns `--repeat` times; the fastest run of each is reported.

    python -m bench.training_loop [--steps 300] [--every 60] [--size-mib 256] [--step-ms 50]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import _common as c

VARIANTS = ("a: no upload", "c: ckptd beside", "b: wandb in-process, online", "b: offline")


# -- the job (a child process) -----------------------------------------------------------


def job(args: argparse.Namespace) -> None:
    """The training loop itself; prints one `RESULT {json}` line."""
    import torch

    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(256, 256, generator=generator)
    w = torch.randn(256, 256, generator=generator) / 16
    rows = args.size_mib * (1 << 20) // (4 * 4096)
    weights = {f"layer{i}": torch.zeros(rows // 4, 4096) for i in range(4)}

    def step_work() -> None:
        y = x
        for _ in range(args.reps):
            y = torch.tanh(y @ w)

    if args.calibrate:
        step_work()
        start = time.perf_counter()
        for _ in range(20):
            step_work()
        print("RESULT " + json.dumps({"step_s": (time.perf_counter() - start) / 20}))
        return

    run: Any = None
    wandb: Any = None
    t_begin = time.time()
    if args.wandb:
        import wandb

        run = wandb.init(project=os.environ.get("WANDB_PROJECT"))
    t_loop = time.time()
    blocked: list[float] = []
    saves: list[float] = []
    out = Path(args.out)
    for step in range(1, args.steps + 1):
        step_work()
        if step % args.every == 0:
            start = time.perf_counter()
            weights["layer0"][0, 0] = step  # new content each time, as training makes
            path = out / f"ckpt_{step}.pt"
            torch.save({"step": step, "weights": weights}, path)
            saves.append(time.perf_counter() - start)
            if run is not None:
                artifact = wandb.Artifact(out.name, type="model")
                artifact.add_file(str(path))
                run.log_artifact(artifact, aliases=[f"step-{step}"])
            blocked.append(time.perf_counter() - start)
    t_loop_end = time.time()
    if run is not None:
        run.finish()
    t_end = time.time()
    result = {
        "init_s": t_loop - t_begin,
        "loop_s": t_loop_end - t_loop,
        "finish_s": t_end - t_loop_end,
        "total_s": t_end - t_begin,
        "blocked": blocked,
        "saves": saves,
    }
    print("RESULT " + json.dumps(result), flush=True)


# -- the harness -------------------------------------------------------------------------


@dataclass
class Run:
    variant: str
    total_s: float
    loop_s: float
    init_s: float
    finish_s: float
    blocked_mean: float
    blocked_max: float
    cpu: dict[str, float]  # who spent the CPU while the job ran, seconds

    def describe(self) -> str:
        cpu = ", ".join(f"{k} {v:.1f}s" for k, v in self.cpu.items())
        return (
            f"{self.variant}: job {self.total_s:.2f}s (init {self.init_s:.2f}, loop "
            f"{self.loop_s:.2f}, finish {self.finish_s:.2f}); blocked per checkpoint mean "
            f"{self.blocked_mean:.3f}s, max {self.blocked_max:.3f}s; CPU meanwhile: {cpu}"
        )


def job_args(args: argparse.Namespace, out: Path, reps: int, wandb: bool) -> list[str]:
    return [
        "--job", "--out", str(out), "--reps", str(reps), "--steps", str(args.steps),
        "--every", str(args.every), "--size-mib", str(args.size_mib),
        *(["--wandb"] if wandb else []),
    ]  # fmt: skip


def run_job(command: list[str], env: dict[str, str]) -> dict[str, Any]:
    out = c.run_child(command, env)
    return dict(json.loads(out.split("RESULT ", 1)[1]))


def calibrate(args: argparse.Namespace, env: dict[str, str]) -> int:
    """Repetitions of the step's matrix work that take `--step-ms` on this machine."""
    command = c.child_command("training_loop", "--job", "--calibrate", "--reps", "10")
    step_s = min(run_job(command, env)["step_s"] for _ in range(3))
    return max(1, round(10 * args.step_ms / 1000 / step_s))


def one_run(
    args: argparse.Namespace, variant: str, tmp: Path, round_: int, reps: int, server: Any
) -> Run:
    out = tmp / f"ckpts-{round_}-{variant[0]}-{len(variant)}"
    out.mkdir()
    name = f"r{round_}-{variant[0]}{len(variant)}"
    beside = variant.startswith("c")
    online = beside or "online" in variant
    env = c.wandb_env(tmp / f"wandb-{name}", server if online else None)
    command = c.child_command("training_loop", *job_args(args, out, reps, variant[0] == "b"))
    cpu: dict[str, float] = {}
    try:
        with contextlib.ExitStack() as stack:
            if beside:
                watch = c.watch_entry(out, f"loop-{name}")
                daemon = stack.enter_context(c.Ckptd(tmp / f"ckptd-{name}", [watch], env))
                daemon.wait_for_log("ckptd started")
                tree = c.ProcTree(daemon.pid, interval=0.5).start()
            start = time.time()
            busy, server_cpu, job_cpu = c.machine_busy_seconds(), c.cpu_self(), _children_cpu()
            steal = c.steal_seconds()
            result = run_job(command, env)
            busy = c.machine_busy_seconds() - busy
            steal = c.steal_seconds() - steal
            cpu["the job"] = _children_cpu() - job_cpu
            cpu["loopback server"] = c.cpu_self() - server_cpu
            if beside:
                end = time.time()
                tree.sample()
                spent = tree.cpu_between(start, end)
                cpu["ckptd"] = spent.get("root", 0.0)
                cpu["its wandb-core"] = spent.get("wandb-core", 0.0)
                want = args.steps // args.every
                c.wait_until("ckptd to publish every checkpoint",
                             lambda: c.committed(server, f"loop-{name}") == want, 600)  # fmt: skip
                cpu["(all published after the job, s)"] = time.time() - end
                tree.stop()
        ours = sum(v for k, v in cpu.items() if not k.startswith("("))
        cpu["other processes"] = max(0.0, busy - steal - ours)
        cpu["steal (host)"] = steal
    finally:
        shutil.rmtree(out, ignore_errors=True)
    blocked = result["blocked"]
    return Run(
        variant, result["total_s"], result["loop_s"], result["init_s"], result["finish_s"],
        sum(blocked) / len(blocked), max(blocked), cpu,
    )  # fmt: skip


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=60, help="steps between checkpoints")
    parser.add_argument("--size-mib", type=int, default=256, help="checkpoint size")
    parser.add_argument("--step-ms", type=float, default=50.0, help="compute per step")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each variant")
    parser.add_argument(
        "--no-server-md5", dest="server_md5", action="store_false",
        help="the loopback server drains uploads without checking their md5 (diagnostic)",
    )  # fmt: skip
    parser.add_argument("--job", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--calibrate", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--wandb", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--reps", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    c.add_common_args(parser)
    args = parser.parse_args()
    if args.job:
        job(args)
        return
    c.print_preamble("training loop", ["bench.training_loop", *sys.argv[1:]])
    runs: dict[str, list[Run]] = {v: [] for v in VARIANTS}
    with (
        c.scratch(args.tmp, "loop", args.keep) as tmp,
        c.bench_server(tmp / "server", verify=args.server_md5) as server,
    ):
        reps = calibrate(args, c.wandb_env(tmp / "wandb-calibrate", None))
        checkpoints = args.steps // args.every
        print(
            f"{args.steps} steps of ~{args.step_ms:g} ms ({reps} matmul+tanh of 256x256), "
            f"a {args.size_mib} MiB checkpoint every {args.every} steps ({checkpoints} in all)"
        )
        for round_ in range(1, args.repeat + 1):
            order = VARIANTS if round_ % 2 else tuple(reversed(VARIANTS))
            for variant in order:
                run = one_run(args, variant, tmp, round_, reps, server)
                runs[variant].append(run)
                print(f"round {round_}: {run.describe()}")
    best = {v: min(rs, key=lambda r: r.total_s) for v, rs in runs.items()}
    median = {v: statistics.median(r.total_s for r in rs) for v, rs in runs.items()}
    a = best[VARIANTS[0]]
    print()
    print("fastest run of each (the ratios below) and, in brackets, the median job time:")
    for variant in VARIANTS:
        print(f"  {best[variant].describe()} [median {median[variant]:.2f}s]")
    print()
    rows = []
    for variant in VARIANTS[1:]:
        run = best[variant]
        ratio = run.total_s / a.total_s
        is_ckptd = variant.startswith("c")
        median_ratio = median[variant] / median[VARIANTS[0]]
        rows.append(
            c.Row(
                f"training loop ({variant}) / (a), {checkpoints}x{args.size_mib} MiB"
                + ("" if args.server_md5 else " (server does not hash)"),
                f"{run.total_s:.2f}s job, {run.blocked_mean:.3f}s blocked/ckpt "
                f"(ratio of medians {median_ratio:.2f})",
                f"(a) {a.total_s:.2f}s, {a.blocked_mean:.3f}s blocked/ckpt",
                ratio,
                "<= 1.05" if is_ckptd else "report (what users suffer today)",
                ratio <= 1.05 if is_ckptd else None,
            )
        )
    c.print_table(rows)


if __name__ == "__main__":
    main()
