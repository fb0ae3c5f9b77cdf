"""The bundle's configs: the rules the MONAI model zoo checks, and how they are laid out.

``inference.json`` and ``train.json`` each run alone and define the model (network, classes, slice
size, preprocessing, inferer, prediction, weight loading) identically; ``evaluate.json`` and
``multi_gpu_train.json`` merge after ``train.json``, the overrides last.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from monai.bundle import ConfigParser, verify_metadata

from tests.bundle_utils import CONFIGS, EXPERIMENTS, REPO, config_files, free_port, verify_bundle_module

SCHEMA = REPO.parent / "shared" / "schemas" / "meta_schema_20240725.json"
# what the model is: defined in inference.json and, identically, in train.json (overrides such as
# synapse.json replace some)
SHARED = {"class_names", "num_classes", "roi_size", "network_def", "intensity_transform", "preprocessing",
          "inferer", "prediction", "keep_largest_component", "handlers"}  # fmt: skip


def _parser(*names: str, **overrides: object) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(config_files(*names))
    for key, value in overrides.items():
        parser[key] = value
    return parser


def _ids(name: str) -> set[str]:
    """The top-level ids a config file sets (``a#b`` sets ``a``); ``+``-keys extend, they do not set."""
    return {k.split("#")[0] for k in json.loads((CONFIGS / f"{name}.json").read_text()) if not k.startswith("+")}


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.json")))
def test_every_config_is_json_indented_by_4(name):
    text = (CONFIGS / name).read_text()
    assert text == json.dumps(json.loads(text), indent=4) + "\n"


@pytest.mark.skipif(not SCHEMA.exists(), reason=f"model-zoo schema copy not found at {SCHEMA}")
def test_metadata_passes_the_model_zoo_schema():
    verify_metadata(meta_file=str(CONFIGS / "metadata.json"), filepath=str(SCHEMA))
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    assert meta["version"] in meta["changelog"]
    fmt = meta["network_data_format"]
    assert set(fmt["inputs"]) == {"image"} and set(fmt["outputs"]) == {"pred"}
    classes = _parser("inference").get_parsed_content("class_names")
    assert list(fmt["outputs"]["pred"]["channel_def"].values()) == classes


_CHECK = """
import sys
import torch
from monai.bundle import ConfigWorkflow
files, workflow_type, root = sys.argv[1].split(","), sys.argv[2], sys.argv[3]
# a nested override, as the command line gives it, before anything is parsed
workflow = ConfigWorkflow(config_file=files, meta_file=sys.argv[4], logging_file=sys.argv[5],
                          workflow_type=workflow_type, bundle_root=root,
                          **{"network_def#features": [4, 8, 16, 32, 64], "network_def#decoder_channels": 8})
if workflow_type == "infer":  # inference loads and checks its weights in initialize: the tiny network's
    import os
    os.makedirs(root + "/models", exist_ok=True)
    torch.save(workflow.parser.get_parsed_content("network_def").state_dict(), root + "/models/model.pt")
workflow.initialize()
try:
    missing = workflow.check_properties()
    assert missing in (None, []), missing
    assert workflow.bundle_root == root
    net = workflow.parser.get_parsed_content("network_def")
    assert next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d)).out_channels == 4
finally:
    workflow.finalize()
print("properties ok")
"""


@pytest.mark.parametrize(
    "files, workflow_type",
    [(["train"], "train"), (["train", "multi_gpu_train"], "train"), (["inference"], "infer")],
)
def test_config_workflow_properties(files, workflow_type, tmp_path):
    # in a subprocess, started outside the bundle: multi_gpu_train's initialize starts a
    # (one-process, gloo) group as torchrun would, and a destroyed group would leave Ignite's
    # distributed state behind in this process
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    paths = ",".join(str(CONFIGS / f"{f}.json") for f in files)
    proc = subprocess.run(
        [sys.executable, "-c", _CHECK, paths, workflow_type, str(tmp_path),
         str(CONFIGS / "metadata.json"), str(CONFIGS / "logging.conf")],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "properties ok" in proc.stdout


# what a base config name on a command line stands for: evaluate.json merges after train.json
_BASES = {"inference": ["inference"], "train": ["train"], "evaluate": ["train", "evaluate"]}

# the bundle's configs and the experiments' overrides, by the name config_files takes
_OVERRIDES = {p.stem: p for p in CONFIGS.glob("*.json")} | {
    str(p.parent.relative_to(EXPERIMENTS)): p for p in EXPERIMENTS.rglob("override.json")
}


def _merges() -> list[tuple[str, str]]:
    """(config, base) for every "merge after a.json, b.json or c.json" a config's _desc_ promises."""
    pairs = []
    for name, path in sorted(_OVERRIDES.items()):
        desc = json.loads(path.read_text()).get("_desc_", "") if path.name != "metadata.json" else ""
        found = re.search(r"[Mm]erge after ((?:\w+\.json(?:, | or )?)+)", desc)
        if found:
            pairs += [(name, base) for base in re.findall(r"(\w+)\.json", found.group(1))]
    return pairs


@pytest.mark.parametrize("override, base", _merges())
def test_every_config_merges_after_the_configs_it_names(override, base):
    # a "#" key whose parent the base lacks fails at read_config (full_size.json's
    # lr_scheduler#power after inference.json alone)
    parser = ConfigParser()
    parser.read_config(config_files(*_BASES[base], override))
    net = parser.get_parsed_content("network_def", instantiate=True)
    assert isinstance(net, torch.nn.Module)
    if override == "full_size":
        assert parser["network_def"]["features"] == [64, 128, 256, 512, 1024] and parser["roi_size"] == [224, 224]
        if base == "train":
            assert parser.get_parsed_content("lr_scheduler").power == 0.0


@pytest.mark.parametrize(
    "name,changed,sample,passes,per_volume,roi",
    [("ablations/no_patches", {"train#patch_size"}, [192, 192, 1], 1, 6, [192, 192]),
     ("ablations/three_passes", {"feedback_passes"}, [128, 128, 1], 3, 6, [192, 192]),
     ("ablations/three_volumes", {"train#slices_per_volume", "train#dataloader#batch_size"}, [128, 128, 1], 1, 4,
      [192, 192]),
     ("ablations/roi_224", {"roi_size", "train#patch_size"}, [144, 144, 1], 1, 6, None)],
)  # fmt: skip
def test_each_recipe_ablation_is_the_shipped_recipe_but_for_one_choice(name, changed, sample, passes, per_volume, roi):
    """``roi`` is the ``--roi_size`` its protocol command passes (None: none, the config sets it)."""
    recipe = json.loads(_OVERRIDES["ablations/shipped_recipe"].read_text())
    ablation = json.loads(_OVERRIDES[name].read_text())
    differ = {k for k in recipe.keys() | ablation.keys() if recipe.get(k) != ablation.get(k)}
    assert differ == {"_desc_"} | changed
    runs = (("ablations/shipped_recipe", [128, 128, 1], 1, 6, [192, 192]), (name, sample, passes, per_volume, roi))
    for config, size, t, n, r in runs:
        parser = _parser("train", config, **({"roi_size": r} if r else {}))
        assert parser.get_parsed_content("train#sample_size") == size
        assert parser["train#slices_per_volume"] == n
        assert parser.get_parsed_content("train#dataloader#batch_size") * n == 12
        assert parser.get_parsed_content("feedback_passes") == t


def test_the_baselines_shipped_recipe_row_samples_as_mgrad_unets():
    recipe = json.loads(_OVERRIDES["ablations/shipped_recipe"].read_text())
    baseline = json.loads(_OVERRIDES["comparison/basicunet_recipe"].read_text())
    assert {k: v for k, v in recipe.items() if k.startswith("train#")} == {
        k: v for k, v in baseline.items() if k.startswith("train#")
    }
    parser = _parser("train", "comparison/basicunet_recipe")
    assert type(parser.get_parsed_content("network_def")).__name__ == "BasicUNet"
    assert parser.get_parsed_content("train#sample_size") == [128, 128, 1]


@pytest.mark.parametrize("name", ["basicunet", "swinunetr", "swinunetr_reca", "medsegdiff", "higmisnet"])
def test_a_network_without_feedback_says_nothing_of_feedback_passes(name):
    # its training step takes one plain step a batch whatever feedback_passes is (FeedbackStep), so
    # its config need not, and does not, set it; full_size.json's 3 merged before it changes nothing
    override = json.loads(_OVERRIDES[f"comparison/{name}"].read_text())
    assert "feedback_passes" not in override
    parser = ConfigParser()
    parser.read_config(config_files("train", "full_size", f"comparison/{name}"))
    assert parser.get_parsed_content("feedback_passes") == 3
    assert not hasattr(parser.get_parsed_content("network_def"), "feedback")


def test_merges_cover_every_config_but_the_two_entry_configs():
    named = {o for o, _ in _merges()}
    assert set(_OVERRIDES) - {"inference", "train", "metadata"} <= named


def test_runner_names_alias_run():
    for files, alias in ((["train"], "training"), (["train", "evaluate"], "evaluating"), (["inference"], "inference")):
        merged = {}
        for f in config_files(*files):
            merged.update(json.loads(open(f).read()))
        assert merged[alias] == "@run"


@pytest.mark.integration
def test_verify_bundle_script_passes_every_check():
    weights = REPO / "bundle" / "models" / "model.pt"
    if not weights.is_file():
        pytest.skip(f"no shipped weights at {weights}")
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "verify_bundle.py"), str(REPO / "bundle")],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert len(lines) == 9 and all(line.startswith("PASS") for line in lines), proc.stdout
    assert "9 of 9 checks passed" in proc.stdout


