"""What the bundle's configs call: command-line switches as booleans, and the training run.

``python -m monai.bundle run … --amp false`` hands the config the text ``'false'``: fire turns only
``True``/``False`` into bools, and a non-empty string is true in Python. The configs turn their
switches into bools where they use them, with MONAI's ``monai.utils.str2bool``; a component whose
boolean arguments may be overridden on the command line (``--network_def#use_rfb false``) is built
through :func:`parse_switches`. Engines and networks are given bools only.

:func:`run_training` is the ``run`` of ``train.json`` (and so of ``multi_gpu_train.json``, merged
after it): the checkpoint handling that needs the trainer to exist, then the training itself.
What can be checked before that is checked in the config's ``initialize``, before anything is
cached, trained or written: :func:`check_training_cases` and :func:`start_checkpoint`.
:func:`report_outputs` ends a run by saying where its files went.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import torch
from ignite.engine import Engine
from monai.handlers import CheckpointLoader, CheckpointSaver
from monai.networks.utils import copy_model_state
from monai.utils import str2bool

from mgrad_net.checkpoints import check_weights, earlier_run, load_checkpoint, resume_checkpoint
from mgrad_net.engines import TrainingBudget
from mgrad_net.handlers import BestMetricRecord
from mgrad_net.io import checkpoints_newest_first

__all__ = [
    "parse_switches",
    "check_training_cases",
    "start_checkpoint",
    "run_training",
    "announce_data",
    "report_outputs",
]

T = TypeVar("T")


def _as_bool(value: object, name: str) -> bool:
    """``value`` as a bool: a bool as it is; text (or the integers fire makes of ``1`` and ``0``)
    through ``monai.utils.str2bool`` (true/false, yes/no, t/f, y/n, 1/0, any case).

    Raises:
        ValueError: naming ``name``, for anything else (a misspelt ``--amp ture`` must not pass).
    """
    if isinstance(value, bool):
        return value
    try:
        return str2bool(str(value))
    except ValueError:
        raise ValueError(f"{name} must be true or false, got {value!r}.") from None


def parse_switches(component: Callable[..., T]) -> Callable[..., T]:
    """``component``, taking its boolean parameters as the command line writes them.

    For a config's ``_target_`` (MONAI calls a callable target with the component's arguments):
    ``"$mgrad_net.config.parse_switches(mgrad_net.networks.MGRADUNet)"``. Every keyword argument
    for a parameter whose default is a bool goes through ``monai.utils.str2bool`` before
    ``component`` is called, so ``--network_def#channels_last false`` turns the option off
    instead of on; other text raises, naming the parameter. A module built from keyword
    arguments keeps them as ``init_args``, for :class:`mgrad_net.checkpoints.RunRecord`.
    """
    switches = {name for name, p in inspect.signature(component).parameters.items() if isinstance(p.default, bool)}

    @functools.wraps(component, updated=())
    def build(*args: Any, **kwargs: Any) -> T:
        for name in switches & kwargs.keys():
            kwargs[name] = _as_bool(kwargs[name], name)
        built = component(*args, **kwargs)
        if isinstance(built, torch.nn.Module) and not args:
            # the arguments as built, for the checkpoint's record of what network it holds (RunRecord)
            built.init_args = dict(kwargs)
        return built

    return build


def check_training_cases(items: Sequence[dict], dataset_dir: str | os.PathLike, datalist: str | os.PathLike) -> int:
    """The number of training cases; an error naming the datalist when there are none (MONAI's
    shuffling sampler would stop on ``num_samples=0`` instead).

    Raises:
        DataValidationError: ``no training cases in <datalist>``.
    """
    from mgrad_net.data.validation import DataValidationError

    if not items:
        where = (
            datalist
            if Path(datalist).expanduser().is_file()
            else f"{dataset_dir} (its training/ folder or the folder itself)"
        )
        raise DataValidationError(
            f"no training cases in {where}: its 'training' section is empty; nothing was trained or written."
        )
    return len(items)


def start_checkpoint(
    ckpt_dir: str | os.PathLike,
    network: torch.nn.Module,
    finetune: bool = False,
    resume: bool = False,
    weights: str | None = None,
    discard_unfinished: bool = False,
) -> str | None:
    """The file a training run starts from, loaded and matched against ``network`` up front:
    with ``resume`` the newest ``checkpoint_epoch=N.pt`` in ``ckpt_dir`` that loads
    (:func:`mgrad_net.checkpoints.resume_checkpoint`), with ``finetune`` the ``weights``
    (:func:`mgrad_net.checkpoints.check_weights`; another class set passes, its output layers then
    start fresh), else ``None``: from scratch. A new run (not ``resume``) is refused where an
    unfinished run's checkpoint is (:func:`mgrad_net.checkpoints.earlier_run`).

    Raises:
        CheckpointError: in one line, naming the file: missing, empty, truncated, or of another
            network (as its record names it); no checkpoint to resume from; an
            unfinished run a new one would end.
    """
    if resume:
        return resume_checkpoint(ckpt_dir, network)
    earlier_run(ckpt_dir, discard_unfinished=discard_unfinished)
    if finetune:
        if not weights:
            raise ValueError("finetune needs the path of the weights to start from.")
        return check_weights(weights, network, new_classes=True)
    return None


def run_training(
    trainer: Engine,
    saver: CheckpointSaver | None = None,
    finetune: bool = False,
    resume: bool = False,
    weights: str | None = None,
    start_from: str | None = None,
) -> None:
    """Attach the run's checkpoint handling to ``trainer``, then run it.

    Args:
        trainer: the training engine (its ``network`` and ``state.device`` are used for loading).
        saver: the ``CheckpointSaver`` of the resumable state. It saves the trainer itself, so it
            is attached here rather than among the trainer's handlers. Under DDP every process
            attaches it and Ignite writes on rank 0 only.
        finetune: start from the model weights in ``weights`` (ignored when resuming).
        resume: continue from the newest ``checkpoint_epoch=N.pt`` in ``saver.save_dir`` that
            loads, restoring every object of ``saver.save_dict``: epoch count, optimizer, LR
            schedule, best-metric record.
        weights: the state dict ``finetune`` starts from.
        start_from: the file :func:`start_checkpoint` chose and checked in the config's
            ``initialize``; chosen here when not given.

    Raises:
        TypeError: ``finetune`` or ``resume`` is not a bool (text such as ``'false'`` is truthy;
            the config turns command-line text into bools with ``monai.utils.str2bool``).
        ValueError: ``resume`` without a ``saver``, or ``finetune`` without ``weights``.
        CheckpointError: the file to start from is missing, broken or of another architecture.
    """
    for name, value in (("finetune", finetune), ("resume", resume)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {value!r}; convert command-line text in the config.")
    if resume and saver is None:
        raise ValueError("resume needs the checkpoint saver whose files it continues from.")
    if start_from is None and (resume or finetune):
        ckpt_dir = saver.save_dir if saver is not None else "."
        start_from = start_checkpoint(ckpt_dir, trainer.network, finetune=finetune, resume=resume, weights=weights)
    if saver is not None:
        saver.attach(trainer)
        # what is left in the folder is this run's to replace: the checkpoint it resumes, or an
        # earlier run's that start_checkpoint let through (finished, or discard_unfinished)
        if hasattr(saver, "supersede"):
            saver.supersede(checkpoints_newest_first(saver.save_dir))
        for obj in saver.save_dict.values():
            if isinstance(obj, BestMetricRecord) and resume:
                obj.resumed_from = Path(start_from)
    device = trainer.state.device
    if resume:
        CheckpointLoader(
            load_path=start_from, load_dict=_saved_part(saver.save_dict, start_from), map_location=device
        ).attach(trainer)
    elif finetune:
        # every tensor whose name and shape fit; the output layers of another class set start fresh
        # (check_weights named them). Not CheckpointLoader(strict_shape=False): MONAI 1.6.1 hands
        # copy_model_state the whole file instead of its "model" entry, and nothing loads.
        state = load_checkpoint(start_from, "weights")
        network = getattr(trainer.network, "module", trainer.network)  # DistributedDataParallel
        _, loaded, fresh = copy_model_state(network, state["model"] if "model" in state else state, inplace=True)
        logging.getLogger("mgrad_net").info(
            "fine-tuning from %s: %d of %d tensors loaded%s", start_from, len(loaded), len(loaded) + len(fresh),
            f"; fresh: {', '.join(fresh)}" if fresh else "")  # fmt: skip
    trainer.run()


def _saved_part(save_dict: dict[str, Any], path: str) -> dict[str, Any]:
    """``save_dict`` less a training budget that the checkpoint at ``path`` holds no state for: it
    was saved before the budget was part of the resumable state (bundle 0.8.3), and that budget
    starts over from the resumed epoch, as it did then. Every other object must be in the file."""
    saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True).keys()  # keys only: tensors stay on disk
    missing = [k for k, v in save_dict.items() if isinstance(v, TrainingBudget) and k not in saved]
    if missing:
        logging.getLogger("mgrad_net").warning(
            "%s holds no training-budget state (saved before 0.8.3): the budget starts over from the resumed epoch",
            path,
        )
    return {k: v for k, v in save_dict.items() if k not in missing}


def _on_phantoms(dataset_dir: str | os.PathLike | None, synthetic_dir: str | os.PathLike | None) -> bool:
    if not dataset_dir or not synthetic_dir:
        return False
    return Path(dataset_dir).expanduser().resolve() == Path(synthetic_dir).expanduser().resolve()


def announce_data(dataset_dir: str | os.PathLike, synthetic_dir: str | os.PathLike) -> None:
    """A run's first line when it runs on the embedded synthetic phantoms: no ``--dataset_dir`` was given."""
    if _on_phantoms(dataset_dir, synthetic_dir):
        logging.getLogger("mgrad_net").warning(
            "no --dataset_dir given: this run uses the embedded synthetic phantoms in %s, not your data", dataset_dir
        )


def report_outputs(dataset_dir: str | None = None, synthetic_dir: str | None = None, **places: str) -> None:
    """Print, as a run's last lines, where its outputs are (``name=path``; those that exist), and,
    where the run used the embedded synthetic phantoms (``dataset_dir`` is ``synthetic_dir``), say so.

    ``train.json`` names the weights, the training log and the TensorBoard folder;
    ``inference.json`` the segmentations' folder; ``evaluate.json`` the report and pictures."""
    lines = [
        f"  {name.replace('_', ' ')}: {os.path.abspath(path)}" for name, path in places.items() if os.path.exists(path)
    ]
    if lines:
        print("outputs:\n" + "\n".join(lines), flush=True)
    if _on_phantoms(dataset_dir, synthetic_dir):
        print(f"(from the embedded synthetic phantoms in {dataset_dir}, not your data: pass --dataset_dir)", flush=True)
