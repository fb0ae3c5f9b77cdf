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

Requests are text from the network, and MONAI's config parser evaluates text that starts with
``$``: every request field MONAI Label passes on to the bundle is typed and checked first
(``mgrad_net.serving``), and a request that fails is answered with HTTP 422 before anything runs.
The training and batch-inference routes run in background processes, so the app puts a checked
copy of each in front of MONAI Label's own when the server starts (:meth:`MGRADApp.server_mode`);
inference is checked in :meth:`MGRADApp.infer`. The tasks check again where they run.
MONAI Label listens on every interface without authentication by default: bind it to
``--host 127.0.0.1`` or turn on its own authentication (README, "MONAI Label").
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any, Dict, Optional

import monailabel
import numpy as np
from fastapi import Depends, HTTPException
from fastapi.routing import APIRoute
from monailabel.config import settings
from monailabel.endpoints import batch_infer as batch_infer_endpoint
from monailabel.endpoints import train as train_endpoint
from monailabel.endpoints.batch_infer import BatchInferImageType
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random
from monailabel.tasks.infer.bundle import BundleInferTask
from monailabel.tasks.train.bundle import BundleTrainTask
from monailabel.utils.others.generic import strtobool

from mgrad_net.serving import RequestError, check_infer_request, check_train_request, refuse_expressions

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
    try:
        refuse_expressions(overrides, "bundle_overrides")
    except RequestError as err:
        raise ValueError(f"bundle_overrides {path}: {err}; give plain values") from None
    return overrides


def _refused(err: RequestError) -> HTTPException:
    return HTTPException(status_code=422, detail=str(err))


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

    def __call__(self, request, datastore):
        # checked again where the training runs (a background process): nothing unchecked goes on
        request = check_train_request(request, os.path.join(self.bundle_path, "models"))
        return super().__call__(request, datastore)

    def _fetch_datalist(self, request, datastore):
        datalist = super()._fetch_datalist(request, datastore)
        refuse_expressions(datalist, "datastore")  # file names become config values too
        return datalist

    def _update_overrides(self, overrides):
        overrides.update(self._overrides)
        overrides["ckpt_dir"] = os.path.join(self.bundle_path, "models")
        # a training stopped from MONAI Label is not resumed from it: a new request replaces its checkpoint
        overrides["discard_unfinished_run"] = True
        # every value that came from the request or the datastore, as it goes to the parser
        refuse_expressions({k: v for k, v in overrides.items() if k != "train#handlers"}, "overrides")
        loaders = [h for h in overrides.get("train#handlers", []) if h.get("_target_") == "CheckpointLoader"]
        refuse_expressions([h.get("load_path") for h in loaders], "model_filename")
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

    # ------------------------------------------------------------ requests, checked

    def _models_dir(self) -> str:
        return os.path.join(self.bundle, "models")

    def check_train(self, request: Dict[str, Any]) -> Dict[str, Any]:
        """The training request typed, or HTTP 422 naming the field."""
        try:
            return check_train_request(request, self._models_dir(), self._trainers.keys())
        except RequestError as err:
            raise _refused(err) from None

    def check_infer(self, request: Dict[str, Any]) -> Dict[str, Any]:
        """The inference request typed, or HTTP 422 naming the field."""
        try:
            return check_infer_request(request, self._models_dir())
        except RequestError as err:
            raise _refused(err) from None

    def infer(self, request, datastore=None):
        return super().infer(self.check_infer(request), datastore)

    def batch_infer(self, request, datastore=None):
        return super().batch_infer(self.check_infer(request), datastore)

    def train(self, request):
        return super().train(self.check_train(request))

    def server_mode(self, mode: bool):
        super().server_mode(mode)
        if mode:
            self._guard_background_routes()

    def _guard_background_routes(self) -> None:
        """Put checked copies of MONAI Label's training and batch-inference routes in front of its
        own (same paths, parameters and roles): those requests run in a background process, so
        without this a refused request would still be answered 200 and fail out of sight."""
        server = sys.modules.get("monailabel.app")
        if server is None:  # not the HTTP server (a background task's process)
            return
        app = self
        admin = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN))

        async def train_model(
            model: str,
            params: Optional[dict] = None,
            run_sync: Optional[bool] = False,
            enqueue: Optional[bool] = False,
            user: User = admin,
        ):
            app.check_train({**(params or {}), "model": model})
            return train_endpoint.run_model(model, params, run_sync, enqueue)

        async def train_all(params: Optional[dict] = None, run_sync: Optional[bool] = False, user: User = admin):
            for model, model_params in (params or {}).items():
                app.check_train({**(model_params if isinstance(model_params, dict) else {"params": model_params}),
                                 "model": model})  # fmt: skip
            return train_endpoint.run(params, run_sync)

        async def batch_infer(
            model: str,
            images: Optional[BatchInferImageType] = BatchInferImageType.IMAGES_ALL,
            params: Optional[dict] = None,
            run_sync: Optional[bool] = False,
            user: User = admin,
        ):
            app.check_infer({**(params or {}), "model": model})
            return batch_infer_endpoint.run(model, images, params, run_sync)

        prefix = settings.MONAI_LABEL_API_STR
        server.app.router.routes[:0] = [
            APIRoute(f"{prefix}/train/{{model}}", train_model, methods=["POST"]),
            APIRoute(f"{prefix}/train/", train_all, methods=["POST"]),
            APIRoute(f"{prefix}/batch/infer/{{model}}", batch_infer, methods=["POST"]),
        ]
        logger.info("+++ Training and batch-inference requests are checked before they run")
