"""The training loop: `train(config) -> TrainResult`, plain Fabric code from data to checkpoints.

One optimizer step = `grad_accum` micro-batches per rank. Under DDP the gradient all-reduce runs only on the last
micro-batch (`no_backward_sync`); under DeepSpeed the engine owns accumulation, loss scaling and clipping
(see tml/train/fabric.py), so the loop does not divide the loss, steps the engine on every micro-batch and
reads the engine's grad norm. Everything that must agree across ranks (loss, grad norm, preemption flag, early
stopping) is reduced or broadcast, so every rank takes the same branch and saves together.

Rank 0 ends every run (finished, early stopping, preemption, divergence) by writing `{out_dir}/summary.json`:
the final numbers in a form scripts can read instead of scraping the console.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist
from lightning import Fabric
from lightning.fabric.utilities.seed import seed_everything

from tml.config import Config, dump_yaml
from tml.data.packed import PackedDataset
from tml.data.sampler import BatchStream
from tml.files import write_atomic
from tml.model import Transformer
from tml.model.diagnostics import attention_metrics, attention_statistics_over
from tml.pretrained import weights_to_start_from
from tml.run_dir import CONFIG_FILE, SUMMARY_FILE, checkpoints_dir
from tml.train.budget import budget_key, describe_budget, horizon_key
from tml.train.checkpoint import Checkpointer, branches_another_run, disk_space_warning
from tml.train.config import TrainConfig
from tml.train.early_stopping import EarlyStopping
from tml.train.evaluate import EvalResult, evaluate, fixed_windows, format_perplexity, perplexity
from tml.train.fabric import FP16_INITIAL_SCALE_POWER, build_fabric, is_deepspeed, resolve_precision
from tml.train.loggers import (
    ConsoleReport,
    build_loggers,
    describe_model,
    flat_hyperparameters,
    log_hyperparameters,
    log_validation,
    model_hyperparameters,
    new_wandb_run_id,
)
from tml.train.muon import MUON, MuonWithAdamW
from tml.train.optim import branch_schedule_notes, build_optimizer, build_scheduler
from tml.train.preemption import PreemptionFlag, install_preemption_handler
from tml.train.preflight import check_vocabulary, ignored_init_from
from tml.train.ranks import is_first_local_process
from tml.train.resume import resume_checkpoint
from tml.train.throughput import ThroughputMeter, flops_rate, peak_flops, slow_cpu_bf16_warning

GIB = 2**30
MAX_NONFINITE_STEPS = 5  # consecutive non-finite losses before the run is declared diverged (fp16 skips are fine)
# Consecutive fp16 overflows before the run is declared diverged: torch's GradScaler (2**16 at the start, halved at
# each overflow) has then tried a scale of 1, so no scale lets fp16 hold these gradients. DeepSpeed's scaler (halved
# from the second overflow on: FP16_HYSTERESIS) is at 1 by then, and raises at its next overflow.
MAX_OVERFLOWED_STEPS = FP16_INITIAL_SCALE_POWER + 1
# DeepSpeed's fp16 scaler gives up with a bare Exception saying this when it overflows at its minimum scale.
DEEPSPEED_MIN_SCALE_MESSAGE = "loss scale already at minimum"
ATTENTION_WINDOWS = 8  # validation windows log.attention_stats measures: a few, as validation runs hundreds


class TrainingDiverged(RuntimeError):
    """Non-finite loss or gradients (or fp16 overflow at every loss scale) for too many steps in a row. The checkpoint
    whose weights led into it was set aside (Checkpointer.set_aside_from), and `last` points at the one before."""


@dataclass
class TrainResult:
    final_step: int
    best_val_loss: float
    val_loss: float  # at the final validation
    val_perplexity: float  # exp(val_loss)
    stopped_early: bool
    preempted: bool
    out_dir: Path


def resume_schedule_notices(config: Config, saved_schedule: TrainConfig | None, step: int, tokens_seen: int,
                            tokens_per_step: int) -> list[str]:
    """What a resume changes in how long or how fast a run trains, said because nothing else would show it;
    `saved_schedule` is the train section the checkpoint was saved under, when its schedule is not this run's (a
    branch, or the run itself given another max_steps), else None."""
    notices = []
    if budget_key(config.train) is not None and tokens_seen != step * tokens_per_step:
        # The budget is counted in steps of today's global batch: the steps trained at another one cost otherwise.
        ends_at = tokens_seen + max(0, config.train.max_steps - step) * tokens_per_step
        notices.append(f"note: {tokens_seen:,} tokens were trained at another global batch; "
                       f"{horizon_key(config.train)} is counted in steps of today's {tokens_per_step:,} tokens, so the "
                       f"run ends at {ends_at:,} tokens")
    if saved_schedule is not None:
        notices += [f"note: {note}" for note in branch_schedule_notes(saved_schedule, config.train, step)]
    return notices


def train(config: Config, preemption: PreemptionFlag | None = None) -> TrainResult:
    started = time.perf_counter()
    tc = config.train
    out_dir = Path(tc.out_dir)
    # Refuses a resume this config cannot continue. The launcher has prepared the shards: they are what it reads.
    resume_dir, meta, changed = resume_checkpoint(config, shards_built=True)
    config = settle_init_from(config, resume_dir, meta)
    tc = config.train
    # The data checks come before the Fabric starts: a mismatch is one line from the CLI, not a traceback per rank.
    check_vocabulary(config)
    block = config.model.block_size
    train_set = PackedDataset(config.data.shard_dir, "train", block, config.data.stride)
    val_set = PackedDataset(config.data.shard_dir, "val", block, block)  # non-overlapping: every token counts once
    branch = resume_dir is not None and branches_another_run(resume_dir, out_dir)
    wandb_run_id = (None if branch else meta.get("wandb_run_id")) or new_wandb_run_id()
    # A new run may start from trained weights; a resumed one has its own. Read (and refused) before Fabric starts.
    initial = weights_to_start_from(tc.init_from, config.model) if tc.init_from and resume_dir is None else None

    fabric = build_fabric(tc, build_loggers(config, wandb_run_id))
    fabric.launch()
    preemption = preemption or install_preemption_handler()
    # Everything after the handler is installed and the process group started is undone by the `finally`, a
    # refused resume or a full disk at start-up included: the caller keeps its signals, the group goes.
    batches: BatchStream | None = None
    model = optimizer = scheduler = engine = None
    try:
        deepspeed = is_deepspeed(fabric)
        rank0 = fabric.global_rank == 0

        # Same seed everywhere for identical initial weights, then a per-rank seed for dropout and sampling.
        seed_everything(tc.seed, verbose=False)
        # Not under DeepSpeed's zero.Init (what fabric.init_module enters for ZeRO-3): it partitions each submodule's
        # parameters as soon as it is built, so the model's own init afterwards would miss them. setup partitions.
        with nullcontext() if deepspeed else fabric.init_module():
            model = Transformer(config.model)
        if initial is not None:
            model.load_state_dict(initial[0])
            fabric.print(f"initial weights from {initial[1]}")
            del initial
        model.activation_checkpointing = tc.activation_checkpointing
        precision = resolve_precision(tc, fabric.device.type)  # as it runs: 16-mixed is bf16 on CPU
        model_figures = model_hyperparameters(model, precision)  # before setup: ZeRO-3 then partitions the parameters
        flops_per_token = int(model_figures["model/flops_per_token"])
        seed_everything(tc.seed + fabric.global_rank, verbose=False)

        if tc.compile:
            model = torch.compile(model)  # Fabric unwraps it for the strategy and compiles the wrapped module again
        optimizer = build_optimizer(model, tc)
        muon = isinstance(optimizer, MuonWithAdamW)
        split = optimizer.describe() if muon else None
        # train/lr is train.lr's curve: AdamW's group; with Muon its own curve (train.muon_lr's) is train/muon_lr
        lr_group = next(i for i, group in enumerate(optimizer.param_groups) if group.get("algorithm") != MUON)
        scheduler = build_scheduler(optimizer, tc)  # before setup: DeepSpeed's wrapper is no torch Optimizer
        if deepspeed:
            model, optimizer = fabric.setup(model, optimizer)  # DeepSpeed builds its engine from both at once
        else:
            model = fabric.setup(model)
            optimizer = fabric.setup_optimizers(optimizer)

        batches = BatchStream(train_set, tc.batch_size, fabric.global_rank, fabric.world_size, tc.seed,
                              num_workers=config.data.num_workers, pin_memory=fabric.device.type == "cuda")
        # log.attention_stats: measured by rank 0 alone on the plain module (no DDP or compile wrapper, nothing any
        # other rank must join), which ZeRO-3 cannot run: its parameters are partitioned across the ranks.
        watch_attention = config.log.attention_stats and rank0 and not (deepspeed and tc.zero_stage == 3)
        attention_model = getattr(model.module, "_orig_mod", model.module) if watch_attention else None
        attention_windows = fabric.to_device(fixed_windows(val_set, ATTENTION_WINDOWS)) if watch_attention else None

        checkpointer = Checkpointer(fabric, out_dir, tc.keep_checkpoints, deepspeed)
        early_stopping = EarlyStopping(tc.early_stop_patience, tc.early_stop_min_delta)
        tokens_per_step = tc.batch_size * block * tc.grad_accum * fabric.world_size
        step = tokens_seen = 0
        seconds_before = 0.0  # training time of the run's earlier segments (before a resume)
        # A branch's origin, kept through its own resumes: its tokens and time include the run it branched from.
        branched_from: dict[str, str | int] | None = None
        if resume_dir is not None:
            restored = checkpointer.load(resume_dir, model, optimizer, scheduler, batches)
            step = restored["loop"]["step"]
            early_stopping.load_state_dict(restored["loop"]["early_stopping"])
            # Counted, not step * tokens_per_step: the batch size or rank count may have changed on an earlier resume.
            tokens_seen = restored["loop"].get("tokens_seen", step * tokens_per_step)  # older checkpoints: estimated
            seconds_before = restored["loop"].get("train_seconds", 0.0)
            branched_from = ({"checkpoint": str(resume_dir.resolve()), "step": step} if branch
                             else restored["loop"].get("branched_from"))
            fabric.print(f"resumed from {resume_dir} at step {step}"
                         + (f": a branch of that run, logged as a run of its own in {out_dir}" if branch else ""))
            for notice in restored["notices"]:
                fabric.print(notice)
            if changed:
                fabric.print(f"resuming with changed settings: {', '.join(changed)}")
            # The saved run's schedule, where this one's differs: a branch, or a longer or shorter run of its own.
            new_length = meta["config"].get("train", {}).get("max_steps") != tc.max_steps
            source = Config.from_dict(meta["config"]).train if branch or new_length else None
            for notice in resume_schedule_notices(config, source, step, tokens_seen, tokens_per_step):
                fabric.print(notice)
        if rank0:  # only now: a refused resume leaves the run's config.yaml describing its checkpoints
            out_dir.mkdir(parents=True, exist_ok=True)
            # The model's cost as a comment: the file stays a config that `--config` loads.
            write_atomic(out_dir / CONFIG_FILE, f"# {describe_model(model_figures)}\n{dump_yaml(config)}".encode())
        fabric.print(describe_model(model_figures))
        fabric.print(f"global batch: {tc.batch_size} sequences x {tc.grad_accum} accumulation x {fabric.world_size} "
                     f"ranks of {block} tokens = {tokens_per_step:,} tokens per optimizer step")
        if muon:
            fabric.print(split)
        elif tc.muon_lr is not None:  # a sweep over train.optimizer may set it for its Muon runs
            fabric.print(f"train.muon_lr {tc.muon_lr:g} is unused: it is Muon's lr, and train.optimizer is "
                         f"{tc.optimizer}")
        if budget := describe_budget(config):
            fabric.print(budget)
        if step >= tc.max_steps:
            fabric.print(f"already at step {step:,} of train.max_steps {tc.max_steps:,}: nothing to train "
                         f"(a larger --{horizon_key(tc)} continues the run); validating once")
        if rank0 and (warning := disk_space_warning(out_dir, int(model_figures["model/params"]))):
            fabric.print(warning)

        peak = peak_flops(fabric.device, precision)  # MFU's denominator: recorded, as on CPU it is measured here
        if peak:
            fabric.print(f"MFU against {flops_rate(peak)} per device "
                         + ("(this CPU's fastest matmul, measured now)" if fabric.device.type == "cpu" else
                            f"({torch.cuda.get_device_name(fabric.device)}'s datasheet peak)"))
        # tc.precision, as the user wrote it: its 16-mixed is bf16 on a CPU, which the warning knows
        if rank0 and fabric.device.type == "cpu" and (warning := slow_cpu_bf16_warning(tc.precision, muon)):
            fabric.print(warning)
        hparams = {**flat_hyperparameters(config), **model_figures, "train/peak_flops_per_device": peak or 0.0}
        log_hyperparameters(fabric.loggers, hparams)
        tensorboard_hparams: dict | None = hparams  # written with the first validation's metrics (see loggers.py)
        meter = ThroughputMeter(flops_per_token, peak, fabric.world_size)
        scaler = getattr(fabric.strategy.precision, "scaler", None)  # fp16 on GPU: skips overflowed steps itself
        fp16_scaling = scaler is not None or (deepspeed and precision == "16-mixed")  # DeepSpeed scales on its own
        skip_sync = fabric.world_size > 1 and not deepspeed
        # The DeepSpeedEngine: Fabric's optimizer.step bypasses it, so the loop steps the engine itself.
        engine = fabric.strategy.model if deepspeed else None
        loss_divisor = 1 if deepspeed else tc.grad_accum  # the DeepSpeed engine divides by grad_accum itself

        def train_seconds() -> float:
            """Wall seconds of the whole run: this process's and those of the segments it resumed."""
            return seconds_before + time.perf_counter() - started

        losses_at_saves: dict[int, float] = {}  # the train loss logged at each step saved: how sound its weights were
        first_loss: float | None = None  # the first step's train loss in this process: where training started from
        step_loss = math.nan  # the latest step's train loss (none yet: a run resumed at its end only validates)

        def save(best: bool = False) -> None:
            loop_state = {"step": step, "early_stopping": early_stopping.state_dict(), "tokens_seen": tokens_seen,
                          "train_seconds": train_seconds(), "branched_from": branched_from}
            checkpointer.save(step, model, optimizer, scheduler, batches, loop_state, config, wandb_run_id, best=best)
            losses_at_saves[step] = step_loss

        def validate() -> tuple[EvalResult, bool]:
            """Validate, log, save `best` on improvement; True when early stopping says stop (rank 0 decides)."""
            nonlocal tensorboard_hparams, val_step
            val_step = step
            result = evaluate(fabric, model, val_set, tc.batch_size, tc.val_batches)
            # Rank 0 decides both, so a last-bit difference in a reduction can never leave one rank out of a save.
            stop, improved = fabric.broadcast((early_stopping.update(result.loss), early_stopping.improved), src=0)
            metrics = {"val/loss": result.loss, "val/perplexity": result.perplexity,
                       "val/best_perplexity": perplexity(early_stopping.best)}
            log_validation(fabric.loggers, metrics, step, tensorboard_hparams)
            tensorboard_hparams = None
            if attention_model is not None:  # its own call: the HParams view keeps the val/* columns only
                with fabric.autocast():
                    fabric.log_dict(attention_metrics(attention_statistics_over(attention_model, [attention_windows])),
                                    step=step)
            report.print(f"step {step:>7d} | val loss {result.loss:.4f} | "
                         f"val ppl {format_perplexity(result.perplexity)}")
            if improved:
                save(best=True)
            return result, stop

        def diverge(bad_step: int, streak: int, what: str) -> NoReturn:
            """Set aside the checkpoints made from the bad steps' weights and raise TrainingDiverged (every rank)."""
            first_bad = bad_step - streak + 1
            # The weights of step first_bad - 1 gave the first bad step: not a checkpoint to continue from.
            kept, last_step = checkpointer.set_aside_from(first_bad - 1)
            when = (f"for {streak} consecutive steps (steps {first_bad} to {bad_step})" if streak > 1
                    else f"at step {bad_step}")
            raise TrainingDiverged(
                f"{what} {when}; stopping. {kept} "
                + damaged_warning(losses_at_saves.get(last_step), first_loss, out_dir)
                + ("Lower train.lr (and train.muon_lr)" if muon and tc.muon_lr is not None else "Lower train.lr")
                + " or raise train.warmup_frac"
                + (", or use bf16-mixed (fp16's range is narrow)." if fp16_scaling else ".")
            )

        val: EvalResult | None = None
        val_step = 0  # the step of that validation
        stopped_early = preempted = False
        nonfinite_streak = overflow_streak = 0

        def run_summary(diverged: bool) -> dict[str, float | int | bool | str | None]:
            """What summary.json holds: the run's final numbers, for scripts that compare runs."""
            return {
                "final_step": step,
                "max_steps": tc.max_steps,
                "best_val_loss": early_stopping.best,
                "best_val_perplexity": perplexity(early_stopping.best),
                "val_loss": val.loss if val else None,
                "val_perplexity": val.perplexity if val else None,
                "stopped_early": stopped_early,
                "preempted": preempted,
                "stop_reason": preemption.describe() if preempted else None,  # "Ctrl-C", "SIGUSR1", ...
                "diverged": diverged,
                "tokens_seen": tokens_seen,
                "wall_s": round(train_seconds(), 3),
                # A branch: the checkpoint it started from, whose run's tokens and time the two above include
                "branched_from": branched_from["checkpoint"] if branched_from else None,
                "branched_at_step": branched_from["step"] if branched_from else None,
                # Training speed alone (validation, saves and start-up left out), median over this process's log windows
                "train_tokens_per_s": round(speed, 1) if (speed := meter.median_tokens_per_s()) is not None else None,
                "peak_flops_per_device": peak,  # what MFU was measured against (None: unknown device, no MFU)
                "params": model_figures["model/params"],
                "params_non_embedding": model_figures["model/params_non_embedding"],
                "checkpoints": str(checkpoints_dir(out_dir).resolve()),  # absolute: read from anywhere
            }

        model.train()
        meter.start()
        with ConsoleReport(rank0, tc.max_steps, step) as report:
            while step < tc.max_steps:
                loss_sum = torch.zeros((), device=fabric.device)
                for micro in range(tc.grad_accum):
                    x, y = fabric.to_device(next(batches))
                    with nullcontext() if deepspeed else fabric.no_backward_sync(
                            model, enabled=skip_sync and micro < tc.grad_accum - 1):
                        _, loss = model(x, y, return_logits=False)
                        fabric.backward(loss / loss_divisor)
                    if deepspeed:
                        try:
                            engine.step()  # every micro-batch: the engine counts them and updates on the last
                        except Exception as error:  # raised on every rank alike: the overflow flag is all-reduced
                            if DEEPSPEED_MIN_SCALE_MESSAGE not in str(error):
                                raise
                            diverge(step + 1, overflow_streak + 1,
                                    "the fp16 gradients overflowed at DeepSpeed's minimum loss scale")
                    loss_sum += loss.detach()
                if deepspeed:  # the engine stepped (and clipped) on the last micro-batch
                    grad_norm, norm_known = deepspeed_grad_norm(engine, fabric.device)
                else:  # the pre-clip norm of gradients DDP has already averaged: the same on every rank
                    max_norm = tc.grad_clip if tc.grad_clip > 0 else math.inf
                    grad_norm = fabric.clip_gradients(model, optimizer, max_norm=max_norm, error_if_nonfinite=False)
                    norm_known = True
                # torch.full, not torch.tensor: filling on the device needs no blocking copy from the host.
                signalled = torch.full((), float(preemption.requested), device=fabric.device)
                # The loop's one wait for the device per step (fp16's GradScaler adds one inside optimizer.step).
                loss_total, signalled_ranks, norm_total = fabric.all_reduce(
                    torch.stack([loss_sum / tc.grad_accum, signalled, grad_norm.float()]), reduce_op="sum").tolist()
                step_loss = loss_total / fabric.world_size
                step_grad_norm = norm_total / fabric.world_size
                first_loss = step_loss if first_loss is None else first_loss
                # A good step has a finite loss and finite gradients. A bad step's update is never applied (except by
                # DeepSpeed, whose engine has already stepped) and never saved, so `last` never holds NaN weights.
                # Under fp16 loss scaling an overflowed gradient is the scaler's to skip (it lowers the scale), not
                # a sign of divergence, unless it goes on (MAX_OVERFLOWED_STEPS). An unknown ZeRO norm is no evidence.
                overflowed = fp16_scaling and norm_known and not math.isfinite(step_grad_norm)
                finite = math.isfinite(step_loss) and (fp16_scaling or not norm_known or math.isfinite(step_grad_norm))
                if not deepspeed:
                    if finite or scaler is not None:
                        optimizer.step()  # with a scaler, an overflowed step is skipped by the scaler itself
                    optimizer.zero_grad(set_to_none=True)
                lrs = scheduler.get_last_lr()  # the rates this step used
                advance_schedule(scheduler, step)
                step += 1
                meter.add(tokens_per_step)
                tokens_seen += tokens_per_step

                nonfinite_streak = 0 if finite else nonfinite_streak + 1
                overflow_streak = overflow_streak + 1 if overflowed else 0
                if step % tc.log_interval == 0 or step == tc.max_steps:
                    tokens_per_s, mfu = meter.measure()
                    metrics = {"train/loss": step_loss, "train/lr": lrs[lr_group],
                               "train/grad_norm": step_grad_norm,
                               "train/tokens_per_s": tokens_per_s, "train/tokens": tokens_seen}
                    if muon:
                        metrics["train/muon_lr"] = lrs[0]
                    if mfu is not None:
                        metrics["train/mfu"] = mfu
                    if fabric.device.type == "cuda":
                        metrics["train/peak_memory_gib"] = torch.cuda.max_memory_allocated(fabric.device) / GIB
                    fabric.log_dict(metrics, step=step)
                    status = f"loss {step_loss:.4f} | lr {metrics['train/lr']:.2e} | {tokens_per_s:,.0f} tok/s"
                    if not finite:
                        status += " | skipped: non-finite loss or gradients"
                    report.print(f"step {step:>7d} | {status}" + (f" | MFU {mfu:.1%}" if mfu is not None else ""))
                    report.advance(step, status)

                if nonfinite_streak >= MAX_NONFINITE_STEPS:
                    diverge(step, nonfinite_streak, "the loss or the gradients were non-finite")
                if overflow_streak >= MAX_OVERFLOWED_STEPS:
                    diverge(step, overflow_streak, "the fp16 gradients overflowed at every loss scale tried")

                saved = False
                if signalled_ranks > 0 and step < tc.max_steps:  # at the last step the run ends, complete, anyway
                    preempted = True
                with meter.paused():  # validation and saving are not training speed
                    if finite and (step % tc.val_interval == 0 or step == tc.max_steps):
                        val, stopped_early = validate()
                        saved = checkpointer.has_saved(step)
                    # A stop request saves even after a skipped step (its update was not applied, so the weights
                    # are the previous step's), unless DeepSpeed applied it: a requeued job then loses nothing.
                    weights_sound = finite or not deepspeed
                    if preempted:
                        report.print(f"step {step:>7d} | stop requested ({preemption.describe()}): " + (
                            "saving `last` and stopping" if weights_sound or saved else
                            "stopping without a save: DeepSpeed applied this non-finite step; `last` is as before"))
                    due = step % tc.ckpt_interval == 0 or step == tc.max_steps or stopped_early
                    if not saved and ((finite and due) or (preempted and weights_sound)):
                        save()
                if stopped_early:
                    report.print(f"step {step:>7d} | early stopping: no val improvement for "
                                 f"{tc.early_stop_patience} validations")
                if stopped_early or preempted:
                    break
            if val is None and not preempted:  # resumed at the end: still report the final metric
                val, _ = validate()
            report.summary({
                "steps": f"{step:,} / {tc.max_steps:,}",
                "best val loss": f"{early_stopping.best:.4f}" if math.isfinite(early_stopping.best) else "-",
                # A run stopped between validations reports its last one: say from which step.
                "final val loss": (f"{val.loss:.4f}" + (f" (step {val_step:,})" if val_step != step else ""))
                if val else "-",
                "final val perplexity": format_perplexity(val.perplexity) if val else "-",
                "stopped early": str(stopped_early),
                "stopped by": preemption.describe() if preempted else "-",  # Ctrl-C, SIGTERM, SIGUSR1, ...
                "checkpoints": str(checkpoints_dir(out_dir)),
                **({"peak GPU memory": f"{torch.cuda.max_memory_allocated(fabric.device) / GIB:.2f} GiB"}
                   if fabric.device.type == "cuda" else {}),
            })
        if rank0:
            write_summary(out_dir, run_summary(diverged=False))
        for logger in fabric.loggers:
            logger.finalize("success")
        finish_wandb(fabric)
    except TrainingDiverged:
        if rank0:  # a sweep's script reads why this run ended like any other's
            write_summary(out_dir, run_summary(diverged=True))
        raise
    finally:
        preemption.uninstall()
        if batches is not None:
            batches.close()
        model = optimizer = scheduler = engine = None  # drop every reference before the process group goes
        teardown(fabric)

    return TrainResult(
        final_step=step,
        best_val_loss=early_stopping.best,
        val_loss=val.loss if val else math.nan,
        val_perplexity=val.perplexity if val else math.nan,
        stopped_early=stopped_early,
        preempted=preempted,
        out_dir=out_dir,
    )


