"""Classifier-free guidance over a limited interval of steps (Kynkaanniemi et al. 2024)."""
import pytest
import torch

from difflab.guidance import guided, index_cond
from difflab.sampling import ddim_sample, ddim_timesteps
from difflab.schedule import NoiseSchedule

W = 2.5
NULL = 10


class Counting:
    """A small random-conv denoiser conditioned on a label, recording each call's batch
    size. Its rows are independent, so a row's output does not depend on the batch."""

    def __init__(self):
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1).double()
        self.embed = torch.randn(11, dtype=torch.float64)
        self.batches = []

    def __call__(self, x, t, cond):
        self.batches.append(x.shape[0])
        label = cond["label"] if isinstance(cond, dict) else cond
        with torch.no_grad():
            return torch.tanh(self.conv(x)) + self.embed[label].view(-1, 1, 1, 1) * (1 + t.view(-1, 1, 1, 1) / 1000)


def _today(den, x, t, cond, null):
    """Today's guidance (no interval), written out: one doubled batch."""
    eps = den(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, null]))
    eps_c, eps_u = eps.chunk(2)
    return eps_c + W * (eps_c - eps_u)


def _inputs(t_values):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(len(t_values), 1, 4, 4, generator=g, dtype=torch.float64)
    return x, torch.tensor(t_values), torch.tensor([3, 7, 1, 0][: len(t_values)])


def test_no_interval_is_todays_guidance_bit_for_bit():
    den = Counting()
    x, t, cond = _inputs([500, 500, 500])
    null = torch.full_like(cond, NULL)
    out = guided(den, W, null)(x, t, cond)
    assert torch.equal(out, _today(den, x, t, cond, null))
    assert den.batches == [6, 6]


def test_outside_the_interval_one_plain_forward():
    den = Counting()
    x, t, cond = _inputs([900, 900, 100])
    null = torch.full_like(cond, NULL)
    wrapped = guided(den, W, null, interval=(200, 800))
    out = wrapped(x, t, cond)
    assert den.batches == [3]
    assert torch.equal(out, den(x, t, cond))


@pytest.mark.parametrize("t_values", [[200, 200, 200], [800, 500, 650]])
def test_inside_the_interval_full_guidance(t_values):
    """Both ends are inside; all rows inside run today's code path exactly."""
    den = Counting()
    x, t, cond = _inputs(t_values)
    null = torch.full_like(cond, NULL)
    out = guided(den, W, null, interval=(200, 800))(x, t, cond)
    assert den.batches == [6]
    assert torch.equal(out, _today(den, x, t, cond, null))


def test_rows_inside_and_outside_in_one_forward():
    den = Counting()
    x, t, cond = _inputs([100, 500, 900, 300])
    null = lambda c: {"label": torch.full_like(c["label"], NULL)}
    out = guided(den, W, null, interval=(250, 600))(x, t, {"label": cond})
    assert den.batches == [4 + 2]
    full = _today(den, x, t, cond, torch.full_like(cond, NULL))
    plain = den(x, t, cond)
    inside = torch.tensor([False, True, False, True])
    torch.testing.assert_close(out[inside], full[inside], rtol=0, atol=1e-12)
    assert torch.equal(out[~inside], plain[~inside])


def test_interval_in_a_sampler_counts_forwards():
    """10 DDIM steps 900 .. 0 guided only for t in [0, 400]: 5 plain, 5 doubled forwards."""
    den = Counting()
    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    cond = torch.tensor([4, 5])
    schedule = NoiseSchedule.linear(1000)
    ts = ddim_timesteps(1000, 10)
    guided_out = ddim_sample(guided(den, W, torch.full_like(cond, NULL), interval=(0, 400)), schedule, x_T, ts, cond)
    assert den.batches == [2] * 5 + [4] * 5
    assert torch.isfinite(guided_out).all()


def test_scale_zero_and_argument_checks():
    den = Counting()
    assert guided(den, 0.0, None, interval=(0, 10)) is den
    for bad in [(5, 1), (1,), (1, 2, 3), "ab", (None, 3), (True, 4), 7]:
        with pytest.raises(ValueError, match="interval"):
            guided(den, W, None, interval=bad)
    with pytest.raises(ValueError, match="interval"):
        guided(den, 0.0, None, interval=(9, 1))


def test_index_cond_structures():
    c = {"a": torch.arange(4), "b": (torch.arange(4) * 2, None)}
    out = index_cond(c, torch.tensor([1, 3]))
    assert out["a"].tolist() == [1, 3] and out["b"][0].tolist() == [2, 6] and out["b"][1] is None
    with pytest.raises(TypeError):
        index_cond(3, torch.tensor([0]))
