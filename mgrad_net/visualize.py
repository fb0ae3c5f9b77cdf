"""Pictures of what the bundle does: overlays of segmentations on their images, training curves.

Drawn with matplotlib's Agg canvas on :class:`matplotlib.figure.Figure` objects, never through
``pyplot``: no display is needed, no global figure state is kept between calls (an evaluation
draws one figure per case), and the bundle's process can be headless.

Colours are fixed per class index (:data:`CLASS_COLOURS`), the same in every picture and curve:
class 1 (ACDC's right ventricle) red, 2 (myocardium) green, 3 (left ventricle) blue, then
yellow, orange, purple, cyan, magenta, lime, pink (Synapse's eight organs use 1–8).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from ignite.engine import Engine, Events

from mgrad_net.handlers import read_training_log
from mgrad_net.io import atomic_path

__all__ = [
    "CLASS_COLOURS",
    "class_colour",
    "overlay_rgb",
    "foreground_slices",
    "case_figure",
    "write_case_picture",
    "plot_training_log",
    "OverlayPictures",
]

logger = logging.getLogger("mgrad_net")

#: RGB (0–255) of classes 1, 2, 3, …; class ``c`` has ``CLASS_COLOURS[(c - 1) % len(CLASS_COLOURS)]``.
CLASS_COLOURS: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75),  # 1 right ventricle: red
    (60, 180, 75),  # 2 myocardium: green
    (0, 130, 200),  # 3 left ventricle: blue
    (255, 225, 25),  # yellow
    (245, 130, 48),  # orange
    (145, 30, 180),  # purple
    (70, 240, 240),  # cyan
    (240, 50, 230),  # magenta
    (210, 245, 60),  # lime
    (250, 190, 212),  # pink
)

_NIFTI_SUFFIXES = (".nii.gz", ".nii", ".gz")


def class_colour(index: int) -> tuple[int, int, int]:
    """The RGB (0–255) colour of foreground class ``index`` (1, 2, …)."""
    if index < 1:
        raise ValueError(f"class_colour: background (0) has no colour; got class {index}.")
    return CLASS_COLOURS[(index - 1) % len(CLASS_COLOURS)]


def _case_name(filename: str) -> str:
    name = Path(str(filename)).name
    for suffix in _NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem or name


def _display_range(image: np.ndarray, lower: float = 0.5, upper: float = 99.5) -> np.ndarray:
    """``image`` scaled to [0, 1] between its percentiles, so one bright voxel cannot darken the rest."""
    image = np.asarray(image, dtype=np.float32)
    finite = image[np.isfinite(image)]
    if finite.size == 0:
        return np.zeros_like(image)
    lo, hi = np.percentile(finite, [lower, upper])
    if hi <= lo:
        return np.zeros_like(image)
    return np.clip((np.nan_to_num(image, nan=lo) - lo) / (hi - lo), 0.0, 1.0)


def overlay_rgb(image: np.ndarray, labels: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """One slice in grey with its labels blended in the class colours.

    Args:
        image: H×W intensities in [0, 1] (values outside are clipped).
        labels: H×W class indices; 0 is left grey.
        alpha: weight of the class colour: a labelled pixel is ``(1 - alpha)·grey + alpha·colour``.

    Returns:
        H×W×3 ``uint8`` RGB.
    """
    image, labels = np.asarray(image), np.asarray(labels)
    if image.shape != labels.shape or image.ndim != 2:
        raise ValueError(f"overlay_rgb: image {image.shape} and labels {labels.shape} must be the same H×W.")
    grey = np.repeat(np.clip(image, 0.0, 1.0)[..., None].astype(np.float32) * 255.0, 3, axis=-1)
    rgb = grey.copy()
    for c in np.unique(labels):
        if c <= 0:
            continue
        mask = labels == c
        rgb[mask] = (1.0 - alpha) * grey[mask] + alpha * np.asarray(class_colour(int(c)), np.float32)
    return np.round(rgb).astype(np.uint8)


def foreground_slices(labels: np.ndarray, n_slices: int = 3) -> list[int]:
    """Up to ``n_slices`` indices along the last axis of ``labels`` (…×Z), spread through its foreground.

    Taken at the centres of ``n_slices`` equal parts of the labelled slices (for 3: at a sixth,
    half and five sixths), where the structures are large, rather than at the first and last
    labelled slice, where they are a few voxels; all of them where there are no more than
    ``n_slices``. With no foreground, spread over all slices.
    """
    depth = labels.shape[-1]
    other_axes = tuple(range(labels.ndim - 1))
    candidates = np.flatnonzero(np.asarray(labels > 0).any(axis=other_axes)) if labels.ndim > 1 else np.array([])
    if candidates.size == 0:
        candidates = np.arange(depth)
    # bins at least one slice wide give distinct slices
    positions = np.floor((np.arange(min(n_slices, candidates.size)) + 0.5) * candidates.size / n_slices)
    return sorted({int(candidates[int(p)]) for p in positions})


def _in_plane_aspect(affine: np.ndarray | None) -> float:
    """Height/width of one displayed pixel: the spacing of the second voxel axis over the first's."""
    if affine is None:
        return 1.0
    affine = np.asarray(affine, dtype=np.float64)
    sx, sy = (float(np.linalg.norm(affine[:3, i])) for i in (0, 1))
    return sy / sx if sx > 0 and sy > 0 and math.isfinite(sy / sx) else 1.0