@pytest.mark.integration
def test_installability_check_names_the_pins_an_older_python_cannot_install():
    """The check asks the package index (needs it, as pip install does): Python 3.9 has no
    MONAI 1.6.1 (its newest is 1.5.2), so the pins fail there, each named with the newest."""
    check = verify_bundle_module().check_installable
    assert "for Python 3.10" in check(REPO / "bundle")
    with pytest.raises(
        ValueError, match=r"Python 3\.9 cannot install: .*monai==1\.6\.1 \(newest for Python 3\.9: 1\.5\.2\)"
    ):
        check(REPO / "bundle", "3.9")


# ---------------------------------------------------------------- one place for the model


@pytest.mark.parametrize("name", ["evaluate", "multi_gpu_train"])
def test_no_workflow_merged_after_train_redefines_the_model(name):
    assert not _ids(name) & SHARED, f"{name}.json redefines what inference.json and train.json define"


def test_train_json_defines_the_model_exactly_as_inference_json():
    # MONAI bundle configs cannot include one another, so both entry configs, which each run
    # alone, hold the model; every id the two define must be the same, to the letter
    inference = json.loads((CONFIGS / "inference.json").read_text())
    train = json.loads((CONFIGS / "train.json").read_text())
    # record_path: the weights whose record sizes the model; inference's ckpt_path, training's only
    # when it fine-tunes (a new run builds its config, whatever ckpt_dir holds)
    common = set(inference) & set(train) - {"_desc_", "imports", "initialize", "run", "record_path"}
    assert SHARED <= common
    assert {k: train[k] for k in common} == {k: inference[k] for k in common}
    assert set(inference["imports"]) <= set(train["imports"])


