"""Schedules, samplers, guidance, image I/O and checkpoints: analytic properties."""
import math

import numpy as np
import pytest
import torch

from difflab.guidance import cat_cond, guided
from difflab.io import load_png, load_state_strict, load_tensors, make_grid, save_png, save_tensors, to_uint8
from difflab.sampling import ddim_sample, ddim_timesteps, ddpm_sample
from difflab.schedule import NoiseSchedule, cosine_betas


def test_linear_schedule_hand_values():
    s = NoiseSchedule.linear(1000)
    assert s.betas.dtype == torch.float64
    assert s.betas[0].item() == pytest.approx(1e-4, abs=1e-15)
    assert s.betas[-1].item() == pytest.approx(2e-2, abs=1e-15)
    step = (2e-2 - 1e-4) / 999
    assert s.betas[1].item() == pytest.approx(1e-4 + step, rel=1e-12)
    # alpha_bar_2 = (1 - b0)(1 - b1)(1 - b2), by hand
    b0, b1, b2 = 1e-4, 1e-4 + step, 1e-4 + 2 * step
    assert s.alphas_cumprod[2].item() == pytest.approx((1 - b0) * (1 - b1) * (1 - b2), rel=1e-12)
    # The well-known endpoint of the DDPM linear schedule: alpha_bar_T ~ 4.04e-5.
    assert s.alphas_cumprod[-1].item() == pytest.approx(4.0358e-5, rel=1e-3)
    assert s.alphas_cumprod_prev[0].item() == 1.0
    assert torch.allclose(s.posterior_variance[1:], s.betas[1:] * (1 - s.alphas_cumprod[:-1]) / (1 - s.alphas_cumprod[1:]))


def test_cosine_schedule_matches_closed_form():
    T, s_ = 1000, 0.008
    sched = NoiseSchedule.cosine(T, s_)
    f = lambda t: math.cos((t / T + s_) / (1 + s_) * math.pi / 2) ** 2
    for t in (0, 10, 500, 900):
        assert sched.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert float(cosine_betas(T).max()) <= 0.999


def test_schedule_rejects_bad_betas():
    with pytest.raises(ValueError, match="betas must lie in"):
        NoiseSchedule(torch.tensor([0.1, 1.5], dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown schedule"):
        NoiseSchedule.from_name("quadratic")


def test_q_sample_and_predict_x0_are_inverse():
    s = NoiseSchedule.linear()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
    noise = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 10, 500, 999])
    xt = s.q_sample(x0, t, noise)
    assert torch.allclose(s.predict_x0(xt, t, noise), x0, atol=1e-8)
    assert torch.allclose(s.predict_eps(xt, t, x0), noise, atol=1e-8)


def test_ddim_timesteps_layout():
    assert ddim_timesteps(1000, 50, offset=1).tolist()[:3] == [981, 961, 941]
    assert ddim_timesteps(1000, 50, offset=1).tolist()[-1] == 1
    assert ddim_timesteps(1000, 10).tolist() == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    assert ddim_timesteps(1000, 1000).tolist() == list(range(999, -1, -1))
    with pytest.raises(ValueError):
        ddim_timesteps(1000, 0)
    with pytest.raises(ValueError):
        ddim_timesteps(1000, 1000, offset=1)


def _oracle(schedule, x0):
    """A denoiser that returns the exact noise taking x0 to x_t."""
    return lambda x, t, cond: schedule.predict_eps(x, t, x0)