def case_figure(
    image: np.ndarray,
    label: np.ndarray | None,
    pred: np.ndarray,
    class_names: Sequence[str],
    title: str = "",
    n_slices: int = 3,
    slices: Sequence[int] | None = None,
    affine: np.ndarray | None = None,
    alpha: float = 0.45,
    panel_inches: float = 3.0,
    dpi: int = 100,
):
    """A figure of a few slices of one case: ground truth overlaid in the top row, prediction below.

    Slices are shown with the first voxel axis to the right and the second upwards, at the
    in-plane spacing of ``affine``. The figure is ``n·panel_inches`` wide and
    ``rows·panel_inches + 1`` high (the inch holds the title and the legend), at ``dpi``.

    Args:
        image: H×W×Z intensities (any range: shown between its 0.5 and 99.5 percentiles).
        label: H×W×Z ground-truth class indices on the image's grid, or None (prediction row only).
        pred: H×W×Z predicted class indices on the image's grid.
        class_names: names of the foreground classes 1, 2, … for the legend.
        title: the figure's title, e.g. the case name.
        n_slices: how many slices, chosen through the ground truth's foreground (else the prediction's).
        slices: the slice indices to show instead.
        affine: the image's affine, for the pixel aspect.
        alpha: weight of the class colours, see :func:`overlay_rgb`.
        panel_inches: size of one slice's panel.
        dpi: pixels per inch of the saved picture.

    Returns:
        a :class:`matplotlib.figure.Figure` on an Agg canvas.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    image, pred = np.asarray(image), np.asarray(pred)
    if label is not None:
        label = np.asarray(label)
    for name, arr in (("label", label), ("pred", pred)):
        if arr is not None and arr.shape != image.shape:
            raise ValueError(f"case_figure: {name} {arr.shape} is not on the image's grid {image.shape}.")
    if image.ndim != 3:
        raise ValueError(f"case_figure: expected H×W×Z volumes, got {image.shape}.")
    if slices is None:
        reference = label if label is not None and (label > 0).any() else pred
        slices = foreground_slices(reference, n_slices)
    slices = list(slices)
    rows = [("ground truth", label), ("prediction", pred)] if label is not None else [("prediction", pred)]

    shown = _display_range(image)
    fig = Figure(figsize=(panel_inches * len(slices), panel_inches * len(rows) + 1.0), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), len(slices), squeeze=False)
    aspect = _in_plane_aspect(affine)
    for r, (row_name, volume) in enumerate(rows):
        for s, z in enumerate(slices):
            ax = axes[r][s]
            # transposed with origin "lower": first voxel axis to the right, second upwards
            rgb = overlay_rgb(shown[:, :, z].T, volume[:, :, z].T, alpha=alpha)
            ax.imshow(rgb, origin="lower", interpolation="nearest", aspect=aspect)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"slice {z}", fontsize=9)
            if s == 0:
                ax.set_ylabel(row_name, fontsize=10)
    handles = [Patch(facecolor=np.asarray(class_colour(i + 1)) / 255.0, label=n) for i, n in enumerate(class_names)]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 5), fontsize=9, frameon=False)
    bottom = 0.6 / (panel_inches * len(rows) + 1.0)
    top = 1.0 - 0.4 / (panel_inches * len(rows) + 1.0)
    fig.subplots_adjust(left=0.04, right=0.99, bottom=bottom, top=top, wspace=0.03, hspace=0.03)
    if title:
        fig.suptitle(title, fontsize=11, y=1.0 - 0.08 / (panel_inches * len(rows) + 1.0), va="top")
    return fig


def _save_png(fig, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    return path


def write_case_picture(
    path: str | Path,
    image: np.ndarray,
    label: np.ndarray | None,
    pred: np.ndarray,
    class_names: Sequence[str],
    title: str = "",
    **kwargs,
) -> Path:
    """:func:`case_figure` written atomically to ``path`` (PNG); returns ``path``.

    Args:
        path: the PNG file.
        image, label, pred, class_names, title: see :func:`case_figure`.
        kwargs: further arguments of :func:`case_figure` (``n_slices``, ``affine``, ``dpi``, …).
    """
    return _save_png(case_figure(image, label, pred, class_names, title=title, **kwargs), path)


def _float(value: str | None) -> float:
    try:
        return float(value) if value not in (None, "") else math.nan
    except ValueError:
        return math.nan


def plot_training_log(csv_path: str | Path, png_path: str | Path, title: str | None = None, dpi: int = 100) -> Path:
    """The training curves of a :class:`mgrad_net.handlers.TrainingLog` CSV as one PNG.

    Left: the mean training loss per epoch. Right: the validation Dice per epoch, mean (black,
    dashed) and per class (``val_dice_<name>`` columns, in class order, so in the class colours of
    the overlays). Epochs without a validation are gaps. 11×4 inches at ``dpi``, written atomically.

    Args:
        csv_path: the ``training_log.csv`` a training run writes in its ``output_dir``.
        png_path: the PNG file to write.
        title: the figure's title (default: the CSV's path).
        dpi: pixels per inch.

    Returns:
        ``png_path``.

    Raises:
        ValueError: the CSV does not exist or has no rows.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = read_training_log(csv_path)
    if not rows:
        raise ValueError(f"plot_training_log: no epochs in {str(csv_path)!r} (missing or empty).")
    epochs = [int(r["epoch"]) for r in rows]
    class_columns = [k for k in rows[0] if k.startswith("val_dice_")]

    fig = Figure(figsize=(11, 4), dpi=dpi)
    FigureCanvasAgg(fig)
    ax_loss, ax_dice = fig.subplots(1, 2)
    # markers, so that a run of one epoch (or isolated validations) still shows its points
    ax_loss.plot(epochs, [_float(r.get("loss")) for r in rows], "o-", color="black", lw=2, ms=4)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss (mean over the epoch)")
    ax_loss.grid(alpha=0.3)
    for i, column in enumerate(class_columns):
        colour = np.asarray(class_colour(i + 1)) / 255.0
        values = [_float(r.get(column)) for r in rows]
        ax_dice.plot(epochs, values, "o-", color=colour, lw=2, ms=4, label=column[len("val_dice_") :])
    mean = [_float(r.get("val_mean_dice")) for r in rows]
    ax_dice.plot(epochs, mean, "s--", color="black", lw=1.5, ms=4, label="mean")
    ax_dice.set_ylim(0.0, 1.02)  # a Dice of 1 stays visible above the frame line
    ax_dice.set_xlabel("epoch")
    ax_dice.set_ylabel("validation Dice")
    ax_dice.grid(alpha=0.3)
    ax_dice.legend(loc="lower right", fontsize=8)
    for ax in (ax_loss, ax_dice):
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(title if title is not None else str(csv_path), fontsize=10)
    fig.tight_layout()
    return _save_png(fig, png_path)


