"""Run on a bundle folder the checks the MONAI model zoo's CI runs, offline, and say which pass.

    python scripts/verify_bundle.py bundle

Checks, in order (each prints PASS or FAIL with its reason; the exit status is the number failed):

1. files: the necessary ``configs/metadata.json`` and ``LICENSE``; the preferred
   ``models/model.pt``, ``configs/inference.json`` (or .yaml/.yml) and ``docs/README.md``;
2. changelog: ``version`` is a key of ``changelog`` in metadata.json;
3. json format: every ``configs/*.json`` is written with indent 4 (as ``json.dumps(…, indent=4)``);
4. metadata schema: ``monai.bundle.verify_metadata`` against the schema metadata.json names, read
   from the pinned copy in ``scripts/schemas/`` (nothing downloads here);
5. properties: ``ConfigWorkflow.check_properties()`` for the train and the inference workflow;
6. net in/out: ``monai.bundle.verify_net_in_out`` as the zoo calls it, at its own defaults
   (``n=1``, shapes from metadata.json; the GPU where there is one, else the CPU);
7. torchscript: ``monai.bundle.ckpt_export`` of ``models/model.pt`` as the zoo calls it (scripted,
   ``torch.jit.script``, no tracing); the exported file and, where the bundle ships one (the
   archive does), ``models/model.ts`` are loaded with ``torch.jit.load`` and run, their outputs
   compared with the eager network's;
8. large files: every file ``large_files.yml`` lists exists with its md5 (the archive that
   ``scripts/package_bundle.py`` writes has one); without that file (this repository keeps the
   weights in git), the files over 1 MB, which the model zoo would need listed there, are named;
9. installable: every version metadata.json pins (``monai_version``, ``pytorch_version``,
   ``numpy_version``, ``required_packages_version``, ``optional_packages_version``) exists on the
   package index for the zoo CI's Python (``--python_version``, default 3.10, the Python of the
   zoo's premerge workflow), asked with ``pip index versions NAME --python-version …``. That asks
   the index the same question ``pip download --no-deps --python-version …`` would, without
   downloading the files (torch's alone is 527 MB). The project's own distribution (``mgrad-net``,
   installed from this repository; the archive drops it from the pins) is skipped. This check
   needs the package index. On the command line write another Python quoted twice
   (``--python_version '"3.12"'``): fire reads a bare 3.10 as the number 3.1.

The model zoo's CI runs the network checks on a GPU where it has one; so does check 6 here, and
the TorchScript comparison runs on the CPU, which is what a user without a GPU gets.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Callable

import fire
import torch

SCHEMAS = Path(__file__).resolve().parent / "schemas"
NECESSARY = ("configs/metadata.json", "LICENSE")
PREFERRED = ("models/model.pt", "configs/inference", "docs/README.md")
ZOO_PYTHON = "3.10"  # Project-MONAI/model-zoo, .github/workflows/premerge-cpu.yml: python-version 3.10.14
OWN_DISTRIBUTION = "mgrad-net"


def _find_config(bundle: Path, stem: str) -> Path | None:
    for suffix in (".json", ".yaml", ".yml"):
        if (bundle / "configs" / f"{stem}{suffix}").is_file():
            return bundle / "configs" / f"{stem}{suffix}"
    return None


def check_files(bundle: Path) -> str:
    missing = [f for f in NECESSARY if not (bundle / f).is_file()]
    for f in PREFERRED:
        found = _find_config(bundle, Path(f).name) if f.startswith("configs/") else (bundle / f).is_file()
        if not found:
            missing.append(f)
    if missing:
        raise FileNotFoundError(f"missing in {bundle}: {', '.join(missing)}")
    return f"{len(NECESSARY)} necessary and {len(PREFERRED)} preferred files present"


def check_changelog(bundle: Path) -> str:
    meta = json.loads((bundle / "configs/metadata.json").read_text())
    for key in ("version", "changelog"):
        if key not in meta:
            raise KeyError(f"configs/metadata.json has no {key!r}")
    if meta["version"] not in meta["changelog"]:
        raise ValueError(f"version {meta['version']} is not in the changelog of configs/metadata.json")
    return f"version {meta['version']} is in the changelog"


def check_json_format(bundle: Path) -> str:
    files = sorted((bundle / "configs").glob("*.json"))
    bad = [f.name for f in files if f.read_text().rstrip("\n") != json.dumps(json.loads(f.read_text()), indent=4)]
    if bad:
        raise ValueError(f"not formatted as json.dumps(indent=4): {', '.join(bad)}")
    return f"{len(files)} files formatted with indent 4"


def check_metadata_schema(bundle: Path, schema: str | None = None) -> str:
    from monai.bundle import verify_metadata

    meta_file = bundle / "configs/metadata.json"
    name = json.loads(meta_file.read_text())["schema"].rsplit("/", 1)[-1]
    schema_file = Path(schema) if schema else SCHEMAS / name
    if not schema_file.is_file():
        raise FileNotFoundError(f"no local copy of the schema {name} at {schema_file}; pass --schema")
    verify_metadata(meta_file=str(meta_file), filepath=str(schema_file))
    return f"metadata.json is valid against {schema_file.name}"


def check_properties(bundle: Path) -> str:
    from monai.bundle import ConfigWorkflow

    done = []
    for stem, workflow_type in (("train", "train"), ("inference", "infer")):
        config = _find_config(bundle, stem)
        if config is None:
            raise FileNotFoundError(f"no configs/{stem}.json in {bundle}")
        # properties resolve only after initialize, which writes (synthetic data, a copy of old
        # weights): give it a scratch bundle_root so the bundle itself is left as it is; inference's
        # initialize checks its weights, so it gets the bundle's own
        weights = {"ckpt_path": str(bundle / "models" / "model.pt")} if workflow_type == "infer" else {}
        with tempfile.TemporaryDirectory() as scratch:
            workflow = ConfigWorkflow(
                config_file=str(config),
                meta_file=str(bundle / "configs/metadata.json"),
                logging_file=str(bundle / "configs/logging.conf"),
                workflow_type=workflow_type,
                bundle_root=scratch,
                **weights,
            )
            workflow.initialize()
            try:
                missing = workflow.check_properties()
            finally:
                workflow.finalize()
        if missing:
            raise ValueError(f"{config.name}: missing {workflow_type} properties {missing}")
        done.append(f"{workflow_type} ({config.name})")
    return "required properties present for " + " and ".join(done)


def check_net_in_out(bundle: Path) -> str:
    from monai.bundle import verify_net_in_out

    verify_net_in_out(
        net_id="network_def",
        meta_file=str(bundle / "configs/metadata.json"),
        config_file=str(_find_config(bundle, "inference")),
        bundle_root=str(bundle),
    )
    return "network input and output shapes match metadata.json (verify_net_in_out at its defaults)"


def _eager_network(bundle: Path, config: str) -> torch.nn.Module:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(config)
    parser["bundle_root"] = str(bundle)
    net = parser.get_parsed_content("network_def").eval()
    net.load_state_dict(torch.load(bundle / "models/model.pt", map_location="cpu", weights_only=True))
    return net


def check_torchscript(bundle: Path, atol: float = 1e-4) -> str:
    from monai.bundle import ckpt_export

    config = str(_find_config(bundle, "inference"))
    net = _eager_network(bundle, config)
    x = torch.rand(2, 1, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = net(x)
    said = []
    with tempfile.TemporaryDirectory() as tmp:
        exported = Path(tmp) / "model.ts"
        ckpt_export(  # the model zoo's call: scripted, no tracing
            net_id="network_def",
            filepath=str(exported),
            ckpt_file=str(bundle / "models/model.pt"),
            meta_file=str(bundle / "configs/metadata.json"),
            config_file=config,
            bundle_root=str(bundle),
        )
        files = {"exported": exported}
        if (bundle / "models/model.ts").is_file():
            files["models/model.ts"] = bundle / "models/model.ts"
        for name, path in files.items():
            with torch.inference_mode():
                diff = (torch.jit.load(str(path), map_location="cpu")(x) - expected).abs().max().item()
            if diff > atol:
                raise AssertionError(f"{name}: TorchScript output differs from eager by {diff:.2e} (> {atol:.0e})")
            said.append(f"{name} max |TorchScript - eager| = {diff:.1e}")
    return f"scripted, loaded and run at 2x1x96x96 (tolerance {atol:.0e}): " + "; ".join(said)


def pinned_versions(meta: dict) -> dict[str, str]:
    """Every package version metadata.json pins, by distribution name."""
    pins = {
        "monai": meta.get("monai_version"),
        "torch": meta.get("pytorch_version"),
        "numpy": meta.get("numpy_version"),
    }
    pins.update(meta.get("required_packages_version") or {})
    pins.update(meta.get("optional_packages_version") or {})
    return {name: version for name, version in pins.items() if version}


def index_versions(name: str, python_version: str) -> list[str]:
    """The versions of ``name`` the package index offers to ``python_version``, newest first."""
    cmd = [sys.executable, "-m", "pip", "index", "versions", name, "--python-version", python_version]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    listed = [line for line in proc.stdout.splitlines() if line.startswith("Available versions:")]
    if listed:
        return listed[0].split(":", 1)[1].replace(" ", "").split(",")
    if "No matching distribution" in proc.stderr:
        return []
    tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
    raise RuntimeError(f"{' '.join(cmd[2:])} failed: {tail[0]}")


def check_installable(bundle: Path, python_version: str = ZOO_PYTHON) -> str:
    from concurrent.futures import ThreadPoolExecutor

    pins = pinned_versions(json.loads((bundle / "configs/metadata.json").read_text()))
    pins.pop(OWN_DISTRIBUTION, None)
    with ThreadPoolExecutor(max_workers=4) as pool:  # one index query per pin, a few at a time
        offered = dict(zip(pins, pool.map(lambda name: index_versions(name, python_version), pins)))
    missing = [
        f"{name}=={version} (newest for Python {python_version}: {(offered[name] or ['none'])[0]})"
        for name, version in pins.items()
        if version not in offered[name]
    ]
    if missing:
        raise ValueError(
            f"configs/metadata.json pins versions Python {python_version} cannot install: {', '.join(missing)}"
        )
    return f"{len(pins)} pinned versions are on the index for Python {python_version} ({OWN_DISTRIBUTION} skipped)"


def check_large_files(bundle: Path) -> str:
    import hashlib

    import yaml

    listing = bundle / "large_files.yml"
    if not listing.is_file():
        big = sorted(
            str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file() and p.stat().st_size > 1_000_000
        )
        return f"no large_files.yml; files over 1 MB the model zoo would need listed there: {', '.join(big) or 'none'}"
    entries = (yaml.safe_load(listing.read_text()) or {}).get("large_files") or []
    if not entries:
        raise ValueError(f"{listing} lists no files")
    for entry in entries:
        path = bundle / entry["path"]
        if not path.is_file():
            raise FileNotFoundError(f"{listing} lists {entry['path']}, which is missing")
        digest = hashlib.new(entry.get("hash_type", "md5"), path.read_bytes()).hexdigest()
        if digest != entry["hash_val"]:
            raise ValueError(
                f"{entry['path']}: {entry.get('hash_type', 'md5')} {digest}, but {listing} says {entry['hash_val']}"
            )
    return f"{len(entries)} file(s) of large_files.yml present with their hashes"


def verify(bundle: str = "bundle", schema: str | None = None, python_version: str = ZOO_PYTHON) -> int:
    """Run every check on ``bundle``; print one line each; return (exit with) the number failed.

    Args:
        bundle: the bundle folder (holding ``configs/``).
        schema: the metadata schema file; default: ``scripts/schemas/<name metadata.json gives>``.
        python_version: the Python whose installable versions the pins are checked against.
    """
    root = Path(bundle).resolve()
    sys.path.insert(0, str(root))  # as MONAI does before running a bundle: its own scripts import
    checks: list[tuple[str, Callable[[], str]]] = [
        ("files", lambda: check_files(root)),
        ("changelog", lambda: check_changelog(root)),
        ("json format", lambda: check_json_format(root)),
        ("metadata schema", lambda: check_metadata_schema(root, schema)),
        ("properties", lambda: check_properties(root)),
        ("net in/out", lambda: check_net_in_out(root)),
        ("torchscript", lambda: check_torchscript(root)),
        ("large files", lambda: check_large_files(root)),
        ("installable", lambda: check_installable(root, str(python_version))),
    ]
    failed = 0
    for name, check in checks:
        try:
            print(f"PASS {name}: {check()}", flush=True)
        except Exception as e:  # every check runs and reports, whatever the others did
            failed += 1
            print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
            traceback.print_exc(file=sys.stderr)
    print(f"{len(checks) - failed} of {len(checks)} checks passed for {root}")
    return failed


if __name__ == "__main__":
    sys.exit(fire.Fire(verify))
