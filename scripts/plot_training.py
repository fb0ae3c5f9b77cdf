"""Training curves of a bundle training run as a PNG: loss, and validation Dice per class.

Reads the ``training_log.csv`` that training writes in its ``output_dir`` (one row per epoch, see
``mgrad_net.handlers.TrainingLog``) and writes the PNG atomically (see
``mgrad_net.visualize.plot_training_log``)::

    python scripts/plot_training.py bundle/eval/training_log.csv /tmp/training.png
    python scripts/plot_training.py bundle/eval/training_log.csv /tmp/training.png --title="quick, 8 epochs"
"""

from __future__ import annotations

import fire

from mgrad_net.visualize import plot_training_log


def main(csv: str, png: str, title: str | None = None, dpi: int = 100) -> str:
    """Plots ``csv`` (a training log) into ``png``; returns the PNG's path (fire prints it).

    Args:
        csv: the training log CSV.
        png: the PNG file to write.
        title: the figure's title (default: the CSV's path).
        dpi: pixels per inch (the figure is 11×4 inches).
    """
    return str(plot_training_log(csv, png, title=title, dpi=dpi))


if __name__ == "__main__":
    fire.Fire(main)