def test_training_and_validation_prepare_images_with_the_inference_transforms():
    parser = _parser("train")
    shared = list(parser.get_parsed_content("preprocessing").transforms)
    for workflow in ("train#preprocessing", "validate#preprocessing"):
        steps = list(parser.get_parsed_content(workflow).transforms)
        assert steps[: len(shared)] == shared and all(a is b for a, b in zip(steps, shared)), workflow
    assert parser.get_parsed_content("validate#inferer") is parser.get_parsed_content("inferer")
    prediction = parser.get_parsed_content("prediction")
    assert parser.get_parsed_content("validate#postprocessing").transforms[0] is prediction


def _drawn_slices(tmp_path, *names: str) -> list[dict]:
    """32 training slices drawn by ``train#preprocessing`` (seeded) from a 64×64×4 NIfTI pair whose
    label map is a disk of class 1 in a ring of class 2 and whose image is 210 on both, 10 around; the patch is
    the whole resized slice, so the drawn label's area changes only by augmentation."""
    import nibabel as nib
    import numpy as np

    yy, xx = np.mgrid[:64, :64]
    r2 = (yy - 31.5) ** 2 + (xx - 31.5) ** 2
    label = np.repeat(((r2 < 10**2) * 1 + ((r2 >= 10**2) & (r2 < 14**2)) * 2)[..., None], 4, axis=-1)
    for key, array in (("image", (label > 0) * 200.0 + 10), ("label", label)):
        nib.save(nib.Nifti1Image(array.astype(np.float32), np.eye(4)), str(tmp_path / f"{key}.nii.gz"))
    sizes = {"roi_size": [48, 48], "patch_size": [48, 48], "train#slices_per_volume": 8}
    transform = _parser(*names, **sizes).get_parsed_content("train#preprocessing")
    transform.set_random_state(seed=0)
    files = {"image": str(tmp_path / "image.nii.gz"), "label": str(tmp_path / "label.nii.gz")}
    return [s for _ in range(4) for s in transform(dict(files))]


