"""Everything about saving and loading training state.

Layout of a run's `checkpoints/` directory:

    step-0000500/            one complete checkpoint (a directory, for plain and DeepSpeed runs alike)
      model.pt               model state dict (plain runs; rank 0)
      optimizer.pt           optimizer state dict (plain runs; rank 0)
      deepspeed/             Fabric/DeepSpeed checkpoint directory instead of the two above (every rank writes)
      trainer.pt             scheduler, grad-scaler, step and loop counters (rank 0)
      rank-00000.pt ...      per rank: Python/NumPy/torch/CUDA RNG states and the batch stream's position
      meta.json              step, resolved config, wandb run id, world size, the shards' content fingerprint
      MANIFEST.json          size and sha256 of every file above, written last
    last -> step-0000500     relative symlinks, replaced atomically
    best -> step-0000400
    diverged-step-0000600/   a checkpoint whose weights led into a divergence: kept, never resumed from

A checkpoint is written under a temporary name and renamed into place only when every rank has finished and
the manifest is written, so a killed run never leaves a half-written `step-*`, `last` or `best`. Loading
checks the manifest first, so a truncated or altered file is refused with its name, and uses
`torch.load(weights_only=True)`: a checkpoint is data, not code. (DeepSpeed's own files are read by DeepSpeed's
loader; the manifest still guards them.) Older step checkpoints beyond `keep` are pruned, never the targets of
`last` or `best`.

`train.resume` names a checkpoint (resolve_resume: `auto` is `last`; a fresh run is refused over an out_dir
that already holds checkpoints); whether it can continue under this run's config, data and strategy is
tml/train/resume.py's to say.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from lightning import Fabric

from tml.config import Config
from tml.data.shards import ShardIndex
from tml.files import (
    existing_ancestor,
    file_sha256,
    free_bytes,
    fresh_directory,
    replaced_on_success,
    write_atomic,
    write_failure,
)
from tml.run_dir import CONFIG_FILE, STEP_DIR, checkpoints_dir, newest_checkpoint, saved_steps, step_name
from tml.train.optim import restore_schedule_step
from tml.train.zero_export import ZeroCheckpointError, fp32_state_dict, verify_deepspeed_checkpoint

FORMAT_VERSION = 1
MANIFEST = "MANIFEST.json"
META = "meta.json"
DIVERGED_PREFIX = "diverged-"  # a step directory set aside after a divergence: kept, never resumed from
DATA_CONTENT = "data_content_fingerprint"  # meta.json key: which source text the run's shards were built from
# What generate, eval and export read of a checkpoint (and so verify): the optimizer, trainer and per-rank files
# are training's. A ZeRO checkpoint's weights are inside its optimizer shards, so all of deepspeed/ is needed.
WEIGHT_FILES = (META, "model.pt", "deepspeed/")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file."""


# What an optimizer group holds that a resume does not take from this run's config as built: its tensors (ZeRO's are
# flat partitions) and the lr, which restore_schedule_step sets from the schedule at the saved step.
SCHEDULED_GROUP_KEYS = frozenset({"params", "lr"})

# fp32 weights and AdamW's two fp32 moments per parameter (DeepSpeed's add more; Muon keeps one for most: less).
CHECKPOINT_BYTES_PER_PARAM = 12


# ---------------------------------------------------------------------------------------------------- locating


