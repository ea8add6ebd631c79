"""DDPM ancestral sampling, DDIM, DPM-Solver++(2M) and UniPC, as pure functions.

Every sampler takes the starting noise ``x_T`` and (all but DDPM) the list of steps from
the caller, and drives any ``Denoiser``: ``eps = denoiser(x [B,C,H,W], t [B] long, cond)``.
Samplers never know which network they drive; adapters meet the contract instead.

Per-step noise (DDPM, or DDIM with eta > 0) is drawn from the ``generator`` passed in,
on the generator's device, then moved to ``x``'s device, so a seed gives the same
numbers on any device and batch layout. DPM-Solver++(2M) and UniPC are deterministic
ODE solvers: they draw nothing and accept ``generator`` only so that callers can swap
samplers without changing the call.

Every sampler can post-process its predicted x0 in one of two ways: ``clip_x0`` (static
clipping to +-clip_x0) or ``threshold`` (Imagen's dynamic thresholding,
:func:`dynamic_threshold`), not both.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from difflab.schedule import NoiseSchedule

Denoiser = Callable[[Tensor, Tensor, Any], Tensor]
# callback(i, t, x_t, x0_pred): called after each step with the new sample.
Callback = Callable[[int, int, Tensor, Tensor], None]


def _randn(shape, like: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device, dtype=torch.float32).to(like.device, like.dtype)


def _progress(iterable, progress: bool, desc: str):
    if not progress:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False)


def dynamic_threshold(x0: Tensor, percentile: float) -> Tensor:
    """Dynamic thresholding of a predicted x0 (Saharia et al. 2022, "Imagen", Sec. 2.3).

    Per sample, ``s`` is the ``percentile`` quantile of |x0| over all its elements,
    raised to at least 1; x0 is clamped to [-s, s] and divided by s, so the result lies
    in [-1, 1]. With s = 1 this is plain clipping to [-1, 1].

    :param x0: [B, ...] predicted clean samples. Half precision is computed in float32
        (``torch.quantile`` needs it) and cast back.
    :param percentile: p in (0, 1], e.g. 0.995 (Imagen's and diffusers' default).
    :return: a tensor of x0's shape and dtype.
    """
    _check_threshold(percentile)
    flat = x0.reshape(x0.shape[0], -1)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    s = torch.quantile(flat.abs(), percentile, dim=1, keepdim=True).clamp(min=1)
    return (torch.clamp(flat, -s, s) / s).reshape(x0.shape).to(x0.dtype)


def _check_threshold(percentile: Optional[float]) -> None:
    if percentile is not None and not 0 < percentile <= 1:
        raise ValueError(f"threshold (a percentile of |x0|) must be in (0, 1], got {percentile!r}")


def _x0_options(clip_x0: Optional[float], threshold: Optional[float]) -> None:
    """Check the x0 post-processing options every sampler shares."""
    _check_threshold(threshold)
    if clip_x0 is not None and threshold is not None:
        raise ValueError(
            f"clip_x0 and threshold are alternatives; got clip_x0={clip_x0!r} and threshold={threshold!r}"
        )


def _post_x0(x0: Tensor, clip_x0: Optional[float], threshold: Optional[float]) -> Tensor:
    """Static clipping or dynamic thresholding of a predicted x0 (whichever is set)."""
    if clip_x0 is not None:
        return x0.clamp(-clip_x0, clip_x0)
    if threshold is not None:
        return dynamic_threshold(x0, threshold)
    return x0


def _step_pairs(timesteps: Union[Tensor, Sequence[int]], last_prev: int) -> tuple[list[int], list[int]]:
    """The caller's step list as ints, checked, with each step's target: the next entry
    of the same list, and ``last_prev`` for the last one."""
    steps = [int(s) for s in (timesteps.tolist() if isinstance(timesteps, Tensor) else timesteps)]
    if not steps:
        raise ValueError("timesteps is empty")
    if any(a <= b for a, b in zip(steps, steps[1:])):
        raise ValueError(f"timesteps must be strictly descending, got {steps!r}")
    if not (-1 <= last_prev < steps[-1]):
        raise ValueError(f"last_prev must be in [-1, {steps[-1]}), got {last_prev!r}")
    return steps, steps[1:] + [last_prev]


def ddim_timesteps(num_train_steps: int, num_steps: int, offset: int = 0) -> Tensor:
    """Uniformly spaced DDIM steps, descending (Song et al. 2021, "uniform" skip).

    ``stride = num_train_steps // num_steps``; steps are ``offset + k * stride`` for
    ``k = 0 .. num_steps - 1``, returned largest first. With 1000/50 and offset 1 this
    is 981, 961, ..., 21, 1.
    """
    if not 1 <= num_steps <= num_train_steps:
        raise ValueError(f"num_steps must be in [1, {num_train_steps}], got {num_steps!r}")
    stride = num_train_steps // num_steps
    steps = torch.arange(num_steps, dtype=torch.long) * stride + offset
    if offset < 0 or int(steps[-1]) >= num_train_steps:
        raise ValueError(
            f"offset {offset!r} puts steps outside [0, {num_train_steps}) for {num_steps} steps of stride {stride}"
        )
    return steps.flip(0)


SPACINGS = ("uniform", "quad", "logsnr")


def spaced_timesteps(schedule: NoiseSchedule, num_steps: int, spacing: str = "uniform") -> Tensor:
    """``num_steps`` distinct training steps, descending, spaced three ways:

    - ``uniform``: :func:`ddim_timesteps` (offset 0);
    - ``quad``: t_k = round((k / (N - 1) * sqrt(0.8 T))^2), DDIM's quadratic skip
      (Song et al. 2021, App. D.2), denser near the data;
    - ``logsnr``: uniform in lambda = log(alpha / sigma) between t = T - 1 and t = 0, each
      target lambda taken at its nearest training step (the spacing DPM-Solver's
      analysis assumes, Lu et al. 2022, Sec. 3.3).

    Where rounding makes two steps equal, the list is completed with the nearest unused
    steps, so it always holds exactly ``num_steps`` entries.
    """
    T = schedule.num_steps
    if not 1 <= num_steps <= T:
        raise ValueError(f"num_steps must be in [1, {T}], got {num_steps!r}")
    if spacing == "uniform":
        return ddim_timesteps(T, num_steps)
    if spacing == "quad":
        targets = (torch.linspace(0, (0.8 * T) ** 0.5, num_steps, dtype=torch.float64) ** 2).round()
    elif spacing == "logsnr":
        ab = schedule.alpha_bar_padded[1:]
        lam = 0.5 * (ab.log() - (1 - ab).log())  # decreasing in t
        wanted = torch.linspace(float(lam[-1]), float(lam[0]), num_steps, dtype=torch.float64)
        targets = (lam[None, :] - wanted[:, None]).abs().argmin(dim=1).double()
    else:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    chosen: list[int] = []
    for t in targets.long().clamp(0, T - 1).tolist():
        cand = t
        for d in range(T):  # nearest unused step
            for c in (t - d, t + d):
                if 0 <= c < T and c not in chosen:
                    cand = c
                    break
            else:
                continue
            break
        chosen.append(cand)
    return torch.tensor(sorted(chosen, reverse=True), dtype=torch.long)


def _adds_noise(schedule: NoiseSchedule, t: int, t_prev: int, eta: float, dtype: torch.dtype) -> bool:
    """Whether DDIM's sigma is > 0 for the step t -> t_prev: the sampler's formula in its
    dtype, on the host's copy of the schedule, so that no GPU value is read back."""
    a_t = schedule.alpha_bar_padded[t + 1].to(dtype)
    a_prev = schedule.alpha_bar_padded[t_prev + 1].to(dtype)
    return bool(eta * ((1 - a_prev) / (1 - a_t)).sqrt() * (1 - a_t / a_prev).sqrt() > 0)


