"""``MeanFlowPipeline`` on diffusers' ``FlowMapEulerDiscreteScheduler`` gives the samples of our
own sampler for the same noise, for vectors and class-conditional images, at 1, 2 and 4 steps."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from conftest import perturbed

diffusers = pytest.importorskip("diffusers")
if not hasattr(diffusers, "FlowMapEulerDiscreteScheduler"):
    pytest.skip("this diffusers has no FlowMapEulerDiscreteScheduler", allow_module_level=True)

from meanflow.cli import main  # noqa: E402
from meanflow.flow.sampling import sample  # noqa: E402
from meanflow.runs.pipeline import MeanFlowPipeline  # noqa: E402
from meanflow.runs.noise import sample_noise  # noqa: E402
from meanflow.train import load_run  # noqa: E402


@pytest.fixture(scope="module")
def digits_pipe(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("runs") / "digits")
    assert main(["train", "--data", "digits", "--out", out, "--preset", "digits-small",
                 "--steps", "2", "--batch-size", "8", "--set", "model.channels=8", "--set",
                 "grid_every=0", "--quiet", "--threads", "1"]) == 0
    run = load_run(out)
    torch.manual_seed(0)
    perturbed(run.model, 0.1)  # zero-initialised output layers would hide the time inputs
    return MeanFlowPipeline.from_run(run)


def test_vectors_match_our_sampler_for_the_same_noise(tiny_run):
    run = load_run(tiny_run)
    perturbed(run.model)
    pipe = MeanFlowPipeline.from_run(run)
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(1))
    for steps in (1, 2, 4):
        ours = run.normalizer.decode(sample(run.model, noise, steps=steps))
        theirs = pipe(batch_size=64, num_inference_steps=steps, latents=noise,
                      output_type="pt").images
        torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-6)
        if steps == 1:  # x = e - u(e, 0, 1), exactly
            assert torch.equal(theirs, ours)
    with pytest.raises(Exception, match="not images"):
        pipe(batch_size=2, output_type="pil")


def test_images_match_trained_run_sample(digits_pipe):
    pipe, run = digits_pipe, digits_pipe.run
    pipe.set_progress_bar_config(disable=True)
    labels = ["0", "3", "7", "9", "1", "2"]
    for steps in (1, 2, 4):
        expected = run.sample(6, steps=steps, seed=11, classes=labels)  # [-1, 1], NCHW
        noise = sample_noise(run.shape, 11, 0, 6)
        images = pipe(batch_size=6, num_inference_steps=steps, class_labels=labels,
                      latents=noise, output_type="np").images
        assert images.shape == (6, 16, 16, 1)
        want = np.clip((expected + 1) / 2, 0, 1).transpose(0, 2, 3, 1)
        np.testing.assert_allclose(images, want, rtol=0, atol=1e-6)
    # sampling-time guidance: the same two-evaluation CFG as TrainedRun.sample(guidance=...)
    expected = run.sample(6, steps=2, seed=11, classes=labels, guidance=1.5)
    images = pipe(batch_size=6, num_inference_steps=2, class_labels=labels, output_type="np",
                  latents=sample_noise(run.shape, 11, 0, 6), guidance_scale=1.5).images
    np.testing.assert_allclose(images, np.clip((expected + 1) / 2, 0, 1).transpose(0, 2, 3, 1),
                               rtol=0, atol=1e-6)
    unguided = pipe(batch_size=6, num_inference_steps=2, class_labels=labels, output_type="np",
                    latents=sample_noise(run.shape, 11, 0, 6)).images
    assert np.abs(images - unguided).max() > 1e-3
    pil = pipe(batch_size=2, class_labels=[3, 4], generator=torch.manual_seed(0)).images
    assert len(pil) == 2 and pil[0].size == (16, 16)


def test_generator_makes_it_reproducible_and_labels_are_checked(digits_pipe):
    pipe = digits_pipe
    pipe.set_progress_bar_config(disable=True)
    a = pipe(batch_size=3, class_labels=5, generator=torch.manual_seed(4), output_type="pt")
    b = pipe(batch_size=3, class_labels=5, generator=torch.manual_seed(4), output_type="pt")
    c = pipe(batch_size=3, class_labels=5, generator=torch.manual_seed(5), output_type="pt")
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    with pytest.raises(Exception, match="class indices 0..9"):
        pipe(batch_size=1, class_labels=[10])
    with pytest.raises(Exception, match="2 class_labels for 3 samples"):
        pipe(batch_size=3, class_labels=[1, 2])


def test_pipeline_save_and_load(digits_pipe, tmp_path):
    pipe = digits_pipe
    pipe.set_progress_bar_config(disable=True)
    folder = str(tmp_path / "pipe")
    pipe.save_pretrained(folder)
    assert os.path.isfile(os.path.join(folder, "scheduler", "scheduler_config.json"))
    back = MeanFlowPipeline.from_pretrained(folder)
    back.set_progress_bar_config(disable=True)
    kwargs = dict(batch_size=4, num_inference_steps=2, class_labels=[1, 2, 3, 4],
                  output_type="pt")
    assert torch.equal(pipe(generator=torch.manual_seed(7), **kwargs).images,
                       back(generator=torch.manual_seed(7), **kwargs).images)
