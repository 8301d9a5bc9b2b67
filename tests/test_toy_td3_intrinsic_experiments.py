"""Tests of toy_td3_intrinsic_experiments.py: the note's numbers, by hand and by independent methods."""

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import toy_td3_intrinsic_experiments as toy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def run(tmp_path_factory):
    """One full default run (the command users type). Its speed is in the README, not asserted:
    a loaded CI machine is slower without anything being wrong."""
    out = tmp_path_factory.mktemp("toy")
    metrics = toy.main(toy.Args(out_dir=str(out)))
    return out, metrics


@pytest.mark.xdist_group("toy_run")
def test_default_run_writes_every_file(run):
    out, metrics = run
    for name in ("fig_action_gap_phase.png", "fig_gate_and_scale.png", "fig_actor_freeze.png"):
        path = out / "figures" / name
        assert path.stat().st_size > 20_000  # a real figure, not an empty canvas
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(out / "toy_metrics.json") as f:
        on_disk = json.load(f)
    public = lambda d: {k: public(v) if isinstance(v, dict) else v for k, v in d.items() if not k.startswith("_")}
    assert on_disk == json.loads(json.dumps(public(metrics)))  # every number returned, none but the plots' data
    assert set(on_disk) >= {"action_gap", "gate_scale", "actor_freeze"}


# --- A. action gap --------------------------------------------------------------------------------
def test_argmax_flip_by_hand():
    q = toy.q_env_discrete(0.2)  # best 1.0, runner-up 0.8
    delta = np.zeros(toy.N_ACTIONS)
    delta[toy.BEST], delta[toy.RUNNER_UP] = -1.0, 1.0
    # w = 0.09: best 1 - 0.09 = 0.91 > runner-up 0.8 + 0.09 = 0.89, no flip
    assert not toy.argmax_flipped(q, delta, 0.09)
    # w = 0.11: 0.89 < 0.91, the runner-up wins
    assert toy.argmax_flipped(q, delta, 0.11)
    # w = 0.1 = lambda*: both 0.9, a tie, and the runner-up's lower index is what np.argmax names first
    assert toy.RUNNER_UP < toy.BEST and not toy.argmax_flipped(q, delta, 0.1)
    assert not toy.argmax_flipped(q, np.full(toy.N_ACTIONS, 7.0), 100.0)  # constant Delta: never
    assert toy.action_gap_threshold(0.2, 2.0) == pytest.approx(0.1)


@pytest.mark.xdist_group("toy_run")
def test_action_gap_metrics(run):
    ag = run[1]["action_gap"]
    assert ag["sup_delta"] == 2.0 and ag["m"] == 0.2
    assert ag["lambda_star_theory"] == pytest.approx(0.1)
    assert ag["w_step"] <= 0.005
    assert 0.1 < ag["lambda_star_empirical"] <= 0.1 + ag["w_step"] + 1e-12  # the first w of the grid above lambda*
    assert ag["action_independent_flips"] == 0
    assert ag["random_delta_flips_below_lambda_star"] == 0  # the bound holds for any Delta of spread 2
    # by hand, from the theory: the worst-case Delta flips the argmax iff w > m / sup Delta = m / 2; every m / 2
    # of the grid is a multiple of w_step, so the first flipped w is m / 2 + w_step on every row
    pm, step = ag["phase_map"], ag["w_step"]
    ws = np.round(np.arange(pm["w_min"], pm["w_max"] + step / 2, step), 10)
    ms = np.round(np.linspace(pm["m_min"], pm["m_max"], pm["m_count"]), 10)
    assert np.allclose(ms / 2 / step, np.round(ms / 2 / step))
    assert pm["flipped_fraction"] == pytest.approx(np.mean(ws[None, :] > ms[:, None] / 2))
    assert pm["boundary_max_abs_error"] == pytest.approx(step)


# --- B. gate and scale ----------------------------------------------------------------------------
def test_kappa_is_2_delta_near_the_bound():
    # kappa(1 - delta) = 2 delta - delta^2; at delta = 0.01: 0.0199, and 2 delta = 0.02
    assert toy.kappa(np.array([0.99]))[0] == pytest.approx(0.0199)
    # relative error of 2 delta is delta / (2 - delta), largest at delta = 0.01
    assert toy.kappa_2delta_max_rel_error() == pytest.approx(0.01 / 1.99, rel=1e-9)


