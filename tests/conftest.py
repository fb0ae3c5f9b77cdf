import pytest
import torch

from mgrad_net.networks import MGRADUNet

TINY = dict(features=(4, 8, 16, 32, 64), decoder_channels=8)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_net(**kwargs) -> MGRADUNet:
    """A small-width MGRAD-UNet: the real architecture at a size a CPU test can afford."""
    return MGRADUNet(**{**TINY, **kwargs})


# ---------------------------------------------------------------- MONAI Label's venv, built early

_MONAILABEL_BUILD: dict = {}


def pytest_collection_modifyitems(config, items):
    # the MONAI Label test runs last, so that its venv build (started below) overlaps the rest
    items.sort(key=lambda item: item.get_closest_marker("monailabel") is not None)


def pytest_collection_finish(session):
    """Start building MONAI Label's venv (minutes of pip) in the background as soon as the run is known
    to include the MONAI Label test, or to be followed by it (``MGRAD_MONAILABEL_PREBUILD=1``, as
    ``.ci/run`` sets); the test's fixture then finds it built, or waits on its lock."""
    import os

    prebuild = os.environ.get("MGRAD_MONAILABEL_PREBUILD") == "1"
    if not prebuild and not any(item.get_closest_marker("monailabel") for item in session.items):
        return
    _MONAILABEL_BUILD["prebuild"] = prebuild
    import subprocess

    from tests.test_monailabel import APP, VENV

    VENV.parent.mkdir(parents=True, exist_ok=True)
    log = open(VENV.parent / "monailabel-venv-build.log", "w")
    # at the lowest priority the build takes the CPU time the tests leave idle (about a quarter of
    # two cores here: subprocess start-ups, file I/O) instead of slowing them
    _MONAILABEL_BUILD["proc"] = subprocess.Popen(
        ["nice", "-n", "19", "bash", str(APP / "setup_venv.sh"), str(VENV)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    _MONAILABEL_BUILD["log"] = log


def pytest_sessionfinish(session, exitstatus):
    proc = _MONAILABEL_BUILD.get("proc")
    if proc is not None and proc.poll() is None and not _MONAILABEL_BUILD.get("prebuild"):
        # the run ended before the test needed it (-x, interrupt): a build without its stamp is redone next
        # time; a prebuild goes on, for the MONAI Label run that follows and waits on its lock
        import os
        import signal

        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
    if "log" in _MONAILABEL_BUILD:
        _MONAILABEL_BUILD["log"].close()
