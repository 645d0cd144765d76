"""``clipforge train``: contrastive pretraining from a laptop to a GPU cluster.

One loop serves every scale: a single CPU process, or N processes under torchrun with
DistributedDataParallel (gloo on CPU, NCCL on GPU).  Options cover the known speed-ups: bf16
autocast, fp16 with a gradient scaler (GPU), GradCache micro-batching for large batches, patch
dropout (FLIP), gradient checkpointing and locked towers (LiT).  A run directory holds
checkpoints, metrics (JSONL, optionally TensorBoard), the loss curve, the evaluation and, when
the run ends, the final model itself: ``clipforge.load(run_dir)`` loads it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..configs import get_config
from ..data.sources import check_readable, open_source
from ..data.synthetic import SyntheticCaptions
from ..factory import create_model
from ..fileio import atomic_directory, atomic_file
from ..image.augment import TrainTransform
from ..loss import LOGIT_SCALE_MAX
from ..precision import native_bf16, warn_if_emulated
from ..reading import REASONS, skip_reason
from ..text.vocabulary import train_bpe
from ..weights.formats import save_into_directory
from .checkpoint import (
    load_checkpoint,
    random_state,
    resolve_resume,
    save_checkpoint,
    set_random_state,
)
from .config import (
    BUILTIN_DATA,
    RESUME_FREE,
    TrainConfig,
    option_name,
    setting_names,
)
from .data import build_loader, caption_texts
from .distributed import (
    Dist,
    all_gather_objects,
    all_reduce_mean,
    average_gradients,
    barrier,
    init_distributed,
    sum_counts,
)
from .gradcache import gradcache_backward
from .objective import Objective
from .optim import build_optimizer, cosine_schedule

log = logging.getLogger("clipforge.train")
VOCABULARY_DIR = "vocabulary"  # a run's learnt tokenizer (TrainConfig.tokenizer "learn")
VOCABULARY_TEXTS = 10_000  # captions it is learnt from
C = TypeVar("C")  # a training config: TrainConfig or FinetuneConfig


def resolve_precision(config: C) -> C:
    """``config`` with ``precision`` "auto" made concrete: bf16 autocast where the device
    computes bfloat16 natively, fp32 elsewhere (see :func:`clipforge.precision.native_bf16`).
    An explicit bf16 is kept, with a warning where it is emulated.  Shared by pretraining,
    fine-tuning and the supervised baseline."""
    if config.precision == "auto":
        config = dataclasses.replace(
            config, precision="bf16" if native_bf16(config.device) else "fp32")
        log.info("precision: %s", config.precision)
    else:
        warn_if_emulated(config.precision, config.device)
    return config


def _shown(value: Any) -> str:
    return "(none)" if value is None else str(value)


def check_resume_settings(config: TrainConfig, saved: dict[str, Any] | None,
                          checkpoint: Path) -> None:
    """Refuse to resume with settings that change the run's outcome, unless
    ``config.resume_override`` names them: silently, a changed batch size, learning rate or
    step count would turn the run into one nobody asked for (see :data:`RESUME_FREE`)."""
    if saved is None:
        log.warning("%s records no settings (written by an older clipforge): the resumed run's "
                    "settings cannot be checked against it", checkpoint)
        return
    current = config.to_json()
    changed = [name for name in current if name not in RESUME_FREE and name in saved
               and saved[name] != current[name]]
    accepted = set(setting_names(config.resume_override))
    refused = [name for name in changed if name not in accepted]
    if refused:
        changes = ", ".join(f"{option_name(n)} {_shown(saved[n])} -> {_shown(current[n])}"
                            for n in refused)
        raise ValueError(
            f"--resume {checkpoint} would continue that run with other settings: {changes}; "
            "give the run's own values to continue it, or accept the change with "
            f"--resume-override {','.join(option_name(n)[2:] for n in refused)}")
    for name in changed:
        log.warning("resuming with %s %s (the run had %s): accepted by --resume-override",
                    option_name(name), _shown(current[name]), _shown(saved[name]))


def _load_resume(config: TrainConfig, checkpoint: Path) -> dict[str, Any]:
    """The checkpoint's state, after checking it may continue under ``config``."""
    state = load_checkpoint(checkpoint)
    needed = ("step", "objective", "optimizer", "scheduler", "scaler", "random")
    missing = [key for key in needed if key not in state] if isinstance(state, dict) else needed
    if missing or not isinstance(state["step"], int):
        raise ValueError(f"{checkpoint} is not a clipforge training checkpoint (no "
                         f"{', '.join(missing) or 'step number'}); pass one of the run's "
                         "checkpoints/step_*.pt with --resume PATH")
    saved = state.get("config")
    check_resume_settings(config, json.loads(saved) if isinstance(saved, str) else None,
                          checkpoint)
    if state["step"] > config.steps:
        raise ValueError(f"--resume {checkpoint} is at step {state['step']}, past --steps "
                         f"{config.steps}: give at least {state['step']} steps")
    return state