def test_strong_augmentation_keeps_image_and_label_aligned_and_rescales_them(tmp_path):
    plain, strong = _drawn_slices(tmp_path, "train"), _drawn_slices(tmp_path, "train", "strong_augmentation")
    base_area = float((plain[0]["label"] > 0).sum())

    def spread(slices: list[dict]) -> float:
        return max(abs(float((s["label"] > 0).sum()) / base_area - 1) for s in slices)

    # the paper's rotations and flips keep the disk's area; the zoom (0.85-1.2, half the slices) does not
    assert spread(plain) < 0.06 and spread(strong) > 0.15, (spread(plain), spread(strong))
    for s in strong:
        image, label = s["image"].as_tensor(), s["label"].as_tensor()
        assert image.shape == label.shape == (1, 48, 48) and set(label.unique().tolist()) <= {0.0, 1.0, 2.0}
        # the image's foreground, cut at half its height (gamma, brightness, noise and blur move
        # intensities, not edges), has the label's area: within 7.3 % here, 20 % if the image alone
        # were zoomed by 1.1
        assert abs(float((image > 0.5 * image.max()).sum() / (label > 0).sum()) - 1) < 0.1


def test_prediction_resizes_the_logits_back_to_the_input_grid_before_the_argmax(tmp_path):
    # a 64×64×3 image with a disk of class 1; the network's logits, at roi_size 16×16, stand in as
    # the one-hot disk resized as the image was. Back on the input's grid the disk's boundary is
    # interpolated; a label map resized back by nearest comes back in 4-pixel steps
    import nibabel as nib
    import numpy as np
    from monai.data import MetaTensor
    from monai.transforms import Invertd, Resize

    yy, xx = np.mgrid[:64, :64]
    disk = np.repeat(((yy - 30.5) ** 2 + (xx - 27.5) ** 2 < 19.3**2)[..., None], 3, axis=-1).astype(np.float32)
    nib.save(nib.Nifti1Image(disk * 100 + 10, np.eye(4)), str(tmp_path / "image.nii.gz"))
    parser = _parser("inference", roi_size=[16, 16])
    onehot = torch.from_numpy(np.stack([1 - disk, disk]))
    logits = Resize((16, 16, -1), mode="trilinear")(onehot).as_tensor()

    def back(transform, pred: torch.Tensor) -> torch.Tensor:
        data = parser.get_parsed_content("preprocessing")({"image": str(tmp_path / "image.nii.gz")})
        data["pred"] = MetaTensor(pred, meta=data["image"].meta)
        return transform(data)["pred"].as_tensor()[0]

    linear = back(parser.get_parsed_content("prediction"), logits)
    nearest = back(Invertd("pred", parser.get_parsed_content("preprocessing"), "image", nearest_interp=True),
                   logits.argmax(0, keepdim=True).float())  # fmt: skip
    truth = torch.from_numpy(disk)
    dice = lambda a: float(2 * (a * truth).sum() / (a.sum() + truth.sum()))  # noqa: E731
    assert linear.shape == nearest.shape == truth.shape
    assert dice(linear) > 0.965 and dice(linear) > dice(nearest) + 0.02, (dice(linear), dice(nearest))  # 0.973, 0.946


