"""DPM-Solver++(2M), UniPC and dynamic thresholding: equality with diffusers' schedulers
(test-only oracles), convergence order on Gaussian data, and the shared contract."""
import math

import numpy as np
import pytest
import torch

from difflab.sampling import (
    ddim_sample,
    ddim_timesteps,
    ddpm_sample,
    dpmpp_2m_sample,
    dynamic_threshold,
    unipc_sample,
)
from difflab.schedule import NoiseSchedule

diffusers = pytest.importorskip("diffusers")

SOLVERS = {"dpmpp_2m": dpmpp_2m_sample, "unipc": unipc_sample}


def _gaussian_eps(schedule: NoiseSchedule, mu, s: float):
    """The exact noise prediction for data x0 ~ N(mu, s^2 I): x_t ~ N(alpha mu, v I) with
    v = alpha^2 s^2 + sigma^2, so eps = -sigma * score = sigma (x - alpha mu) / v."""

    def den(x, t, cond):
        ab = schedule.alpha_bar_padded[t + 1].view(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        return (1 - ab).sqrt() * (x - ab.sqrt() * mu) / (ab * s * s + 1 - ab)

    return den


def _test_denoiser(schedule: NoiseSchedule):
    """Gaussian-data eps plus a random-conv perturbation: a non-linear, non-trivial
    denoiser whose predicted x0 stays of order 1, in float64."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 3, 3, padding=1).double()
    exact = _gaussian_eps(schedule, 0.3, 0.8)

    def den(x, t, cond):
        with torch.no_grad():
            return exact(x, t, cond) + 0.1 * torch.tanh(conv(x.double())).to(x.dtype)

    return den


# --- diffusers oracles -------------------------------------------------------------


def _oracle(cls, schedule, den, x_T, *, num_steps=None, steps=None, last_prev, **config):
    """Run a diffusers multistep scheduler on ``den`` from ``x_T``; returns its list of
    timesteps, every step's prev_sample (float64) and the scheduler.

    The scheduler gets our betas (``trained_betas``), but diffusers builds alpha_bar and
    sigma = sqrt((1 - alpha_bar) / alpha_bar) in float32, and 1 - alpha_bar loses digits
    near t = 0 (sigma is off by 8e-5 relative at t = 0 for the linear schedule), which
    moves the outputs by up to ~2e-4. Its ``alphas_cumprod`` is therefore replaced by our
    float64 table (as numpy, which set_timesteps converts it to anyway); set_timesteps
    then rounds the sigmas to float32 once, and the scheduler steps in float32."""
    sch = cls(
        num_train_timesteps=schedule.num_steps,
        trained_betas=schedule.betas.numpy(),
        prediction_type="epsilon",
        solver_order=2,
        lower_order_final=True,
        final_sigmas_type="zero" if last_prev == -1 else "sigma_min",
        **config,
    )
    sch.alphas_cumprod = schedule.alphas_cumprod.numpy().copy()
    if steps is not None:
        sch.set_timesteps(timesteps=steps)
    else:
        sch.set_timesteps(num_steps)
    x = x_T.float()
    out = []
    for t in sch.timesteps:
        eps = den(x.double(), t.expand(x.shape[0]), None).float()
        x = sch.step(eps, t, x).prev_sample
        out.append(x.double())
    return sch.timesteps.tolist(), out, sch


def _ours(solver, schedule, den, x_T, steps, last_prev, **kw):
    xs, x0s = [], []
    out = solver(den, schedule, x_T, steps, last_prev=last_prev,
                 callback=lambda i, t, x, x0: (xs.append(x), x0s.append(x0)), **kw)
    assert torch.equal(out, xs[-1])
    return xs, x0s


def _maxdiff(a, b):
    return max(float((u - v).abs().max()) for u, v in zip(a, b, strict=True))


DPM_CONFIG = {"algorithm_type": "dpmsolver++", "solver_type": "midpoint", "euler_at_final": False}
UNIPC_CONFIG = {"solver_type": "bh1", "predict_x0": True, "disable_corrector": []}


# (num_steps, offset, last_prev): < 15 steps (lower-order final step when landing on
# alpha_bar_0) and >= 15 (second-order final step); landing on the clean image or on step 0.
CASES = [(5, 1, -1), (10, 1, 0), (20, 1, 0), (20, 0, -1)]


@pytest.mark.parametrize("num_steps,offset,last_prev", CASES)
def test_dpmpp_2m_matches_diffusers_on_our_step_list(num_steps, offset, last_prev):
    schedule = NoiseSchedule.linear(1000)
    den = _test_denoiser(schedule)
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    steps = ddim_timesteps(1000, num_steps, offset).tolist()
    ts, ref, _ = _oracle(diffusers.DPMSolverMultistepScheduler, schedule, den, x_T, steps=steps,
                         last_prev=last_prev, **DPM_CONFIG)
    assert ts == steps
    xs, _ = _ours(dpmpp_2m_sample, schedule, den, x_T, steps, last_prev)
    assert _maxdiff(xs, ref) < 1e-5


@pytest.mark.parametrize("num_steps,offset,last_prev", CASES)
def test_solvers_match_diffusers_leading_spacing(num_steps, offset, last_prev):
    """diffusers' multistep schedulers space "leading" steps by T // (N + 1) (DDIMScheduler
    uses T // N): their list is ddim_timesteps(T, N + 1, offset) without its last entry."""
    schedule = NoiseSchedule.linear(1000)
    den = _test_denoiser(schedule)
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    steps = ddim_timesteps(1000, num_steps + 1, offset).tolist()[:-1]
    spacing = {"timestep_spacing": "leading", "steps_offset": offset}

    ts, ref, _ = _oracle(diffusers.DPMSolverMultistepScheduler, schedule, den, x_T, num_steps=num_steps,
                         last_prev=last_prev, **DPM_CONFIG, **spacing)
    assert ts == steps
    xs, _ = _ours(dpmpp_2m_sample, schedule, den, x_T, steps, last_prev)
    assert _maxdiff(xs, ref) < 1e-5

    ts, ref, sch = _oracle(diffusers.UniPCMultistepScheduler, schedule, den, x_T, num_steps=num_steps,
                           last_prev=last_prev, **UNIPC_CONFIG, **spacing)
    assert ts == steps
    xs, x0s = _ours(unipc_sample, schedule, den, x_T, steps, last_prev)
    if last_prev == 0:
        assert _maxdiff(xs, ref) < 1e-5
    else:
        # To sigma = 0 with B(h) = h, diffusers' last (first-order) predictor multiplies
        # B(h) = -inf by a zero residual and returns NaN; the step itself is x0_pred.
        # Every earlier step is compared, and the last against its data prediction.
        assert _maxdiff(xs[:-1], ref[:-1]) < 1e-5
        assert torch.equal(xs[-1], x0s[-1])
        assert float((xs[-1] - sch.model_outputs[-1].double()).abs().max()) < 1e-5


@pytest.mark.parametrize("name", ["dpmpp_2m", "unipc"])
def test_dynamic_thresholding_matches_diffusers(name):
    """diffusers caps s at sample_max_value; Imagen does not, so the cap is set out of reach."""
    schedule = NoiseSchedule.linear(1000)
    den = _test_denoiser(schedule)
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    steps = ddim_timesteps(1000, 10, 1).tolist()
    cls, config = ((diffusers.DPMSolverMultistepScheduler, DPM_CONFIG) if name == "dpmpp_2m"
                   else (diffusers.UniPCMultistepScheduler, UNIPC_CONFIG))
    if name == "dpmpp_2m":
        _, ref, _ = _oracle(cls, schedule, den, x_T, steps=steps, last_prev=0, thresholding=True,
                            dynamic_thresholding_ratio=0.9, sample_max_value=1e6, **config)
    else:
        steps = ddim_timesteps(1000, 11, 1).tolist()[:-1]
        _, ref, _ = _oracle(cls, schedule, den, x_T, num_steps=10, last_prev=0, thresholding=True,
                            dynamic_thresholding_ratio=0.9, sample_max_value=1e6, timestep_spacing="leading",
                            steps_offset=1, **config)
    xs, x0s = _ours(SOLVERS[name], schedule, den, x_T, steps, 0, threshold=0.9)
    assert _maxdiff(xs, ref) < 1e-5
    plain, _ = _ours(SOLVERS[name], schedule, den, x_T, steps, 0)
    assert float((plain[-1] - xs[-1]).abs().max()) > 1e-2  # thresholding was active
    assert all(float(x0.abs().max()) <= 1 + 1e-12 for x0 in x0s)


# --- convergence order on Gaussian data --------------------------------------------


def _logsnr_linear_schedule(num_steps: int, lam_max: float, lam_min: float) -> NoiseSchedule:
    """A schedule whose lambda_t = log(alpha_t / sigma_t) falls linearly in t, so uniform
    steps in t are uniform steps h in lambda."""
    lam = torch.linspace(lam_max, lam_min, num_steps, dtype=torch.float64)
    ab = torch.sigmoid(2 * lam)
    return NoiseSchedule(1 - ab / torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]]))


