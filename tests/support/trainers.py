"""Real training programs for the tests, run in a process of their own beside the daemon:

    python -m tests.support.trainers KIND OUT RECORD

Each KIND writes into OUT exactly as its framework does (the real Hugging Face `Trainer`, a
real Lightning `Trainer` with `ModelCheckpoint`, a plain `torch.save` loop, a real
`save_pretrained()`), on tiny models built from a config on the CPU: nothing is downloaded.
Right after each checkpoint is saved, and before the framework's rotation can delete it, one
JSON line goes to RECORD: the checkpoint's path relative to OUT, its step, its metric, and
the md5 of each of its files then. Training runs in its own process so that the frameworks'
threads, warnings and progress bars stay out of the test process.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["KINDS", "Recorder"]

STEPS_PER_SAVE = 2
SAVES = 6
SECONDS_PER_STEP = 0.5  # a checkpoint every second: the "every 2 s or less"


class Recorder:
    """Appends one line per saved checkpoint to the record file, flushed at once."""

    def __init__(self, out: Path, record: Path) -> None:
        self.out = out
        self.record = record

    def saved(self, unit: Path, step: int, metric: float | None) -> None:
        files = [unit] if unit.is_file() else sorted(p for p in unit.rglob("*") if p.is_file())
        base = unit.parent if unit.is_file() else unit
        line = {
            "unit": unit.relative_to(self.out).as_posix(),
            "step": step,
            "metric": metric,
            "files": {p.relative_to(base).as_posix(): _md5(p) for p in files},
        }
        with self.record.open("a") as f:
            f.write(json.dumps(line) + "\n")


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


class Pacer:
    """Spaces training steps `seconds` apart, as a real model's compute would."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.next_at = time.monotonic() + seconds

    def step(self) -> None:
        time.sleep(max(0.0, self.next_at - time.monotonic()))
        self.next_at = max(self.next_at, time.monotonic()) + self.seconds