def ddim_sample(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    x_T: Tensor,
    timesteps: Union[Tensor, Sequence[int]],
    cond: Any = None,
    *,
    eta: float = 0.0,
    clip_x0: Optional[float] = None,
    threshold: Optional[float] = None,
    last_prev: int = -1,
    generator: Optional[torch.Generator] = None,
    callback: Optional[Callback] = None,
    progress: bool = False,
) -> Tensor:
    """DDIM (Song, Meng & Ermon 2021, eq. 12 and 16).

    Notation (variable -> paper): ``a_t`` -> alpha_t (the paper's alpha is our
    alpha_bar), ``a_prev`` -> alpha_{t-1}, ``sigma`` -> sigma_t(eta).

        x0     = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)          [clipped to +-clip_x0]
        sigma  = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev)
        x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z

    The direction term uses the network's eps as predicted, also when x0 is clipped.

    :param x_T: [B, C, H, W] starting noise.
    :param timesteps: steps at which the network is evaluated, descending. Each step
        moves to the next entry of the same list; the last moves to ``last_prev``.
    :param last_prev: where the last step lands: ``-1`` is the clean image
        (alpha_bar = 1); ``0`` lands on step 0 (alpha_bar_0), as the course recipe does.
    :param clip_x0: clip the predicted x0 to [-clip_x0, clip_x0] at each step, or None.
    :param threshold: instead of ``clip_x0``, dynamic thresholding of x0 at this
        percentile (:func:`dynamic_threshold`), or None. Like clipping, it changes x0
        only; the direction term keeps the predicted eps.
    :param generator: source of the per-step noise z (only used when eta > 0).
    :param callback: called as ``callback(i, t, x_prev, x0_pred)`` after each step.
    """
    steps, prevs = _step_pairs(timesteps, last_prev)
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta!r}")
    _x0_options(clip_x0, threshold)
    x = x_T
    batch = x.shape[0]
    for i, (t, t_prev) in enumerate(_progress(list(zip(steps, prevs)), progress, "DDIM")):
        t_b = torch.full((batch,), t, device=x.device, dtype=torch.long)
        eps = denoiser(x, t_b, cond)
        a_t = schedule.alpha_bar(t_b, x)
        a_prev = schedule.alpha_bar(torch.full_like(t_b, t_prev), x)
        x0 = _post_x0((x - (1 - a_t).sqrt() * eps) / a_t.sqrt(), clip_x0, threshold)
        sigma = eta * ((1 - a_prev) / (1 - a_t)).sqrt() * (1 - a_t / a_prev).sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps
        if eta > 0 and _adds_noise(schedule, t, t_prev, eta, x.dtype):
            x = x + sigma * _randn(x.shape, x, generator)
        if callback is not None:
            callback(i, t, x, x0)
    return x