def deepspeed_grad_norm(engine, device: torch.device) -> tuple[torch.Tensor, bool]:
    """The engine's pre-clip gradient norm of the step it just took, kept on the device (float() would wait for
    the engine), and whether it is known: (nan, False) when ZeRO did not compute one."""
    reported = engine.get_global_grad_norm()
    if reported is None:
        return torch.full((), math.nan, device=device), False
    if torch.is_tensor(reported):
        return reported.detach().to(device, torch.float32).reshape(()), True
    return torch.full((), float(reported), device=device), True


def damaged_warning(loss_at_last: float | None, first_loss: float | None, out_dir: Path) -> str:
    """A sentence when the checkpoint left as `last` was itself saved at a loss above where training started: a blow-up
    whose loss stayed finite for a while damaged those weights too, and resuming from them would not train."""
    if loss_at_last is None or first_loss is None or not loss_at_last > first_loss or not math.isfinite(loss_at_last):
        return ""  # `not >`: a NaN on either side is no evidence
    return (f"Its train loss ({loss_at_last:.4g}) was already above the first step's ({first_loss:.4g}), so its "
            f"weights are likely damaged too: a new run (another --train.out_dir than {out_dir}) starts afresh. ")


def settle_init_from(config: Config, resume_dir: Path | None, meta: dict) -> Config:
    """train.init_from is where a run's weights started: made absolute at its first start (config.yaml then says
    where from, wherever it is read), and kept by every resume, which continues its own weights; a different value
    given to a resume is ignored, saying so."""
    given = config.train.init_from
    if resume_dir is None:
        started_from = os.path.abspath(os.path.expanduser(given)) if given else None
    else:
        started_from = meta["config"]["train"].get("init_from")
        if ignored_init_from(config, meta) and is_first_local_process():
            print(f"tml: train.init_from={given} ignored: this run resumes its own weights"
                  + (f" (it started from {started_from})" if started_from else ""), file=sys.stderr)
    return dataclasses.replace(config, train=dataclasses.replace(config.train, init_from=started_from))