def gauss_hermite_kappa_mean(ratio, nodes=120):
    """E[sech^2(u)], u ~ N(0, 1 + r^2), by Gauss-Hermite: a method independent of the script's."""
    x, w = np.polynomial.hermite_e.hermegauss(nodes)
    u = np.sqrt(1 + ratio**2) * x
    return float(np.sum(w / np.cosh(u) ** 2) / np.sqrt(2 * np.pi))


def kappa_mean_over_u(ratio):
    """E[sech^2(u)], u ~ N(0, 1 + r^2), by the trapezoid rule over u (sech^2 is below 1e-30 beyond |u| = 40):
    right at every ratio, where Gauss-Hermite's nodes step over sech^2's narrow peak once r is large."""
    sigma, u = math.sqrt(1 + ratio**2), np.linspace(-40.0, 40.0, 160001)
    return float(np.trapezoid(np.exp(-((u / sigma) ** 2) / 2) / (sigma * math.sqrt(2 * math.pi)) / np.cosh(u) ** 2, u))


def joint_transport(ratio, nodes=120):
    """E[|x_small| sech^2(x_small + x_big)], x_small ~ N(0, 1), x_big ~ N(0, r^2): Gauss-Hermite over x_big,
    the trapezoid rule over x_small (|x| has a kink at 0): independent of the script's conditional form."""
    y, w = np.polynomial.hermite_e.hermegauss(nodes)
    x = np.linspace(-10.0, 10.0, 20001)
    inner = (w / np.cosh(x[:, None] + ratio * y) ** 2).sum(axis=1) / np.sqrt(2 * np.pi)
    return float(np.trapezoid(np.abs(x) * np.exp(-(x**2) / 2) / np.sqrt(2 * np.pi) * inner, x))


def test_exact_values_against_independent_methods():
    ex1, ex100 = toy.gate_stats_exact(1.0), toy.gate_stats_exact(100.0)
    assert ex1["kappa_mean"] == pytest.approx(gauss_hermite_kappa_mean(1.0), abs=1e-6)
    # ratio 100: u is spread so wide that E[sech^2 u] = (integral of sech^2 = 2) * density at 0,
    # and E|x_small| given u ~ 0 is the folded-normal mean sqrt(2/pi) * r / sqrt(1 + r^2)
    sigma = math.sqrt(1 + 100.0**2)
    assert ex100["kappa_mean"] == pytest.approx(2 / (math.sqrt(2 * math.pi) * sigma), rel=2e-3)
    expected = 2 / (math.sqrt(2 * math.pi) * sigma) * math.sqrt(2 / math.pi) * 100 / sigma
    assert ex100["transport"] == pytest.approx(expected, rel=2e-3)
    # saturation is closed form: P(|u| >= atanh(0.99)) = 2 Phi(-atanh(0.99) / sigma)
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))
    assert ex1["saturation_rate"] == pytest.approx(2 * phi(-math.atanh(0.99) / math.sqrt(2)), rel=1e-9)
    assert ex1["kappa_mean"] == pytest.approx(0.4800, abs=5e-4)
    for ratio in (1.0, 3.0):  # transport on the joint density of (x_small, x_big), not the script's 1-D integral
        assert toy.gate_stats_exact(ratio)["transport"] == pytest.approx(joint_transport(ratio), abs=1e-5)
    assert ex1["transport"] == pytest.approx(0.3041, abs=5e-5)


@pytest.mark.xdist_group("toy_run")
def test_gate_scale_monte_carlo_numbers(run):
    gs = run[1]["gate_scale"]
    ratios = gs["scale_ratios"]
    no, norm = gs["no_norm"], gs["norm"]
    for i, ratio in enumerate(ratios):  # Monte Carlo within 4 of its standard errors of the quadrature
        assert abs(no["kappa_mean"][i] - kappa_mean_over_u(ratio)) < 4 * no["kappa_mean_se"][i]
    assert no["kappa_mean"][0] == pytest.approx(0.481, abs=0.01)
    assert no["kappa_mean"][-1] <= 0.01
    assert no["transport"][0] == pytest.approx(0.304, abs=0.01)
    assert no["transport"][-1] <= 0.008
    for i in range(len(ratios)):
        assert norm["kappa_mean"][i] == pytest.approx(0.481, abs=0.015)
        assert norm["transport"][i] == pytest.approx(0.304, abs=0.015)
    assert all(b > a for a, b in zip(no["saturation_rate"], no["saturation_rate"][1:]))
    assert max(norm["saturation_rate"]) < 0.1
    # Monte Carlo and quadrature agree within 4 standard errors at every ratio
    exact = gs["exact"]["no_norm"]
    for key in ("kappa_mean", "transport"):
        for mc, se, ex in zip(no[key], no[f"{key}_se"], exact[key]):
            assert abs(mc - ex) <= 4 * se
    assert gs["kappa_2delta_max_rel_error"] == pytest.approx(0.01 / 1.99, rel=1e-6)