def test_convergence_order_on_gaussian_data():
    """Data x0 ~ N(mu, s^2 I) makes the probability-flow ODE linear: x_t has marginal
    N(alpha_t mu, v_t I), v_t = alpha_t^2 s^2 + sigma_t^2, and the flow is the monotone map
    between these Gaussians, x_end = alpha_end mu + sqrt(v_end / v_T) (x_T - alpha_T mu).

    10,000 training steps with lambda linear in t from 6 to -5 (alpha_bar from 1 - 6e-6 to
    4.5e-5, the range of DDPM's linear schedule), N steps uniform in t from 9999 to 0, so h
    is constant up to rounding t. N starts at 20: below 15 steps DPM-Solver++'s last step
    is first order. The fitted slope of log(max error) against log N is the order.
    UniPC-2's corrector raises its order to 3 (Zhao et al. 2023, UniC-p has order p + 1)."""
    T, s = 10_000, 0.5
    schedule = _logsnr_linear_schedule(T, 6.0, -5.0)
    g = torch.Generator().manual_seed(0)
    mu = 0.5 * torch.randn(1, 1, 4, 4, generator=g, dtype=torch.float64)
    x_T = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64)
    den = _gaussian_eps(schedule, mu, s)
    ab = schedule.alpha_bar_padded

    def exact(t0, t_end):
        v0, v1 = ab[t0 + 1] * s * s + 1 - ab[t0 + 1], ab[t_end + 1] * s * s + 1 - ab[t_end + 1]
        return ab[t_end + 1].sqrt() * mu + (v1 / v0).sqrt() * (x_T - ab[t0 + 1].sqrt() * mu)

    ns = [20, 40, 80, 160]
    slopes = {}
    for name, solver in [("ddim", ddim_sample), ("dpmpp_2m", dpmpp_2m_sample), ("unipc", unipc_sample)]:
        errs = []
        for n in ns:
            grid = np.round(np.linspace(T - 1, 0, n + 1)).astype(int).tolist()
            out = solver(den, schedule, x_T, grid[:-1], last_prev=grid[-1])
            errs.append(float((out - exact(grid[0], grid[-1])).abs().max()))
        slopes[name] = float(np.polyfit(np.log(ns), np.log(errs), 1)[0])
    assert -1.3 <= slopes["ddim"] <= -0.7, slopes
    assert -2.4 <= slopes["dpmpp_2m"] <= -1.6, slopes
    assert slopes["unipc"] <= -2.5, slopes


