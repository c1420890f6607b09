"""Generated layers in a model, accuracy, and fine-tuning by distillation."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from adntn.data.images import Preprocessing, image_splits, resolve_preprocessing
from adntn.training.distill import (FinetuneConfig, distillation_loss, finetune, finetune_full, generated_parameters,
                           logits_of)
from adntn.errors import AdntnError
from adntn.training.evaluate import (Accuracy, Paired, Predictions, accuracy_of_logits, evaluate, mcnemar_p,
                                    paired_counts, predict, tensor_batches)
from adntn.models.layers import GeneratedConv2d, GeneratedLinear, dense_weights, generated_from, swap_in
from adntn.networks.ttn import TTN
from adntn.progress import Progress
from adntn.core.spec import GeneratorSpec
from adntn.core.tensorize import choose_leg_factors
from tolerances import assert_close_scaled

SHARED = Path(__file__).resolve().parent.parent.parent / "shared"


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread avoids thread hand-off costs (large on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def ttn_for(weight: torch.Tensor, bond_dims=(2, 2)) -> TTN:
    """A 4-leg TTN fitted (hierarchical SVD) to ``weight``."""
    rows, cols = weight.shape[0], weight[0].numel()
    out_dims, in_dims = choose_leg_factors(rows, cols, 4)
    spec = GeneratorSpec("ttn", tuple(weight.shape), out_dims, in_dims, bond_dims, activation="tanh")
    return TTN.from_weight(spec, weight)


def tiny_head(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))


def tiny_convnet(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(1), nn.Linear(8, 3))


# --- accuracy --------------------------------------------------------------------------------

def test_accuracy_of_hand_made_logits():
    logits = torch.tensor([
        [9., 8., 7., 6., 5., 4.],  # label 0: top-1 hit
        [9., 8., 7., 6., 5., 4.],  # label 4: 5th best -> top-5 hit only
        [9., 8., 7., 6., 5., 4.],  # label 5: 6th best -> miss
        [0., 0., 1., 0., 0., 3.],  # label 5: top-1 hit
    ])
    accuracy = accuracy_of_logits(logits, torch.tensor([0, 4, 5, 5]))
    assert accuracy == Accuracy(top1=0.5, top5=0.75, images=4)


def test_top5_with_fewer_than_five_classes_is_top3():
    logits = torch.tensor([[1., 2., 3.], [3., 2., 1.]])
    assert accuracy_of_logits(logits, torch.tensor([0, 1])) == Accuracy(top1=0.0, top5=1.0, images=2)


def test_evaluate_matches_logits_and_restores_mode():
    head = tiny_head().train()
    inputs, labels = torch.randn(50, 32), torch.randint(0, 3, (50,))
    accuracy = evaluate(head, tensor_batches(inputs, labels, 16))
    assert accuracy == accuracy_of_logits(logits_of(head, inputs, 50), labels)
    assert head.training and accuracy.images == 50


def test_evaluate_without_samples_is_an_error():
    with pytest.raises(ValueError, match="no samples"):
        evaluate(tiny_head(), [])


def test_mcnemar_p_of_hand_computed_splits():
    assert mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(5, 0) == pytest.approx(2 / 32, rel=1e-12)  # 2 P[B(5, 1/2) = 0]
    assert mcnemar_p(1, 9) == pytest.approx(2 * 11 / 1024, rel=1e-12)  # 2 (1 + 10) / 2^10
    assert mcnemar_p(9, 1) == mcnemar_p(1, 9) and mcnemar_p(3, 3) == 1.0
    # a split far beyond the floats' range of 2^n: in log space
    # exact: 2 sum_{i <= 400} C(1000, i) / 2^1000 in integers = 2.72846415606602e-10
    assert mcnemar_p(600, 400) == pytest.approx(2.72846415606602e-10, rel=1e-9) and mcnemar_p(2000, 2000) == 1.0


def test_paired_counts_of_hand_made_predictions():
    labels = torch.tensor([0, 1, 2, 3, 4])
    dense = Predictions(torch.tensor([0, 1, 2, 0, 0]), labels, torch.ones(5, dtype=torch.bool))  # 3 right
    compressed = Predictions(torch.tensor([0, 2, 2, 3, 1]), labels, torch.ones(5, dtype=torch.bool))  # 3 right
    agree, lost, gained, images = paired_counts(compressed, dense)
    assert (agree, lost, gained, images) == (2, 1, 1, 5)  # samples 0, 2 agree; 1 lost; 3 gained
    described = Paired(agree, lost, gained, images).describe()
    assert described["top1_agreement"] == 0.4 and described["mcnemar_p"] == 1.0
    with pytest.raises(ValueError, match="same samples"):
        paired_counts(compressed, Predictions(dense.top1, labels.flip(0), dense.in_top5))


def test_predict_gives_the_accuracy_of_evaluate():
    head = tiny_head()
    inputs, labels = torch.randn(50, 32), torch.randint(0, 3, (50,))
    predictions = predict(head, tensor_batches(inputs, labels, 16))
    assert torch.equal(predictions.top1, logits_of(head, inputs, 50).argmax(dim=1))
    top1, top5, images = predictions.counts()
    assert Accuracy(top1=top1 / images, top5=top5 / images, images=images) == evaluate(head, tensor_batches(inputs, labels, 16))


# --- generated layers ------------------------------------------------------------------------

def test_generated_linear_computes_with_the_generated_weight():
    dense = tiny_head()[0]
    layer = generated_from(dense, ttn_for(dense.weight.detach()))
    assert isinstance(layer, GeneratedLinear)
    x = torch.randn(5, 32)
    assert_close_scaled(layer(x), F.linear(x, layer.generator(), dense.bias))
    layer(x).sum().backward()
    assert all(p.grad is not None for p in layer.generator.parameters() if p.requires_grad)
    assert layer.bias.grad is not None


def test_generated_conv_computes_with_the_generated_weight():
    dense = nn.Conv2d(3, 8, 3, stride=2, padding=1)
    layer = generated_from(dense, ttn_for(dense.weight.detach()))
    assert isinstance(layer, GeneratedConv2d)
    x = torch.randn(2, 3, 9, 9)
    expected = F.conv2d(x, layer.generator(), dense.bias, stride=2, padding=1)
    assert layer(x).shape == (2, 8, 5, 5)
    assert_close_scaled(layer(x), expected)


def test_generated_from_rejects_a_wrong_shape():
    with pytest.raises(ValueError, match="shape"):
        generated_from(nn.Linear(32, 16), ttn_for(torch.randn(16, 16)))


def test_dense_weights_load_strictly_into_the_dense_model():
    model = tiny_head()
    dense_twin = copy.deepcopy(model)
    generator = ttn_for(model[0].weight.detach())
    swap_in(model, {"0": generated_from(model[0], generator)})
    assert isinstance(model[0], GeneratedLinear)
    state = dense_weights(model)
    assert list(state) == list(dense_twin.state_dict())
    dense_twin.load_state_dict(state, strict=True)
    with torch.no_grad():
        assert torch.equal(dense_twin[0].weight, generator())
        x = torch.randn(4, 32)
        assert_close_scaled(dense_twin.eval()(x), model.eval()(x))


def test_swap_in_a_nested_module_and_unknown_names():
    model = nn.Sequential()
    model.add_module("classifier", tiny_head())
    replacement = nn.Identity()
    assert swap_in(model, {"classifier.2": replacement}) is model
    assert model.classifier[2] is replacement
    with pytest.raises(AdntnError, match="no module named 'classifier.9'"):
        swap_in(model, {"classifier.9": nn.Identity()})


class RecordingProgress(Progress):
    """Keeps every (description, done, loss) it is told."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int, float | None]] = []

    def task(self, description: str, total: int):
        return lambda done, loss=None: self.events.append((description, done, loss))


