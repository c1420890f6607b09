"""compress --data and eval on a tiny ImageFolder the test writes itself."""

import json
import os

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from adntn.cli import app
from adntn.demo import small_vgg11

runner = CliRunner()
CLASSES = 10


def adntn(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("task")
    g = torch.Generator().manual_seed(0)
    for split, count in (("train", 6), ("test", 3)):
        for label in range(CLASSES):
            folder = root / "data" / split / f"c{label}"
            folder.mkdir(parents=True)
            for index in range(count):
                colour = torch.tensor([label * 25, 255 - label * 25, (label * 70) % 256])
                pixels = (colour.view(1, 1, 3) + torch.randint(-20, 20, (32, 32, 3), generator=g)).clamp(0, 255)
                Image.fromarray(pixels.to(torch.uint8).numpy()).save(folder / f"{index}.png")
    config = root / "tiny.toml"
    config.write_text("[preprocessing]\nmean = [0.5, 0.5, 0.5]\nstd = [0.25, 0.25, 0.25]\nbatch_size = 16\n")
    torch.manual_seed(0)
    checkpoint = root / "tiny.pt"
    torch.save(small_vgg11(CLASSES).state_dict(), checkpoint)
    out = root / "tiny.adntn"
    result = adntn("compress", checkpoint, "--layers", "fc6,fc7", "--ratio", "20", "--steps", "3",
                   "--data", root / "data", "--config", config, "--epochs", "1", "--batch-size", "16",
                   "--train", "fc8", "--no-dropout", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    return root, checkpoint, config, out, json.loads(result.stdout)


def test_report_says_what_was_trained_on_what(setup):
    _, _, _, _, report = setup
    training = report["training"]
    assert training["train_images"] == 60 and training["heldout_split"] == "test"
    assert training["heldout_images"] == 30
    assert training["trained"] == ["generator:classifier.0", "bias:classifier.0", "generator:classifier.3",
                                   "bias:classifier.3", "layer:classifier.6"]
    assert training["finetune"]["epochs"] == 1 and training["preprocessing_source"].startswith("config")
    assert training["finetune"]["dropout"] is False and training["finetune"]["student_mode"].startswith("dropout off")
    for name in ("dense", "compressed"):
        assert 0 <= report["accuracy"][name]["top1"] <= report["accuracy"][name]["top5"] <= 1
    for layer in report["layers"]:
        assert layer["activation_rel_error"] >= 0 and 0 < layer["activation_fit_energy"] <= 1
        assert layer["bias_shift"] > 0
    assert training["activation_fit"]["bias"].startswith("moved so each output's mean")


def test_report_pairs_the_compressed_model_with_the_dense_one(setup):
    _, _, _, _, report = setup
    accuracy = report["accuracy"]
    paired = accuracy["paired"]
    assert paired["images"] == accuracy["images"] == 30
    assert paired["gained"] - paired["lost"] == round(30 * (accuracy["compressed"]["top1"] - accuracy["dense"]["top1"]))
    assert 0 <= paired["top1_agreement"] <= 1 and 0 < paired["mcnemar_p"] <= 1
    shown = adntn("report", setup[3])
    assert shown.exit_code == 0 and f"right by dense only {paired['lost']}, by compressed only {paired['gained']}" in shown.stdout, shown.stdout


def test_eval_of_the_directory_matches_the_reported_accuracy(setup):
    root, _, config, out, report = setup
    result = adntn("eval", out, "--data", root / "data", "--config", config, "--json")
    assert result.exit_code == 0, result.output
    measured = json.loads(result.stdout)
    assert measured["images"] == 30
    assert abs(measured["top1"] - report["accuracy"]["compressed"]["top1"]) < 1e-9


def test_eval_against_the_dense_checkpoint_pairs_as_the_report_did(setup):
    root, checkpoint, config, out, report = setup
    result = adntn("eval", out, "--data", root / "data", "--config", config, "--against", checkpoint, "--json")
    assert result.exit_code == 0, result.output
    measured = json.loads(result.stdout)
    assert measured["paired"] == report["accuracy"]["paired"]
    assert abs(measured["against"]["top1"] - report["accuracy"]["dense"]["top1"]) < 1e-9
    assert measured["against"]["path"] == str(checkpoint)
    text = adntn("eval", out, "--data", root / "data", "--config", config, "--against", checkpoint)
    assert text.exit_code == 0 and "tiny.pt (vgg11) on the same images" in text.stdout, text.output


def test_eval_against_a_model_of_other_outputs_is_refused(setup, tmp_path):
    root, _, config, out, _ = setup
    torch.save(small_vgg11(3).state_dict(), tmp_path / "three.pt")
    result = adntn("eval", out, "--data", root / "data", "--config", config, "--against", tmp_path / "three.pt")
    assert result.exit_code == 1 and "--against needs a model of the same outputs" in result.stderr
    assert "Traceback" not in result.output


def test_eval_of_the_dense_checkpoint_matches_the_reported_dense_accuracy(setup):
    root, checkpoint, config, _, report = setup
    result = adntn("eval", checkpoint, "--data", root / "data", "--config", config, "--json")
    assert result.exit_code == 0, result.output
    assert abs(json.loads(result.stdout)["top1"] - report["accuracy"]["dense"]["top1"]) < 1e-9


def test_trained_dense_layer_is_written_and_others_untouched(setup, tmp_path):
    _, checkpoint, _, out, _ = setup
    assert adntn("expand", out, "-o", tmp_path / "d.pt").exit_code == 0
    original, expanded = torch.load(checkpoint), torch.load(tmp_path / "d.pt")
    assert not torch.equal(original["classifier.6.weight"], expanded["classifier.6.weight"])  # --train fc8
    assert torch.equal(original["features.0.weight"], expanded["features.0.weight"])


def test_class_count_mismatch_is_refused(setup, tmp_path):
    root, _, config, _, _ = setup
    torch.save(small_vgg11(3).state_dict(), tmp_path / "three.pt")
    result = adntn("compress", tmp_path / "three.pt", "--layers", "fc6", "--ratio", "20", "--data", root / "data",
                   "--config", config, "--out", tmp_path / "o")
    assert result.exit_code == 1 and "10 class folders" in result.stderr
    assert not (tmp_path / "o").exists()


def test_conv_layers_take_the_full_forward_pass(setup, tmp_path):
    root, checkpoint, config, _, _ = setup
    result = adntn("compress", checkpoint, "--layers", "conv5_2", "--ratio", "20", "--steps", "2",
                   "--data", root / "data", "--config", config, "--epochs", "1", "--out", tmp_path / "o", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["training"]["features_cached"] is False
    assert report["training"]["trained"] == ["generator:features.18", "bias:features.18"]
    assert report["layers"][0]["activation_rel_error"] >= 0


def test_expanded_safetensors_keep_the_source_metadata(tmp_path):
    from safetensors import safe_open

    from adntn.io.checkpoint import save_state_dict

    torch.manual_seed(0)
    source = tmp_path / "m.safetensors"
    save_state_dict(small_vgg11().state_dict(), source, metadata={"mean": "[0.5, 0.5, 0.5]", "std": "[0.2, 0.2, 0.2]"})
    assert adntn("compress", source, "--layers", "fc7", "--ratio", "20", "--steps", "1", "--out", tmp_path / "o").exit_code == 0
    assert adntn("expand", tmp_path / "o", "-o", tmp_path / "d.safetensors").exit_code == 0
    with safe_open(str(tmp_path / "d.safetensors"), "pt") as handle:
        assert handle.metadata()["mean"] == "[0.5, 0.5, 0.5]"


def test_an_interrupted_fine_tuning_resumes_from_its_last_epoch(setup, tmp_path):
    """Stopped during epoch 2 of 2, the run leaves its epoch-1 state beside the output (and no
    output); --resume finishes it with the cores an uninterrupted run writes, and removes the state."""
    import adntn
    from adntn.pipeline.compress import compress_to, resume_path

    root, checkpoint, config, _, _ = setup
    options = dict(ratio=20, steps=3, data=root / "data", config=config, epochs=2, batch_size=16)
    whole = tmp_path / "whole.adntn"
    compress_to(checkpoint, ["fc6", "fc7"], whole, **options, dropout=False)

    class StopInSecondEpoch(adntn.Progress):
        def task(self, description, total):
            def advance(done, loss=None):
                if description == "fine-tuning" and done > total // 2:
                    raise KeyboardInterrupt
            return advance

    out = tmp_path / "resumed.adntn"
    with pytest.raises(KeyboardInterrupt):
        compress_to(checkpoint, ["fc6", "fc7"], out, progress=StopInSecondEpoch(), **options, dropout=False)
    state = resume_path(out)
    assert state.is_file() and not out.exists()
    assert torch.load(state, weights_only=True)["epoch"] == 1
    with pytest.raises(adntn.AdntnError, match="other inputs or settings"):
        compress_to(checkpoint, ["fc6", "fc7"], out, **{**options, "epochs": 3}, dropout=False, resume=True)
    report = compress_to(checkpoint, ["fc6", "fc7"], out, **options, dropout=False, resume=True)
    assert not state.parent.exists()
    assert report["training"]["finetune"]["epochs"] == 2
    for name in ("classifier.0", "classifier.3"):
        assert (out / "layers" / f"{name}.safetensors").read_bytes() == \
            (whole / "layers" / f"{name}.safetensors").read_bytes()


def _stages_before_error(**options):
    """The pipeline stages that ran before compress refused ``options`` (with its sentence)."""
    import adntn

    stages = []

    class Recorder(adntn.Progress):
        def stage_done(self, name, seconds):
            stages.append(name)

    with pytest.raises(adntn.AdntnError) as caught:
        adntn.compress(options.pop("checkpoint"), progress=Recorder(), **options)
    return stages, str(caught.value)


def test_train_outside_the_classifier_or_unknown_is_refused_before_fitting(setup):
    root, checkpoint, config, _, _ = setup
    common = dict(checkpoint=checkpoint, layers=["fc6"], ratio=20, steps=3, data=root / "data", config=config)
    stages, message = _stages_before_error(**common, train=["conv1_1"])
    assert "fit" not in stages and "--train conv1_1 is outside the classifier" in message
    stages, message = _stages_before_error(**common, train=["fc99"])
    assert "fit" not in stages and "Unknown layer 'fc99'" in message


def test_a_cache_dir_that_is_a_file_is_refused_before_fitting(setup, tmp_path):
    root, checkpoint, config, _, _ = setup
    blocker = tmp_path / "features"
    blocker.write_text("not a folder")
    stages, message = _stages_before_error(checkpoint=checkpoint, layers=["fc6"], ratio=20, steps=3,
                                           data=root / "data", config=config, cache_dir=blocker / "inner")
    assert "fit" not in stages and f"{blocker} is a file, not a folder" in message


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_cache_dir_is_refused(setup, tmp_path):
    root, checkpoint, config, _, _ = setup
    folder = tmp_path / "features"
    folder.mkdir(mode=0o555)
    _, message = _stages_before_error(checkpoint=checkpoint, layers=["fc6"], ratio=20, steps=3,
                                      data=root / "data", config=config, cache_dir=folder)
    assert "is not writable" in message


def test_a_poisoned_feature_cache_is_recomputed_not_trusted(setup, tmp_path):
    """A cache with the right key but the wrong width, or labels out of range, is ignored."""
    import adntn

    root, checkpoint, config, _, _ = setup
    cache = tmp_path / "features"
    options = dict(layers=["fc6", "fc7"], ratio=20, steps=3, data=root / "data", config=config, epochs=1,
                   batch_size=16, cache_dir=cache)
    clean = adntn.compress(checkpoint, **options).report["accuracy"]
    for meta in cache.glob("*.json"):
        described = json.loads(meta.read_text())
        values, labels = meta.with_suffix(".bin"), meta.with_suffix(".labels")
        rows = described["rows"]
        described["width"] //= 2  # same bytes, half the width: a (2 rows, w/2) view of each row
        described["rows"] = rows
        values.write_bytes(values.read_bytes()[:rows * described["width"] * 2])
        labels.write_bytes(torch.full((rows,), 10_000, dtype=torch.long).numpy().tobytes())
        meta.write_text(json.dumps(described))
    again = adntn.compress(checkpoint, **options).report["accuracy"]
    assert again == clean


def test_a_diverging_fine_tuning_is_refused_not_written(setup, tmp_path):
    root, checkpoint, config, _, _ = setup
    out = tmp_path / "nan.adntn"
    result = adntn("compress", checkpoint, "--layers", "fc6,fc7", "--ratio", "20", "--steps", "3",
                   "--data", root / "data", "--config", config, "--epochs", "1", "--batch-size", "16",
                   "--finetune-lr", "1e30", "--out", out)
    assert result.exit_code == 1 and "diverged" in result.stderr and "--finetune-lr" in result.stderr
    assert "Traceback" not in result.output and not out.exists()


def test_a_budget_with_data_is_split_by_distillation_probes(setup, tmp_path, monkeypatch):
    """Every candidate is probed with its bias corrected as the activation stage corrects it."""
    from adntn.pipeline import task

    corrected = []
    original = task._corrected_bias
    monkeypatch.setattr(task, "_corrected_bias", lambda *args: corrected.append(1) or original(*args))
    root, checkpoint, config, _, _ = setup
    result = adntn("compress", checkpoint, "--layers", "fc6,fc7", "--budget", "2k", "--steps", "2",
                   "--data", root / "data", "--config", config, "--epochs", "1", "--batch-size", "16",
                   "--out", tmp_path / "o", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    allocation = report["allocation"]
    assert allocation["measure"].startswith("distillation loss")
    assert report["total"]["compressed_core_params"] == allocation["core_params"] <= 2000
    for row in allocation["layers"]:
        assert row["candidates"] and all(0 <= c["measure"] for c in row["candidates"])
    probed = sum(len(row["candidates"]) for row in allocation["layers"])
    assert len(corrected) == probed + len(allocation["layers"])  # each probe, then each chosen layer


def test_a_model_left_at_chance_or_far_below_dense_is_named_in_a_note():
    from adntn.pipeline.task import accuracy_warning
    from adntn.training.distill import FinetuneResult
    from adntn.training.evaluate import Accuracy

    result = FinetuneResult(epochs=1, images=50_000, steps=196, seconds=20.0, final_loss=11.8)
    dense = Accuracy(0.878, 0.996, 10_000)
    note = accuracy_warning(Accuracy(0.1, 0.5, 10_000), dense, 10, result)
    assert note is not None and "chance" in note and "11.8" in note and "--seed" in note
    assert accuracy_warning(Accuracy(0.8751, 0.99, 10_000), dense, 10, result) is None
    assert accuracy_warning(Accuracy(0.1, 0.5, 10_000), Accuracy(0.1, 0.5, 10_000), 10, result) is None
    assert accuracy_warning(Accuracy(0.0011, 0.005, 50_000), Accuracy(0.7, 0.9, 50_000), 1000, result) is not None
    short = FinetuneResult(epochs=1, images=2_000, steps=8, seconds=2.0, final_loss=1.9)
    note = accuracy_warning(Accuracy(0.1955, 0.70, 2_000), Accuracy(0.886, 0.99, 2_000), 10, short)
    assert note is not None and "0.1955" in note and "8 fine-tuning steps" in note and "--epochs" in note
    assert accuracy_warning(Accuracy(0.84, 0.99, 2_000), Accuracy(0.886, 0.99, 2_000), 10, short) is None