# --- C. training ----------------------------------------------------------------------------------
@pytest.mark.xdist_group("toy_run")
def test_actor_freeze_and_flip(run):
    af = run[1]["actor_freeze"]
    freeze = af["freeze"]
    assert freeze["no_norm"]["near_bound_ratio"][0] == 1.0 and freeze["norm"]["near_bound_ratio"][0] == 1.0
    assert freeze["no_norm"]["steps_to_leave_bound"] is None  # stuck for the whole budget
    assert freeze["no_norm"]["near_bound_ratio"][-1] == 1.0
    assert freeze["norm"]["steps_to_leave_bound"] is not None
    assert freeze["norm"]["steps_to_leave_bound"] < freeze["train_steps"]
    assert freeze["norm"]["final_action_mean"] == pytest.approx(0.3, abs=0.05)  # reached Q's optimum
    assert freeze["no_norm"]["initial_kappa_mean"] < 1e-8 < freeze["norm"]["initial_kappa_mean"]

    flip = af["flip"]
    assert flip["measured_action_gap"] == pytest.approx(0.2, abs=0.01)
    runs = flip["runs"]
    assert not runs["w_0"]["flipped"] and runs["w_0"]["final_action_mean"] == pytest.approx(0.5, abs=0.05)
    assert not runs["w_0.5_lambda"]["flipped"]
    assert runs["w_2_lambda"]["flipped"] and runs["w_2_lambda"]["final_action_mean"] == pytest.approx(-0.5, abs=0.05)
    # an action-independent bonus moves Q by w everywhere and the actor not at all
    assert flip["constant_delta_actions_identical_to_w_0"] is True


def test_bad_flag_is_one_line_exit_2(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "toy_td3_intrinsic_experiments.py"),
                             "--num-samples", "10", "--out-dir", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "--num-samples" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("field, value, message", [
    ("m", 1e-17, "--m must be in [1e-6, 0.5)"),  # 1 - 1e-17 == 1.0: no w could ever flip the argmax
    ("w_step", 1e-9, "--w-step must be in [1e-4, 0.05]"),  # 5e8 grid columns: hours of argmax
    ("seed", -1, "--seed must be in [0, 2**32)"),
    ("num_samples", 10 ** 10, "--num-samples must be in [1000, 10**7]"),  # 75 GiB an array
])
def test_values_that_would_crash_or_never_end_are_user_errors(tmp_path, field, value, message):
    with pytest.raises(toy.UserError, match=re.escape(message)):
        toy.main(toy.Args(out_dir=str(tmp_path / "out"), **{field: value}))
    assert not (tmp_path / "out").exists()
    (tmp_path / "a_file").write_text("")
    with pytest.raises(toy.UserError, match="cannot write under --out-dir: .*a_file"):
        toy.main(toy.Args(out_dir=str(tmp_path / "a_file")))


def test_an_output_that_cannot_be_written_is_refused_before_any_work_and_old_metrics_go(tmp_path):
    out = tmp_path / "out"
    (out / "toy_metrics.json").mkdir(parents=True)  # a folder where the metrics go
    with pytest.raises(toy.UserError, match="cannot write under --out-dir: .*toy_metrics.json' is a folder"):
        toy.main(toy.Args(out_dir=str(out)))
    assert os.listdir(out / "figures") == []  # refused before the first figure
    (out / "toy_metrics.json").rmdir()
    (out / "toy_metrics.json").write_text('{"seed": 0}')  # an earlier run's
    toy.prepare_out_dir(str(out / "figures"), str(out / "toy_metrics.json"))
    assert not (out / "toy_metrics.json").exists()  # a stopped rerun leaves no old metrics beside new figures