def resolve_resume(resume: str, out_dir: str | Path) -> Path | None:
    """`none` -> None; `auto` -> `checkpoints/last` when present; anything else is a checkpoint path that must exist
    (a run directory means its `last`).

    `none` over an out_dir that already holds checkpoints is refused: the new run would repoint `last` and `best`
    at its own (worse) models and orphan the old step directories.
    """
    if resume in ("", "none"):
        existing = describe_saved_run(out_dir)
        if existing:
            raise CheckpointError(
                f"{out_dir} already holds a run ({existing}) and train.resume is 'none': --train.resume auto "
                f"continues it, another --train.out_dir starts a new run (or delete {out_dir} first)"
            )
        return None
    if resume == "auto":
        last = checkpoints_dir(out_dir) / "last"
        if not last.is_symlink() and not last.exists():
            # A run killed between renaming its first step directory into place and pointing `last` at it.
            newest = newest_checkpoint(out_dir)
            return newest.resolve() if newest else None
        if not last.exists():
            raise CheckpointError(
                f"{last} points to a missing checkpoint ({os.readlink(last)}); {_dangling_last_advice(last)}")
        if not last.is_symlink():  # copied with links followed: its step directory may be the whole copy
            return _whole_looking_copy(last)
        return last.resolve()
    path = Path(resume)
    if not path.exists():
        raise CheckpointError(f"train.resume={resume!r}: no such checkpoint{_dangling(path)}")
    is_checkpoint = (path / META).exists() or (path / MANIFEST).exists()
    if not is_checkpoint and checkpoints_dir(path).is_dir() and (last := resolve_resume("auto", path)) is not None:
        found = last  # a run directory continues from its `last`, as `auto` does (find_checkpoint would pick `best`)
    else:
        found = find_checkpoint(path)
    if branches_another_run(found, out_dir) and (existing := describe_saved_run(out_dir)):
        # The same command run twice: starting the branch again would retrain it over its own checkpoints.
        raise CheckpointError(
            f"{out_dir} already holds a run ({existing}) and train.resume names a checkpoint of another run "
            f"({found}): --train.resume auto continues {out_dir}, another --train.out_dir starts a new branch")
    return found


def branches_another_run(resume_dir: Path, out_dir: str | Path) -> bool:
    """True when a run resumes a checkpoint of another out_dir: a branch (another length of a WSD run, say), which
    continues the weights, optimizer and data position but is a run of its own in wandb, not more of the old one."""
    return resume_dir.resolve().parent != checkpoints_dir(out_dir).resolve()


def _dangling_last_advice(dangling_last: Path) -> str:
    """What `--train.resume auto` does once a dangling `last` is removed (it falls back to the newest step)."""
    newest = newest_checkpoint(dangling_last.parent.parent)
    copied = f"if the run was copied without {os.readlink(dangling_last)}, copy it too; otherwise "
    if newest:
        return (f"{copied}the newest complete checkpoint is {newest.name}: remove the {dangling_last.name} link "
                "and --train.resume auto continues from it")
    return f"{copied}no complete checkpoint is left: remove the {dangling_last.name} link to start the run afresh"


def _whole_looking_copy(copied_last: Path) -> Path:
    """A `last` directory, or its step directory when only that one has every file at its size (an interrupted
    copy): what the resume loads once relink_copied_checkpoints has made `last` a link again."""
    if _passes(copied_last, hash_files=False) or (step := _meta_step(copied_last)) is None:
        return copied_last.resolve()  # whole, or refused by the checks that follow, naming it
    step_dir = copied_last.parent / step_name(step)
    return (step_dir if _passes(step_dir, hash_files=False) else copied_last).resolve()


def _meta_step(directory: Path) -> int | None:
    """The step a checkpoint's meta.json records, or None when it cannot be read."""
    try:
        return int(read_meta(directory)["step"])
    except (CheckpointError, KeyError, TypeError, ValueError):
        return None


def _dangling(path: Path) -> str:
    """`: it links to step-0000020, which is not there (...)` for a link whose target is missing, else ""."""
    if not path.is_symlink():
        return ""
    return (f": it links to {os.readlink(path)}, which is not there (a copy without what the link named? `cp -L` "
            "copies the checkpoint itself)")


def older_checkpoint_advice(refused: Path) -> str:
    """How to go on from a refused checkpoint: the newest complete step directory before it, if any."""
    match = STEP_DIR.fullmatch(refused.name)
    # `last` or `best` copied as a directory has no step in its name: its meta.json has it
    older = newest_checkpoint(refused.parent.parent, before=int(match[1]) if match else _meta_step(refused))
    if older is None:
        return "no older checkpoint is left in this run"
    return f"an older checkpoint is there: --train.resume {older}"


def remove_unfinished_saves(root: Path) -> None:
    """Delete the `.tmp-step-*` and `.stale-*` directories of saves that were killed (SIGKILL, a node lost): no
    later save of the same step may come to replace them. Only one training uses an out_dir (its run lock)."""
    for leftover in [*root.glob(".tmp-step-*"), *root.glob(".stale-*")]:
        shutil.rmtree(leftover, ignore_errors=True)