@pytest.mark.parametrize("given", [None, "false"])
def test_prediction_keeps_each_class_largest_component_unless_switched_off(given):
    # a label map (1×H×W×D) with each class in one block, plus islands of classes 1 and 3 apart from them
    label = torch.zeros(1, 16, 16, 4)
    label[0, 2:6, 2:6, :] = 1
    label[0, 8:12, 2:6, :] = 2
    label[0, 8:12, 8:12, :] = 3
    islands = label.clone()
    islands[0, 14, 14, 1] = 1
    islands[0, 0, 15, 2] = 3
    for name in ("train", "inference"):
        parser = _parser(name) if given is None else _parser(name, keep_largest_component=given)
        steps = list(parser.get_parsed_content("prediction").transforms)
        last = steps[-1]
        if given == "false":
            assert len(steps) == 2 and type(last).__name__ == "AsDiscreted", name
            continue
        assert type(last).__name__ == "KeepLargestConnectedComponentd", name
        assert torch.equal(last({"pred": islands})["pred"].as_tensor(), label), name


def test_evaluation_attaches_the_inference_loading_handlers_then_its_reports():
    parser = _parser("train", "evaluate")
    handlers = [type(h).__name__ for h in parser.get_parsed_content("validate#evaluator#val_handlers")]
    loading = [
        "CheckpointLoader",
        "EvaluatorAutocast",
        "OptimizeForInference",
        "StatsHandler",
    ]  # inference.json's handlers
    assert handlers == loading + ["SegmentationReport", "OverlayPictures"]


# ---------------------------------------------------------------- handlers chosen by id


def _handler_types(tmp_path, is_not_rank0: bool) -> tuple[list[str], list[str]]:
    parser = _parser(
        "train", is_not_rank0=is_not_rank0, output_dir=str(tmp_path), ckpt_dir=str(tmp_path),
        **{"train#dataset#data": [], "validate#dataset#data": []},
    )  # fmt: skip
    # MONAI Label puts its own loader first: a position counted from either end would shift
    loader = {"_target_": "CheckpointLoader", "load_path": "x.pt", "load_dict": {"model": "@network"}}
    parser["train#handlers"].insert(0, loader)
    train = [type(h).__name__ for h in parser.get_parsed_content("train#trainer#train_handlers")]
    validate = [type(h).__name__ for h in parser.get_parsed_content("validate#evaluator#val_handlers")]
    return train, validate


def test_rank0_only_handlers_are_chosen_by_their_own_flag_not_by_position(tmp_path):
    train, validate = _handler_types(tmp_path, is_not_rank0=True)
    assert train == [
        "CheckpointLoader",
        "StopOnNonFiniteLoss",
        "TrainingBudget",
        "LrScheduleHandler",
        "ValidationHandler",
        "WeightsWithoutValidation",
        "TrainingLog",
    ]
    assert validate == ["AtomicCheckpointSaver"]  # Ignite writes its files on rank 0 only
    train, validate = _handler_types(tmp_path, is_not_rank0=False)
    assert train[-3:] == ["StatsHandler", "TensorBoardStatsHandler", "ProgressBar"] and len(train) == 10
    assert validate == ["StatsHandler", "TensorBoardStatsHandler", "AtomicCheckpointSaver"]