def write_summary(out_dir: Path, summary: dict[str, float | int | bool | str | None]) -> None:
    """`{out_dir}/summary.json`, replaced atomically. Non-finite numbers (no validation yet) become null:
    JSON has no NaN or Infinity, and `json.loads` elsewhere would choke on Python's spelling of them."""
    values = {key: None if isinstance(value, float) and not math.isfinite(value) else value
              for key, value in summary.items()}
    write_atomic(out_dir / SUMMARY_FILE, (json.dumps(values, indent=2) + "\n").encode())


def advance_schedule(scheduler: torch.optim.lr_scheduler.LRScheduler, step: int) -> None:
    """One schedule step per loop step, also after an optimizer step that was skipped (fp16 overflow, NaN loss).

    torch warns at a fresh schedule's first step when the optimizer has not stepped yet, which a skipped first step
    triggers for nothing. Only that step is wrapped: entering `catch_warnings` resets Python's show-once warning
    registries, so wrapping every step would repeat any such warning from the training step on every step.
    """
    if step > 0:  # a resumed schedule restores its step count, and torch checks only the first
        scheduler.step()
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)` before", UserWarning)
        scheduler.step()


def finish_wandb(fabric: Fabric) -> None:
    for logger in fabric.loggers:
        if type(logger).__name__ == "WandbLogger" and fabric.global_rank == 0:
            logger.experiment.finish()


def teardown(fabric: Fabric) -> None:
    """Free the model before the process group: gloo on CPU aborted 3 runs in 8 without this order. A group of one
    (DeepSpeed makes one for a single process) goes too: left behind, it would hold its port in a process that goes
    on to start other runs."""
    gc.collect()
    if dist.is_available() and dist.is_initialized():
        try:
            if fabric.world_size > 1:
                fabric.barrier()
        finally:
            dist.destroy_process_group()