def remove_whole(directory: Path) -> None:
    """Rename away, then delete: a reader (tml eval on `last` during training) sees it whole or gone. A kill in
    between leaves `.stale-*`, removed at the next start (remove_unfinished_saves)."""
    stale = directory.with_name(f".stale-{directory.name}")
    os.replace(directory, stale)
    # A file still open in it (a reader on NFS) can make the delete fail: the next start removes the rest.
    shutil.rmtree(stale, ignore_errors=True)


def relink_copied_checkpoints(root: Path) -> None:
    """Turn a `last` or `best` that is a directory (a run copied with its links followed: `cp -rL`, `rsync -L`,
    `scp -r`) back into a link to its step directory, so the next save can repoint it. A copy is only deleted once
    the step directory it duplicates has passed the full hash check; when the step directory fails it and the copy
    passes, the copy becomes the step; when neither passes, both are left for the loader to refuse."""
    for link in (root / "last", root / "best"):
        if link.is_symlink() or not link.is_dir() or (saved_step := _meta_step(link)) is None:
            continue  # a link, nothing, or not a checkpoint tml can name (left for the loader to refuse)
        step = step_name(saved_step)
        target = root / step
        if not target.exists():
            os.replace(link, target)  # the copy is the only one: it becomes the step, nothing is deleted
        elif _passes(target):  # the copy is the step's duplicate
            remove_whole(link)
        elif _passes(link):  # the step directory is cut short or damaged (an interrupted copy): the copy replaces it
            remove_whole(target)
            os.replace(link, target)
        else:
            continue
        _point_link(link, step)


def _passes(directory: Path, hash_files: bool = True) -> bool:
    """Every file of the checkpoint's manifest there, at its size (and with its sha256 when `hash_files`)."""
    try:
        verify_checkpoint(directory, hash_files=hash_files)
    except CheckpointError:
        return False
    return True


def disk_space_warning(out_dir: str | Path, params: int) -> str | None:
    """A warning when out_dir's disk cannot hold two checkpoints of a model this size (the new one is written
    before the old one is pruned), said at start-up instead of by a failed save hours later; else None."""
    needed = 2 * params * CHECKPOINT_BYTES_PER_PARAM
    directory = existing_ancestor(Path(out_dir).absolute()) or Path(".")
    free = free_bytes(directory)
    if free is None or free >= needed:
        return None
    return (f"warning: {directory} has {free / 1e9:,.2f} GB free, and two checkpoints of this model take about "
            f"{needed / 1e9:,.2f} GB: saving may fail (free space, or another --train.out_dir)")


def attempt(write: Callable[[], object]) -> BaseException | None:
    """Run one phase of a save; the write error it raised (a full disk, a read-only directory), or None. torch.save
    reports a full disk as a RuntimeError from its zip writer, so that counts too; anything else propagates."""
    try:
        write()
    except (OSError, RuntimeError) as error:
        return error
    return None