# --- fine-tuning -----------------------------------------------------------------------------

def distillation_problem(seed: int = 0):
    """(teacher head, student head with a TTN fc layer, features, teacher logits, labels).

    The teacher's last layer is scaled up so its logits are confident and the KD term dominates.
    """
    teacher = tiny_head(seed)
    with torch.no_grad():
        teacher[3].weight.mul_(10)
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(512, 32, generator=generator)
    teacher_logits = logits_of(teacher, features, 128)
    labels = teacher_logits.argmax(1)
    student = copy.deepcopy(teacher)
    swap_in(student, {"0": generated_from(student[0], ttn_for(student[0].weight.detach()))})
    return teacher, student, features, teacher_logits, labels


def full_loss(student, features, teacher_logits, labels, config) -> float:
    with torch.no_grad():
        return float(distillation_loss(student.eval()(features), teacher_logits, labels, config))


def test_distillation_loss_is_zero_kd_for_identical_logits():
    logits, labels = torch.randn(8, 5), torch.randint(0, 5, (8,))
    only_kd = FinetuneConfig(kd_weight=1.0)
    # zero up to the rounding of log-probabilities, which are about as large as the logits
    assert_close_scaled(float(distillation_loss(logits, logits, labels, only_kd)), 0.0, scale=float(logits.abs().max()))
    only_ce = FinetuneConfig(kd_weight=0.0)
    assert_close_scaled(distillation_loss(logits, logits + 1, labels, only_ce), F.cross_entropy(logits, labels))