# --- the shared contract -----------------------------------------------------------


def _oracle_eps(schedule, x0):
    """Returns the noise that maps x0 to x_t exactly: every sampler must land on x0."""

    def den(x, t, cond):
        return schedule.predict_eps(x, t, x0)

    return den


@pytest.mark.parametrize("name", ["dpmpp_2m", "unipc"])
@pytest.mark.parametrize("num_steps", [1, 3, 20])
def test_oracle_denoiser_recovers_x0(name, num_steps):
    schedule = NoiseSchedule.cosine(1000)
    g = torch.Generator().manual_seed(4)
    x0 = torch.rand(2, 1, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    x_T = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64)
    out = SOLVERS[name](_oracle_eps(schedule, x0), schedule, x_T, ddim_timesteps(1000, num_steps))
    torch.testing.assert_close(out, x0, atol=1e-9, rtol=0)


@pytest.mark.parametrize("name", ["dpmpp_2m", "unipc"])
def test_one_step_is_ddim(name):
    schedule = NoiseSchedule.linear(1000)
    den = _test_denoiser(schedule)
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for last_prev in (-1, 0, 400):
        ref = ddim_sample(den, schedule, x_T, [900], last_prev=last_prev)
        out = SOLVERS[name](den, schedule, x_T, [900], last_prev=last_prev)
        torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("name", ["dpmpp_2m", "unipc"])
