"""Where inference writes its segmentations, and what it refuses to do there.

- One output per input: ``<output_dir>/<folder>/<name>_<postfix>.nii.gz``, where ``<folder>`` is the
  input's folder relative to the folder that holds all the inputs (:func:`input_root`). Inputs in
  one folder give a flat ``output_dir``; ``site1/image.nii.gz`` and ``site2/image.nii.gz`` give
  ``site1/image_seg.nii.gz`` and ``site2/image_seg.nii.gz``. Names follow MONAI's ``SaveImage``
  (``FolderLayout``), which :func:`planned_outputs` calls, so the check and the writer agree.
- Before anything is written (:func:`check_no_overwrite`): two inputs that would still share an
  output, an output that is one of the input images, or an output path where any file already
  exists (a label ``case_seg.nii.gz`` beside ``case.nii.gz``, an earlier run's output) stop the
  run, naming the files. Existing files are replaced only with ``overwrite=True``
  (``--overwrite true``); input images never.
- :func:`prepare_outputs` then removes the hidden temporary files (``.<output>.<hex>.tmp.nii.gz``)
  that an interrupted run left beside the outputs it is about to write.
- :class:`SaveSegmentationd` writes each label map atomically with the input's spatial shape
  ``(H, W, Z)``: the channel is dropped, a single slice is kept; a full disk is reported as
  :class:`~mgrad_net.errors.NoSpaceLeftError` naming the folder.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from monai.data import FolderLayout
from monai.transforms import SaveImaged

from mgrad_net.errors import NoSpaceLeftError, OverwriteRefusedError
from mgrad_net.io import AtomicNibabelWriter, is_atomic_leftover

__all__ = [
    "input_root",
    "datalist_root",
    "planned_outputs",
    "check_no_overwrite",
    "prepare_outputs",
    "SegmentationWriter",
    "SaveSegmentationd",
]

_EXT = ".nii.gz"


def input_root(items: Sequence[dict], key: str = "image") -> str:
    """The deepest folder that holds every input (``SaveImage``'s ``data_root_dir``); ``""`` for none."""
    folders = [os.path.dirname(os.path.abspath(os.path.expanduser(str(item[key])))) for item in items if item.get(key)]
    return os.path.commonpath(folders) if folders else ""


def datalist_root(dataset_dir: str | os.PathLike, datalist: str | os.PathLike | None, section: str) -> str:
    """:func:`input_root` of a data set's section, read without side effects (the synthetic default
    is not written); ``""`` where the data set cannot be read (the run's validation says why).

    The configs give this to the saver, which MONAI Label also instantiates, outside any run.
    """
    from mgrad_net.data.datalist import load_datalist

    try:
        return input_root(load_datalist(dataset_dir, datalist, section))
    except (OSError, ValueError):
        return ""


def planned_outputs(
    items: Sequence[dict], output_dir: str | os.PathLike, postfix: str, data_root_dir: str = "", key: str = "image"
) -> list[Path]:
    """The file each input's segmentation goes to, as ``SaveSegmentationd`` with the same arguments names it."""
    layout = FolderLayout(
        output_dir=str(Path(output_dir).expanduser()), postfix=postfix, extension=_EXT, parent=False,
        makedirs=False, data_root_dir=data_root_dir,
    )  # fmt: skip
    return [Path(os.path.abspath(layout.filename(subject=str(item[key])))) for item in items]


def _read_as_label(target: Path) -> Path | None:
    """The image ``target`` would be paired with as its label (``X_seg.nii.gz`` beside ``X.nii.gz``,
    :func:`mgrad_net.data.datalist.pair_folder`'s rule), if that image exists."""
    from mgrad_net.data.datalist import LABEL_SUFFIXES

    name = target.name[: -len(_EXT)] if target.name.endswith(_EXT) else target.stem
    for suffix in LABEL_SUFFIXES:
        if name.endswith(suffix):
            for ext in (".nii.gz", ".nii"):
                image = target.with_name(name[: -len(suffix)] + ext)
                if image.is_file():
                    return image
    return None


def check_no_overwrite(
    items: Sequence[dict],
    output_dir: str | os.PathLike,
    postfix: str,
    key: str = "image",
    overwrite: bool = False,
    data_root_dir: str = "",
) -> list[Path]:
    """Refuse an inference run that would lose a file; return the outputs it will write.

    Args:
        items: the datalist's items; their images are the inputs, never replaced. A label beside
            them is like any other existing file: replaced only with ``overwrite``.
        output_dir, postfix, data_root_dir: as given to ``SaveSegmentationd``.
        key: the items' image key.
        overwrite: replace files that exist at the output paths (never an input).

    Raises:
        OverwriteRefusedError: listing, one line each, every output that two inputs share, that is an
            input, that lies outside ``output_dir``, that would be read as an image's label (beside
            it, named with a label suffix), or (without ``overwrite``) that exists already.
    """
    out = Path(output_dir).expanduser().resolve()
    outputs = planned_outputs(items, output_dir, postfix, data_root_dir, key)
    inputs = {Path(str(item[key])).expanduser().resolve() for item in items}
    problems, existing, seen = [], [], {}
    for item, target in zip(items, outputs):
        source = str(item[key])
        resolved = target.resolve()
        if resolved in seen:
            problems.append(f"{target}: the output of both {seen[resolved]} and {source}")
            continue
        seen[resolved] = source
        if out != resolved and out not in resolved.parents:
            problems.append(f"{target}: the output of {source} lies outside output_dir {str(out)!r}")
        elif resolved in inputs:
            problems.append(f"{target}: would overwrite its own input (the output of {source})")
        elif _read_as_label(target):
            problems.append(
                f"{target}: would lie beside {_read_as_label(target)} named as its label, so evaluation and "
                f"training there would read the prediction as ground truth (the output of {source})"
            )
        elif os.path.lexists(target):
            existing.append(f"{target}: exists (the output of {source} would replace it)")
    if existing and not overwrite:
        problems += existing
    if problems:
        hint = "pass --overwrite true to replace existing files, " if existing and not overwrite else ""
        raise OverwriteRefusedError(
            f"inference refuses to write to {str(out)!r}; nothing was written:\n" + "\n".join(problems) + "\n"
            f"({hint}choose another output_dir or output_postfix; inputs are never overwritten)"
        )
    return outputs


def prepare_outputs(
    items: Sequence[dict],
    output_dir: str | os.PathLike,
    postfix: str,
    overwrite: bool = False,
    data_root_dir: str = "",
    key: str = "image",
) -> list[Path]:
    """:func:`check_no_overwrite`, then remove the temporary files that an interrupted run left beside
    the outputs this run writes (the ``atomic_path`` pattern ``.<output>.<hex>.tmp.nii.gz``, nothing else)."""
    outputs = check_no_overwrite(items, output_dir, postfix, key=key, overwrite=overwrite, data_root_dir=data_root_dir)
    removed = []
    for target in outputs:
        if not target.parent.is_dir():
            continue
        for path in target.parent.glob(f".{target.name}.*.tmp{_EXT}"):
            if is_atomic_leftover(path) and path.name.startswith(f".{target.name}."):
                path.unlink()
                removed.append(str(path))
    if removed:
        logging.getLogger("mgrad_net").warning(
            "removed %d temporary file(s) left by an interrupted run: %s", len(removed), "; ".join(removed)
        )
    return outputs


class SegmentationWriter(AtomicNibabelWriter):
    """An atomic NIfTI writer that keeps every spatial axis: the single channel of a label map is
    dropped, and nothing else, so an ``H×W×1`` input gives an ``H×W×1`` output (MONAI's
    ``squeeze_end_dims`` would give ``H×W``) and an ``H×W×Z×1`` one gives ``H×W×Z``."""

    def set_data_array(self, data_array, channel_dim: int | None = 0, squeeze_end_dims: bool = True, **kwargs) -> None:
        super().set_data_array(data_array, channel_dim=channel_dim, squeeze_end_dims=False, **kwargs)
        if self.data_obj.ndim > 3 and self.data_obj.shape[-1] == 1:  # channel last after the conversion
            self.data_obj = self.data_obj[..., 0]


def _is_no_space(error: BaseException) -> bool:
    """Whether a writer failed for a full disk. MONAI's ``SaveImage`` catches every writer error and
    raises ``RuntimeError('... cannot find a suitable writer ...')`` carrying the writer's traceback
    only as text, so that text is read when the chain holds no ``ENOSPC`` error."""
    seen = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError) and current.errno == errno.ENOSPC:
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return f"[Errno {errno.ENOSPC}]" in str(error) or NoSpaceLeftError.__name__ in str(error)


class SaveSegmentationd(SaveImaged):
    """``SaveImaged`` for the bundle's label maps: :class:`SegmentationWriter` by default (atomic,
    spatial shape kept), one file per input (``separate_folder=False``; give ``data_root_dir`` to keep
    the inputs' folders), and a full disk raised as :class:`~mgrad_net.errors.NoSpaceLeftError`
    naming the folder instead of MONAI's "cannot find a suitable writer".
    """

    def __init__(
        self,
        keys,
        output_dir: str | os.PathLike = "./",
        writer=SegmentationWriter,
        separate_folder: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(keys, output_dir=output_dir, writer=writer, separate_folder=separate_folder, **kwargs)
        self.output_dir = str(output_dir)

    def __call__(self, data):
        try:
            return super().__call__(data)
        except RuntimeError as err:
            if not _is_no_space(err):
                raise
            raise NoSpaceLeftError(
                errno.ENOSPC, f"no space left on {self.output_dir}: free space there or choose another output_dir"
            ) from err