def test_finetune_decreases_the_loss_and_trains_only_the_given_groups():
    teacher, student, features, teacher_logits, labels = distillation_problem()
    config = FinetuneConfig(epochs=4, lr=3e-2, batch_size=64)
    frozen_before = student[3].weight.detach().clone()
    before = full_loss(student, features, teacher_logits, labels, config)
    student.train()
    progress = RecordingProgress()
    result = finetune(student, teacher_logits, features, labels, generated_parameters(student), config, progress)
    assert [done for _, done, _ in progress.events] == list(range(1, 33))
    assert progress.events[-1][2] == pytest.approx(result.final_loss)
    assert student.training  # mode restored
    after = full_loss(student, features, teacher_logits, labels, config)
    assert after < 0.8 * before
    assert result.trained == ["generator:0", "bias:0"]
    assert (result.epochs, result.images, result.steps) == (4, 512, 32)
    assert len(result.losses) == 4 and result.final_loss == result.losses[-1] < result.losses[0]
    assert torch.equal(student[3].weight, frozen_before) and student[3].weight.requires_grad
    json.dumps(result.describe())


def test_finetune_is_bit_reproducible_and_the_seed_matters():
    runs = []
    for seed in (0, 0, 1):
        _, student, features, teacher_logits, labels = distillation_problem()
        result = finetune(student, teacher_logits, features, labels, generated_parameters(student),
                          FinetuneConfig(epochs=2, batch_size=100, seed=seed))
        runs.append((result.losses, dense_weights(student)["0.weight"]))
    assert runs[0][0] == runs[1][0] and torch.equal(runs[0][1], runs[1][1])
    assert runs[0][0] != runs[2][0]


class ModeProbe(nn.Module):
    """Identity that records the mode of a dropout layer and a batch-norm layer it holds."""

    def __init__(self) -> None:
        super().__init__()
        self.dropout, self.norm = nn.Dropout(0.0), nn.BatchNorm1d(16)
        self.seen: set[tuple[bool, bool]] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.add((self.dropout.training, self.norm.training))
        return self.dropout(self.norm(x) * 0 + x)


def test_finetune_trains_dropout_freezes_batch_norm_and_keeps_the_global_rng():
    _, student, features, teacher_logits, labels = distillation_problem()
    probe = ModeProbe()
    student.insert(1, probe)
    student.train()
    student[0].eval()
    running_mean = probe.norm.running_mean.clone()
    rng = torch.get_rng_state()
    finetune(student, teacher_logits, features, labels, generated_parameters(student), FinetuneConfig(epochs=1))
    assert probe.seen == {(True, False)}
    assert torch.equal(probe.norm.running_mean, running_mean)
    assert torch.equal(torch.get_rng_state(), rng)
    assert student.training and probe.norm.training and not student[0].training  # modes restored


def test_finetune_without_dropout_runs_the_whole_student_in_eval_mode():
    _, student, features, teacher_logits, labels = distillation_problem()
    probe = ModeProbe()
    student.insert(1, probe)
    student.train()
    config = FinetuneConfig(epochs=1, dropout=False)
    finetune(student, teacher_logits, features, labels, generated_parameters(student), config)
    assert probe.seen == {(False, False)}
    assert student.training and probe.dropout.training  # modes restored
    assert config.describe()["student_mode"] == "dropout off, batch norm frozen"