def _tiny_gpt2(**overrides: Any) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    shape = {"n_layer": 1, "n_head": 2, "n_embd": 16, "vocab_size": 64, "n_positions": 16}
    config = GPT2Config(**{**shape, **overrides}, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


class _Tokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Random token sequences, each its own label (causal language modelling)."""

    def __init__(self, count: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 64, (count, 16), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def hf_trainer(out: Path, recorder: Recorder) -> None:
    """The Hugging Face Trainer: `checkpoint-N/` every 2 steps, evaluated first, only the
    newest kept (`save_total_limit=1`)."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    pacer = Pacer(SECONDS_PER_STEP)

    class Record(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            pacer.step()

        def on_save(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            evals = [e["eval_loss"] for e in state.log_history if "eval_loss" in e]
            unit = out / f"checkpoint-{state.global_step}"
            recorder.saved(unit, state.global_step, evals[-1] if evals else None)

    args = TrainingArguments(
        output_dir=str(out), max_steps=STEPS_PER_SAVE * SAVES, save_steps=STEPS_PER_SAVE,
        eval_strategy="steps", eval_steps=STEPS_PER_SAVE, save_total_limit=1,
        per_device_train_batch_size=4, per_device_eval_batch_size=8, learning_rate=1e-2,
        report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=STEPS_PER_SAVE,
        dataloader_num_workers=0, seed=0,
    )  # fmt: skip
    trainer = Trainer(
        model=_tiny_gpt2(), args=args, train_dataset=_Tokens(64, seed=1),
        eval_dataset=_Tokens(8, seed=2), callbacks=[Record()],
    )  # fmt: skip
    trainer.train()


def lightning(out: Path, recorder: Recorder) -> None:
    """Lightning's ModelCheckpoint(save_top_k=1, monitor="val_loss"), metrics in the name;
    the checkpoint IO records each file the moment Lightning has written it."""
    import lightning.pytorch as pl
    from lightning.fabric.plugins import TorchCheckpointIO

    pacer = Pacer(SECONDS_PER_STEP)

    class Regression(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(8, 1)

        def training_step(self, batch: list[torch.Tensor], _: int) -> torch.Tensor:
            pacer.step()
            x, y = batch
            return torch.nn.functional.mse_loss(self.layer(x), y)

        def validation_step(self, batch: list[torch.Tensor], _: int) -> None:
            x, y = batch
            self.log("val_loss", torch.nn.functional.mse_loss(self.layer(x), y))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.05)

    class RecordingIO(TorchCheckpointIO):
        def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, **kwargs: Any) -> None:
            super().save_checkpoint(checkpoint, path, **kwargs)
            metric = trainer.callback_metrics.get("val_loss")
            recorder.saved(
                Path(path), int(checkpoint["global_step"]),
                None if metric is None else float(f"{float(metric):.4f}"),  # as in the name
            )  # fmt: skip

    torch.manual_seed(0)
    x = torch.randn(64, 8)
    data = torch.utils.data.TensorDataset(x, x @ torch.randn(8, 1))
    checkpoint = pl.callbacks.ModelCheckpoint(
        dirpath=out, filename="{epoch}-{step}-{val_loss:.4f}", monitor="val_loss", mode="min",
        save_top_k=1,
    )  # fmt: skip
    trainer = pl.Trainer(
        max_steps=STEPS_PER_SAVE * SAVES, val_check_interval=STEPS_PER_SAVE,
        limit_val_batches=1, num_sanity_val_steps=0, callbacks=[checkpoint],
        plugins=[RecordingIO()], logger=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", devices=1,
    )  # fmt: skip
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    trainer.fit(Regression(), loader, torch.utils.data.DataLoader(data, batch_size=64))


# val_loss per save of the plain loop: the best (lowest) is neither the first nor the last.
TORCH_LOSSES = (0.9, 0.5, 0.7, 0.3, 0.6, 0.4)


def torch_loop(out: Path, recorder: Recorder) -> None:
    """A plain loop: `torch.save` straight to `ckpt_N.pt` (in place, no rename) every
    second, its metrics in a sidecar written first, the previous checkpoint deleted right
    after (its sidecar stays)."""
    import ckptd.sidecar

    pacer = Pacer(2 * SECONDS_PER_STEP)
    torch.manual_seed(0)
    previous: Path | None = None
    for index, loss in enumerate(TORCH_LOSSES, start=1):
        step = 10 * index
        path = out / f"ckpt_{step}.pt"
        ckptd.sidecar.write(path, step=step, metrics={"val_loss": loss})
        torch.save({"model": {"w": torch.randn(128, 128)}, "step": step}, path)
        recorder.saved(path, step, loss)
        if previous is not None:
            previous.unlink()
        previous = path
        pacer.step()


def save_pretrained(out: Path, recorder: Recorder) -> None:
    """`model.save_pretrained(dir)` into the watched directory, sharded small: config.json,
    generation_config.json, the shards and their index, nothing from a Trainer."""
    model = _tiny_gpt2(n_layer=2, n_embd=32, vocab_size=256, n_positions=32)
    unit = out / "gpt2-tiny"
    model.save_pretrained(unit, max_shard_size="20KB")
    recorder.saved(unit, 0, None)


def save_adapter(out: Path, recorder: Recorder) -> None:
    """A PEFT LoRA adapter's `save_pretrained(dir)`: adapter_config.json,
    adapter_model.safetensors and the README model card."""
    from peft import LoraConfig, get_peft_model

    unit = out / "lora-adapter"
    get_peft_model(_tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"])).save_pretrained(unit)
    recorder.saved(unit, 0, None)


def layouts(out: Path, recorder: Recorder) -> None:
    """Every save_pretrained() layout the format tests take apart, one directory each."""
    from peft import LoraConfig, get_peft_model

    model = _tiny_gpt2(n_layer=2, n_embd=32, vocab_size=256, n_positions=32)
    model.save_pretrained(out / "plain")
    model.save_pretrained(out / "sharded", max_shard_size="20KB")
    # transformers 5 writes safetensors only; `pytorch_model.bin` is what 4.x wrote by
    # default and what many published models still hold: config plus a torch.save zip.
    model.config.save_pretrained(out / "bin")
    torch.save(model.state_dict(), out / "bin" / "pytorch_model.bin")
    adapted = get_peft_model(_tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"]))
    adapted.save_pretrained(out / "adapter")
    adapted.save_pretrained(out / "adapter-bin", safe_serialization=False)
    for unit in sorted(out.iterdir()):
        recorder.saved(unit, 0, None)


KINDS: dict[str, Callable[[Path, Recorder], None]] = {
    "hf-trainer": hf_trainer,
    "lightning": lightning,
    "torch-loop": torch_loop,
    "save-pretrained": save_pretrained,
    "save-adapter": save_adapter,
    "layouts": layouts,
}


def main() -> None:
    kind, out, record = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    torch.set_num_threads(1)  # two cores, shared with the daemon under test
    out.mkdir(parents=True, exist_ok=True)
    KINDS[kind](out, Recorder(out, record))


if __name__ == "__main__":
    main()