def describe_saved_run(out_dir: str | Path) -> str | None:
    """'checkpoints up to step N' when out_dir has `checkpoints/last` or a step directory, else None."""
    root = checkpoints_dir(out_dir)
    steps = saved_steps(out_dir)
    last = root / "last"
    if last.is_symlink() and (match := STEP_DIR.fullmatch(os.readlink(last))):
        steps.append(int(match[1]))
    if steps:
        return f"checkpoints up to step {max(steps)} in {root}"
    return f"{last} -> {os.readlink(last)}" if last.is_symlink() else None


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory (its `best`, else `last`)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint or run directory{_dangling(path)}")
    if (path / META).exists() or (path / MANIFEST).exists():
        return path.resolve()
    for name in ("best", "last"):
        candidate = checkpoints_dir(path) / name
        if candidate.exists():
            return candidate.resolve()
    dangling = [link for name in ("best", "last") if (link := checkpoints_dir(path) / name).is_symlink()]
    if dangling:
        newest = newest_checkpoint(path)
        links = " and ".join(f"{link} -> {os.readlink(link)}" for link in dangling)
        raise CheckpointError(f"{path}: {links} point to missing checkpoints"
                              + (f"; the newest complete one is {newest}" if newest else ""))
    set_aside = sorted(checkpoints_dir(path).glob(f"{DIVERGED_PREFIX}step-*"))
    if set_aside:
        raise CheckpointError(f"{path} diverged before it saved a checkpoint worth using; the one set aside then is "
                              f"{set_aside[-1]}: name it to use it anyway")
    if (path / CONFIG_FILE).is_file():
        raise CheckpointError(f"{path} is a run directory with no checkpoint yet: a run saves one every "
                              "train.ckpt_interval steps and when it ends")
    raise CheckpointError(f"{path} is neither a checkpoint directory (no {MANIFEST}) nor a run directory with one")


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(directory: Path) -> None:
    entries = {str(path.relative_to(directory)): {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
               for path in _files(directory)}
    manifest = {"format": FORMAT_VERSION, "files": entries}
    write_atomic(directory / MANIFEST, json.dumps(manifest, indent=1).encode())


def verify_checkpoint(directory: str | Path, only: tuple[str, ...] | None = None,
                      hash_files: bool = True) -> dict[str, Any]:
    """Check every file against the manifest (or those whose path starts with one of `only`); returns meta.json.
    Raises CheckpointError naming the bad file. `hash_files=False` checks that each file is there at its size,
    a stat each (launchers' pre-checks: a truncated file is refused before data or a queued job)."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{manifest_path} is missing: {directory} is not a complete tml checkpoint")
    try:
        entries = {relative: (int(expected["bytes"]), str(expected["sha256"]))
                   for relative, expected in json.loads(manifest_path.read_text())["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as error:  # not JSON, or not a manifest's shape
        raise CheckpointError(f"{manifest_path} is corrupted ({error!r})") from error
    for relative, (size_expected, sha256_expected) in entries.items():
        if only is not None and not relative.startswith(only):
            continue
        path = directory / relative
        if not path.is_file():
            raise CheckpointError(f"{path} is missing from the checkpoint")
        size = path.stat().st_size
        if size != size_expected:
            raise CheckpointError(f"{path} is truncated or altered: {size} bytes, expected {size_expected}")
        if hash_files and file_sha256(path) != sha256_expected:
            raise CheckpointError(f"{path} is corrupted: its sha256 does not match {MANIFEST}")
    return read_meta(directory)


def read_meta(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / META
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot read {path}: {error}") from error


def safe_load(path: Path) -> Any:
    """torch.load restricted to tensors and plain containers; errors name the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zip, unpickling refused, ...
        raise CheckpointError(f"cannot load {path}: {error}") from error


def _point_link(link: Path, target_name: str) -> None:
    """Replace `link` with a relative symlink to `target_name` atomically."""
    tmp = link.with_name(f".{link.name}.tmp-link")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    with replaced_on_success(link, tmp):
        os.symlink(target_name, tmp)


def shards_content_fingerprint(shard_dir: str | Path) -> str | None:
    """The content fingerprint of the shards a run trains on (None without a readable index, e.g. in tests)."""
    index = ShardIndex.load_or_none(shard_dir)
    return (index.content_fingerprint or None) if index else None


# ------------------------------------------------------------------------------------------------- RNG states


def capture_rng_state() -> dict[str, Any]:
    """This rank's RNG states in a form torch.load(weights_only=True) accepts (NumPy's key as a tensor)."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()  # this rank's own device (Fabric made it current)
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # One state, for this rank's device: a restart on a machine with another GPU count still restores it.
        torch.cuda.set_rng_state(state["cuda"])


# ------------------------------------------------------------------------------------------------ the manager


class Checkpointer:
    """Saves and loads complete training states for one run; every rank calls save() and load() together."""

    def __init__(self, fabric: Fabric, out_dir: str | Path, keep: int, deepspeed: bool = False) -> None:
        self.fabric = fabric
        self.root = checkpoints_dir(out_dir)
        self.keep = keep
        self.deepspeed = deepspeed
        self._saved_steps: set[int] = set()
        if fabric.global_rank == 0:
            remove_unfinished_saves(self.root)
            try:
                relink_copied_checkpoints(self.root)
            except OSError as error:  # rank 0 alone: raising would leave the others waiting; the next save says it
                warnings.warn(f"cannot turn the copied last/best in {self.root} back into links: {error}", stacklevel=2)

    def save(
        self,
        step: int,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        stream,
        loop_state: dict[str, Any],
        config: Config,
        wandb_run_id: str | None,
        best: bool = False,
    ) -> Path:
        """Write `step-N` (unless this run already wrote it), then point `last` (and `best`) at it.

        Four phases (make the temporary directory, write every rank's part, publish it, point the links and prune),
        and after each the ranks agree whether all of them succeeded: a rank that cannot write (a full disk) makes
        every rank raise the same CheckpointError at the same point, instead of the others waiting in a barrier it
        never reaches.
        """
        fabric = self.fabric
        rank0 = fabric.global_rank == 0
        name = step_name(step)
        final = self.root / name
        if step not in self._saved_steps:
            tmp = self.root / f".tmp-{name}"
            try:
                self._agree(attempt(lambda: fresh_directory(tmp)) if rank0 else None, final)
                self._agree(attempt(lambda: self._write_parts(tmp, step, model, optimizer, scheduler, stream,
                                                              loop_state, config, wandb_run_id)), final)
                self._agree(attempt(lambda: self._publish(tmp, final)) if rank0 else None, final)
            except BaseException:  # a failed or interrupted save leaves no half-written step behind
                if rank0:
                    shutil.rmtree(tmp, ignore_errors=True)
                raise
            self._saved_steps.add(step)
        # Agreed like the phases above (and their barrier): a link or prune that fails raises on every rank.
        self._agree(attempt(lambda: self._point_links(name, best)) if rank0 else None, final)
        return final

    def _point_links(self, name: str, best: bool) -> None:
        """Point `last` (and `best`) at the step just saved, then drop the step checkpoints no longer kept."""
        _point_link(self.root / "last", name)
        if best:
            _point_link(self.root / "best", name)
        self._prune()

    def _write_parts(self, tmp: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     scheduler: torch.optim.lr_scheduler.LRScheduler, stream, loop_state: dict[str, Any],
                     config: Config, wandb_run_id: str | None) -> None:
        """This rank's files of the checkpoint: DeepSpeed's shards (every rank), or the model and optimizer (rank 0);
        every rank's RNG state and data position; rank 0's scheduler, scaler, loop state and meta.json."""
        fabric = self.fabric
        if self.deepspeed:
            fabric.save(tmp / "deepspeed", {"model": model, "optimizer": optimizer})
        elif fabric.global_rank == 0:
            torch.save(model.state_dict(), tmp / "model.pt")
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        rank_state = {"rng": capture_rng_state(), "data": stream.state_dict()}
        torch.save(rank_state, tmp / f"rank-{fabric.global_rank:05d}.pt")
        if fabric.global_rank == 0:
            trainer = {
                "scheduler": scheduler.state_dict(),
                "precision": fabric.strategy.precision.state_dict(),
                "loop": loop_state,
            }
            torch.save(trainer, tmp / "trainer.pt")
            meta = {
                "format": FORMAT_VERSION, "step": step, "world_size": fabric.world_size,
                "deepspeed": self.deepspeed, "wandb_run_id": wandb_run_id, "config": config.to_dict(),
            }
            if data_content := shards_content_fingerprint(config.data.shard_dir):
                meta[DATA_CONTENT] = data_content
            write_atomic(tmp / META, json.dumps(meta, indent=1).encode())

    def _publish(self, tmp: Path, final: Path) -> None:
        """Hash every file into the manifest, then rename the directory into place (rank 0)."""
        write_manifest(tmp)
        if final.exists():  # from an earlier trajectory of this run (resumed from an older step)
            remove_whole(final)
        os.replace(tmp, final)

    def _agree(self, failure: BaseException | None, final: Path) -> None:
        """Raise the same CheckpointError on every rank when any rank's phase failed, with the reason of the first
        rank that failed (the CLI prints one rank's message per machine); doubles as the barrier between the phases."""
        fabric = self.fabric
        # One slot per rank, summed: an all_reduce (Fabric's all_gather goes through a deprecated torch collective).
        flags = torch.zeros(fabric.world_size, device=fabric.device)
        flags[fabric.global_rank] = float(failure is not None)
        failed = [rank for rank, flag in enumerate(fabric.all_reduce(flags, reduce_op="sum").tolist()) if flag]
        if not failed:
            return
        reason = write_failure(failure, self.root) if failure is not None else None
        reason = fabric.broadcast(reason, src=failed[0])
        on_rank = f" on rank {failed[0]}" if fabric.world_size > 1 else ""
        raise CheckpointError(f"cannot write checkpoint {final}: {reason}{on_rank}; the checkpoints already in "
                              f"{self.root} are left as they were") from failure

    def set_aside_from(self, first_suspect: int) -> tuple[str, int | None]:
        """After a divergence: rename the step directories from `first_suspect` on to `diverged-step-N` (kept, but no
        longer what `--train.resume auto` or `tml generate` picks), point `last` at the newest step left and drop a
        `best` that pointed at a renamed one. Every rank calls it; rank 0 moves. Returns a sentence for the message
        and the step `last` now points at (None when no checkpoint is left)."""
        # This trajectory's checkpoints only: after a resume from an older step, later ones of the run's earlier
        # trajectory did not lead into this divergence.
        on_disk = saved_steps(self.root.parent)
        suspect = [step for step in on_disk if step >= first_suspect and step in self._saved_steps]
        remaining = [step for step in on_disk if step < first_suspect]
        moved = ", ".join(f"{DIVERGED_PREFIX}{step_name(step)}" for step in suspect)
        if self.fabric.global_rank == 0:
            for step in suspect:
                os.replace(self.root / step_name(step), self.root / f"{DIVERGED_PREFIX}{step_name(step)}")
            for link in ("last", "best"):
                path = self.root / link
                if path.is_symlink() and not path.exists():  # its step was just renamed
                    path.unlink()
                    if link == "last" and remaining:
                        _point_link(path, step_name(max(remaining)))
        self.fabric.barrier()
        kept_as = "checkpoint whose weights led into it is" if len(suspect) == 1 else "checkpoints from it on are"
        set_aside = f"The {kept_as} kept as {moved}. " if suspect else ""
        if remaining:
            return (f"{set_aside}`last` is {step_name(max(remaining))} in {self.root}, saved before the divergence: "
                    "--train.resume auto continues from it.", max(remaining))
        return f"{set_aside}No checkpoint from before the divergence is left: a new run starts afresh.", None

    def has_saved(self, step: int) -> bool:
        return step in self._saved_steps

    def _prune(self) -> None:
        protected = {os.readlink(self.root / link) for link in ("last", "best") if (self.root / link).is_symlink()}
        steps = [step_name(step) for step in saved_steps(self.root.parent)]
        keep = set(steps[-self.keep :]) if self.keep > 0 else set()
        for name in steps:
            if name not in keep and name not in protected:
                remove_whole(self.root / name)

    def _verify(self, directory: Path) -> dict[str, Any]:
        """The manifest and (DeepSpeed) the shards' safety; returns meta.json. (The strategy and rank count were
        checked by tml/train/resume.py before the Fabric existed: check_resume_layout.) A refusal names the newest
        older checkpoint, which the user can resume from instead."""
        try:
            meta = verify_checkpoint(directory)
            if self.deepspeed:
                verify_deepspeed_checkpoint(directory / "deepspeed")  # DeepSpeed itself unpickles without limits
        except (CheckpointError, ZeroCheckpointError) as error:
            raise CheckpointError(f"{error}; {older_checkpoint_advice(directory)}") from error
        return meta

    def load(
        self,
        directory: Path,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        stream,
    ) -> dict[str, Any]:
        """Restore everything saved by save() into the set-up objects.

        Returns the loop state, meta.json and `notices`: lines for rank 0 to print (a changed rank count).
        """
        fabric = self.fabric
        error = meta = None
        if fabric.global_rank == 0:  # the files are shared: one rank checks them for all
            try:
                meta = self._verify(directory)
            except CheckpointError as caught:
                error = str(caught)
            except OSError as caught:  # unreadable (permissions, a stale NFS handle): said on every rank, no hang
                error = f"cannot read checkpoint {directory}: {caught}"
        error, meta = fabric.broadcast((error, meta), src=0)
        if error:
            raise CheckpointError(error)
        # A load brings back the saved groups' settings too (torch's load_state_dict, and DeepSpeed's of its base
        # optimizer): this run's config (a resume's changed weight_decay, betas or muon_momentum, which it lists as
        # changed) is put back over them; the lrs are the schedule's (restore_schedule_step below)
        configured = [{key: value for key, value in group.items() if key not in SCHEDULED_GROUP_KEYS}
                      for group in optimizer.param_groups]
        if self.deepspeed:
            fabric.load(directory / "deepspeed", {"model": model, "optimizer": optimizer})
        else:
            model.load_state_dict(safe_load(directory / "model.pt"))
            optimizer.load_state_dict(safe_load(directory / "optimizer.pt"))
        for group, settings in zip(optimizer.param_groups, configured, strict=True):
            group.update(settings)
        trainer = safe_load(directory / "trainer.pt")
        restore_schedule_step(scheduler, trainer["scheduler"])  # the step count; the curve is this run's config
        if trainer["precision"]:  # empty from a run without a grad scaler (bf16, fp32): a new one starts fresh
            fabric.strategy.precision.load_state_dict(trainer["precision"])
        notices = []
        same_ranks = meta["world_size"] == fabric.world_size
        # Every rank saved the same data position, so rank 0's serves any rank count (BatchStream re-divides it);
        # RNG states belong to one rank each and only carry over rank for rank.
        rank_file = directory / f"rank-{fabric.global_rank if same_ranks else 0:05d}.pt"
        rank_state = safe_load(rank_file)
        try:
            stream.load_state_dict(rank_state["data"])
        except ValueError as error:  # other shards than the checkpoint's: its position means nothing here
            raise CheckpointError(f"{rank_file}: {error}") from error
        if same_ranks:
            restore_rng_state(rank_state["rng"])
        else:
            notices.append(f"{directory} was saved with {meta['world_size']} ranks, this run has {fabric.world_size}: "
                           "the data stream continues from the saved position (rounded down to a whole global batch) "
                           "and RNG states are re-seeded")
        self._saved_steps.add(int(meta["step"]))
        return {"loop": trainer["loop"], "meta": meta, "notices": notices}


class CheckpointWeights(NamedTuple):
    state: dict[str, torch.Tensor]
    config: Config
    directory: Path  # the step directory read, after links and run directories were followed
    step: int


def read_weights(path: str | Path) -> CheckpointWeights:
    """Model weights, config and step of a checkpoint (or a run directory's best/last), for generate/eval/export.

    A DeepSpeed checkpoint is consolidated to one fp32 state dict with DeepSpeed's ZeRO export first. A training
    still running in the same run may prune the checkpoint `last` or `best` pointed at while it is read; the link
    is then followed once more, to the checkpoint that replaced it.
    """
    directory = find_checkpoint(path)
    try:
        return _read_weights(directory)
    except CheckpointError as error:
        if directory.exists():
            raise
        if Path(path).resolve() != directory and (replacement := find_checkpoint(path)) != directory:
            return _read_weights(replacement)
        raise CheckpointError(f"{directory} was removed while it was read: a training still running in this run keeps "
                              "only its newest checkpoints (train.keep_checkpoints); name its `best`, or try again"
                              ) from error


def load_model_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], Config]:
    """read_weights' state dict and config."""
    weights = read_weights(path)
    return weights.state, weights.config


def _read_weights(directory: Path) -> CheckpointWeights:
    meta = verify_checkpoint(directory, only=WEIGHT_FILES)
    config = Config.from_dict(meta["config"])
    if meta.get("deepspeed"):
        try:
            state = fp32_state_dict(directory / "deepspeed")
        except ZeroCheckpointError as error:  # one error type for every caller (generate, eval, export, init_from)
            raise CheckpointError(str(error)) from error
    else:
        state = safe_load(directory / "model.pt")
    return CheckpointWeights(state, config, directory, int(meta["step"]))