def ddpm_sample(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    x_T: Tensor,
    cond: Any = None,
    *,
    clip_x0: Optional[float] = None,
    threshold: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
    callback: Optional[Callback] = None,
    progress: bool = False,
) -> Tensor:
    """DDPM ancestral sampling over all T steps (Ho et al. 2020, Algorithm 2), with
    the posterior variance beta_tilde_t (eq. 7):

        mu     = 1/sqrt(alpha_t) * (x_t - beta_t / sqrt(1 - alpha_bar_t) * eps)
        x_{t-1} = mu + sqrt(beta_tilde_t) z,   z = 0 at t = 0

    With ``clip_x0`` the mean is formed from the clipped x0 through the posterior
    q(x_{t-1} | x_t, x0), which equals the formula above when nothing is clipped;
    ``threshold`` (dynamic thresholding, :func:`dynamic_threshold`) is used the same way.
    """
    _x0_options(clip_x0, threshold)
    x = x_T
    batch = x.shape[0]
    T = schedule.num_steps
    for i, t in enumerate(_progress(range(T - 1, -1, -1), progress, "DDPM")):
        t_b = torch.full((batch,), t, device=x.device, dtype=torch.long)
        eps = denoiser(x, t_b, cond)
        a_t = schedule.alpha_bar(t_b, x)
        a_prev = schedule.alpha_bar(t_b - 1, x)
        beta = 1 - a_t / a_prev
        x0 = _post_x0((x - (1 - a_t).sqrt() * eps) / a_t.sqrt(), clip_x0, threshold)
        # Posterior mean (Ho et al. eq. 7) written with x0.
        mean = (a_prev.sqrt() * beta / (1 - a_t)) * x0 + ((1 - beta).sqrt() * (1 - a_prev) / (1 - a_t)) * x
        if t > 0:
            var = beta * (1 - a_prev) / (1 - a_t)
            x = mean + var.sqrt() * _randn(x.shape, x, generator)
        else:
            x = mean
        if callback is not None:
            callback(i, t, x, x0)
    return x


