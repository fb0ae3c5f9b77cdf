"""A MONAI Label app that serves this repository's MGRAD-UNet bundle (``bundle/``) as it is.

    monailabel start_server --app scripts/monailabel --studies /path/to/volumes \
        [--conf bundle /path/to/bundle] [--conf bundle_overrides overrides.json] [--conf skip_trainers true]

It is MONAI Label's "monaibundle" sample reduced to one local bundle: the stock
``BundleInferTask`` and ``BundleTrainTask`` read ``configs/inference.json``,
``configs/train.json`` and ``configs/metadata.json`` unmodified, so nothing is downloaded (no model
zoo). Conf options (``--conf KEY VALUE``):

- ``bundle``: the bundle folder (default: ``bundle/`` of the repository holding this app). Its
  ``models/model.pt`` is what inference loads, and what training from MONAI Label replaces (the
  previous one is kept as ``models/model_before_<time>.pt``).
- ``bundle_overrides``: a JSON file of config ids and values applied to both the inference and the
  training config, e.g. ``{"network_def#features": [8, 16, 32, 64, 128], "roi_size": [96, 96]}``
  for weights trained at that width. A relative path is taken from the bundle folder.
- ``model_name``: the name MONAI Label shows (default ``mgrad_unet``).
- ``skip_trainers``: ``true`` serves inference only.
- ``preload``: ``true`` loads the weights when the server starts.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict

import monailabel
import numpy as np
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random
from monailabel.tasks.infer.bundle import BundleInferTask
from monailabel.tasks.train.bundle import BundleTrainTask
from monailabel.utils.others.generic import strtobool

logger = logging.getLogger(__name__)

DEFAULT_BUNDLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir, "bundle")


def load_overrides(bundle: str, path: str | None) -> Dict[str, Any]:
    """The ``bundle_overrides`` JSON file as a dict of config id -> value ({} when not given)."""
    if not path:
        return {}
    path = path if os.path.isabs(path) else os.path.join(bundle, path)
    with open(path) as f:
        overrides = json.load(f)
    if not isinstance(overrides, dict):
        raise ValueError(f"bundle_overrides {path}: expected a JSON object of config id -> value")
    return overrides


class MGRADInferTask(BundleInferTask):
    """MONAI Label's bundle inference, with the app's config overrides applied."""

    def __init__(self, path: str, conf: Dict[str, str], overrides: Dict[str, Any], **kwargs):
        self._overrides = overrides
        super().__init__(path, conf, **kwargs)
        # metadata.json describes the 2D network's input; the task itself takes whole volumes
        # (the bundle's SliceInferer runs the network over every axial slice)
        self.dimension = 3

    def _load_bundle_config(self, path, config):
        parser = super()._load_bundle_config(path, config)
        for k, v in self._overrides.items():
            parser[k] = v
        return parser

    def writer(self, data, extension=None, dtype=None):
        # label maps as uint8, as the bundle writes them (MONAI Label's default is float32),
        # unless the request asks for a dtype (``result_dtype``)
        if dtype is None and not data.get("result_dtype"):
            dtype = np.uint8
        return super().writer(data, extension, dtype)


class MGRADTrainTask(BundleTrainTask):
    """MONAI Label's bundle training, with the app's config overrides applied.

    ``ckpt_dir`` is pinned to ``<bundle>/models``: the best weights of a run must land where
    inference loads them (``models/model.pt``), whatever an override file says.
    """

    def __init__(self, path: str, conf: Dict[str, str], overrides: Dict[str, Any]):
        self._overrides = overrides
        super().__init__(path, conf)

    def _load_bundle_config(self, path, config):
        parser = super()._load_bundle_config(path, config)
        for k, v in self._overrides.items():
            parser[k] = v
        return parser

    def _update_overrides(self, overrides):
        overrides.update(self._overrides)
        overrides["ckpt_dir"] = os.path.join(self.bundle_path, "models")
        return overrides


class MGRADApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        self.bundle = os.path.realpath(conf.get("bundle") or DEFAULT_BUNDLE)
        if not os.path.isfile(os.path.join(self.bundle, "configs", "inference.json")):
            raise FileNotFoundError(
                f"no bundle at {self.bundle} (configs/inference.json missing); set --conf bundle PATH"
            )
        self.overrides = load_overrides(self.bundle, conf.get("bundle_overrides"))
        self.model_name = conf.get("model_name", "mgrad_unet")
        logger.info(f"+++ Serving bundle {self.bundle} as '{self.model_name}'; overrides: {self.overrides}")
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name=f"MGRAD-UNet bundle (MONAI Label {monailabel.__version__})",
            description="MGRAD-UNet cardiac short-axis MRI segmentation, served from the mgrad-net MONAI bundle",
            version=monailabel.__version__,
        )

    def init_infers(self) -> Dict[str, InferTask]:
        task = MGRADInferTask(self.bundle, self.conf, self.overrides)
        if not task.is_valid():
            logger.warning(
                f"+++ No inference: {self.bundle}/models/model.pt is missing. Train the bundle first "
                "(or from MONAI Label), then restart the server."
            )
            return {}
        logger.info(f"+++ Adding Inferer:: {self.model_name} => {task}")
        return {self.model_name: task}

    def init_trainers(self) -> Dict[str, TrainTask]:
        if strtobool(self.conf.get("skip_trainers", "false")):
            return {}
        task = MGRADTrainTask(self.bundle, self.conf, self.overrides)
        if not task.is_valid():
            return {}
        logger.info(f"+++ Adding Trainer:: {self.model_name} => {task}")
        return {self.model_name: task}

    def init_strategies(self) -> Dict[str, Strategy]:
        return {"random": Random(), "first": First()}
