"""Tests for clq_compile/digits.py: the digits data, the classifier that judges samples, the sampler."""

import sys
from types import SimpleNamespace

import pytest
import torch

from clq_compile import digits


@pytest.fixture(scope="module")
def classifier():
    return digits.fit_digit_classifier(seed=0)


def test_classifier_labels_the_real_digits(classifier):
    images, labels = digits.load_digit_images()
    assert images.shape == (1797, 1, 16, 16)
    assert images.min().item() == -1.0 and images.max().item() == 1.0
    accuracy = (digits.classify(classifier, images) == labels).float().mean().item()
    assert accuracy > 0.9


def test_classify_rejects_wrong_shapes(classifier):
    with pytest.raises(ValueError, match="shape"):
        digits.classify(classifier, torch.zeros(2, 8, 8))


def test_sampler_recovers_the_image_an_oracle_denoises_towards():
    images, labels = digits.load_digit_images()
    target, labels = images[:6], labels[:6]
    alphas_cumprod = digits.training_scheduler().alphas_cumprod

    def oracle(x, timestep, class_labels):
        # The exact noise that separates x from the target at this step of the training schedule.
        a = alphas_cumprod[timestep].view(-1, 1, 1, 1)
        return SimpleNamespace(sample=(x - a.sqrt() * target) / (1 - a).sqrt())

    noise = torch.randn(target.shape, generator=torch.Generator().manual_seed(0))
    out = digits.sample(oracle, labels, noise, num_inference_steps=10)
    torch.testing.assert_close(out, target, atol=1e-5, rtol=0)


def test_without_scikit_learn_the_judge_says_what_to_install(monkeypatch):
    for name in ("sklearn", "sklearn.datasets", "sklearn.linear_model"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import sklearn...` raise ImportError
    with pytest.raises(ImportError, match=r"clq-compile\[bench\]"):
        digits.fit_digit_classifier(seed=0)
    # sampling does not need it
    out = digits.sample(lambda x, timestep, class_labels: SimpleNamespace(sample=torch.zeros_like(x)),
                        torch.tensor([3]), torch.zeros(1, 1, 16, 16), num_inference_steps=2)
    assert out.shape == (1, 1, 16, 16)