def _alpha_sigma_lambda(schedule: NoiseSchedule, t: int) -> tuple[float, float, float]:
    """alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t) and
    lambda_t = log(alpha_t / sigma_t) at step ``t`` as host float64 numbers, read from the
    host copy of the schedule (no GPU value is read back). ``t = -1`` is the clean image:
    alpha = 1, sigma = 0, lambda = +inf."""
    ab = float(schedule.alpha_bar_padded[t + 1])
    alpha, sigma = math.sqrt(ab), math.sqrt(1.0 - ab)
    lam = math.log(alpha) - math.log(sigma) if sigma > 0 else math.inf
    return alpha, sigma, lam


def dpmpp_2m_sample(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    x_T: Tensor,
    timesteps: Union[Tensor, Sequence[int]],
    cond: Any = None,
    *,
    clip_x0: Optional[float] = None,
    threshold: Optional[float] = None,
    last_prev: int = -1,
    generator: Optional[torch.Generator] = None,
    callback: Optional[Callback] = None,
    progress: bool = False,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2): multistep,
    second order, data prediction, on the discrete schedule.

    Notation (variable -> paper), with t_0 = ``timesteps[0]`` and t_M = ``last_prev``:
    ``alpha`` -> alpha_t = sqrt(alpha_bar_t), ``sigma`` -> sigma_t = sqrt(1 - alpha_bar_t),
    ``lam`` -> lambda_t = log(alpha_t / sigma_t), ``h`` -> h_i = lambda_{t_i} - lambda_{t_{i-1}},
    ``r`` -> r_i = h_{i-1} / h_i, ``x0`` -> x_theta(x_{t_{i-1}}, t_{i-1}), ``d`` -> D_i.

        x0   = (x_{t_{i-1}} - sigma_{t_{i-1}} eps) / alpha_{t_{i-1}}     [clip_x0 / threshold]
        D_i  = (1 + 1/(2 r_i)) x0_{i-1} - 1/(2 r_i) x0_{i-2}             (first order: D_i = x0_{i-1})
        x_{t_i} = sigma_{t_i}/sigma_{t_{i-1}} x_{t_{i-1}} - alpha_{t_i} (e^{-h_i} - 1) D_i

    The first step is first order (DDIM with eta = 0; nothing to extrapolate from). The
    last step is first order when it lands on the clean image (``last_prev = -1``:
    lambda = inf, so h and r are undefined and the step returns x0 itself) or when there
    are fewer than 15 steps, as diffusers' ``DPMSolverMultistepScheduler`` does with
    ``lower_order_final=True``. Clipping or thresholding changes x0 and so the whole update
    (in DDIM's form the direction term then uses the eps implied by the clipped x0, not
    the predicted one as ``ddim_sample`` does).

    :param x_T: [B, C, H, W] starting noise.
    :param timesteps: steps at which the network is evaluated, descending. Each step
        moves to the next entry of the same list; the last moves to ``last_prev``.
    :param last_prev: where the last step lands: ``-1`` is the clean image
        (alpha_bar = 1); ``0`` lands on step 0 (alpha_bar_0).
    :param clip_x0: clip the predicted x0 to [-clip_x0, clip_x0] at each step, or None.
    :param threshold: instead of ``clip_x0``, dynamic thresholding of x0 at this
        percentile (:func:`dynamic_threshold`), or None.
    :param generator: unused (the solver is deterministic); accepted for a uniform call.
    :param callback: called as ``callback(i, t, x_next, x0_pred)`` after each step.
    """
    steps, prevs = _step_pairs(timesteps, last_prev)
    _x0_options(clip_x0, threshold)
    n = len(steps)
    x = x_T
    batch = x.shape[0]
    x0_last: Optional[Tensor] = None
    h_last = 0.0
    for i, (t, t_prev) in enumerate(_progress(list(zip(steps, prevs)), progress, "DPM++ 2M")):
        alpha_s, sigma_s, lam_s = _alpha_sigma_lambda(schedule, t)
        alpha_t, sigma_t, lam_t = _alpha_sigma_lambda(schedule, t_prev)
        eps = denoiser(x, torch.full((batch,), t, device=x.device, dtype=torch.long), cond)
        x0 = _post_x0((x - sigma_s * eps) / alpha_s, clip_x0, threshold)
        h = lam_t - lam_s
        # alpha_t (1 - e^{-h}); at the clean image (h = inf) this is alpha_t = 1.
        coef = -alpha_t * math.expm1(-h)
        first_order = x0_last is None or (i == n - 1 and (t_prev == -1 or n < 15))
        if first_order:
            d = x0
        else:
            r = h_last / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_last
        x = (sigma_t / sigma_s) * x + coef * d
        x0_last, h_last = x0, h
        if callback is not None:
            callback(i, t, x, x0)
    return x


def unipc_sample(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    x_T: Tensor,
    timesteps: Union[Tensor, Sequence[int]],
    cond: Any = None,
    *,
    clip_x0: Optional[float] = None,
    threshold: Optional[float] = None,
    last_prev: int = -1,
    generator: Optional[torch.Generator] = None,
    callback: Optional[Callback] = None,
    progress: bool = False,
) -> Tensor:
    """UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast
    Sampling of Diffusion Models", Algorithms 1-3): predictor UniP-2 and corrector UniC,
    data prediction, B(h) = h -- diffusers' ``UniPCMultistepScheduler`` with
    ``solver_type="bh1"``, ``solver_order=2``, ``predict_x0=True``,
    ``lower_order_final=True``, ``disable_corrector=[]``.

    Notation (variable -> paper), step t_{i-1} -> t_i: ``alpha``, ``sigma``, ``lam`` ->
    alpha_t, sigma_t, lambda_t = log(alpha_t / sigma_t); ``h`` -> h_i = lambda_{t_i} -
    lambda_{t_{i-1}}; ``hh = -h`` (data prediction integrates in -lambda); ``b_h`` ->
    B(h) = hh; ``m`` -> x_theta (the predicted x0); ``r`` -> r_1 = (lambda_{t_{i-2}} -
    lambda_{t_{i-1}}) / h_i; ``d1`` -> D_1 = (m_{i-2} - m_{i-1}) / r_1; ``rho`` -> a_1
    (predictor) and the corrector's c-vector; phi_1(z) = (e^z - 1)/z, phi_{k+1}(z) =
    (phi_k(z) - 1/k!)/z.

        x_lin = sigma_{t_i}/sigma_{t_{i-1}} x_{t_{i-1}} - alpha_{t_i} (e^{hh} - 1) m_{i-1}
        UniP-2:  x_{t_i}  = x_lin - alpha_{t_i} B(h) * 1/2 * D_1          (UniP-1: x_lin)
        UniC:    x^c_{t_i} = x_lin - alpha_{t_i} B(h) (rho_1 D_1 + rho_2 (m_i - m_{i-1}))
                 with [[1, 1], [r_1, 1]] rho = [phi_2(hh), 2 phi_3(hh)]   (UniC-1: rho = 1/2)

    m_i is the model evaluated at the predictor's x_{t_i}; the corrector reuses it, so
    the correction costs no extra evaluation, and the next predictor starts from
    x^c_{t_i}. The first step is first order (nothing to extrapolate from); the last
    predictor step is first order and is not corrected (no evaluation follows it). The
    corrector after step i-1 has the order of that step's predictor.

    :param x_T: [B, C, H, W] starting noise.
    :param timesteps: steps at which the network is evaluated, descending. Each step
        moves to the next entry of the same list; the last moves to ``last_prev``.
    :param last_prev: where the last step lands: ``-1`` is the clean image
        (alpha_bar = 1); ``0`` lands on step 0 (alpha_bar_0).
    :param clip_x0: clip the predicted x0 to [-clip_x0, clip_x0] at each step, or None.
    :param threshold: instead of ``clip_x0``, dynamic thresholding of x0 at this
        percentile (:func:`dynamic_threshold`), or None.
    :param generator: unused (the solver is deterministic); accepted for a uniform call.
    :param callback: called as ``callback(i, t, x_next, x0_pred)`` after each step, with
        the predictor's sample (the corrector refines it after the next evaluation).
    """
    steps, _ = _step_pairs(timesteps, last_prev)
    _x0_options(clip_x0, threshold)
    n = len(steps)
    coeffs = [_alpha_sigma_lambda(schedule, t) for t in steps + [last_prev]]
    x = x_T
    batch = x.shape[0]
    ms: list[Tensor] = []  # m_{i-2}, m_{i-1}: the last two predicted x0
    x_start: Optional[Tensor] = None  # x_{t_{i-1}}, where the last predictor started
    order = 0  # order of the last predictor step
    for i, t in enumerate(_progress(steps, progress, "UniPC")):
        alpha_s, sigma_s, _ = coeffs[i]
        eps = denoiser(x, torch.full((batch,), t, device=x.device, dtype=torch.long), cond)
        m = _post_x0((x - sigma_s * eps) / alpha_s, clip_x0, threshold)
        if x_start is not None:
            x = _unic(coeffs, i, x_start, ms, m, order)
        order = min(2, n - i, i + 1)
        ms = (ms + [m])[-2:]
        x_start = x
        x = _unip(coeffs, i, x, ms, order)
        if callback is not None:
            callback(i, t, x, m)
    return x


def _unip(coeffs: list[tuple[float, float, float]], i: int, x: Tensor, ms: list[Tensor], order: int) -> Tensor:
    """UniP-``order`` (B(h) = h) from step i to i + 1; ``ms[-1]`` is x_theta at step i."""
    (_, sigma_s, lam_s), (alpha_t, sigma_t, lam_t) = coeffs[i], coeffs[i + 1]
    h = lam_t - lam_s
    x_lin = (sigma_t / sigma_s) * x - (alpha_t * math.expm1(-h)) * ms[-1]
    if order == 1:
        return x_lin
    r = (coeffs[i - 1][2] - lam_s) / h
    d1 = (ms[-2] - ms[-1]) / r
    return x_lin - (alpha_t * -h * 0.5) * d1


def _unic(coeffs: list[tuple[float, float, float]], i: int, x_start: Tensor, ms: list[Tensor], m: Tensor,
          order: int) -> Tensor:
    """UniC-``order`` (B(h) = h): re-does the step i - 1 -> i from ``x_start`` with the
    model output ``m`` at step i; ``ms[-1]`` is x_theta at step i - 1."""
    (_, sigma_s, lam_s), (alpha_t, sigma_t, lam_t) = coeffs[i - 1], coeffs[i]
    h = lam_t - lam_s
    hh = -h
    b_h = hh
    h_phi_1 = math.expm1(hh)
    x_lin = (sigma_t / sigma_s) * x_start - (alpha_t * h_phi_1) * ms[-1]
    d_t = m - ms[-1]
    if order == 1:
        return x_lin - (alpha_t * b_h * 0.5) * d_t
    # [[1, 1], [r, 1]] rho = [b1, b2], b1 = hh phi_2(hh) / B(h), b2 = 2 hh phi_3(hh) / B(h).
    hh_phi_2 = h_phi_1 / hh - 1
    hh_phi_3 = hh_phi_2 / hh - 0.5
    b1 = hh_phi_2 / b_h
    b2 = 2 * hh_phi_3 / b_h
    r = (coeffs[i - 2][2] - lam_s) / h
    rho_1 = (b1 - b2) / (1 - r)
    rho_2 = b1 - rho_1
    d1 = (ms[-2] - ms[-1]) / r
    return x_lin - (alpha_t * b_h) * (rho_1 * d1 + rho_2 * d_t)


SAMPLERS = ("ddim", "ddpm", "dpmpp-2m", "unipc")


def run_sampler(
    name: str,
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    x_T: Tensor,
    timesteps: Union[Tensor, Sequence[int]],
    cond: Any = None,
    *,
    eta: float = 0.0,
    last_prev: int = -1,
    **kwargs: Any,
) -> Tensor:
    """The sampler called ``name`` (one of ``SAMPLERS``) with the common arguments.

    ``ddpm`` runs all T ancestral steps and ignores ``timesteps`` and ``last_prev``;
    ``eta`` is DDIM's (the ODE solvers take none, and refuse a non-zero one).
    ``kwargs``: ``clip_x0``, ``threshold``, ``generator``, ``callback``, ``progress``.
    """
    if name == "ddpm":
        return ddpm_sample(denoiser, schedule, x_T, cond, **kwargs)
    if name == "ddim":
        return ddim_sample(denoiser, schedule, x_T, timesteps, cond, eta=eta, last_prev=last_prev, **kwargs)
    solvers = {"dpmpp-2m": dpmpp_2m_sample, "unipc": unipc_sample}
    if name not in solvers:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {name!r}")
    if eta:
        raise ValueError(f"eta {eta!r} is DDIM's; the {name} solver is deterministic (eta must be 0)")
    return solvers[name](denoiser, schedule, x_T, timesteps, cond, last_prev=last_prev, **kwargs)
