"""The toy model behind the TD3 action freeze: why an intrinsic reward can move the critic's
values while the actor does not move at all.

Three experiments, each a few functions:
  A. Action gap. r_tot = r_env + w*r_int changes the critic to Q_env + w*Delta. The greedy
     action can only change if w * supDelta > m, the action gap between the best and the
     runner-up action: lambda* = m / supDelta. An action-independent Delta never changes it.
  B. Gate and scale. A tanh actor's gradient passes kappa = 1 - (a/a_max)^2. Unnormalized
     inputs with one large feature push the pre-activation far out, kappa -> 0 (about 2*delta
     at distance delta from the bound), and the small feature's signal cannot get through.
  C. Training. A small tanh actor trained by the deterministic policy gradient against a
     known critic: stuck at the bound on scale-imbalanced states, free once they are
     normalized; and its trained action flips for w above lambda*, not below.

Run:     python toy_td3_intrinsic_experiments.py [--out-dir DIR] [--seed 0] [--num-samples 200000]
Writes:  DIR/figures/fig_action_gap_phase.png, DIR/figures/fig_gate_and_scale.png,
         DIR/figures/fig_actor_freeze.png, DIR/toy_metrics.json; prints a summary table.
Runs in well under 60 s on a 2-core CPU.
"""

import contextlib
import glob
import io
import json
import os
import pathlib
import re
import signal
import sys
import time
from dataclasses import dataclass
from typing import Optional

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn as nn
import tyro


@dataclass
class Args:
    out_dir: str = "."
    """folder for figures/ and toy_metrics.json"""
    seed: int = 0
    """seed of the Monte Carlo samples and of experiment C's actors"""
    num_samples: int = 200_000
    """Monte Carlo samples per scale ratio in experiment B"""
    m: float = 0.2
    """action gap between the best and the runner-up action (A and C)"""
    w_step: float = 0.005
    """grid step of the intrinsic weight w in the phase map"""
    train_steps: int = 3000
    """gradient steps of each actor in experiment C"""
    freeze_ratio: float = 1e4
    """scale of the large feature relative to the small one in experiment C (the trading
    observation's price, equity and volume sit 1e4-1e8 above its returns)"""


SUP_DELTA = 2.0  # spread sup|Delta(a1) - Delta(a2)| of every intrinsic term used here
SATURATION = 0.99  # B2: |a| >= 0.99 a_max counts as saturated (the note's threshold)
NEAR_BOUND = 0.999  # C: the trading audit's near-bound threshold
EXACT_GRID = 400_001  # trapezoid points over u in [-60, 60] for the exact expectations


# A. ACTION GAP ----------------------------------------------------------------------------------
# Eleven discrete actions. The best (index BEST) beats the runner-up (index RUNNER_UP) by m;
# every other action is at least 1.1 lower still, so with w <= 0.5 and a Delta of spread 2
# only the runner-up can ever overtake the best one.
N_ACTIONS, BEST, RUNNER_UP = 11, 8, 2


def q_env_discrete(m: float) -> np.ndarray:
    q = -0.5 - 0.1 * np.abs(np.arange(N_ACTIONS) - BEST)  # far below both
    q[BEST], q[RUNNER_UP] = 1.0, 1.0 - m
    return q


def worst_case_delta(rng: np.random.Generator) -> np.ndarray:
    """An action-dependent Delta of spread exactly SUP_DELTA that favours the runner-up most."""
    delta = rng.uniform(-1.0, 1.0, N_ACTIONS)
    delta[BEST], delta[RUNNER_UP] = -SUP_DELTA / 2, SUP_DELTA / 2
    return delta


def action_gap_threshold(m: float, sup_delta: float = SUP_DELTA) -> float:
    """lambda* = m / supDelta: below it no intrinsic term of that spread can change the argmax."""
    return m / sup_delta


def argmax_flipped(q_env: np.ndarray, delta: np.ndarray, w: float) -> bool:
    """Another action now scores strictly above the old best: a tie (w = lambda*) is no flip, whichever
    index np.argmax would name first (1e-12: the rounding of q + w * delta)."""
    q_tot = q_env + w * delta
    return bool(q_tot.max() > q_tot[int(np.argmax(q_env))] + 1e-12)