def test_solver_contract(name):
    schedule = NoiseSchedule.linear(1000)
    den = _test_denoiser(schedule)
    x_T = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    seen = []
    out = SOLVERS[name](den, schedule, x_T, [900, 500, 100], callback=lambda i, t, x, x0: seen.append((i, t)))
    assert seen == [(0, 900), (1, 500), (2, 100)]
    assert out.dtype == torch.float32 and out.shape == x_T.shape
    with pytest.raises(ValueError, match="descending"):
        SOLVERS[name](den, schedule, x_T, [100, 500])
    with pytest.raises(ValueError, match="last_prev"):
        SOLVERS[name](den, schedule, x_T, [500, 100], last_prev=100)
    with pytest.raises(ValueError, match="empty"):
        SOLVERS[name](den, schedule, x_T, [])


def test_dynamic_threshold_values():
    x = torch.tensor([[[-4.0, 2.0, 0.5, 1.0]], [[0.2, -0.4, 0.6, 0.8]]])
    out = dynamic_threshold(x, 0.75)
    q = torch.quantile(torch.tensor([4.0, 2.0, 0.5, 1.0]), 0.75)  # 2.5
    torch.testing.assert_close(out[0], x[0].clamp(-q, q) / q)
    assert torch.equal(out[1], x[1])  # quantile < 1: s = 1, plain clipping to [-1, 1]
    assert dynamic_threshold(x.half(), 0.75).dtype == torch.float16
    for bad in (0, 1.5, -0.1):
        with pytest.raises(ValueError, match="threshold"):
            dynamic_threshold(x, bad)


def test_threshold_and_clip_options_in_ddim_and_ddpm():
    schedule = NoiseSchedule.linear(1000)
    x_T = 3 * torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    den = lambda x, t, c: torch.zeros_like(x)  # eps = 0: x0 = x_t / sqrt(alpha_bar), large
    # DDIM: thresholding changes x0 only; the direction term keeps the predicted eps (0 here).
    out = ddim_sample(den, schedule, x_T, [999], last_prev=500, threshold=0.9)
    x0 = dynamic_threshold(x_T / schedule.alpha_bar_padded[1000].sqrt(), 0.9)
    torch.testing.assert_close(out, schedule.alpha_bar_padded[501].sqrt() * x0)
    gen = torch.Generator().manual_seed(8)
    ddpm = ddpm_sample(den, NoiseSchedule.linear(3), x_T, threshold=0.9, generator=gen)
    assert torch.isfinite(ddpm).all()
    for sampler in (lambda **kw: ddim_sample(den, schedule, x_T, [999], **kw),
                    lambda **kw: ddpm_sample(den, NoiseSchedule.linear(3), x_T, **kw),
                    lambda **kw: dpmpp_2m_sample(den, schedule, x_T, [999], **kw),
                    lambda **kw: unipc_sample(den, schedule, x_T, [999], **kw)):
        with pytest.raises(ValueError, match="alternatives"):
            sampler(clip_x0=1.0, threshold=0.9)
        with pytest.raises(ValueError, match="threshold"):
            sampler(threshold=1.5)


@pytest.mark.parametrize("name", ["dpmpp_2m", "unipc"])
def test_clip_x0_bounds_prediction(name):
    schedule = NoiseSchedule.linear(1000)
    x_T = 3 * torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(9))
    den = lambda x, t, c: torch.zeros_like(x)
    x0s = []
    out = SOLVERS[name](den, schedule, x_T, [999, 600, 200], clip_x0=1.0,
                        callback=lambda i, t, x, x0: x0s.append(x0))
    assert all(float(x0.abs().max()) <= 1.0 for x0 in x0s)
    assert float(out.abs().max()) <= 1.0 + 1e-6
    assert math.isfinite(float(out.sum()))