@pytest.mark.parametrize("num_steps", [1, 7, 50, 1000])
@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_ddim_eta0_with_oracle_recovers_x0(num_steps, name):
    s = NoiseSchedule.from_name(name)
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(2, 3, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    x_T = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    out = ddim_sample(_oracle(s, x0), s, x_T, ddim_timesteps(1000, num_steps))
    assert torch.allclose(out, x0, atol=1e-6)


def test_ddim_last_prev_zero_lands_on_step_zero():
    s = NoiseSchedule.linear()
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(1, 3, 4, 4, generator=g, dtype=torch.float64)
    x_T = torch.randn(1, 3, 4, 4, generator=g, dtype=torch.float64)
    ts = ddim_timesteps(1000, 50, offset=1)
    out = ddim_sample(_oracle(s, x0), s, x_T, ts, last_prev=0)
    # With the true noise the deterministic DDIM path stays on x_t = sqrt(a_t) x0 + sqrt(1-a_t) eps*
    # with one eps* for every step, so landing on t = 0 gives q_sample(x0, 0, eps*).
    x_first = ddim_sample(_oracle(s, x0), s, x_T, ts[:1], last_prev=int(ts[1]))
    eps_star = s.predict_eps(x_first, ts[1:2], x0)
    a0 = s.alphas_cumprod[0]
    assert torch.allclose(out, a0.sqrt() * x0 + (1 - a0).sqrt() * eps_star, atol=1e-8)
    assert not torch.allclose(out, x0, atol=1e-4)


def test_ddim_clipping_keeps_predicted_eps():
    s = NoiseSchedule.linear()
    x_T = torch.full((1, 1, 2, 2), 3.0, dtype=torch.float64)
    eps_value = 0.5
    den = lambda x, t, c: torch.full_like(x, eps_value)
    out = ddim_sample(den, s, x_T, [999], clip_x0=1.0, last_prev=500)
    a_t, a_p = s.alphas_cumprod[999], s.alphas_cumprod[500]
    x0 = ((3.0 - (1 - a_t).sqrt() * eps_value) / a_t.sqrt()).clamp(-1, 1)
    expected = a_p.sqrt() * x0 + (1 - a_p).sqrt() * eps_value
    assert torch.allclose(out, torch.full_like(out, float(expected)))


def test_ddim_eta1_all_steps_equals_ddpm():
    s = NoiseSchedule.linear()
    den = lambda x, t, c: 0.3 * x * (t.view(-1, 1, 1, 1) / (t.view(-1, 1, 1, 1) + 1.0)) + 0.1
    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    a = ddim_sample(den, s, x_T, ddim_timesteps(1000, 1000), eta=1.0, generator=torch.Generator().manual_seed(7))
    b = ddpm_sample(den, s, x_T, generator=torch.Generator().manual_seed(7))
    assert torch.allclose(a, b, atol=1e-8), (a - b).abs().max()
    c = ddpm_sample(den, s, x_T, generator=torch.Generator().manual_seed(8))
    assert not torch.allclose(a, c, atol=1e-3)


def test_ddpm_with_oracle_returns_x0():
    """At t = 0 the posterior mean with alpha_bar_prev = 1 is x0 itself, so with the
    true noise DDPM ends exactly on x0 whatever noise it added on the way."""
    s = NoiseSchedule.linear()
    x0 = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x_T = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    seen = []
    out = ddpm_sample(_oracle(s, x0), s, x_T, generator=torch.Generator().manual_seed(1),
                      callback=lambda i, t, x, x0p: seen.append((t, float((x - x0).abs().max()))))
    assert torch.allclose(out, x0, atol=1e-9)
    assert [t for t, _ in seen[:2]] == [999, 998] and seen[-1][0] == 0
    assert seen[-2][1] > 1e-3  # one step earlier the sample still carried noise


def test_sampler_argument_checks():
    s = NoiseSchedule.linear()
    den = lambda x, t, c: x
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="descending"):
        ddim_sample(den, s, x, [10, 20])
    with pytest.raises(ValueError, match="last_prev"):
        ddim_sample(den, s, x, [20, 10], last_prev=10)
    with pytest.raises(ValueError, match="empty"):
        ddim_sample(den, s, x, [])


def _cond_denoiser(calls):
    def den(x, t, cond):
        calls.append(x.shape[0])
        label = cond["label"].view(-1, 1, 1, 1).to(x.dtype)
        return x * 0.5 + label + 0.01 * t.view(-1, 1, 1, 1)
    return den


def test_guidance_scale_zero_is_the_conditional_model():
    calls = []
    den = _cond_denoiser(calls)
    assert guided(den, 0.0, lambda c: c) is den


def test_guidance_batched_equals_two_calls_and_formula():
    calls = []
    den = _cond_denoiser(calls)
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([5, 50, 500])
    cond = {"label": torch.tensor([1, 2, 3])}
    null = {"label": torch.tensor([10, 10, 10])}
    w = 2.5
    out = guided(den, w, null)(x, t, cond)
    assert calls == [6]  # one doubled forward
    e_c, e_u = den(x, t, cond), den(x, t, null)
    assert torch.allclose(out, (1 + w) * e_c - w * e_u)
    assert torch.allclose(out, e_u + (1 + w) * (e_c - e_u))  # the "s = 1 + w" form
    out2 = guided(den, w, lambda c: {"label": torch.full_like(c["label"], 10)})(x, t, cond)
    assert torch.allclose(out, out2)


def test_cat_cond_structures():
    a = (torch.tensor([1]), {"k": torch.tensor([2])})
    b = (torch.tensor([3]), {"k": torch.tensor([4])})
    out = cat_cond(a, b)
    assert out[0].tolist() == [1, 3] and out[1]["k"].tolist() == [2, 4]
    with pytest.raises(ValueError):
        cat_cond({"a": torch.tensor([1])}, {"b": torch.tensor([1])})


def test_to_uint8_matches_save_image_rounding():
    x = torch.tensor([0.0, 0.5 / 255, 0.499 / 255, 1.0, 1.2, -0.1, 0.5]).view(1, 1, 7).repeat(3, 1, 1)
    got = to_uint8(x)[0, :, 0].tolist()
    expected = [int(min(max(v * 255 + 0.5, 0), 255)) for v in [0.0, 0.5 / 255, 0.499 / 255, 1.0, 1.2, -0.1, 0.5]]
    assert got == expected == [0, 1, 0, 255, 255, 0, 128]


