"""Guidance distillation (``difflab digits distill``): the teacher trajectories are the
sampler's own states, the student learns the guided prediction, a distilled model samples
with one evaluation per step and refuses other guidance, and a run resumes exactly."""
import json

import pytest
import torch

from difflab.cli import main
from difflab.data import BalancedDigits
from difflab.digits.config import DistillConfig, SampleConfig
from difflab.digits.distill import Batches, distill, teacher_trajectories
from difflab.digits.generate import generate_images, null_condition
from difflab.digits.model_io import load_digit_model
from difflab.guidance import guided
from difflab.io import save_json, save_tensors
from difflab.nets.digit_unet import DigitDenoiser, DigitUNet
from difflab.sampling import ddim_sample, spaced_timesteps
from difflab.schedule import NoiseSchedule
from difflab.training import latest_checkpoint
from test_digits import make_layout, write_tiny_model

S = 4.0


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A tiny guided teacher whose conditional and unconditional predictions differ."""
    return write_tiny_model(tmp_path_factory.mktemp("teacher"), seed=1, scale=0.05)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = make_layout(tmp_path_factory.mktemp("digits"), counts=(("mnistm", 20), ("svhn", 10)))
    return BalancedDigits.from_root(root, cache_dir=root / "cache", progress=False)


def _cfg(**kw):
    base = dict(steps=8, batch_size=8, sample_steps=4, lr=1e-3, warmup=2, ckpt_every=4, seed=5, device="cpu")
    return DistillConfig(**{**base, **kw})


def _guided_teacher(teacher_dir):
    net, schedule, _ = load_digit_model(teacher_dir)
    return guided(DigitDenoiser(net), S - 1, null_condition("both")), schedule


def test_trajectories_are_the_states_guided_ddim_visits(teacher_dir):
    """Each recorded state is the sample DDIM holds before that step (checked against the
    sampler's own callback), and each recorded eps is the guided teacher's prediction there."""
    teacher, schedule = _guided_teacher(teacher_dir)
    ts = spaced_timesteps(schedule, 5, "uniform")
    noise = torch.randn((3, 3, 28, 28), generator=torch.Generator().manual_seed(0))
    cond = (torch.tensor([1, 7, 3]), torch.tensor([0, 1, 1]))
    with torch.no_grad():
        x, t, eps = teacher_trajectories(teacher, schedule, ts, noise, cond)
        seen = [noise]
        ddim_sample(teacher, schedule, noise, ts, cond, clip_x0=1.0, callback=lambda i, t_, x_, x0: seen.append(x_))
        assert x.shape == (3, 5, 3, 28, 28) and t.tolist() == [ts.tolist()] * 3
        for i in range(5):
            assert torch.equal(x[:, i], seen[i]), i
            torch.testing.assert_close(eps[:, i], teacher(seen[i], t[:, i], cond), rtol=0, atol=1e-6)


def test_a_batch_mixes_every_trajectory_step_and_data_rows(teacher_dir, data):
    teacher, schedule = _guided_teacher(teacher_dir)
    cfg = _cfg(batch_size=8, trajectory_share=0.5, sample_steps=4)
    batches = Batches(teacher, schedule, data, cfg, count=1, world=1, rank=0, device="cpu")
    x, t, digit, dataset, eps = batches(0)
    assert x.shape == (8, 3, 28, 28) and eps.shape == x.shape
    assert sorted(t[:4].tolist()) == sorted(spaced_timesteps(schedule, 4, "uniform").tolist())
    with torch.no_grad():  # data rows: the guided teacher's prediction at the noised image
        torch.testing.assert_close(eps[4:], teacher(x[4:], t[4:], (digit[4:], dataset[4:])), rtol=0, atol=1e-4)
    # the next step of the block takes the next state of the same trajectories
    x1, t1, *_ = batches(1)
    order = spaced_timesteps(schedule, 4, "uniform").tolist()
    assert [order.index(v) for v in t1[:4].tolist()] == [(order.index(v) + 1) % 4 for v in t[:4].tolist()]


def _gap(student: DigitUNet, teacher, schedule, seed: int) -> float:
    """Mean squared gap between the student's and the guided teacher's eps on held-out
    trajectory states."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((16, 3, 28, 28), generator=g)
    cond = (torch.randint(10, (16,), generator=g), torch.randint(2, (16,), generator=g))
    with torch.no_grad():
        x, t, eps = teacher_trajectories(teacher, schedule, spaced_timesteps(schedule, 4, "uniform"), noise, cond)
        x, t, eps = x.flatten(0, 1), t.flatten(), eps.flatten(0, 1)
        c = tuple(v.repeat_interleave(4) for v in cond)
        return float((DigitDenoiser(student)(x, t, c) - eps).pow(2).mean())


def test_distillation_brings_the_student_to_the_guided_teacher(teacher_dir, data, tmp_path):
    """Measured threshold: 60 steps cut the student's squared gap to the guided teacher on
    held-out trajectory states to under 3/4 of the starting gap (the teacher's conditional
    prediction). Measured: 0.66 of it (0.62 after 120 steps: the tiny network's limit)."""
    teacher, schedule = _guided_teacher(teacher_dir)
    start = _gap(load_digit_model(teacher_dir)[0], teacher, schedule, seed=99)
    distill(teacher_dir, None, tmp_path / "run", _cfg(steps=60, ckpt_every=0, lr=2e-3, warmup=5, ema_decay=0.9),
            data=data, progress=False)
    student, _, meta = load_digit_model(tmp_path / "run")
    end = _gap(student, teacher, schedule, seed=99)
    assert end < 0.75 * start, (start, end)
    assert student.distilled_scale == S and meta["distilled"]["guidance_scale"] == S


def test_a_distilled_model_samples_with_one_evaluation_per_step_and_refuses_other_guidance(teacher_dir, data, tmp_path):
    distill(teacher_dir, None, tmp_path / "run", _cfg(steps=2), data=data, progress=False)
    net, schedule, _ = load_digit_model(tmp_path / "run")
    calls = []
    net.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    digits, datasets = torch.tensor([0, 5, 9]), torch.tensor([0, 1, 1])
    cfg = SampleConfig(steps=6, batch_size=3, seed=2)
    images = generate_images(net, schedule, digits, datasets, cfg, progress=False)
    assert calls == [3] * 6  # one plain evaluation of the 3 images per step
    # equal to unguided DDIM with the student's network
    noise = torch.randn((3, 3, 28, 28), generator=torch.Generator().manual_seed(2))
    noise = noise.contiguous(memory_format=torch.channels_last)  # the layout CPU sampling uses
    with torch.no_grad():
        plain = ddim_sample(DigitDenoiser(net), schedule, noise, spaced_timesteps(schedule, 6, "uniform"),
                            (digits, datasets), clip_x0=1.0).clamp(-1, 1)
    torch.testing.assert_close(images, plain, rtol=0, atol=1e-6)
    for other in (dict(guidance_scale=3.0), dict(guide_on="digit"), dict(guidance_interval=(0, 500))):
        with pytest.raises(ValueError, match="guidance scale 4 distilled into it"):
            generate_images(net, schedule, digits, datasets, SampleConfig(**other), progress=False)


def test_distillation_resumes_exactly_even_inside_a_block(teacher_dir, data, tmp_path):
    """Stopped after step 6 (inside the second block of 4 trajectory steps) and resumed, a
    run ends with the losses and weights of an uninterrupted one."""
    full = distill(teacher_dir, None, tmp_path / "full", _cfg(steps=10), data=data, progress=False)
    distill(teacher_dir, None, tmp_path / "part", _cfg(steps=10, ckpt_every=3), data=data, progress=False, stop_at=6)
    part = distill(teacher_dir, None, tmp_path / "part", _cfg(steps=10), data=data, progress=False, resume=True)
    assert part == full
    a, b = load_digit_model(tmp_path / "full")[0], load_digit_model(tmp_path / "part")[0]
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k


def test_resuming_with_another_teacher_or_options_is_refused(teacher_dir, data, tmp_path):
    distill(teacher_dir, None, tmp_path / "run", _cfg(steps=4), data=data, progress=False, stop_at=4)
    other = tmp_path / "other"
    other.mkdir()
    save_json(json.loads((teacher_dir / "config.json").read_text()), other / "config.json")
    net = load_digit_model(teacher_dir)[0]
    save_tensors({k: v + 0.01 for k, v in net.state_dict().items()}, other / "model.safetensors")
    with pytest.raises(ValueError, match="distilled from a teacher with weights sha256"):
        distill(other, None, tmp_path / "run", _cfg(steps=8), data=data, progress=False, resume=True)
    with pytest.raises(ValueError, match="trajectory_share 0.5 -> 0.25"):
        distill(teacher_dir, None, tmp_path / "run", _cfg(steps=8, trajectory_share=0.25), data=data, progress=False,
                resume=True)


def test_distil_cli_bad_inputs(teacher_dir, data, tmp_path, capsys):
    """One line naming the option or file: a missing teacher, a distilled teacher, no data
    for data rows, guidance scale 1."""
    assert main(["digits", "distill", "--teacher", str(tmp_path / "nope"), "--out", str(tmp_path / "a"),
                 "--trajectory-share", "1", "--quiet"]) == 2
    assert "digit checkpoint not found" in capsys.readouterr().err
    assert main(["digits", "distill", "--teacher", str(teacher_dir), "--out", str(tmp_path / "b"), "--quiet"]) == 2
    assert "--data is needed" in capsys.readouterr().err
    assert main(["digits", "distill", "--teacher", str(teacher_dir), "--out", str(tmp_path / "c"), "--guidance-scale",
                 "1", "--trajectory-share", "1", "--quiet"]) == 2
    assert "no guidance to distil" in capsys.readouterr().err
    distill(teacher_dir, None, tmp_path / "run", _cfg(steps=1, trajectory_share=1.0), progress=False)
    assert main(["digits", "distill", "--teacher", str(tmp_path / "run"), "--out", str(tmp_path / "d"),
                 "--trajectory-share", "1", "--quiet"]) == 2
    assert "already distilled" in capsys.readouterr().err
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists() and not (tmp_path / "d").exists()


def test_a_distilled_model_folder_is_the_teachers_config_plus_its_guidance(teacher_dir, tmp_path):
    """The student is the teacher's own network and schedule: a distilled model folder
    carries the teacher's config.json plus the distilled section."""
    distill(teacher_dir, None, tmp_path / "run", _cfg(steps=1, trajectory_share=1.0), progress=False)
    meta = json.loads((latest_checkpoint(tmp_path / "run") / "config.json").read_text())
    teacher_meta = json.loads((teacher_dir / "config.json").read_text())
    assert {k: v for k, v in meta.items() if k != "distilled"} == teacher_meta
    assert NoiseSchedule.from_name(meta["schedule"], meta["num_train_steps"]).num_steps == 1000