def _to_class_indices(volume: torch.Tensor | np.ndarray) -> np.ndarray:
    """C×H×W×Z one-hot (or scores) → H×W×Z indices; 1×H×W×Z indices → H×W×Z."""
    volume = torch.as_tensor(volume).detach().cpu()
    volume = volume.argmax(0) if volume.shape[0] > 1 else volume[0]
    return volume.numpy().astype(np.int64)


class OverlayPictures:
    """Writes, per evaluated case, a PNG of a few slices with ground truth and prediction overlaid.

    Attach it to a ``SupervisedEvaluator`` whose postprocessing puts the prediction (and the
    label) on the label's grid, as the bundle's does (``Invertd`` back to the input's grid, then
    one-hot). The image in the batch is on the network's resized grid, so the original image is
    read again from the file named in its metadata, with MONAI's ``LoadImage`` as the bundle's
    ``LoadImaged`` read it (same reader, no reorientation): its array is then on the label's grid
    voxel for voxel. A case whose image does not match its prediction's grid is skipped with a
    warning, not failed: a picture is never worth losing the evaluation's metrics.

    The picture of case ``<name>.nii.gz`` is ``<output_dir>/<name>.png`` (see
    :func:`case_figure`), written atomically when the case's iteration completes; a later case of
    the run with the same file name is ``<folder>_<name>.png``.

    Args:
        output_dir: folder of the pictures.
        class_names: names of the foreground classes 1, 2, … (the legend).
        n_slices: slices per picture, spread through the ground truth's foreground.
        image_key: batch key of the image, whose metadata names the file.
        label_key: batch key of the label (leave the row out where it is missing).
        pred_key: output key of the prediction.
        alpha: weight of the class colours.
        dpi: pixels per inch (each slice's panel is 3 inches).
    """

    def __init__(
        self,
        output_dir: str | Path,
        class_names: Sequence[str],
        n_slices: int = 3,
        image_key: str = "image",
        label_key: str = "label",
        pred_key: str = "pred",
        alpha: float = 0.45,
        dpi: int = 100,
    ) -> None:
        from monai.transforms import LoadImage

        self.output_dir = Path(output_dir)
        self.class_names = list(class_names)
        self.n_slices = n_slices
        self.image_key = image_key
        self.label_key = label_key
        self.pred_key = pred_key
        self.alpha = alpha
        self.dpi = dpi
        self._load = LoadImage(image_only=True, ensure_channel_first=True)
        self.written: list[Path] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        # MONAI engines decollate batch and output into lists of per-case dicts; undecollated ones are dicts
        batch, output = engine.state.batch, engine.state.output
        items = batch if isinstance(batch, list) else [batch]
        outputs = output if isinstance(output, list) else [output]
        for item, out in zip(items, outputs):
            self.write(item, out)

    def write(self, item: dict, out: dict) -> Path | None:
        """The picture of one decollated case; returns its path, or None where it was skipped."""
        meta = getattr(item.get(self.image_key), "meta", None) or {}
        filename = meta.get("filename_or_obj")
        if not filename or not isinstance(filename, (str, Path)):
            logger.warning("OverlayPictures: no file name in the %r metadata; no picture.", self.image_key)
            return None
        pred = _to_class_indices(out[self.pred_key])
        label = item.get(self.label_key)
        label = _to_class_indices(label) if label is not None else None
        image = self._load(str(filename))
        affine = getattr(image, "affine", None)
        image = np.asarray(image[0], dtype=np.float32)
        if image.shape != pred.shape or (label is not None and label.shape != pred.shape):
            logger.warning(
                "OverlayPictures: %s has shape %s but its prediction %s (label %s) does not match; no picture.",
                filename, image.shape, pred.shape, None if label is None else label.shape,
            )  # fmt: skip
            return None
        path = self.output_dir / f"{_case_name(str(filename))}.png"
        if path in self.written:  # two cases of this run share a file name: the later one names its folder too
            path = self.output_dir / f"{Path(str(filename)).parent.name}_{path.name}"
            for n in range(2, 10_000):
                if path not in self.written:
                    break
                path = path.with_name(f"{_case_name(str(filename))}_{n}.png")
        path = write_case_picture(
            path, image, label, pred, self.class_names,
            title=Path(str(filename)).name, n_slices=self.n_slices, alpha=self.alpha, dpi=self.dpi,
            affine=None if affine is None else np.asarray(affine),
        )  # fmt: skip
        self.written.append(path)
        return path