def test_png_roundtrip_and_grid_layout(tmp_path):
    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(12, 3, 5, 7, generator=g)
    grid = make_grid(imgs, nrow=5, padding=2, pad_value=0.25)
    assert grid.shape == (3, 3 * 7 + 2, 5 * 9 + 2)
    assert torch.equal(grid[:, 2:7, 2:9], imgs[0])
    assert torch.equal(grid[:, 9:14, 2 + 9 : 9 + 9], imgs[6])  # row 1, col 1
    assert float(grid[0, 0, 0]) == 0.25
    save_png(imgs[0], tmp_path / "a.png")
    back = load_png(tmp_path / "a.png")
    assert torch.equal(back, torch.from_numpy(to_uint8(imgs[0])).permute(2, 0, 1).float() / 255)
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]  # no temp files left


def test_load_png_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_png(tmp_path / "nope.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="bad.png"):
        load_png(bad)


def test_save_tensors_is_atomic_and_strict(tmp_path, monkeypatch):
    net = torch.nn.Linear(3, 2)
    path = tmp_path / "w.safetensors"
    save_tensors(net.state_dict(), path)
    loaded = load_tensors(path)
    other = torch.nn.Linear(3, 2)
    load_state_strict(other, loaded, path)
    assert torch.equal(other.weight, net.weight)

    import safetensors.torch as ck  # save_tensors imports save_file from here at call time

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", boom)
    with pytest.raises(OSError):
        save_tensors({"x": torch.zeros(2)}, path)
    assert load_tensors(path).keys() == net.state_dict().keys()  # old file intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]

    with pytest.raises(ValueError) as e:
        load_state_strict(torch.nn.Linear(4, 2), loaded, path)
    assert "shape conflicts" in str(e.value) and "weight" in str(e.value) and "w.safetensors" in str(e.value)
    with pytest.raises(ValueError, match="missing keys"):
        load_state_strict(torch.nn.Linear(3, 2), {"weight": loaded["weight"]}, path)


def test_slerp_analytic_cases_and_parallel_fallback():
    from difflab.interpolation import lerp, slerp

    e0 = torch.zeros(1, 4)
    e0[0, 0] = 1.0
    e1 = torch.zeros(1, 4)
    e1[0, 1] = 1.0
    # Orthogonal unit vectors: theta = pi/2, so slerp(a) = cos(a pi/2) e0 + sin(a pi/2) e1.
    for a in (0.0, 0.25, 0.5, 1.0):
        expected = math.cos(a * math.pi / 2) * e0 + math.sin(a * math.pi / 2) * e1
        assert torch.allclose(slerp(e0, e1, a), expected, atol=1e-6)
    # Per sample: row 0 is parallel (falls back to lerp, no NaN), row 1 orthogonal.
    z0 = torch.cat([e0, e0])
    z1 = torch.cat([3 * e0, e1])
    out = slerp(z0, z1, 0.5)
    assert torch.isfinite(out).all()
    assert torch.allclose(out[0], lerp(e0, 3 * e0, 0.5)[0])
    assert torch.allclose(out[1], (e0[0] + e1[0]) / math.sqrt(2), atol=1e-6)
    with pytest.raises(ValueError, match="equal shapes"):
        slerp(torch.zeros(2, 3), torch.zeros(3, 2), 0.5)


def test_min_snr_weighting_matches_closed_form():
    """Min-SNR-5: each sample's MSE times min(SNR, 5)/SNR, with SNR from the linear betas by hand."""
    from difflab.schedule import NoiseSchedule, ddpm_loss

    sched = NoiseSchedule.linear(1000)
    betas = np.linspace(1e-4, 2e-2, 1000, dtype=np.float64)
    abar = np.cumprod(1 - betas)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(6, 3, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(6, 3, 8, 8, generator=g)
    t = torch.tensor([0, 10, 100, 300, 700, 999])
    pred = torch.randn(6, 3, 8, 8, generator=g)
    denoiser = lambda x, tt, c: pred  # noqa: E731  (a fixed prediction makes the per-sample error known)
    per_sample = ((pred - noise) ** 2).flatten(1).mean(1).double().numpy()
    snr = abar[t.numpy()] / (1 - abar[t.numpy()])
    expected = float(np.mean(np.minimum(snr, 5.0) / snr * per_sample))
    got = float(ddpm_loss(denoiser, sched, x0, t, noise, min_snr_gamma=5.0))
    assert got == pytest.approx(expected, rel=1e-5)
    # low-noise steps are down-weighted, high-noise steps (SNR < 5) keep weight 1
    assert snr[0] > 5 > snr[-1]
    plain = float(ddpm_loss(denoiser, sched, x0, t, noise))
    assert plain == pytest.approx(float(per_sample.mean()), rel=1e-5)
    assert got < plain