def test_finetune_with_zero_epochs_changes_nothing():
    _, student, features, teacher_logits, labels = distillation_problem()
    weight = dense_weights(student)["0.weight"]
    result = finetune(student, teacher_logits, features, labels, generated_parameters(student),
                      FinetuneConfig(epochs=0))
    assert (result.steps, result.final_loss) == (0, None)
    assert torch.equal(dense_weights(student)["0.weight"], weight)


def test_finetune_full_through_a_conv_layer_keeps_batch_norm_frozen():
    teacher = tiny_convnet().eval()
    images = torch.randn(96, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = logits_of(teacher, images, 96).argmax(1)
    student = copy.deepcopy(teacher)
    swap_in(student, {"0": generated_from(student[0], ttn_for(student[0].weight.detach(), bond_dims=(1, 1)))})
    running_mean = student[1].running_mean.clone()
    loader = DataLoader(TensorDataset(images, labels), batch_size=32, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    config = FinetuneConfig(epochs=5, lr=1e-2)
    before = full_loss(student, images, logits_of(teacher, images, 96), labels, config)
    result = finetune_full(student, teacher, loader, generated_parameters(student), config)
    after = full_loss(student, images, logits_of(teacher, images, 96), labels, config)
    assert after < before and result.steps == 15 and result.images == 96
    assert torch.equal(student[1].running_mean, running_mean)


@pytest.mark.parametrize("field, value", [("epochs", -1), ("lr", 0.0), ("batch_size", 0), ("temperature", 0.0),
                                          ("kd_weight", 1.5), ("weight_decay", -1.0)])
def test_bad_finetune_config_is_one_error(field, value):
    with pytest.raises(AdntnError):
        FinetuneConfig(**{field: value})


# --- the reference CIFAR-10 checkpoint (skipped without ../shared) --------------------------

REFERENCE_MODEL = SHARED / "models" / "vgg16_bn_cifar10.safetensors"
REFERENCE_DATA = SHARED / "data" / "cifar10-jpg.tar.gz"
PER_CLASS = 30  # at most 100


@pytest.fixture(scope="module")
def cifar_sample(tmp_path_factory) -> Path:
    """test/ (and a copy as train/) with the first PER_CLASS test images of each class."""
    if not (REFERENCE_MODEL.is_file() and REFERENCE_DATA.is_file()):
        pytest.skip("../shared (reference CIFAR-10 data and model) is absent")
    if shutil.which("tar") is None:
        pytest.skip("no tar program to extract the sample")
    root = tmp_path_factory.mktemp("cifar")
    subprocess.run(["tar", "-xzf", str(REFERENCE_DATA), "-C", str(root), "--wildcards", "test/*/00*.jpg"],
                   check=True)  # images 0000-0099 of each class
    for class_dir in (root / "test").iterdir():
        for image in sorted(class_dir.iterdir())[PER_CLASS:]:
            image.unlink()
    shutil.copytree(root / "test", root / "train")
    return root


def test_reference_vgg16_bn_accuracy_on_cifar_sample(cifar_sample):
    from safetensors import safe_open
    from safetensors.torch import load_file
    from torchvision.models import vgg16_bn

    with safe_open(str(REFERENCE_MODEL), "pt") as handle:
        metadata = handle.metadata()
    preprocessing, source = resolve_preprocessing(None, metadata)
    assert source == "checkpoint metadata"
    with torch.device("meta"):  # no time spent initialising weights that are then overwritten
        model = vgg16_bn(num_classes=10)
        model.avgpool = nn.AdaptiveAvgPool2d(1)
        model.classifier[0] = nn.Linear(512, 4096)
    model.load_state_dict(load_file(str(REFERENCE_MODEL)), strict=True, assign=True)
    splits = image_splits(cifar_sample, Preprocessing(**{**preprocessing.__dict__, "workers": 0}))
    assert splits.classes == json.loads(metadata["classes"])
    loader = DataLoader(splits.heldout, batch_size=100)
    accuracy = evaluate(model, loader)
    assert accuracy.images == 10 * PER_CLASS
    print(f"reference VGG-16-BN on {accuracy.images} CIFAR-10 test images: {accuracy}")
    assert accuracy.top1 > 0.8  # 0.878 on all 10,000 test images