def phase_map(ws: np.ndarray, ms: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """flipped[i, j] for m = ms[i], w = ws[j]."""
    return np.array([[argmax_flipped(q_env_discrete(m), delta, w) for w in ws] for m in ms])


def experiment_action_gap(args: Args, rng: np.random.Generator) -> dict:
    ws = np.round(np.arange(0.0, 0.5 + args.w_step / 2, args.w_step), 10)
    ms = np.round(np.linspace(0.02, 0.8, 40), 10)
    delta = worst_case_delta(rng)
    flipped = phase_map(ws, ms, delta)
    constant = np.ones(N_ACTIONS)  # action-independent: raises every Q by w, the ranking stays
    flipped_constant = phase_map(ws, ms, constant)
    q_m = q_env_discrete(args.m)
    flips_at_m = [w for w in ws if argmax_flipped(q_m, delta, w)]
    boundary = [ws[row.argmax()] if row.any() else np.nan for row in flipped]
    # The bound holds for every Delta of spread 2, not only the worst case: try random ones.
    violations = 0
    for _ in range(200):
        d = rng.uniform(-1.0, 1.0, N_ACTIONS)
        d = (d - d.min()) / (d.max() - d.min()) * SUP_DELTA - SUP_DELTA / 2
        for m in ms[::4]:
            below = ws[ws <= action_gap_threshold(m) + 1e-12]  # w = lambda* included: a tie is no flip
            violations += sum(argmax_flipped(q_env_discrete(m), d, w) for w in below)
    return {
        "sup_delta": SUP_DELTA, "m": args.m, "lambda_star_theory": action_gap_threshold(args.m),
        "lambda_star_empirical": float(flips_at_m[0]) if flips_at_m else None, "w_step": args.w_step,
        "action_independent_flips": int(flipped_constant.sum()),
        "random_delta_flips_below_lambda_star": int(violations),
        "phase_map": {"w_min": float(ws[0]), "w_max": float(ws[-1]), "w_step": args.w_step,
                      "m_min": float(ms[0]), "m_max": float(ms[-1]), "m_count": len(ms),
                      "flipped_fraction": float(flipped.mean()),
                      "boundary_max_abs_error": float(np.nanmax(np.abs(np.array(boundary) - ms / SUP_DELTA)))},
        "_plot": {"ws": ws, "ms": ms, "flipped": flipped, "q_m": q_m, "delta": delta},
    }


def plot_action_gap(result: dict, path: str) -> None:
    p = result["_plot"]
    ws, ms = p["ws"], p["ms"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    ax = axes[0]
    cmap = matplotlib.colors.ListedColormap(["#f2f2f2", "#d62728"])
    dw, dm = ws[1] - ws[0], ms[1] - ms[0]
    ax.imshow(p["flipped"], origin="lower", aspect="auto", cmap=cmap, vmin=0, vmax=1,
              extent=[ws[0] - dw / 2, ws[-1] + dw / 2, ms[0] - dm / 2, ms[-1] + dm / 2])
    ax.plot(ms / SUP_DELTA, ms, color="#1f77b4", lw=2.5, label=r"theory $w = m/\sup\Delta$")
    ax.axhline(result["m"], color="k", ls=":", lw=1)
    ax.plot([result["lambda_star_theory"]], [result["m"]], "o", color="#1f77b4")
    ax.set_xlabel("intrinsic weight w")
    ax.set_ylabel("action gap m")
    ax.set_title(r"A. argmax of $Q_{env} + w\,\Delta$ flipped (red)")
    ax.legend(loc="upper left")
    ax = axes[1]
    a = np.arange(N_ACTIONS)
    for w, style in ((0.0, "-o"), (0.5 * result["lambda_star_theory"], "-s"), (2 * result["lambda_star_theory"], "-^")):
        ax.plot(a, p["q_m"] + w * p["delta"], style, label=f"action-dependent Δ, w = {w:.2f}")
    ax.plot(a, p["q_m"] + 0.5 * 1.0, "--", color="grey", label="action-independent Δ ≡ 1, w = 0.5 (same argmax)")
    ax.set_xlabel("action index")
    ax.set_ylabel(r"$Q_{env} + w\,\Delta$")
    ax.set_title(f"m = {result['m']}: the runner-up (index {RUNNER_UP}) overtakes only above λ*")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    save_figure(fig, path)


# B. GATE AND SCALE ------------------------------------------------------------------------------
def kappa(actions_normalized: np.ndarray) -> np.ndarray:
    """tanh gate kappa = 1 - (a/a_max)^2, the factor d tanh/du on every actor gradient: 0 at the bound."""
    return 1.0 - np.square(actions_normalized)


def kappa_2delta_max_rel_error(delta_max: float = 0.01, n: int = 1000) -> float:
    """Near the bound, |a|/a_max = 1 - delta: kappa = 2 delta - delta^2, so 2 delta is off by
    delta / (2 - delta) relatively (0.5025% at delta = 0.01)."""
    delta = np.linspace(delta_max / n, delta_max, n)
    k = kappa(1.0 - delta)
    return float(np.max(np.abs(2 * delta - k) / k))


def gate_samples(ratio: float, num_samples: int, rng: np.random.Generator, normalize: bool):
    """The note's model: features x_small and ratio * x_large (both N(0,1) underneath); the actor's
    pre-activation sums them, u = x_small + ratio * x_large. With normalization each feature is
    z-scored first (its own sample mean and std), so the large one no longer dominates."""
    x_small = rng.standard_normal(num_samples)
    x_large = ratio * rng.standard_normal(num_samples)
    if normalize:
        u = (x_small - x_small.mean()) / x_small.std() + (x_large - x_large.mean()) / x_large.std()
    else:
        u = x_small + x_large
    return x_small, u


def gate_stats_monte_carlo(ratio: float, num_samples: int, rng: np.random.Generator, normalize: bool) -> dict:
    x_small, u = gate_samples(ratio, num_samples, rng, normalize)
    a = np.tanh(u)  # a / a_max
    k = kappa(a)
    return {"kappa_mean": float(k.mean()), "transport": float(np.mean(np.abs(k * x_small))),
            "saturation_rate": float(np.mean(np.abs(a) >= SATURATION)),
            "kappa_mean_se": float(k.std() / np.sqrt(num_samples)),
            "transport_se": float(np.abs(k * x_small).std() / np.sqrt(num_samples))}


def normal_cdf(x: np.ndarray) -> np.ndarray:
    return torch.special.ndtr(torch.as_tensor(x, dtype=torch.float64)).numpy()


def gate_stats_exact(ratio: float) -> dict:
    """The same three numbers by quadrature. u ~ N(0, 1 + r^2); given u, x_small is normal with
    mean u/(1 + r^2) and std r/sqrt(1 + r^2), so E[|x_small| | u] is a folded-normal mean and
    both expectations become 1-D integrals over u (kappa = sech^2(u) vanishes for |u| > 40)."""
    var_u = 1.0 + ratio**2
    u = np.linspace(-60.0, 60.0, EXACT_GRID)
    du = u[1] - u[0]
    density = np.exp(-(u**2) / (2 * var_u)) / np.sqrt(2 * np.pi * var_u)
    sech2 = 1.0 / np.cosh(u) ** 2
    mu, sd = u / var_u, ratio / np.sqrt(var_u)
    folded_mean = sd * np.sqrt(2 / np.pi) * np.exp(-(mu**2) / (2 * sd**2)) + mu * (1 - 2 * normal_cdf(-mu / sd))
    u_sat = np.arctanh(SATURATION)
    return {"kappa_mean": float(np.sum(sech2 * density) * du),
            "transport": float(np.sum(sech2 * folded_mean * density) * du),
            "saturation_rate": float(2 * normal_cdf(-u_sat / np.sqrt(var_u)))}


def experiment_gate_scale(args: Args, rng: np.random.Generator) -> dict:
    ratios = np.logspace(0, 2, 9)  # 1 ... 100, log-spaced
    keys = ("kappa_mean", "transport", "saturation_rate", "kappa_mean_se", "transport_se")
    out = {"scale_ratios": [float(r) for r in ratios], "saturation_threshold": SATURATION}
    for name, normalize in (("no_norm", False), ("norm", True)):
        rows = [gate_stats_monte_carlo(r, args.num_samples, rng, normalize) for r in ratios]
        out[name] = {k: [row[k] for row in rows] for k in keys}
    exact_no_norm = [gate_stats_exact(r) for r in ratios]
    exact_norm = gate_stats_exact(1.0)  # after z-scoring every ratio looks like ratio 1
    out["exact"] = {"no_norm": {k: [row[k] for row in exact_no_norm] for k in exact_norm},
                    "norm": {k: [exact_norm[k]] * len(ratios) for k in exact_norm}}
    out["kappa_2delta_max_rel_error"] = kappa_2delta_max_rel_error()
    out["note_values_at_ratio_100"] = {"kappa_mean": 0.007, "transport": 0.0059}
    return out


def plot_gate_and_scale(result: dict, path: str) -> None:
    ratios = np.array(result["scale_ratios"])
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    ax = axes[0]
    x = np.linspace(0, 1, 500)
    ax.plot(x, kappa(x), label=r"$\kappa = 1 - (a/a_{max})^2$")
    near = x >= 0.9
    ax.plot(x[near], 2 * (1 - x[near]), "--", label=r"$2\delta$, $\delta = 1 - |a|/a_{max}$")
    ax.set_xlabel(r"$|a| / a_{max}$")
    ax.set_ylabel(r"$\kappa$")
    ax.set_title(f"B1. tanh gate (2δ within {100 * result['kappa_2delta_max_rel_error']:.2f}% for δ ≤ 0.01)")
    ax.legend()
    ax = axes[1]
    ax.plot(ratios, result["no_norm"]["saturation_rate"], "o-", color="#d62728", label="no normalization (MC)")
    ax.plot(ratios, result["norm"]["saturation_rate"], "s-", color="#2ca02c", label="normalized (MC)")
    ax.plot(ratios, result["exact"]["no_norm"]["saturation_rate"], "k:", label="exact")
    ax.set_xscale("log")
    ax.set_xlabel("scale ratio large / small feature")
    ax.set_ylabel(f"P(|a| ≥ {SATURATION} a_max)")
    ax.set_title("B2. saturation share")
    ax.legend()
    ax = axes[2]
    for key, marker, label in (("kappa_mean", "o", "E[κ]"), ("transport", "^", "E[|κ·x_small|]")):
        ax.plot(ratios, result["no_norm"][key], marker + "-", color="#d62728", label=f"{label}, no norm")
        ax.plot(ratios, result["norm"][key], marker + "-", color="#2ca02c", label=f"{label}, normalized")
        ax.plot(ratios, result["exact"]["no_norm"][key], "k:", lw=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("scale ratio large / small feature")
    ax.set_ylabel("expectation (dotted: exact)")
    ax.set_title("B3. gate and small-signal transport")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


# C. TRAINING: a tanh actor and the deterministic policy gradient --------------------------------
class TanhActor(nn.Module):
    """a = a_max * tanh(MLP(s)), the TD3 actor in miniature (a_max = 1)."""

    def __init__(self, obs_dim: int = 2, hidden: int = 16):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(obs_dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.body(s)).squeeze(-1)


def imbalanced_states(n: int, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """A small return-like feature ~N(0,1) beside a price-like level ~ratio*(1 + 0.1 N(0,1))."""
    small = torch.randn(n, generator=generator)
    level = ratio * (1.0 + 0.1 * torch.randn(n, generator=generator))
    return torch.stack([small, level], dim=1)


def zscore(states: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (states - mean) / std


def double_well_q(a: torch.Tensor, tilt: float, k: float = 20.0) -> torch.Tensor:
    """tilt * s(a) - k (a^2 - 1/4)^2 with s(a) = clip(2a, -1, 1)/2: wells at a = +-0.5; the
    upper one is higher by about |tilt|. Q_env has tilt m; adding w*Delta with
    Delta(a) = -clip(2a, -1, 1) (spread 2) gives tilt m - 2w, which changes sign at w = lambda*."""
    return tilt * torch.clamp(2 * a, -1.0, 1.0) / 2 - k * (a.square() - 0.25).square()


def train_actor(actor: TanhActor, critic, states_fn, steps: int, lr: float, batch: int,
                eval_states: torch.Tensor, generator: torch.Generator, record_every: int = 10) -> dict:
    """Deterministic policy gradient: maximize Q(s, pi(s)) by Adam on the actor only.

    Adam divides by the gradient's running RMS, so it revives any gradient well above its eps
    (1e-8): a *small* kappa does not freeze an actor. What freezes it is kappa underflowing to
    exactly 0, which is what huge pre-activations from unnormalized levels do.
    """
    opt = torch.optim.Adam(actor.parameters(), lr=lr, fused=True)  # one kernel: these nets are all overhead
    steps_rec, near_rec, mean_rec = [], [], []
    for step in range(steps + 1):
        if step % record_every == 0 or step == steps:
            with torch.no_grad():
                a = actor(eval_states)
            steps_rec.append(step)
            near_rec.append(float((a.abs() >= NEAR_BOUND).float().mean()))
            mean_rec.append(float(a.mean()))
        if step == steps:
            break
        loss = -critic(actor(states_fn(batch, generator))).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    left = next((s for s, r in zip(steps_rec, near_rec) if r < 0.5), None)
    return {"steps": steps_rec, "near_bound_ratio": near_rec, "action_mean": mean_rec, "steps_to_leave_bound": left}


def experiment_actor_freeze(args: Args) -> dict:
    g = torch.Generator().manual_seed(args.seed)
    reference = imbalanced_states(10_000, args.freeze_ratio, g)
    mean, std = reference.mean(0), reference.std(0)  # fit the normalizer once
    eval_raw = imbalanced_states(1000, args.freeze_ratio, g)
    a_target = 0.3  # C1 critic: Q(s, a) = -(a - 0.3)^2, an interior optimum
    c1_critic = lambda a: -(a - a_target).square()
    runs = {}
    for name, normalize in (("no_norm", False), ("norm", True)):
        torch.manual_seed(args.seed)  # the same initial weights for both
        actor = TanhActor()
        with torch.no_grad():
            actor.body[-1].bias.fill_(6.0)  # start collapsed at the upper bound, as after a runaway
        transform = (lambda s: zscore(s, mean, std)) if normalize else (lambda s: s)
        with torch.no_grad():
            pre = actor.body(transform(eval_raw)).squeeze(-1)
        runs[name] = train_actor(actor, c1_critic,
                                 lambda n, gen: transform(imbalanced_states(n, args.freeze_ratio, gen)),
                                 args.train_steps, 3e-3, 256, transform(eval_raw), g)
        runs[name]["initial_kappa_mean"] = float((1 - torch.tanh(pre).square()).mean())
        runs[name]["final_action_mean"] = runs[name]["action_mean"][-1]

    # C2: normalized states, the actor starts at a = 0 (zero output layer) between two wells.
    lam = action_gap_threshold(args.m)
    flips = {}
    for label, w, constant in (("w_0", 0.0, False), ("w_0.5_lambda", 0.5 * lam, False),
                               ("w_2_lambda", 2 * lam, False), ("constant_delta_w_0.5", 0.5, True)):
        torch.manual_seed(args.seed + 1)
        actor = TanhActor()
        with torch.no_grad():
            actor.body[-1].weight.zero_()
            actor.body[-1].bias.zero_()
        if constant:  # r_int independent of the action: Q rises by w everywhere
            critic = lambda a, w=w: double_well_q(a, args.m) + w * 1.0
        else:  # Delta(a) = -clip(2a, -1, 1): favours the runner-up well at a = -0.5
            critic = lambda a, w=w: double_well_q(a, args.m) - w * torch.clamp(2 * a, -1.0, 1.0)
        gen = torch.Generator().manual_seed(args.seed + 2)  # identical batches for every w
        run = train_actor(actor, critic, lambda n, gen: zscore(imbalanced_states(n, args.freeze_ratio, gen), mean, std),
                          args.train_steps, 3e-3, 256, zscore(eval_raw, mean, std), gen)
        with torch.no_grad():
            final_actions = actor(zscore(eval_raw, mean, std))
        run["final_action_mean"] = float(final_actions.mean())
        run["flipped"] = bool(run["final_action_mean"] < 0)  # the env-best well is a = +0.5
        run["w"] = w
        run["_final_actions"] = final_actions
        flips[label] = run
    grid = torch.linspace(-1, 1, 20001)
    q_env = double_well_q(grid, args.m)
    upper, lower = grid >= 0, grid < 0
    measured_gap = float(q_env[upper].max() - q_env[lower].max())
    identical = torch.equal(flips["w_0"]["_final_actions"], flips["constant_delta_w_0.5"]["_final_actions"])
    return {
        "freeze": {"ratio": args.freeze_ratio, "train_steps": args.train_steps, "critic": "Q(s,a) = -(a - 0.3)^2",
                   "no_norm": strip_private(runs["no_norm"]), "norm": strip_private(runs["norm"])},
        "flip": {"m": args.m, "measured_action_gap": measured_gap, "lambda_star": lam,
                 "runs": {k: strip_private(v) for k, v in flips.items()},
                 "constant_delta_actions_identical_to_w_0": bool(identical)},
    }


def strip_private(d: dict) -> dict:
    return {k: v for k, v in d.items() if not k.startswith("_")}


def plot_actor_freeze(result: dict, path: str) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    ax = axes[0]
    for name, color, label in (("no_norm", "#d62728", "raw states (scale ratio {:g})"),
                               ("norm", "#2ca02c", "z-scored states")):
        run = result["freeze"][name]
        ax.plot(run["steps"], run["near_bound_ratio"], color=color, label=label.format(result["freeze"]["ratio"]))
        if run["steps_to_leave_bound"] is not None:
            ax.axvline(run["steps_to_leave_bound"], color=color, ls=":", lw=1)
    ax.set_xscale("symlog", linthresh=10)
    ax.set_xlim(left=0)  # no margin of negative steps
    ax.set_xlabel("actor gradient steps")
    ax.set_ylabel(f"share of actions with |a| ≥ {NEAR_BOUND} a_max")
    fr = result["freeze"]  # the title says what these runs did
    ax.set_title(f"C1. actor at the bound: raw states {left_bound(fr['no_norm']['steps_to_leave_bound'])}, "
                 f"z-scored {left_bound(fr['norm']['steps_to_leave_bound'])}", fontsize=10)
    ax.set_ylim(-0.05, 1.05)
    ax.legend()
    ax = axes[1]
    for label, run in result["flip"]["runs"].items():
        constant = label.startswith("constant")
        on_w0 = constant and result["flip"]["constant_delta_actions_identical_to_w_0"]
        suffix = " — exactly on w_0" if on_w0 else ""
        ax.plot(run["steps"], run["action_mean"], label=f"{label} (w = {run['w']:.3g}){suffix}",
                ls="--" if constant else "-")
    ax.set_xscale("symlog", linthresh=10)
    ax.set_xlim(left=0)  # no margin of negative steps
    ax.axhline(0.5, color="grey", lw=0.8)
    ax.axhline(-0.5, color="grey", lw=0.8)
    ax.set_xlabel("actor gradient steps")
    ax.set_ylabel("mean action a / a_max")
    flipped = [label for label, run in result["flip"]["runs"].items() if run["flipped"]] or ["none"]
    ax.set_title(f"C2. trained action, λ* = {result['flip']['lambda_star']:.3g}: flipped {', '.join(flipped)}",
                 fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def left_bound(steps: Optional[int]) -> str:
    return "did not leave" if steps is None else f"left after {steps} steps"


# RUN: A, B and C, their figures and toy_metrics.json -------------------------------------------
def print_summary(metrics: dict) -> None:
    ag, gs, af = metrics["action_gap"], metrics["gate_scale"], metrics["actor_freeze"]
    print(f"A  action gap m = {ag['m']}, supΔ = {ag['sup_delta']}: λ* theory {ag['lambda_star_theory']:.3f}, "
          f"empirical {ag['lambda_star_empirical']:.3f} (grid step {ag['w_step']}); "
          f"action-independent Δ flips: {ag['action_independent_flips']}")
    print(f"B  {'ratio':>7} {'E[κ] MC':>9} {'exact':>8} {'transport':>10} {'exact':>8} {'sat MC':>7} "
          f"{'E[κ] norm':>10} {'transp norm':>12}")
    for i, r in enumerate(gs["scale_ratios"]):
        nn_, ex, no = gs["no_norm"], gs["exact"]["no_norm"], gs["norm"]
        print(f"   {r:7.2f} {nn_['kappa_mean'][i]:9.4f} {ex['kappa_mean'][i]:8.4f} {nn_['transport'][i]:10.4f} "
              f"{ex['transport'][i]:8.4f} {nn_['saturation_rate'][i]:7.3f} {no['kappa_mean'][i]:10.4f} "
              f"{no['transport'][i]:12.4f}")
    fr, raw, z = af["freeze"], af["freeze"]["no_norm"], af["freeze"]["norm"]
    print(f"C1 actor at the bound, ratio {fr['ratio']:g}: raw states {left_bound(raw['steps_to_leave_bound'])} "
          f"(initial E[κ] {raw['initial_kappa_mean']:.1e}); z-scored {left_bound(z['steps_to_leave_bound'])} "
          f"(initial E[κ] {z['initial_kappa_mean']:.1e}) within {fr['train_steps']} steps")
    runs = af["flip"]["runs"]
    print("C2 trained action mean: " + ", ".join(
        f"{k} {v['final_action_mean']:+.3f}{' (flipped)' if v['flipped'] else ''}" for k, v in runs.items()))


def main(args: Args) -> dict:
    """Run A, B and C; write the figures and toy_metrics.json; return the metrics."""
    validate_args(args)
    start = time.time()
    rng = np.random.default_rng(args.seed)
    fig_dir, metrics_path = os.path.join(args.out_dir, "figures"), os.path.join(args.out_dir, "toy_metrics.json")
    prepare_out_dir(fig_dir, metrics_path)

    action_gap = experiment_action_gap(args, rng)
    plot_action_gap(action_gap, os.path.join(fig_dir, "fig_action_gap_phase.png"))
    gate_scale = experiment_gate_scale(args, rng)
    plot_gate_and_scale(gate_scale, os.path.join(fig_dir, "fig_gate_and_scale.png"))
    actor_freeze = experiment_actor_freeze(args)
    plot_actor_freeze(actor_freeze, os.path.join(fig_dir, "fig_actor_freeze.png"))

    metrics = {"seed": args.seed, "num_samples": args.num_samples,
               "action_gap": strip_private(action_gap), "gate_scale": gate_scale, "actor_freeze": actor_freeze,
               "wall_time_s": round(time.time() - start, 2)}
    write_json_atomic(metrics_path, metrics)
    print_summary(metrics)
    print(f"wrote {fig_dir}/fig_*.png and {metrics_path} in {metrics['wall_time_s']} s")
    return metrics


# ===== MACHINERY (skip on a first read): files, interruption, the command line ======================
class UserError(Exception):
    """A mistake in the command line or inputs: reported as one line on stderr, exit code 2."""


def validate_args(args: Args) -> None:
    if not 1000 <= args.num_samples <= 10 ** 7:  # 10^7: B's arrays take about 0.5 GB
        raise UserError(f"--num-samples must be in [1000, 10**7], got {args.num_samples}")
    if not 1e-6 <= args.m < SUP_DELTA / 4:  # below 1e-6 the gap drowns in float rounding
        raise UserError(f"--m must be in [1e-6, {SUP_DELTA / 4}) so the phase map (w up to 0.5) shows the boundary, "
                        f"got {args.m}")
    if not 1e-4 <= args.w_step <= 0.05:  # finer: millions of grid cells, minutes of argmax
        raise UserError(f"--w-step must be in [1e-4, 0.05], got {args.w_step}")
    if not 0 <= args.seed < 2 ** 32:
        raise UserError(f"--seed must be in [0, 2**32), got {args.seed}")
    if args.train_steps < 1:
        raise UserError(f"--train-steps must be >= 1, got {args.train_steps}")
    if not 1.0 <= args.freeze_ratio <= 1e30:  # float32 states overflow to inf a few decades above
        raise UserError(f"--freeze-ratio must be in [1, 1e30], got {args.freeze_ratio}")


def prepare_out_dir(fig_dir: str, metrics_path: str) -> None:
    """Make the folders and check the outputs can be written, before minutes of work; remove an earlier run's
    toy_metrics.json, which marks a completed run: a stopped run would leave it beside newer figures."""
    try:
        os.makedirs(fig_dir, exist_ok=True)
        for folder in (fig_dir, os.path.dirname(metrics_path) or "."):
            if not os.access(folder, os.W_OK):
                raise PermissionError(f"'{folder}' is not writable")
        taken = [path for path in glob.glob(os.path.join(fig_dir, "fig_*.png")) + [metrics_path] if os.path.isdir(path)]
        if taken:
            raise IsADirectoryError(f"'{taken[0]}' is a folder")
        if os.path.lexists(metrics_path):
            os.remove(metrics_path)
    except OSError as err:
        raise UserError(f"cannot write under --out-dir: {err}") from None


def parse_cli(args_type, argv: Optional[list[str]] = None):
    """tyro.cli, but a parse error becomes one line on stderr and exit code 2."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            return tyro.cli(args_type, args=argv)
    except SystemExit as exit_:
        if exit_.code in (0, None):
            raise
        # tyro's box (rules of ─, or - where stdout is not UTF-8): title, text to the next rule, guesses for a typo
        lines = [re.sub(r"[╭╮╰╯│]", "", line).strip() for line in captured.getvalue().splitlines()] or [""]
        parts = "\n".join("\0" if line and not line.strip("─-") else line for line in lines[1:]).split("\0")
        title, (body, *more) = lines[0].strip("─ "), [" ".join(s.split()) for s in parts if s.strip()] or [""]
        guesses = [flag.rstrip(",") for s in more if s.startswith("Perhaps") for flag in s.split() if flag[:2] == "--"]
        hint = f" (did you mean {' or '.join(dict.fromkeys(guesses))}?)" if guesses else ""
        print(f"error: {body if body.startswith(title) else f'{title}: {body}'}{hint} (see --help)", file=sys.stderr)
        sys.exit(2)


def replace_atomic(path: str, write) -> None:
    """write(tmp) then os.replace: a reader never sees half a file, and no error (nor a second
    Ctrl-C) leaves the temp file behind."""
    tmp = f"{path}.tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json_atomic(path: str, obj) -> None:
    text = json.dumps(obj, indent=2, allow_nan=False)  # a NaN fails here, before any file is touched
    replace_atomic(path, lambda tmp: pathlib.Path(tmp).write_text(text))


def save_figure(fig, path: str) -> None:
    try:
        replace_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        plt.close(fig)


class Interrupted(Exception):
    """SIGINT or SIGTERM (command line only): stop, leaving only complete files."""


def raise_interrupted(signum, frame) -> None:
    raise Interrupted(signum)


if __name__ == "__main__":
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, raise_interrupted)
    try:
        main(parse_cli(Args))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as stop:
        signum = stop.args[0]
        print(f"error: interrupted by {signal.Signals(signum).name}: the files written so far are complete, "
              "the others were not written", file=sys.stderr)
        sys.exit(128 + signum)