def _restore(state: dict[str, Any], checkpoint: Path, objective: Objective, optimizer,
             scheduler, scaler) -> None:
    """Put the run's training state back; a checkpoint of another model is named, in one line."""
    try:
        objective.load_state_dict(state["objective"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
    except (RuntimeError, KeyError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"--resume {checkpoint} does not fit this run's model or optimiser "
                         f"({first}); resume with the run's own --model") from exc
    set_random_state(state["random"])


def _write_run_config(output: Path, config: TrainConfig) -> None:
    with atomic_file(output / "train_config.json") as tmp:
        tmp.write_text(json.dumps(config.to_json(), indent=2) + "\n")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def _autocast(config: TrainConfig, device: torch.device):
    if config.precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if config.precision == "bf16" else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def _open_data(config: TrainConfig, image_size: int):
    if config.data == BUILTIN_DATA:
        return SyntheticCaptions(seed=config.seed, image_size=image_size, split="train",
                                 curriculum=config.curriculum())
    # Shards are resampled: runs are counted in steps, never run dry, and no rank waits for
    # another at an epoch end.  (CSV and folder sources ignore the option.)
    source = open_source(config.data, image_key=config.csv_image_key,
                         caption_key=config.csv_caption_key, seed=config.seed, resampled=True)
    check_readable(source)
    return source


def _learnt_vocabulary(config: TrainConfig, output: Path, ranks: Dist, resuming: bool
                       ) -> Path | None:
    """The run's own tokenizer when it learns one (TrainConfig.learns_vocabulary): a BPE
    learnt by the main process from the first VOCABULARY_TEXTS captions into OUTPUT/vocabulary
    (kept by a resumed run), which every process then reads."""
    if not config.learns_vocabulary():
        return None
    directory = output / VOCABULARY_DIR
    if ranks.is_main and not (resuming and (directory / "tokenizer.json").is_file()):
        started = time.perf_counter()
        source = _open_data(config, get_config(config.model).image_size)
        texts = caption_texts(source, VOCABULARY_TEXTS)
        if not texts:
            raise ValueError(f"--tokenizer learn: no readable caption in {config.data}")
        with atomic_directory(directory, "tokenizer.json") as tmp:
            train_bpe(texts, tmp, config.vocab_size)
        log.info("learnt a vocabulary from %d captions in %.1f s: %s", len(texts),
                 time.perf_counter() - started, directory)
    barrier()
    return directory


class MetricsLog:
    """Append-only JSONL (and TensorBoard when asked); on resume, entries past the checkpoint
    are dropped so the file describes exactly one history."""

    def __init__(self, path: Path, resume_step: int, tensorboard: bool):
        self.path = path
        if path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            with atomic_file(path) as tmp:
                tmp.write_text("".join(line + "\n" for line in kept))
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise RuntimeError("--tensorboard needs: pip install tensorboard") from exc
            self.writer = SummaryWriter(str(path.parent / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def train(config: TrainConfig) -> dict[str, Any]:
    """Run (or resume) training; returns the final evaluation (empty for non-main ranks)."""
    config.validate()
    config = resolve_precision(config)
    ranks, device = init_distributed(config.device)
    output = Path(config.output)
    checkpoints = output / "checkpoints"
    resume_from = resolve_resume(config.resume, checkpoints) if config.resume else None
    state = _load_resume(config, resume_from) if resume_from is not None else None
    if ranks.is_main:
        checkpoints.mkdir(parents=True, exist_ok=True)

    vocabulary = _learnt_vocabulary(config, output, ranks, resuming=state is not None)
    torch.manual_seed(config.seed)
    model = create_model(config.model, weights=config.weights, activation=config.activation,
                         tokenizer=vocabulary)
    model.visual.patch_dropout = config.patch_dropout if hasattr(model.visual, "proj") else 0.0
    if config.grad_checkpointing:
        model.set_grad_checkpointing(True)
    objective = Objective(model, config.loss)
    if config.weights is None and not Path(config.model).exists():
        objective.init_temperature()
    _lock_towers(objective, config)
    train_mode(model, config)
    objective.to(device)
    trainable = [p for p in objective.parameters() if p.requires_grad]
    optimizer = build_optimizer(objective, config.lr, config.decay())
    scheduler = cosine_schedule(optimizer, config.warmup, config.steps)
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")

    start_step = 0
    data_state: dict[str, Any] = {}
    if state is not None:
        _restore(state, resume_from, objective, optimizer, scheduler, scaler)
        start_step = state["step"]
        data_state = state.get("data", {})
        state = None  # the restored tensors need no second copy
        log.info("resumed from %s at step %d", resume_from, start_step)
    elif ranks.is_main and any(checkpoints.glob("step_*.pt")):
        log.warning("%s holds an earlier run: starting a new one over it (pass --resume latest "
                    "to continue that run instead)", output)
    if ranks.is_main:  # only now: a resume that failed leaves the run's record as it was
        _write_run_config(output, config)

    ddp = DistributedDataParallel(objective) if ranks.enabled else None
    source = _open_data(config, model.config.image_size)
    transform = TrainTransform.from_config(model.config)
    positions = _stream_positions(data_state, ranks, config.workers)
    loader = build_loader(source, transform, model.tokenizer, config.seed, start_step,
                          config.steps, config.batch_size, ranks.rank, ranks.world_size,
                          config.workers, positions)
    metrics = MetricsLog(output / "metrics.jsonl", start_step, config.tensorboard) \
        if ranks.is_main else None
    autocast = _autocast(config, device)
    # Skips counted by this rank since the start (or the resume); the checkpoint holds the
    # totals over all ranks before it, which rank 0 carries on from.
    skipped: dict[str, int] = dict(data_state.get("skipped", {})) if ranks.is_main else {}
    last_good = resume_from

    bar = tqdm(total=config.steps, initial=start_step, disable=not (config.progress and
                                                                      ranks.is_main),
               desc="train", unit="step", dynamic_ncols=True)
    tick, tick_step = time.perf_counter(), start_step
    step = start_step
    for pixels, tokens, bad, reached in loader:
        if step >= config.steps:
            break
        if reached is not None:  # a streamed batch: how far into which stream it read
            positions[reached[0]] = reached[1]
        for reason in bad:
            kind = skip_reason(reason)
            skipped[kind] = skipped.get(kind, 0) + 1
            log.warning("skipped sample: %s", reason)
        pixels, tokens = pixels.to(device, non_blocking=True), tokens.to(device)
        loss = _step(config, objective, ddp, pixels, tokens, autocast, scaler, optimizer,
                     trainable)
        value = all_reduce_mean(loss).item()  # the global batch's loss, the same on every rank
        if not math.isfinite(value):
            bar.close()
            where = f"the last good checkpoint is {last_good}" if last_good else \
                "no checkpoint was written yet"
            raise TrainingDiverged(f"loss became {value} at step {step + 1}; stopped; {where}. "
                                   "Lower --lr, raise --warmup or set --grad-clip.")
        scheduler.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, LOGIT_SCALE_MAX)
        step += 1
        log_now = step % config.log_every == 0 or step == config.steps
        all_skipped = sum_counts(skipped, SKIP_KINDS) if log_now else {}

        if ranks.is_main:
            temperature = model.logit_scale.exp().item()
            now = time.perf_counter()
            rate = (step - tick_step) * config.batch_size / max(now - tick, 1e-9)
            lr = optimizer.param_groups[0]["lr"]
            bar.set_postfix(loss=f"{value:.3f}", lr=f"{lr:.2e}", temp=f"{temperature:.1f}",
                            samples_s=f"{rate:.0f}", refresh=False)
            bar.update(1)
            if log_now:
                metrics.write({"step": step, "loss": value, "lr": lr,
                               "temperature": temperature, "samples_per_s": rate,
                               "skipped": all_skipped})
                tick, tick_step = now, step
            if config.eval_every and step % config.eval_every == 0 and step < config.steps:
                _periodic_eval(config, model, metrics, step)
        if step % config.checkpoint_every == 0 or step == config.steps:
            data = {"world_size": ranks.world_size, "workers": config.workers,
                    "positions": all_gather_objects(positions),
                    "skipped": sum_counts(skipped, SKIP_KINDS)}
            if ranks.is_main:
                last_good = save_checkpoint(checkpoints, step, {
                    "step": step, "objective": objective.state_dict(),
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(), "random": random_state(),
                    "data": data, "config": json.dumps(config.to_json()),
                }, config.keep_checkpoints)
    bar.close()
    if step < config.steps:
        raise RuntimeError(f"the data ran out at step {step} of {config.steps}")
    skipped = sum_counts(skipped, SKIP_KINDS)

    result: dict[str, Any] = {}
    if ranks.is_main:
        model.eval()
        save_into_directory(model.config, model.state_dict(), output, model.tokenizer)
        if metrics is not None:
            metrics.close()
        from .report import final_report

        result = final_report(config, model, output, skipped)
    if ranks.enabled:
        torch.distributed.barrier()
    return result


SKIP_KINDS = (*REASONS, "other")


def _stream_positions(data_state: dict[str, Any], ranks, workers: int) -> dict[int, int]:
    """How far each of this rank's data streams had read at the checkpoint (streamed sources;
    empty for a fresh run).  The streams are only the same with the same number of ranks and
    workers: otherwise they start afresh, with a warning."""
    saved = data_state.get("positions")
    if not saved or not any(saved):
        return {}
    if (data_state.get("world_size"), data_state.get("workers")) != (ranks.world_size, workers):
        log.warning("the checkpoint was written by %s process(es) with %s data worker(s) each, "
                    "this run has %d with %d: the data streams start afresh rather than where "
                    "they stopped (resume with the same torchrun --nproc_per_node and "
                    "--workers to continue them exactly)", data_state.get("world_size"),
                    data_state.get("workers"), ranks.world_size, workers)
        return {}
    positions = {int(k): int(v) for k, v in saved[ranks.rank].items()}
    if ranks.is_main:
        log.info("resuming the data streams at %s (re-reading, not decoding, what they had "
                 "read)", ", ".join(f"stream {k}: item {v}" for k, v in sorted(positions.items())))
    return positions


def _locked_modules(model, config: TrainConfig) -> list[torch.nn.Module]:
    locked: list[torch.nn.Module] = []
    if config.lock_image:
        locked.append(model.visual)
    if config.lock_text:
        locked += [model.token_embedding, model.transformer, model.ln_final]
    return locked


def _lock_towers(objective: Objective, config: TrainConfig) -> None:
    """LiT: a locked tower keeps its weights fixed (Zhai et al. 2022)."""
    for module in _locked_modules(objective.model, config):
        module.requires_grad_(False)
    if config.lock_text:
        objective.model.positional_embedding.requires_grad_(False)
        objective.model.text_projection.requires_grad_(False)


def train_mode(model, config: TrainConfig) -> None:
    """Training mode, except locked towers, whose BatchNorm statistics must not move."""
    model.train()
    for module in _locked_modules(model, config):
        module.eval()


def _step(config: TrainConfig, objective: Objective, ddp: DistributedDataParallel | None,
          pixels: torch.Tensor, tokens: torch.Tensor, autocast, scaler: torch.amp.GradScaler,
          optimizer: torch.optim.Optimizer, trainable: list[torch.nn.Parameter]) -> torch.Tensor:
    optimizer.zero_grad(set_to_none=True)
    if config.micro_batch and config.micro_batch < pixels.shape[0]:
        sync = ddp.no_sync() if ddp is not None else contextlib.nullcontext()
        with sync:
            # the chunked CLIP loss: the full-batch step never holds N x N logits
            loss = gradcache_backward(
                objective.model, pixels, tokens,
                lambda i, t, s: scaler.scale(objective.chunked_loss_fn(i, t, s)),
                config.micro_batch, autocast)
        average_gradients(trainable)
        loss = loss / scaler.get_scale() if scaler.is_enabled() else loss
    else:
        with autocast():
            loss = (ddp or objective)(pixels, tokens)
        scaler.scale(loss).backward()
    if config.grad_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()


def _periodic_eval(config: TrainConfig, model, metrics: MetricsLog | None, step: int) -> None:
    if config.data != BUILTIN_DATA or metrics is None:
        return
    from .report import evaluate_builtin

    model.eval()
    try:
        result = evaluate_builtin(model, config.seed, n=240)
    finally:
        train_mode(model, config)
    metrics.write({"step": step, **{f"eval/{k}": v for k, v in result.items()}})