def test_multi_gpu_config_selects_no_handlers_and_spells_out_no_run():
    multi = json.loads((CONFIGS / "multi_gpu_train.json").read_text())
    assert not [k for k in multi if "handlers" in k] and "run" not in multi
    assert multi["is_not_rank0"] == "$dist.get_rank() > 0"


# ---------------------------------------------------------------- switches as the command line writes them


@pytest.mark.parametrize(
    "given, expected",
    [("false", False), ("False", False), ("0", False), ("no", False), (0, False), (False, False),
     ("true", True), ("TRUE", True), ("1", True), (True, True)],
)  # fmt: skip
def test_switches_given_on_the_command_line_reach_the_engines_as_booleans(given, expected):
    # `--amp false` arrives as the text 'false', which Python counts as true
    train, infer = _parser("train"), _parser("inference")
    for parser in (train, infer):
        parser["amp"] = parser["compile"] = given
    for parser, engine in ((train, "train#trainer"), (train, "validate#evaluator"), (infer, "evaluator")):
        assert parser.get_parsed_content(f"{engine}#amp") is expected
        assert parser.get_parsed_content(f"{engine}#compile") is expected
    train["train#foreground_sampling"] = given
    sampler = train.get_parsed_content("train#random_transforms#0")
    assert type(sampler).__name__ == ("RandCropByPosNegLabeld" if expected else "RandSpatialCropSamplesd")


@pytest.mark.parametrize("given, expected", [("false", False), ("true", True)])
def test_sync_batchnorm_given_as_text(given, expected):
    parser = _parser("train", "multi_gpu_train", sync_batchnorm=given, device="$torch.device('cpu')")
    module = parser.get_parsed_content("network#module")  # the network DDP wraps
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in module.modules()) is expected


def test_a_misspelt_switch_is_an_error_that_names_it():
    parser = _parser("train", amp="ture")
    with pytest.raises(RuntimeError, match=r"str2bool\(str\(.*'amp'") as raised:  # MONAI shows the expression
        parser.get_parsed_content("train#trainer#amp")
    assert 'Got "ture", expected a value from: yes, true' in str(raised.value.__cause__)
    parser = _parser("inference", **{"network_def#use_rfb": "ture"})
    with pytest.raises(RuntimeError) as raised:
        parser.get_parsed_content("network_def")
    assert "use_rfb must be true or false, got 'ture'" in str(raised.value.__cause__)


@pytest.mark.parametrize("given", ["false", "False", "0"])
def test_network_switches_given_as_text_build_the_network_asked_for(given):
    parser = _parser("inference")
    for switch in ("use_rfb", "side_outputs", "channels_last"):
        parser[f"network_def#{switch}"] = given
    net = parser.get_parsed_content("network_def")
    assert not any(type(m).__name__ == "RFB" for m in net.modules())
    assert len(net.side.convs) == 0
    assert net.channels_last is False
    parser = _parser("inference", **{"network_def#channels_last": "true"})
    assert parser.get_parsed_content("network_def").channels_last is True


# ---------------------------------------------------------------- machine policy, chosen in the config


def test_channels_last_is_on_where_the_config_says_it_measured_faster():
    avx512 = torch.backends.cpu.get_cpu_capability().startswith("AVX512") and not torch.cuda.is_available()
    assert _parser("inference").get_parsed_content("network_def").channels_last is avx512


def test_micro_batching_is_the_inferers_and_checkpointing_the_networks(tmp_path):
    parser = _parser("train", **{"inferer#sw_batch_size": 2, "network_def#checkpointing": "full"})
    inferer = parser.get_parsed_content("validate#inferer")
    assert type(inferer).__name__ == "SliceInferer" and inferer.sw_batch_size == 2
    assert parser.get_parsed_content("network_def").checkpointing == "full"
