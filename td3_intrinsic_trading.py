"""TD3 on an inline trading environment, with an intrinsic reward and the action-freeze audit.

Why can an intrinsic reward move the critic's values while the actor does not move at all?
  1. Scale: raw features (prices ~1e2, volume ~1e6, equity ~1e5) push the tanh actor's pre-activation so
     far out that kappa = 1 - (a/a_max)^2 is 0: the actor is frozen at the bound. `--state-norm` removes it.
  2. Action gap: r_tot = r_env + w*r_int only changes the greedy action if w*supDelta exceeds the action
     gap; a nearly action-independent r_int (plain RND on s': the action shows only in s'[position] and
     s'[equity]) raises every action's value almost alike (see the toy).
  3. Out of sample, a normalizer fitted on the train split cannot tame a trending level: `--state-norm`
     first makes price and equity relative; the shift audit shows `--no-stationary` failing.

Run:     python td3_intrinsic_trading.py --state-norm        (the main command; without --state-norm: the freeze)
         python td3_intrinsic_trading.py --eval-only --checkpoint runs/.../model.pt [--data-csv other.csv]
Writes:  runs/{run_name}/: summary.json, state_scale_summary.json, td3_action_saturation.json, eval_test.json,
         eval_equity.png, action_saturation.png, TensorBoard events per agent; model.pt with --save-model.

Reading map. The lesson comes first, in the order it runs; the machinery follows one signpost.
  Args                                   every flag, with its meaning
  synthetic_market, market_features      the data and the observation     (FORK: a feature)
  TradingEnv                             one asset, target positions       (FORK: the environment)
  Actor, QNetwork, TwinQ                 the networks                      (FORK: a layer)
  ReplayBuffer, StateNormalizer          what is stored; --state-norm
  RND                                    the intrinsic reward r_int        (FORK: another bonus)
  TD3                                    the update: gradients, optimizers (FORK: the optimizer)
  evaluate_split, benchmark_metrics      Sharpe & co. against buy-and-hold and a rule
  train_agent, main                      the loop; the paired run, the test split, the audit
"""

import contextlib
import copy
import csv
import dataclasses
import gzip
import io
import json
import math
import multiprocessing
import os
import pathlib
import pickle
import queue
import random
import re
import shutil
import signal
import sys
import threading
import time
import zlib
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, Optional

import gymnasium as gym
import matplotlib
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (part of the run folder name); default: this file's name, so a fork's runs say so"""
    seed: int = 1
    """training seed: weights, exploration noise, replay sampling, episode starts"""
    cuda: bool = True
    """if toggled, cuda is used when available"""
    threads: int = 0
    """torch intra-op threads (0 keeps torch's default, one per core); with a thread for each agent, the agents
    train side by side, each in its own process with its share"""
    compile: bool = True
    """torch.compile the gradients of the critic, the actor and RND (a few seconds once; needs a C++ compiler)"""
    runs_dir: str = "runs"
    """root folder of the run folders"""
    save_model: bool = False
    """write model.pt (networks and normalizer of every agent) at the end"""
    eval_only: bool = False
    """only evaluate the agents of --checkpoint (saved networks and normalizer; data, splits, cost, capital and
    bars per year as given here, else as saved), then exit"""
    checkpoint: Optional[str] = None
    """model.pt written by --save-model, for --eval-only"""
    eval_split: Literal["test", "val", "train", "all"] = "test"
    """--eval-only: the split to evaluate on (all: the whole file from its first usable row)"""

    # Market data
    data_csv: Optional[str] = None
    """price CSV or .csv.gz (a date column or Date and Time, Close, [Adj Close], Volume); default: synthetic"""
    accept_suspect_rows: bool = False
    """--data-csv: keep repeated timestamps, gaps of over a month, split-ratio moves of unadjusted prices and
    one-step moves beyond +100%/-90% (stopped as likely errors)"""
    market_seed: int = 0
    """seed of the synthetic two-regime market (independent of --seed: every seed sees one market)"""
    market_steps: int = 10000
    """length of the synthetic market in steps (days)"""
    train_frac: float = 0.7
    """chronological share of the data for training"""
    val_frac: float = 0.15
    """chronological share for validation (evaluated during training); the rest is the test split"""

    # Environment
    episode_length: int = 256
    """training episodes are random windows of this many steps of the train split"""
    cost_bp: float = 10.0
    """transaction cost in basis points of the traded fraction of equity"""
    risk_penalty: float = 10.0
    """lambda of the risk term lambda*p^2*sigma^2 (makes the optimal position interior)"""
    reward_scale: float = 100.0
    """multiplies the per-step reward (daily returns ~1e-2 become ~1)"""
    initial_equity: float = 1e5
    """starting equity in currency units (the raw observation shows it, ~1e5)"""
    periods_per_year: Optional[int] = None
    """bars per year, for annualized return, volatility, Sharpe and Sortino; default: from the CSV's timestamps
    (daily stocks 252, hourly FX 6240, ...), 252 for the synthetic (daily) market"""

    # State normalization
    state_norm: bool = False
    """normalize observations with statistics fitted once on a random-action rollout of the train split"""
    state_norm_kind: Literal["zscore", "robust"] = "zscore"
    """zscore: (x - mean)/std; robust: (x - median)/IQR"""
    log_volume: bool = True
    """with --state-norm, feed log1p(volume) instead of volume"""
    stationary: bool = True
    """with --state-norm, make price and equity relative first; --no-stationary z-scores raw levels (the shift)"""

    # Intrinsic reward and paired runs
    intrinsic_kind: Literal["none", "rnd", "sa-rnd"] = "rnd"
    """rnd: novelty of s' (action-independent but for position/equity); sa-rnd: novelty of (s, a)"""
    intrinsic_coef: float = 0.5
    """w in r_tot = r_env + w * r_int"""
    rnd_hidden: int = 64
    """width of the two hidden layers of RND's target and predictor (at 16 the predictor fits the target everywhere)"""
    paired: bool = True
    """also train a baseline (w = 0) on identical seeds, the audit's counterfactual"""

    # TD3
    total_timesteps: int = 30000
    """environment steps per agent"""
    learning_starts: int = 5000
    """env steps of uniform random actions before learning starts"""
    learning_rate: float = 3e-5
    """the learning rate of the actor's and the critics' optimizers (low: the reward's noise is ~10x its
    action-dependent drift)"""
    hidden_size: int = 32
    """width of the two hidden layers of the actor and of each critic (small: ~7000 train steps to fit)"""
    buffer_size: int = int(1e6)
    """the replay memory buffer size"""
    gamma: float = 0.5
    """the discount factor gamma (short: an action sets one step's position; a long horizon mostly adds noise)"""
    tau: float = 0.005
    """target smoothing coefficient (Polyak averaging)"""
    batch_size: int = 256
    """the batch size of samples from the replay memory"""
    policy_noise: float = 0.2
    """std of the target policy smoothing noise, as a fraction of the action half-range"""
    exploration_noise: float = 0.1
    """std of the Gaussian exploration noise, as a fraction of the action half-range"""
    policy_frequency: int = 2
    """the frequency of training the policy and the targets (delayed policy updates)"""
    preactivation_penalty: Optional[float] = None
    """beta of beta*mean(u^2) in the actor loss, u the pre-tanh output (rlkit's policy_pre_activation_weight):
    keeps the actor off the bound; default 1e-3 with --state-norm (chosen on validation), else 0"""
    noise_clip: float = 0.5
    """clip of the target policy smoothing noise, as a fraction of the action half-range"""
    eval_frequency: int = 1000
    """evaluate on the validation split every N env steps (and at the end)"""
    keep_best: bool = True
    """test the checkpoint with the best validation Sharpe (early stopping on the validation split)"""


# MARKET DATA AND FEATURES -----------------------------------------------------------------------
@dataclass
class Market:
    close: np.ndarray
    volume: np.ndarray
    dates: Optional[list] = None
    regime: Optional[np.ndarray] = None  # synthetic only: 1 = bear
    periods_per_year: int = 252  # bars per year (a CSV's: from its timestamps); the synthetic market is daily
    frequency: str = "daily bars (the synthetic market)"


def synthetic_market(n_steps: int, seed: int) -> Market:
    """Two-regime market: daily log-returns N(mu, sigma) in a Markov chain of bull/bear regimes. bull
    mu=+0.0012 sigma=0.010 stay 0.985; bear mu=-0.0015 sigma=0.018 stay 0.97; start 100; log V = log(3e6)
    + 0.4 bear + 8|r| + 0.3 N(0,1). Learnable (the regime shows in volatility and volume), not trivial."""
    rng = np.random.default_rng(seed)
    mu, sigma, stay = np.array([0.0012, -0.0015]), np.array([0.010, 0.018]), np.array([0.985, 0.97])
    regime = np.zeros(n_steps, dtype=int)
    for t in range(1, n_steps):
        regime[t] = regime[t - 1] if rng.random() < stay[regime[t - 1]] else 1 - regime[t - 1]
    log_ret = mu[regime] + sigma[regime] * rng.standard_normal(n_steps)
    log_ret[0] = 0.0
    close = 100.0 * np.exp(np.cumsum(log_ret))
    volume = np.exp(np.log(3e6) + 0.4 * regime + 8 * np.abs(log_ret) + 0.3 * rng.standard_normal(n_steps))
    return Market(close=close, volume=volume, regime=regime)


WARMUP = 20  # the longest feature window (MA20): the first usable step


def market_features(close: np.ndarray, volume: np.ndarray, stationary: bool = False) -> dict:
    """FORK: an observation feature. name -> [n] array; row t uses data up to t only (no look-ahead), a
    windowed feature is NaN on rows < WARMUP (a longer window needs a larger WARMUP); every index elsewhere
    comes from these names. stationary: log(C_t / max C_{t-19..t}) replaces the close. A level trends out of
    any range fitted on the past (the synthetic close ends x73 above its start), so a z-score fitted on the
    train split puts test prices at +10; a ratio of two prices means the same in every year and under any
    scaling of the series."""
    window = lambda x, k: np.lib.stride_tricks.sliding_window_view(x, k)[WARMUP - k + 1:]  # noqa: E731  (ending at t)
    pad = lambda x: np.concatenate([np.full(WARMUP, np.nan), x])  # noqa: E731  (rows t >= WARMUP)
    log_ret = np.concatenate([[np.nan], np.diff(np.log(close))])
    last20 = window(close, 20)
    level = ("log_close_over_max20", pad(np.log(close[WARMUP:] / last20.max(axis=1)))) if stationary \
        else ("close", close)
    return {level[0]: level[1], "volume": volume, "log_return": log_ret,
            "realized_vol_10": pad(window(log_ret, 10).std(axis=1)),  # realized vol of the last 10 returns
            "log_volume_mean_10": pad(window(np.log1p(volume), 10).mean(axis=1)),  # activity, one bar's noise averaged
            "momentum_10": pad(np.log(close[WARMUP:] / close[WARMUP - 10:-10])),  # 10-step momentum
            "close_over_ma20_minus_1": pad(close[WARMUP:] / last20.mean(axis=1) - 1.0)}  # distance from MA20


def split_bounds(n: int, train_frac: float, val_frac: float) -> dict:
    """Chronological [start, end) index ranges, never shuffled; none starts before the warm-up ends."""
    floor = lambda x: max(int(x + 1e-9), WARMUP)  # noqa: E731 (1e-9: 1000 * (0.7 + 0.2) is 899.99999999)
    train_end, val_end = floor(n * train_frac), floor(n * (train_frac + val_frac))
    return {"train": (WARMUP, train_end), "val": (train_end, val_end), "test": (val_end, n), "all": (WARMUP, n)}


# ENVIRONMENT ------------------------------------------------------------------------------------
def observation_names(features: dict, relative_equity: bool) -> list[str]:
    """The observation's columns: the market features, then the position and the equity (or its drawdown)."""
    return [*features, "position", "equity_drawdown" if relative_equity else "equity"]


def drifted(position, asset_return):
    """The share of equity a position (a share of equity) has become after the asset moved by asset_return, costs
    paid pro rata: keeping the position trades the difference. 0 and 1 do not drift. (A move that leaves no
    equity, 1 + position * asset_return <= 0, ends the episode first: ruin.)"""
    return position * (1.0 + asset_return) / (1.0 + position * asset_return)


class TradingEnv(gym.Env):
    """FORK: the environment. One asset, target-position actions, no look-ahead. At step t the agent
    observes C_t (and features up to t), chooses p_t in [-1, 1] (a fraction of equity) and earns over t -> t+1

        reward = reward_scale * [p_t (C_{t+1}/C_t - 1) - cost |p_t - w_t| - lambda p_t^2 sigma_t^2]

    w_t = drifted(p_{t-1}, C_t/C_{t-1} - 1) is what p_{t-1} has become with the last move: holding 0.5 while the
    price rises is selling a little each step; holding 0 or 1 costs nothing.
    sigma_t is the 10-step realized volatility. The risk term makes the optimal position interior,
    p* = mu / (2 lambda sigma^2): with lambda = 10 the default market's regimes want about +0.6 (bull)
    and -0.2 (bear), so an actor pinned at +-1 is a symptom, not the optimum. Equity moves by the first
    two terms. Training episodes are random windows of `episode_length` steps; evaluation runs a whole
    split from flat; terminated only on ruin (equity <= 10% of start). relative_equity: the observation
    holds equity / its running peak - 1 (the drawdown) instead of equity, which grows with the episode.
    """

    def __init__(self, close: np.ndarray, features: dict, start: int, end: int, episode_length: Optional[int],
                 cost: float = 0.001, risk_penalty: float = 10.0, reward_scale: float = 100.0,
                 initial_equity: float = 1e5, relative_equity: bool = False):
        super().__init__()
        if end - start < 2:
            raise ValueError(f"split [{start}, {end}) is too short for one step")
        self.close, self.market = close, np.column_stack(list(features.values()))
        self.sigma = features["realized_vol_10"]  # of the risk term
        self.start, self.end = start, end  # steps t in [start, end - 1): C_{t+1} stays inside
        self.episode_length = episode_length  # None: the whole split, from its start
        self.cost, self.risk_penalty, self.reward_scale = cost, risk_penalty, reward_scale
        self.initial_equity, self.relative_equity = initial_equity, relative_equity
        self.names = observation_names(features, relative_equity)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (len(self.names),), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
        self.t = self.t_end = start
        self.position, self.equity, self.peak_equity = 0.0, initial_equity, initial_equity

    def _obs(self) -> np.ndarray:
        equity = self.equity / self.peak_equity - 1.0 if self.relative_equity else self.equity
        return np.concatenate([self.market[self.t], [self.position, equity]]).astype(np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        last_step = self.end - 1  # exclusive bound on t
        if options and "start" in options:  # continue from a given step (the reference rollout)
            if not self.start <= options["start"] < last_step:
                raise ValueError(f"start {options['start']} outside [{self.start}, {last_step})")
            self.t, self.t_end = int(options["start"]), last_step
        elif self.episode_length is None or last_step - self.start <= self.episode_length:
            self.t, self.t_end = self.start, last_step
        else:
            self.t = int(self.np_random.integers(self.start, last_step - self.episode_length + 1))
            self.t_end = self.t + self.episode_length
        self.position, self.equity, self.peak_equity = 0.0, self.initial_equity, self.initial_equity
        return self._obs(), {}

    def step(self, action):
        p = float(np.clip(np.asarray(action, dtype=np.float64).reshape(-1)[0], -1.0, 1.0))
        asset_return = self.close[self.t + 1] / self.close[self.t] - 1.0
        held = drifted(self.position, self.close[self.t] / self.close[self.t - 1] - 1.0)  # w_t (from flat: 0)
        traded = abs(p - held)
        pnl = p * asset_return - self.cost * traded
        reward = self.reward_scale * (pnl - self.risk_penalty * p * p * self.sigma[self.t] ** 2)
        self.equity *= 1.0 + pnl
        self.peak_equity = max(self.peak_equity, self.equity)
        self.position = p
        self.t += 1
        terminated = self.equity <= 0.1 * self.initial_equity
        truncated = not terminated and self.t >= self.t_end
        return self._obs(), float(reward), bool(terminated), bool(truncated), {"step_return": pnl, "traded": traded}


# NETWORKS ---------------------------------------------------------------------------------------
class Actor(nn.Module):
    """pi(s) = tanh(u) * action_scale + action_bias with u = MLP(s): any Box bounds, asymmetric included."""

    def __init__(self, obs_dim: int, action_low: np.ndarray, action_high: np.ndarray, hidden_sizes: tuple[int, int]):
        super().__init__()
        h1, h2 = hidden_sizes
        self.fc1 = nn.Linear(obs_dim, h1)
        self.fc2 = nn.Linear(h1, h2)
        self.fc_mu = nn.Linear(h2, len(action_low))
        self.register_buffer("action_scale", torch.as_tensor((action_high - action_low) / 2.0, dtype=torch.float32))
        self.register_buffer("action_bias", torch.as_tensor((action_high + action_low) / 2.0, dtype=torch.float32))

    def forward(self, obs: torch.Tensor, with_preactivation: bool = False):
        """pi(s); with_preactivation: (pi(s), u), u the input of tanh (its gradient scaled by kappa = 1 - tanh(u)^2)"""
        u = self.fc_mu(F.relu(self.fc2(F.relu(self.fc1(obs)))))
        action = torch.tanh(u) * self.action_scale + self.action_bias
        return (action, u) if with_preactivation else action


class QNetwork(nn.Module):
    """Q(s, a): an MLP on concat(s, a). FORK: a layer (nn.LayerNorm, ...) goes here, both critics get it; one that
    acts otherwise in evaluation (nn.Dropout) needs agent.qf.eval() before evaluating, .train() after."""

    def __init__(self, obs_dim: int, action_dim: int, hidden_sizes: tuple[int, int]):
        super().__init__()
        h1, h2 = hidden_sizes
        self.fc1 = nn.Linear(obs_dim + action_dim, h1)
        self.fc2 = nn.Linear(h1, h2)
        self.fc3 = nn.Linear(h2, 1)

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        x = torch.cat([obs, actions], dim=-1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x))))).squeeze(-1)


class TwinQ(nn.Module):
    """TD3's two critics, Q1 and Q2: two QNetworks with their own initial weights, kept stacked ([2, ...]
    per tensor) so that one vectorized call (torch.vmap) runs both: half the matmul calls."""

    def __init__(self, obs_dim: int, action_dim: int, hidden_sizes: tuple[int, int]):
        super().__init__()
        critics = [QNetwork(obs_dim, action_dim, hidden_sizes) for _ in range(2)]
        stacked, _ = torch.func.stack_module_state(critics)  # name -> [Q1's tensor, Q2's tensor]
        self.names = list(stacked)
        self.stacked = nn.ParameterList([nn.Parameter(stacked[name]) for name in self.names])
        self.architecture = [critics[0].to("meta")]  # a list, not a submodule: its weights are `stacked`

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """[Q1, Q2] as a [2, batch] tensor."""
        def one_critic(*weights):
            return torch.func.functional_call(self.architecture[0], dict(zip(self.names, weights)), (obs, actions))
        return torch.vmap(one_critic, randomness="different")(*self.stacked)  # dropout: a mask per critic

    def train(self, mode: bool = True) -> "TwinQ":
        self.architecture[0].train(mode)  # no submodule, so .train() and .eval() must reach it here (dropout)
        return super().train(mode)

    def q1(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Q1 alone: the actor's objective (TD3 differentiates the first critic only)."""
        weights = {name: w[0] for name, w in zip(self.names, self.stacked)}
        return torch.func.functional_call(self.architecture[0], weights, (obs, actions))


# REPLAY BUFFER AND NORMALIZERS ------------------------------------------------------------------
class ReplayBuffer:
    """Ring buffer of rows [obs | next_obs | action | reward | terminated] in one preallocated tensor."""

    def __init__(self, capacity: int, obs_dim: int, action_dim: int, device: torch.device):
        self.capacity, self.device = capacity, device
        self.obs_dim, self.action_dim = obs_dim, action_dim
        self.storage = torch.zeros(capacity, 2 * obs_dim + action_dim + 2, device=device)
        self.pos, self.size = 0, 0

    def add(self, obs, next_obs, actions, rewards, terminations) -> None:
        """Rows of transitions: arrays with a leading batch dimension (it may be 0)."""
        n = len(obs)
        rows = torch.as_tensor(np.concatenate(
            [obs, next_obs, actions, np.reshape(rewards, (n, 1)), np.reshape(terminations, (n, 1))],
            axis=1, dtype=np.float32), device=self.device)
        index = torch.arange(self.pos, self.pos + n, device=self.device) % self.capacity
        self.storage[index] = rows
        self.pos = (self.pos + n) % self.capacity
        self.size = min(self.size + n, self.capacity)

    def sample(self, batch_size: int, generator: Optional[torch.Generator] = None):
        """(obs, actions, rewards, terminations, next_obs) of random rows: one gather, then contiguous fields
        (a compiled graph specializes on memory layout: the same layout every time means one graph)."""
        rows = self.storage[torch.randint(0, self.size, (batch_size,), device=self.device, generator=generator)]
        o, a = self.obs_dim, self.action_dim
        return tuple(x.contiguous() for x in (rows[:, :o], rows[:, 2 * o:2 * o + a], rows[:, -2], rows[:, -1],
                                               rows[:, o:2 * o]))


class RunningMeanStd(nn.Module):
    """Running mean and variance of a stream of vectors (Chan et al.'s parallel update), in float64, as
    module buffers (saved with state_dict). normalize(x) = clip((x - mean) / sqrt(var + 1e-8), +-clip)."""

    def __init__(self, dim: int, clip: float = 10.0):
        super().__init__()
        self.clip = clip
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("var", torch.ones(dim, dtype=torch.float64))
        self.register_buffer("count", torch.zeros(1, dtype=torch.float64))

    @torch.no_grad()
    def update(self, batch: torch.Tensor) -> None:
        batch, n = batch.to(torch.float64), batch.shape[0]
        if n == 0:
            return
        total = self.count + n
        delta = batch.mean(0) - self.mean
        m2 = self.var * self.count + batch.var(0, unbiased=False) * n + delta.square() * (self.count * n / total)
        self.mean += delta * (n / total)
        self.var.copy_(m2 / total)
        self.count.copy_(total)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.mean.float()) / torch.sqrt(self.var + 1e-8).float()).clamp(-self.clip, self.clip)


class StateNormalizer(nn.Module):
    """--state-norm: fitted once on reference states, then frozen: (f(x) - center) / scale, clipped to +-10;
    f = log1p on volume when asked (it spans orders of magnitude). kind: zscore (mean/std) or robust
    (median/IQR). An nn.Module for its buffers: saved and loaded with state_dict."""

    def __init__(self, names: list[str], kind: str, log_volume: bool, clip: float = 10.0):
        super().__init__()
        self.kind, self.clip = kind, clip
        log_columns = torch.tensor([log_volume and name == "volume" for name in names])
        self.register_buffer("log_columns", log_columns, persistent=False)  # from the flags, not saved
        self.register_buffer("center", torch.zeros(len(names), dtype=torch.float64))
        self.register_buffer("scale", torch.ones(len(names), dtype=torch.float64))
        self.register_buffer("fit_count", torch.zeros((), dtype=torch.int64))

    def transform_raw(self, x: torch.Tensor) -> torch.Tensor:
        """log1p on the volume column (one select, not a copy and an indexed write: this runs every step)."""
        return torch.where(self.log_columns, torch.log1p(x), x)

    def fit(self, states: np.ndarray) -> "StateNormalizer":
        x = self.transform_raw(torch.as_tensor(np.asarray(states), dtype=torch.float64)).numpy()
        if self.kind == "robust":
            center, scale = np.median(x, axis=0), np.percentile(x, 75, axis=0) - np.percentile(x, 25, axis=0)
        else:
            center, scale = x.mean(axis=0), x.std(axis=0)
        self.center.copy_(torch.as_tensor(center))
        self.scale.copy_(torch.as_tensor(np.where(scale > 1e-12, scale, 1.0)))  # a constant feature passes centred
        self.fit_count.fill_(len(states))
        return self

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return ((self.transform_raw(obs) - self.center.float()) / self.scale.float()).clamp(-self.clip, self.clip)


def reference_states(env: TradingEnv, seed: int) -> np.ndarray:
    """One state per step of a whole split, from a uniform-random-action rollout (the fit sample). Random
    trading is ruined long before the split ends; it restarts flat at the same step, covering every state."""
    env.action_space.seed(seed)
    obs, _ = env.reset(seed=seed)
    states = []
    while True:
        states.append(obs)
        obs, _, terminated, truncated, _ = env.step(env.action_space.sample())
        if truncated or env.t >= env.t_end:
            return np.asarray(states)
        if terminated:
            obs, _ = env.reset(options={"start": env.t})


# INTRINSIC REWARD -------------------------------------------------------------------------------
class RND(nn.Module):
    """FORK: another intrinsic reward: any nn.Module (obs, actions, next_obs) -> r_int, one per sample, on raw
    states; build it in main. Define it at module level: side by side, each agent's process gets it by pickle.

    Random Network Distillation (Burda et al. 2018): novelty = the error of a trained predictor against
    a fixed random network. "rnd" looks at s' only: it depends on the action just through s'[position]
    and s'[equity], so it mostly raises every action's value alike. "sa-rnd" looks at (s, a), which
    ranks actions. Inputs normalized by their running stats, clipped to +-5; r_int = error / running std.
    """

    def __init__(self, kind: str, obs_dim: int, seed: int, hidden: int, out: int = 32, lr: float = 1e-4):
        super().__init__()
        in_dim = obs_dim if kind == "rnd" else obs_dim + 1
        mlp = lambda: nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),  # noqa
                                    nn.Linear(hidden, out)).requires_grad_(False)
        with torch.random.fork_rng(devices=[]):  # its own random stream: the agents' draws stay untouched
            torch.manual_seed(seed + 7919)
            self.kind, self.target, self.predictor = kind, mlp(), mlp()
        self.optimizer = torch.optim.Adam(self.predictor.parameters(), lr=lr, fused=True)
        self.input_stats, self.error_stats = RunningMeanStd(in_dim, clip=5.0), RunningMeanStd(1)

    def prediction_error(self, x: torch.Tensor, predictor_params: Optional[dict] = None) -> torch.Tensor:
        """Squared error of the predictor on normalized, clipped inputs: the novelty signal."""
        x = self.input_stats.normalize(x)
        params = predictor_params if predictor_params is not None else dict(self.predictor.named_parameters())
        return (torch.func.functional_call(self.predictor, params, (x,)) - self.target(x)).square().mean(dim=-1)

    def predictor_gradients(self, obs: torch.Tensor, actions: torch.Tensor, next_obs: torch.Tensor):
        """Update the input statistics, score the batch, and the gradient of the predictor's loss on it;
        r_int = error / running std of the errors."""
        x = next_obs if self.kind == "rnd" else torch.cat([obs, actions], dim=-1)
        self.input_stats.update(x)

        def loss(params):
            error = self.prediction_error(x, params)
            return error.mean(), error
        grads, (_, error) = torch.func.grad_and_value(loss, has_aux=True)(dict(self.predictor.named_parameters()))
        self.error_stats.update(error[:, None])
        return grads, error / torch.sqrt(self.error_stats.var + 1e-8).float()

    def forward(self, obs: torch.Tensor, actions: torch.Tensor, next_obs: torch.Tensor) -> torch.Tensor:
        """r_int for a training batch: score it, train the predictor on it."""
        grads, r_int = self.predictor_gradients(obs, actions, next_obs)
        optimizer_step(self.optimizer, self.predictor, grads)
        return r_int


# ALGO LOGIC: the TD3 update ---------------------------------------------------------------------
def smoothing_noise(actions: torch.Tensor, policy_noise: float, noise_clip: float, action_scale: torch.Tensor,
                    generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Target policy smoothing: N(0, policy_noise*scale) clipped to +-noise_clip*scale, per dimension."""
    noise = torch.randn(actions.shape, device=actions.device, generator=generator) * (policy_noise * action_scale)
    limit = noise_clip * action_scale
    return torch.maximum(torch.minimum(noise, limit), -limit)


def td3_target(actor_target, qf_target, next_obs, rewards, terminations, noise, gamma, action_low, action_high):
    """y = r + gamma * (1 - terminated) * min(Q1', Q2')(s', clamp(pi'(s') + noise, low, high)).
    Clipped double-Q (the min) fights overestimation; only termination stops the bootstrap:
    a time-limit truncation is not a terminal state, so its value is bootstrapped."""
    next_actions = torch.clamp(actor_target(next_obs) + noise, action_low, action_high)
    next_q = qf_target(next_obs, next_actions).min(dim=0).values
    return rewards + gamma * (1.0 - terminations) * next_q


def soft_update_(targets: list[torch.Tensor], sources: list[torch.Tensor], tau: float) -> None:
    """Polyak averaging theta' <- (1 - tau) theta' + tau theta, as one fused foreach lerp."""
    torch._foreach_lerp_(targets, sources, tau)


def optimizer_step(optimizer: torch.optim.Optimizer, module: nn.Module, grads: dict) -> None:
    """Every optimizer's step: the gradients go where torch.optim reads them (p.grad), then one step.
    FORK: gradient clipping (torch.nn.utils.clip_grad_norm_) goes between the two."""
    for name, param in module.named_parameters():
        # contiguous: fused Adam on CPU (torch 2.13) silently misreads the strided views torch.func may return
        param.grad = grads[name].contiguous()
    optimizer.step()


def preactivation_penalty(args: Args) -> float:
    """beta: as given, else 1e-3 under --state-norm and 0 on raw features, where u ~ 1e3-1e5 makes even a
    small beta * u^2 flip a saturated actor now and then (it would blur the demo of a frozen actor)."""
    if args.preactivation_penalty is not None:
        return args.preactivation_penalty
    return 1e-3 if args.state_norm else 0.0


NETWORKS = ("actor", "qf", "actor_target", "qf_target")  # what a checkpoint of an agent holds


class TD3:
    """One agent: actor, twin critic, targets, optimizers, and its own torch.Generator for exploration
    noise, smoothing noise and replay indices: two agents built with the same seed stay bit-identical as
    long as they see the same rewards. Gradients come from torch.func, as in td3_continuous.py: the weights need
    no autograd graph (requires_grad off: backward() or a tensor hook fails loudly rather than doing nothing)."""

    def __init__(self, obs_dim: int, args: Args, device: torch.device, normalizer: Optional[StateNormalizer],
                 seed: int, intrinsic: Optional[nn.Module] = None):
        torch.manual_seed(seed)  # identical initial weights for every agent of a paired run
        self.args, self.device, self.normalizer = args, device, normalizer
        sizes = (args.hidden_size, args.hidden_size)
        low, high = np.array([-1.0], np.float32), np.array([1.0], np.float32)  # positions: short ... long
        self.actor = Actor(obs_dim, low, high, sizes).to(device).requires_grad_(False)
        self.qf = TwinQ(obs_dim, 1, sizes).to(device).requires_grad_(False)
        self.actor_target, self.qf_target = copy.deepcopy(self.actor), copy.deepcopy(self.qf)
        # FORK: the optimizer: any torch.optim optimizer (e.g. torch.optim.AdamW; a scheduler: build it here, step
        # it in update()). fused=True runs Adam as one C++ kernel for all tensors instead of ~10 ops per tensor.
        self.q_optimizer = torch.optim.Adam(self.qf.parameters(), lr=args.learning_rate, fused=True)
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=args.learning_rate, fused=True)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.action_low, self.action_high = torch.as_tensor(low, device=device), torch.as_tensor(high, device=device)
        # the reward hook: r_tot = r_env + w * r_int, made fresh on every sampled batch (the buffer stores r_env)
        self.intrinsic, self.intrinsic_coef = intrinsic, args.intrinsic_coef
        self.intrinsic_delta = torch.zeros((), dtype=torch.float64, device=device)  # sum of mean(w * r_int)
        self.penalty, self.n_updates = preactivation_penalty(args), 0

    def norm(self, obs: torch.Tensor) -> torch.Tensor:
        return obs if self.normalizer is None else self.normalizer(obs)

    @torch.inference_mode()
    def policy_action(self, obs: np.ndarray) -> np.ndarray:
        """pi(s), the deterministic action: no noise, no clipping by the env (what the audit inspects)."""
        return self.actor(self.norm(torch.as_tensor(obs, dtype=torch.float32, device=self.device))).cpu().numpy()

    @torch.inference_mode()
    def explore(self, obs: np.ndarray) -> np.ndarray:
        """pi(s) + N(0, exploration_noise * scale), clipped to the bounds."""
        a = self.actor(self.norm(torch.as_tensor(obs[None], dtype=torch.float32, device=self.device)))
        noise = torch.randn(a.shape, generator=self.generator, device=self.device)
        a += noise * (self.args.exploration_noise * self.actor.action_scale)
        return torch.clamp(a, self.action_low, self.action_high)[0].cpu().numpy()

    def critic_gradients(self, obs, actions, rewards, terminations, next_obs, noise):
        """Gradient of the critic loss: both critics regress on the clipped double-Q target."""
        obs, next_obs = self.norm(obs), self.norm(next_obs)  # inside the compiled graph: no eager calls
        with torch.no_grad():
            y = td3_target(self.actor_target, self.qf_target, next_obs, rewards, terminations, noise,
                           self.args.gamma, self.action_low, self.action_high)

        def critic_loss(qf_params):
            q = torch.func.functional_call(self.qf, qf_params, (obs, actions))  # [2, batch]
            qf_losses = (q - y).square().mean(dim=1)  # [qf1_loss, qf2_loss]
            return qf_losses.sum(), {"qf_losses": qf_losses, "q_means": q.mean(dim=1)}
        grads, (_, metrics) = torch.func.grad_and_value(critic_loss, has_aux=True)(dict(self.qf.named_parameters()))
        return grads, metrics

    def actor_loss(self, actor_params: dict, obs: torch.Tensor) -> torch.Tensor:
        """-mean Q1(s, pi(s)) + beta * mean(u^2): the deterministic policy gradient, plus the pull off the
        bound (at the bound kappa ~ 0 and the critic's gradient no longer reaches the actor)."""
        actions, u = torch.func.functional_call(self.actor, actor_params, (obs,), {"with_preactivation": True})
        return -self.qf.q1(obs, actions).mean() + self.penalty * u.square().mean()

    def actor_gradients(self, obs):
        return torch.func.grad_and_value(self.actor_loss)(dict(self.actor.named_parameters()), self.norm(obs))

    def update(self, batch) -> dict:
        """One critic step (+ actor and targets every policy_frequency-th call), on raw observations."""
        obs, actions, rewards, terminations, next_obs = batch
        if self.intrinsic is not None:  # the reward hook, on raw states
            bonus = self.intrinsic_coef * self.intrinsic(obs, actions, next_obs)
            rewards = rewards + bonus
            self.intrinsic_delta += bonus.mean()
        noise = smoothing_noise(actions, self.args.policy_noise, self.args.noise_clip, self.actor.action_scale,
                                self.generator)
        grads, metrics = self.critic_gradients(obs, actions, rewards, terminations, next_obs, noise)
        optimizer_step(self.q_optimizer, self.qf, grads)
        self.n_updates += 1
        metrics["rewards"] = rewards
        if self.n_updates % self.args.policy_frequency == 0:  # delayed policy updates
            grads, metrics["actor_loss"] = self.actor_gradients(obs)
            optimizer_step(self.actor_optimizer, self.actor, grads)
            soft_update_(list(self.actor_target.parameters()) + list(self.qf_target.parameters()),
                         list(self.actor.parameters()) + list(self.qf.parameters()), self.args.tau)
        return metrics

    def intrinsic_mean_delta(self) -> float:
        """The mean of r_tot - r_env over all training batches so far."""
        return float(self.intrinsic_delta) / max(self.n_updates, 1)

    def state_dicts(self) -> dict:
        """A copy of the weights of the four networks: a checkpoint (early stopping, model.pt)."""
        return copy.deepcopy({part: getattr(self, part).state_dict() for part in NETWORKS})

    def load_state_dicts(self, state: dict) -> None:
        for part in NETWORKS:
            getattr(self, part).load_state_dict(state[part])


# EVALUATION -------------------------------------------------------------------------------------
def performance_metrics(step_returns: np.ndarray, traded: np.ndarray, periods_per_year: int) -> dict:
    """Return, risk and cost of one equity curve: Sharpe = sqrt(P) mean/std of step returns; Sortino uses the
    downside deviation sqrt(mean(min(r, 0)^2)); max drawdown = max_t 1 - equity_t / max_{s<=t} equity_s;
    turnover = sum of the fractions of equity traded (the env's |p_t - w_t|, entry from flat included)."""
    r = np.asarray(step_returns, dtype=np.float64)
    equity = np.concatenate([[1.0], np.cumprod(1.0 + r)])
    n, mean, std = len(r), float(r.mean()), float(r.std())
    downside = float(np.sqrt(np.mean(np.minimum(r, 0.0) ** 2)))
    # annualized in logs: equity ** (P/n) overflows on a short split of many bars a year (None: beyond a float)
    growth = periods_per_year / n * math.log(equity[-1]) if equity[-1] > 0 else -math.inf
    return {"total_return": float(equity[-1] - 1.0), "annualized_return": math.expm1(growth) if growth < 700 else None,
            "volatility": std * math.sqrt(periods_per_year),
            "sharpe": mean / std * math.sqrt(periods_per_year) if std > 0 else 0.0,
            "sortino": mean / downside * math.sqrt(periods_per_year) if downside > 0 else 0.0,
            "max_drawdown": float(np.max(1.0 - equity / np.maximum.accumulate(equity))),
            "turnover": float(np.sum(traded)),
            "steps": n}


def q1_mean(agent: TD3, observations: np.ndarray) -> float:
    """mean Q1(s, pi(s)) over raw observations (the audit compares two critics on one set of states)."""
    obs = agent.norm(torch.as_tensor(np.asarray(observations), dtype=torch.float32, device=agent.device))
    with torch.no_grad():
        return float(agent.qf.q1(obs, agent.actor(obs)).mean())


def evaluate_split(agent: TD3, env: TradingEnv, periods_per_year: int) -> dict:
    """The deterministic policy over a whole split from flat; raw actor outputs kept for the audit."""
    obs, _ = env.reset(seed=0)
    observations, actions, returns, traded, positions, equity, done = [], [], [], [], [], [env.equity], False
    while not done:
        a = agent.policy_action(obs[None])[0]
        observations.append(obs)
        actions.append(float(a[0]))
        obs, _, terminated, truncated, info = env.step(a)  # the env clips to [-1, 1]
        returns.append(info["step_return"])
        traded.append(info["traded"])
        positions.append(env.position)
        equity.append(env.equity)
        done = terminated or truncated
    return {"metrics": performance_metrics(np.array(returns), np.array(traded), periods_per_year),
            "observations": np.asarray(observations), "actions": np.array(actions), "positions": np.array(positions),
            "equity": np.array(equity),
            "saturation": action_saturation_stats(actions)}


def benchmark_metrics(close: np.ndarray, realized_vol: np.ndarray, bounds: tuple, vol_threshold: float,
                      cost: float, periods_per_year: int) -> dict:
    """Buy-and-hold (one entry cost), flat, and the rule baseline vol_filter: long (1) while the 10-step
    realized vol is below its train-split median (vol_threshold), else flat; a bear regime is twice as
    volatile, so low vol says "bull" without looking ahead. Over the agents' evaluation steps."""
    start, end = bounds
    asset = close[start + 1: end] / close[start: end - 1] - 1.0
    schedules = {"buy_and_hold": np.ones(end - start - 1), "flat": np.zeros(end - start - 1),
                 "vol_filter": (realized_vol[start: end - 1] < vol_threshold).astype(np.float64)}
    out = {"metrics": {}, "equity": {}}
    for name, positions in schedules.items():
        # the agents' cost model: p_t earns C_{t+1}/C_t - 1 and pays cost * |p_t - w_t|, starting flat
        traded = np.abs(positions - np.concatenate([[0.0], drifted(positions[:-1], asset[:-1])]))
        returns = positions * asset - cost * traded
        out["metrics"][name] = performance_metrics(returns, traded, periods_per_year)
        out["equity"][name] = np.concatenate([[1.0], np.cumprod(1.0 + returns)])
    return out


# THE TRAINING LOOP ------------------------------------------------------------------------------
def train_agent(name: str, args: Args, data: "MarketData", normalizer: Optional[StateNormalizer], device: torch.device,
                run_dir: str, stop: "StopOnSignal", intrinsic: Optional[nn.Module] = None) -> dict:
    """Train one agent on the train split; evaluate it on the validation split every eval_frequency steps.
    data: the market, its splits and reference states (prepare_data); stop.signum: set by Ctrl-C or SIGTERM.
    Every agent of a run starts from the same seeds (weights, noise, replay indices, episode starts),
    so the only difference between the baseline and the intrinsic agent is w * r_int."""
    random.seed(args.seed)
    np.random.seed(args.seed)
    env, val_env = trading_env(data, "train", args, training=True), trading_env(data, "val", args, training=False)
    obs_dim = env.observation_space.shape[0]
    agent = TD3(obs_dim, args, device, normalizer, args.seed, intrinsic)
    if args.compile:
        compile_update(agent)
    rb = ReplayBuffer(min(args.buffer_size, args.total_timesteps), obs_dim, 1, device)
    log = TrainingLog(name, args, run_dir, data.fit_states)  # TensorBoard, validation history, progress lines
    best = {"sharpe": -math.inf, "step": None, "state": None}  # early stopping: the checkpoint kept
    env.action_space.seed(args.seed)
    obs, _ = env.reset(seed=args.seed)
    for global_step in range(1, args.total_timesteps + 1):
        if stop.signum is not None:
            break
        learning = global_step > args.learning_starts
        # ALGO LOGIC: act (uniform random, then pi(s) + exploration noise), step, store r_env
        action = agent.explore(obs) if learning else env.action_space.sample()
        next_obs, reward, terminated, truncated, _ = env.step(action)
        rb.add(obs[None], next_obs[None], action[None], [reward], [terminated])
        log.episode_step(reward, terminated or truncated, global_step)
        obs = env.reset()[0] if terminated or truncated else next_obs
        # ALGO LOGIC: one TD3 update per env step; r_tot = r_env + w * r_int is made per sampled batch
        if learning:
            metrics = agent.update(rb.sample(args.batch_size, agent.generator))
            if agent.n_updates % LOG_EVERY_UPDATES == 0:
                log.losses(metrics, agent, global_step)  # raises Diverged on NaN/inf
        log.tick(learning, global_step)
        if global_step % args.eval_frequency == 0 or global_step == args.total_timesteps:
            val = evaluate_split(agent, val_env, data.periods_per_year)
            log.evaluation(val, agent, global_step)  # raises Diverged on a NaN/inf weight: never kept
            # keep the best validation Sharpe; only a trained network (before learning starts every evaluation
            # scores the initial weights); ties keep the earlier step
            if learning and val["metrics"]["sharpe"] > best["sharpe"]:
                best = {"sharpe": val["metrics"]["sharpe"], "step": global_step, "state": agent.state_dicts()}
    log.writer.close()
    return {"agent": agent, "log": log, "best": best}


def main(args: Args) -> dict:
    """Fit the normalizer, train every agent, keep each one's best validation checkpoint, test, audit."""
    check_args(args)
    device = setup_torch(args)
    if args.eval_only:
        return evaluate_checkpoint(args, device)
    data = prepare_data(args, *load_market(args))
    check_split_lengths(data, args)
    # reference states, from a random-action rollout over the train split: --state-norm's fit sample (then
    # frozen), and the states on which the audit compares the two critics
    data.fit_states = reference_states(trading_env(data, "train", args, training=False), args.seed)
    normalizer = None
    if args.state_norm:
        normalizer = StateNormalizer(data.names, args.state_norm_kind, args.log_volume).fit(data.fit_states).to(device)
    run_dir = make_run_dir(args.runs_dir, f"{data.source}__{args.exp_name}__{args.seed}")
    write_scale_summary(run_dir, args, data, normalizer)
    names = ["baseline"] if args.paired else []  # w = 0: the counterfactual, on identical seeds
    names += ["intrinsic"] if args.intrinsic_kind != "none" else []
    # the intrinsic agent's bonus r_int (FORK: build another intrinsic reward here)
    intrinsic = {name: RND(args.intrinsic_kind, len(data.names), args.seed, args.rnd_hidden).to(device)
                 if name == "intrinsic" else None for name in names}
    trained = {}
    with StopOnSignal() as stop:  # Ctrl-C / SIGTERM: end the step, write summary.json, exit 130 / 143
        try:
            if side_by_side(names, device):  # a thread for each agent: each in its own process, at once (machinery)
                train_side_by_side(names, args, data, normalizer, device, run_dir, stop, intrinsic, trained)
            else:
                for name in names:
                    trained[name] = train_agent(name, args, data, normalizer, device, run_dir, stop, intrinsic[name])
                    if stop.signum is not None:
                        break
            # a signal during the last step's evaluation leaves every agent trained: the report goes on
            finished = [t["log"].steps == args.total_timesteps for t in trained.values()]
            if stop.signum is not None and not (len(finished) == len(names) and all(finished)):
                return end_early(args, run_dir, trained, signum=stop.signum)
        except Diverged as err:
            return end_early(args, run_dir, trained, error=err)
        # Training is over: a signal from here on lets the report (seconds) finish.
        # The paired audit asks what training with r_int did to the policy: the final agents, on test.
        final_test = {name: evaluate_split(t["agent"], trading_env(data, "test", args, training=False),
                                           data.periods_per_year) for name, t in trained.items()}
        final_pair = final_paired({name: t["agent"] for name, t in trained.items()}, final_test)
        # --keep-best (early stopping): the reward's noise is 10x its action-dependent drift, so a critic trained
        # long enough fits the noise of the ~7000 train steps; validation Sharpe says when that starts. The kept
        # step's actor, critic and their targets (model.pt then holds one consistent agent) are tested.
        for t in trained.values():
            if args.keep_best and t["best"]["state"] is not None:  # None: every Sharpe after learning started NaN
                t["agent"].load_state_dicts(t["best"]["state"])
                t["selected_step"] = t["best"]["step"]
        return report(args, run_dir, data, normalizer, trained, final_test, final_pair)  # test, audit files, table


# ===== MACHINERY (skip on a first read): the audit, the run folder, CSV reading, model files, =========
# ===== eval-only, faults and signals, the command line, the compile set-up ============================
LOG_EVERY_UPDATES = 100  # metrics are read back (.item() waits for the device) only this often
PROGRESS_EVERY_SECONDS = 30.0  # a progress line at least this often: a long run never looks hung
NEAR_BOUND, COLLAPSE_RATIO = 0.999, 0.95  # |a| >= 0.999 a_max is "at the bound"; collapse: at it on >= 95%
SHIFT_CLIP_RATIO, SHIFT_NEAR_BOUND = 0.01, 0.5  # shift audit: a feature at the clip on >= 1%; the actor on >= 50%
MIN_ROWS = 200  # a shorter file is refused at once; the splits' lengths are checked after (check_split_lengths)
MISSING_VALUES = {"", "null"}  # what Yahoo-style exports write on holidays: the row is skipped
MAX_VALUE = 1e18  # a larger close or volume is no price (its square overflows the networks' float32)
MAX_STEP_MOVE, MIN_STEP_MOVE = 1.0, -0.9  # a one-step close move beyond +100% / -90% is likely a data error
# usual stock split ratios (7: Apple 2014): without adjusted prices such a one-step move is named; not 3:2, whose
# -33% a volatile stock's bad day can match
SPLIT_RATIOS = (2, 3, 4, 5, 7, 10)
SPLIT_TOLERANCE = math.log(1.15)  # a split day's own move is within +-15%
MAX_GAP_DAYS, MAX_GAP_RATIO = 31.0, 10.0  # a gap beyond both (a month; 10 median gaps) is likely rows missing
# Above these, the divergence message names the learning rate or the reward as the likely cause
# (else it lists every cause): this script's scales are lr ~ 3e-5 and |r_tot| ~ 1-10.
DIVERGENCE_HINTS = {"learning_rate": 1e-3, "reward": 100.0}
EXIT_CODES = {"completed": 0, "diverged": 1}  # interrupted: 128 + the signal (130 SIGINT, 143 SIGTERM)
MODEL_FORMAT = "td3_intrinsic_trading/5"  # bumped when the keys or their meaning change (features: by their names)


class UserError(Exception):
    """A mistake in the command line or inputs: reported as one line on stderr, exit code 2."""


class Diverged(Exception):
    """A loss, a Q-value or a weight stopped being finite: the run ends with status "diverged"."""

    def __init__(self, message: str, agent: str, step: int):
        super().__init__(message)
        self.agent, self.step = agent, step


# THE AUDIT: saturation, the paired comparison, the diagnosis, the shift ---------------------------
def kappa(actions_normalized: np.ndarray) -> np.ndarray:
    """tanh gate kappa = 1 - (a/a_max)^2, the factor d tanh/du on every actor gradient: 0 at the bound."""
    return 1.0 - np.square(actions_normalized)


def action_saturation_stats(actions) -> dict:
    """On raw actor outputs in [-1, 1] (a_max = 1)."""
    a = np.asarray(actions, dtype=np.float64).reshape(-1)
    k, near = kappa(a), float(np.mean(np.abs(a) >= NEAR_BOUND))
    return {"near_bound_ratio": near, "actor_collapse_detected": bool(near >= COLLAPSE_RATIO),
            "kappa_mean": float(k.mean()), "kappa_p10": float(np.percentile(k, 10)),
            "action_mean": float(a.mean()), "action_std": float(a.std())}


def scale_stats(x: np.ndarray, names: list[str]) -> dict:
    """state_scale_summary.json's pre_stats/post_stats: per dimension and overall: min, max, mean, std, p95/p99 |x|."""
    x = np.asarray(x, dtype=np.float64)
    absx = np.abs(x)
    per_dim = [{"idx": i, "name": names[i], "min": float(x[:, i].min()), "max": float(x[:, i].max()),
                "mean": float(x[:, i].mean()), "std": float(x[:, i].std()),
                "p95_abs": float(np.percentile(absx[:, i], 95)), "p99_abs": float(np.percentile(absx[:, i], 99))}
               for i in range(x.shape[1])]
    return {"shape": list(x.shape),
            "global": {"min": float(x.min()), "max": float(x.max()),
                       "p95_abs": float(np.percentile(absx, 95)), "p99_abs": float(np.percentile(absx, 99))},
            "per_dim": per_dim}


def p99_abs_spread(stats: dict) -> Optional[float]:
    """max/min of per-dim p99_abs: how many orders of magnitude the inputs span (None if a dim is 0)."""
    p99 = [d["p99_abs"] for d in stats["per_dim"]]
    return max(p99) / min(p99) if min(p99) > 0 else None


def paired_metrics(base: dict, intr: dict, q1_delta: float) -> dict:
    """Step-aligned comparison of two evaluations over the same market segment; q1_delta: the two critics'
    mean Q1 on one common set of states (each on its own trajectory would mix a change of states in)."""
    n, m = min(len(base["actions"]), len(intr["actions"])), min(len(base["equity"]), len(intr["equity"]))
    return {"action_equal_ratio": float(np.mean(np.isclose(intr["actions"][:n], base["actions"][:n], rtol=0.0,
                                                           atol=1e-6))),
            "eval_value_mae": float(np.mean(np.abs(intr["equity"][:m] - base["equity"][:m]))),
            "q1_delta_mean": q1_delta}


def final_paired(agents: dict, results: dict) -> Optional[dict]:
    """paired_metrics of the baseline and the intrinsic agent on one split (None without both), both critics
    scored on the union of the two agents' observations there."""
    if not {"baseline", "intrinsic"} <= set(agents):
        return None
    common = np.concatenate([results["baseline"]["observations"], results["intrinsic"]["observations"]])
    q1_delta = q1_mean(agents["intrinsic"], common) - q1_mean(agents["baseline"], common)
    return paired_metrics(results["baseline"], results["intrinsic"], q1_delta)


def verdict(val: dict, val_bench: dict, periods_per_year: int) -> dict:
    """Per agent, from the validation split: an edge only if its Sharpe beats buy-and-hold, the rule and flat
    (0) there by more than one standard error of a Sharpe estimate, sqrt(P / n) annualized (Lo 2002, small
    Sharpe). The kept checkpoint was chosen on this split, so "edge" is a first hurdle, not proof; without
    one, good test numbers are luck, not evidence of skill."""
    out = {}
    for name, m in val.items():
        noise = math.sqrt(periods_per_year / m["steps"])
        lead = {b: m["sharpe"] - val_bench[b]["sharpe"] for b in ("buy_and_hold", "vol_filter")}
        beaten = [b for b, x in lead.items() if x > 0]
        edge = all(x > noise for x in lead.values()) and m["sharpe"] > noise
        if not beaten:
            how = "beats neither"
        elif len(beaten) == 1:
            how = f"beats only {beaten[0]}"
        elif edge:
            how = "beats both"
        elif min(lead.values()) <= noise:
            how = "beats both by less than the noise"
        else:
            how = "beats both, but is within the noise of flat (0)"
        out[name] = {"edge": edge, "text": f"{name}: {'edge' if edge else 'no edge learned'}: its validation Sharpe "
                     f"{m['sharpe']:.2f} {how} (buy_and_hold {val_bench['buy_and_hold']['sharpe']:.2f}, vol_filter "
                     f"{val_bench['vol_filter']['sharpe']:.2f}, noise {noise:.2f})"
                     + ("" if edge else "; its test numbers are not evidence of skill")}
    return out


def input_fix(args: Args) -> Optional[str]:
    """The input change that can free an actor stuck at its bound, or None if the run already has it
    (advice never tells a run to use an option it already uses)."""
    if not args.state_norm:
        return "use --state-norm"
    return None if args.stationary else "make the levels relative (drop --no-stationary)"


def diagnose(paired: dict, near_bound: float, initial_equity: float, shift: Optional[str] = None, *,
             fix: Optional[str]) -> dict:
    """R1-R4 (docs/trading.md, the audit loop), plus what to change (a distribution shift, when found, comes first).
    fix: input_fix(args), the input change still open to the run (None: inputs already normalized)."""
    moved, frozen = abs(paired["intrinsic_mean_delta"]) > 1e-9, paired["action_equal_ratio"] >= 0.999
    if not moved:
        code, text = "R4", "no intrinsic effect: w * r_int is zero on the training batches"
    elif frozen:
        code, text = "R1", "value moved, policy frozen: r_int changed the targets but the actions are identical"
    elif paired["eval_value_mae"] <= 1e-6 * initial_equity:
        code, text = "R2", "actions differ, but the portfolio value curves are equal"
    else:
        code, text = "R3", "actions and portfolio value both differ: the intrinsic reward changed behaviour"
    if near_bound >= COLLAPSE_RATIO:
        advice = "the actor sits at its bound (kappa ~ 0, no gradient reaches it): " + (
            f"check state_scale_summary.json (p99_abs_spread) and {fix} before judging the intrinsic reward" if fix
            else "its inputs are normalized and relative, so check the data (a flat or trendless price gives it "
                 "nothing to follow), then a lower --learning-rate or a larger --preactivation-penalty")
    elif frozen and moved:
        advice = ("the actor can move (near-bound low) yet ignores r_int: the intrinsic term is action-independent "
                  "and only raises every action's value; redesign it (e.g. --intrinsic-kind sa-rnd) rather than "
                  "tuning normalization")
    else:
        advice = "nothing to audit: w * r_int is 0 on every batch: raise --intrinsic-coef above 0" if not moved else \
            "the intrinsic reward changes the policy: judge it by both agents' verdicts, then their test Sharpe"
    return {"code": code, "text": text, "advice": f"{shift}; then: {advice}" if shift else advice}


def network_inputs(observations: np.ndarray, normalizer: Optional[StateNormalizer]) -> np.ndarray:
    """What the networks see of raw observations: normalized and clipped, or raw without --state-norm."""
    if normalizer is None:
        return np.asarray(observations, dtype=np.float64)
    with torch.no_grad():
        return normalizer(torch.as_tensor(np.asarray(observations), dtype=torch.float32,
                                          device=normalizer.center.device)).double().cpu().numpy()


def shift_stats(inputs: np.ndarray, fit_low: np.ndarray, fit_high: np.ndarray, clip: Optional[float],
                names: list[str]) -> dict:
    """scale_stats of evaluation inputs, plus per feature the share at +-clip and outside the fit range."""
    stats = scale_stats(inputs, names)
    for d in stats["per_dim"]:
        x = inputs[:, d["idx"]]
        d["clip_ratio"] = None if clip is None else float(np.mean(np.abs(x) >= clip * (1 - 1e-6)))
        margin = 1e-3 * (fit_high[d["idx"]] - fit_low[d["idx"]])  # a position of exactly +-1 is not "outside"
        d["outside_fit_range"] = float(np.mean((x < fit_low[d["idx"]] - margin) | (x > fit_high[d["idx"]] + margin)))
    stats["clip_ratio_max"] = None if clip is None else max(d["clip_ratio"] for d in stats["per_dim"])
    stats["outside_fit_range_max"] = max(d["outside_fit_range"] for d in stats["per_dim"])
    return stats


def distribution_shift(shift: dict, saturation: dict, *, fix: Optional[str]) -> Optional[str]:
    """Names a shift when an input or the actor is fine on validation but not on test.

    Per feature: at the +-clip on >= 1% of test steps and on under a fifth of that share on
    validation (a trending level does this; another feature's rare clip on validation does not hide it).
    The actor: at its bound on >= 50% of test steps, under 50% on validation.
    """
    for name, splits in shift.items():
        if "val" not in splits or "test" not in splits:
            continue
        val_near, test_near = saturation[name]["val"]["near_bound_ratio"], saturation[name]["test"]["near_bound_ratio"]
        shifted = [(test["clip_ratio"], val["clip_ratio"], test["name"])
                   for val, test in zip(splits["val"]["per_dim"], splits["test"]["per_dim"])
                   if test["clip_ratio"] is not None and test["clip_ratio"] >= SHIFT_CLIP_RATIO
                   and val["clip_ratio"] < test["clip_ratio"] / 5]
        actor_shifted = test_near >= SHIFT_NEAR_BOUND > val_near
        if not shifted and not actor_shifted:
            continue
        parts = [f"'{feature}' is at the clip on {test_share:.0%} of test steps (validation {val_share:.0%})"
                 for test_share, val_share, feature in sorted(shifted, reverse=True)]
        if actor_shifted:
            parts.append(f"the actor is at its bound on {test_near:.0%} of test steps (validation {val_near:.0%})")
        remedy = (f"{fix} rather than retuning the agent" if fix else
                  "the test period lies outside what the train split showed: train on more or more recent data")
        what = "an input left the range fitted on the train split" if shifted else "the actor left what it did there"
        return f"distribution shift ({name}): " + ", ".join(parts) + f": {what}; {remedy}"
    return None


def feature_transforms(args: Args, names: list[str]) -> list[str]:
    """What the networks see of each feature, in order (named in state_scale_summary.json)."""
    if not args.state_norm:
        return ["raw"] * len(names)
    scale = "robust (x - median)/IQR" if args.state_norm_kind == "robust" else "zscore (x - mean)/std"
    steps = {"volume": "log1p, " if args.log_volume else "",
             "log_close_over_max20": "log(close_t / max(close_t-19..t)), ",
             "log_volume_mean_10": "mean of log1p(volume) over the last 10 bars, ",
             "equity_drawdown": "equity_t / running peak of the episode - 1, "}
    return [f"{steps.get(name, '')}{scale}, clip +-10" for name in names]


# THE DATA: the run's market, its splits, the environments -----------------------------------------
@dataclass
class MarketData:
    """The market in the run's observation layout, and what is fitted on its train split."""

    close: np.ndarray
    features: dict  # market_features() in the run's layout (raw or stationary)
    names: list  # of the observation: the features, then position and equity (or its drawdown)
    stationary: bool  # relative layout (--state-norm with --stationary): close over its 20-bar high, drawdown
    splits: dict  # name -> [start, end)
    vol_threshold: float  # the rule baseline's threshold: median realized vol of the train split
    source: str  # for the run name: the CSV's file name or synthetic{market_seed}
    periods_per_year: int  # for annualized metrics: --periods-per-year, else from the data
    frequency: str  # how periods_per_year was found
    dates: Optional[list]  # a CSV's timestamps (ISO text), one per row; None for the synthetic market
    fit_states: Optional[np.ndarray] = None  # reference_states(): the normalizer's fit sample, the audit's states


def load_market(args: Args) -> tuple[Market, str]:
    if args.data_csv:
        return load_csv(args.data_csv, args.accept_suspect_rows), os.path.basename(args.data_csv)
    return synthetic_market(args.market_steps, args.market_seed), f"synthetic{args.market_seed}"


def prepare_data(args: Args, market: Market, source: str) -> MarketData:
    """Features in the run's layout; the three chronological splits and "all" (every usable row)."""
    stationary = args.state_norm and args.stationary  # the raw run keeps raw levels: the freeze demo (R1)
    features = market_features(market.close, market.volume, stationary=stationary)
    splits = split_bounds(len(market.close), args.train_frac, args.val_frac)
    lo, hi = splits["train"]
    names = observation_names(features, relative_equity=stationary)
    periods, frequency = (args.periods_per_year, "--periods-per-year") if args.periods_per_year \
        else (market.periods_per_year, market.frequency)
    threshold = float(np.median(features["realized_vol_10"][lo:hi])) if hi > lo else math.nan  # NaN: no train rows
    return MarketData(market.close, features, names, stationary, splits, threshold, source, periods, frequency,
                      market.dates)


def check_split_lengths(data: MarketData, args: Args) -> None:
    need = max(args.episode_length // 2, 20)  # half a training episode, at least 20 steps
    for split in ("train", "val", "test"):
        lo, hi = data.splits[split]
        if hi - lo - 1 < need:  # n rows, n - 1 steps
            raise UserError(f"the {split} split has {hi - lo - 1} steps, under the {need} of half an episode "
                            f"(--episode-length {args.episode_length}): use more data, a shorter --episode-length "
                            "or other --train-frac/--val-frac")


def trading_env(data: MarketData, split: str, args: Args, training: bool) -> TradingEnv:
    """The env of one split: training episodes are random windows of --episode-length steps, else the whole
    split from flat; the cost in fractions of equity; the equity as a drawdown in the stationary layout."""
    return TradingEnv(data.close, data.features, *data.splits[split],
                      episode_length=args.episode_length if training else None, cost=args.cost_bp * 1e-4,
                      risk_penalty=args.risk_penalty, reward_scale=args.reward_scale,
                      initial_equity=args.initial_equity, relative_equity=data.stationary)


# ONE AGENT'S RUN FILES: TensorBoard, validation history, best checkpoint, progress, divergence -------
class TrainingLog:
    """One agent's plumbing: TensorBoard, the learning-phase clock, the validation history, progress lines,
    the divergence check."""

    def __init__(self, name: str, args: Args, run_dir: str, common_states: np.ndarray):
        self.name, self.args, self.steps, self.common_states = name, args, 0, common_states
        self.writer = SummaryWriter(os.path.join(run_dir, name))
        self.writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(
            f"|{k}|{v}|" for k, v in dataclasses.asdict(args).items()))
        self.history, self.val_results, self.last_values = [], [], {}
        self.episode_return, self.episode_length = 0.0, 0
        self.learn_seconds, self.learn_steps, self.compile_seconds = 0.0, 0, 0.0
        self.compile_iterations = args.policy_frequency if args.compile else 0  # where torch.compile builds
        self.start, self.clock, self.last_print = time.time(), time.perf_counter(), time.time()

    def episode_step(self, reward: float, done: bool, step: int) -> None:
        self.episode_return, self.episode_length = self.episode_return + reward, self.episode_length + 1
        if done:
            self.writer.add_scalar("charts/episodic_return", self.episode_return, step)
            self.writer.add_scalar("charts/episodic_length", self.episode_length, step)
            self.episode_return, self.episode_length = 0.0, 0

    def losses(self, metrics: dict, agent: TD3, step: int) -> None:
        """CleanRL's loss curves (and the mean of r_tot - r_env); a NaN or inf in them ends the run."""
        (q1, q2), (l1, l2) = metrics["q_means"].tolist(), metrics["qf_losses"].tolist()
        self.last_values = {"qf1_values": q1, "qf2_values": q2, "qf1_loss": l1, "qf2_loss": l2,
                            "qf_loss": (l1 + l2) / 2}
        if "actor_loss" in metrics:
            self.last_values["actor_loss"] = metrics["actor_loss"].item()
        for name, value in self.last_values.items():
            self.writer.add_scalar(f"losses/{name}", value, step)
        self.writer.add_scalar("charts/SPS", int(self.sps), step)
        if agent.intrinsic is not None:
            self.writer.add_scalar("charts/intrinsic_mean_delta", agent.intrinsic_mean_delta(), step)
        self.last_values["reward_abs_max"] = metrics["rewards"].abs().max().item()
        self.check_finite(agent, step)

    def check_finite(self, agent: TD3, step: int) -> None:
        """Diverged if a logged loss, Q-value, r_tot or an actor or critic weight is NaN/inf: at every logging
        interval and before every evaluation, so no evaluated or kept network has diverged."""
        bad = next(((name, value) for name, value in self.last_values.items() if not math.isfinite(value)), None)
        weights = torch.stack([p.sum() for p in list(agent.actor.parameters()) + list(agent.qf.parameters())])
        if bad is None and not bool(torch.isfinite(weights).all()):
            bad = ("a network weight", math.nan)
        if bad is None:
            return
        reward_max, args = self.last_values.get("reward_abs_max", math.nan), self.args
        causes = {  # cause: whether this run's numbers point at it
            f"too high a learning rate (--learning-rate {args.learning_rate:g}; the default is {Args.learning_rate:g})":
                args.learning_rate > DIVERGENCE_HINTS["learning_rate"],
            f"the reward scale (|r_tot| up to {reward_max:.3g}; --reward-scale {args.reward_scale:g}"
            + (f", --intrinsic-coef {args.intrinsic_coef:g})" if agent.intrinsic is not None else ")"):
                reward_max > DIVERGENCE_HINTS["reward"]}
        if not args.state_norm:  # never advise an option the run already uses
            causes["unnormalized inputs (price and equity levels ~1e2-1e5; use --state-norm)"] = True
        likely = [cause for cause, flagged in causes.items() if flagged] or list(causes)
        self.writer.close()  # the agent ends here: its TensorBoard file is closed as a completed run's is
        raise Diverged(f"[{self.name}] training diverged at step {step}: {bad[0]} = {bad[1]:g}. "
                       f"Likely cause: {'; or '.join(likely)}", self.name, step)

    def evaluation(self, result: dict, agent: TD3, step: int) -> None:
        """One validation evaluation: history, TensorBoard, a progress line."""
        self.check_finite(agent, step)  # never evaluate (or keep as best) a diverged network
        self.val_results.append(result)
        entry = {"global_step": step, **result["saturation"], "val_sharpe": result["metrics"]["sharpe"],
                 "val_total_return": result["metrics"]["total_return"],
                 "q1_mean_fit_states": q1_mean(agent, self.common_states)}
        if agent.intrinsic is not None:
            entry["intrinsic_mean_delta"] = agent.intrinsic_mean_delta()
        self.history.append(entry)
        for name, key in (("eval/sharpe", "val_sharpe"), ("eval/total_return", "val_total_return"),
                          ("audit/near_bound_ratio", "near_bound_ratio"), ("audit/kappa_mean", "kappa_mean")):
            self.writer.add_scalar(name, entry[key], step)
        self.progress(step)

    def tick(self, learning: bool, step: int) -> None:
        """The learning-phase clock (not evaluating nor compiling) and a progress line now and then."""
        now = time.perf_counter()
        if learning and self.compile_iterations > 0:
            self.compile_iterations -= 1
            self.compile_seconds += now - self.clock
        elif learning:
            self.learn_seconds += now - self.clock
            self.learn_steps += 1
        self.clock, self.steps = now, step
        if time.time() - self.last_print > PROGRESS_EVERY_SECONDS:
            self.progress(step)

    @property
    def sps(self) -> float:
        return self.learn_steps / self.learn_seconds if self.learn_seconds else 0.0

    def progress(self, step: int) -> None:
        line = f"[{self.name}] step {step}/{self.args.total_timesteps} | learning SPS {self.sps:.0f} | "
        if self.history:
            last = self.history[-1]
            line += f"val Sharpe {last['val_sharpe']:.2f} | near-bound {last['near_bound_ratio']:.3f} | "
        eta = int((self.args.total_timesteps - step) / max(self.sps, 1e-9))
        print(line + (f"ETA {eta // 60}m{eta % 60:02d}s" if self.sps else "ETA ? (learning not started)"), flush=True)
        self.last_print, self.clock = time.time(), time.perf_counter()  # printing is not learning time


# THE REPORT: the test split, the audit files, the table, summary.json ------------------------------
def report(args: Args, run_dir: str, data: MarketData, normalizer: Optional[StateNormalizer], trained: dict,
           final_test: dict, final_pair: Optional[dict]) -> dict:
    """After training: the kept agents on validation and test, the audit files, model.pt, the summary."""
    agents, logs = {name: t["agent"] for name, t in trained.items()}, {name: t["log"] for name, t in trained.items()}
    inputs = network_inputs(data.fit_states, normalizer)
    fit_range = (inputs.min(axis=0), inputs.max(axis=0))  # the range the networks saw fitted: the shift yardstick
    result = evaluation_report(args, run_dir, data, agents, normalizer, fit_range, ["val", "test"])
    write_scale_summary(run_dir, args, data, normalizer, result)
    selected = {name: t.get("selected_step", args.total_timesteps) for name, t in trained.items()}  # step tested
    paired, diagnosis, per_eval = None, None, []
    if final_pair is not None:  # both agents trained: what training with r_int did, the final policies on test
        paired = {**final_pair, "intrinsic_mean_delta": agents["intrinsic"].intrinsic_mean_delta()}
        evals = zip(logs["baseline"].val_results, logs["baseline"].history, logs["intrinsic"].val_results,
                    logs["intrinsic"].history)
        per_eval = [{"global_step": hi["global_step"], **paired_metrics(b, i, hi["q1_mean_fit_states"] -
                                                                        hb["q1_mean_fit_states"]),
                     "intrinsic_mean_delta": hi["intrinsic_mean_delta"]} for b, hb, i, hi in evals]
        learned = [row for row in per_eval if row["global_step"] > args.learning_starts]  # before: identical agents
        for key in ("action_equal_ratio", "eval_value_mae", "intrinsic_mean_delta", "q1_delta_mean"):
            paired[f"{key}_mean"] = float(np.mean([row[key] for row in learned])) if learned else None
        near = max(res["saturation"]["near_bound_ratio"] for res in final_test.values())
        diagnosis = diagnose(paired, near, args.initial_equity, result["distribution_shift"], fix=input_fix(args))
    # summary/history: validation evaluations during training; selected: the checkpoint kept (best validation
    # Sharpe) on validation and test; final_test: the last (not kept) policy on test
    saturation = {"near_bound_threshold": NEAR_BOUND, "collapse_threshold": COLLAPSE_RATIO, "summary_split": "val",
                  "history_split": "val", "test_split": "test", "paired": paired and {**paired, "history": per_eval},
                  "diagnosis": diagnosis, "distribution_shift": result["distribution_shift"],
                  "agents": {name: {"summary": log.history[-1], "history": log.history, "selected_step": selected[name],
                                    "final_test": final_test[name]["saturation"],
                                    "selected_val": result["saturation"][name]["val"],
                                    "test": result["saturation"][name]["test"]} for name, log in logs.items()}}
    write_json_atomic(os.path.join(run_dir, "td3_action_saturation.json"), saturation)
    if args.save_model:
        save_model(os.path.join(run_dir, "model.pt"), args, data, agents, fit_range, selected)
    val = {name: res["metrics"] for name, res in result["results"]["val"].items()}  # the kept agents'
    summary = {"status": "completed", "exit_code": EXIT_CODES["completed"], "run_dir": run_dir, "seed": args.seed,
               "state_norm": args.state_norm, "stationary": data.stationary,
               "total_timesteps": args.total_timesteps, "periods_per_year": data.periods_per_year,
               "frequency": data.frequency, "test": result["eval"], "selected_step": selected,
               "val": val, "val_benchmarks": result["benchmarks"]["val"],
               "verdict": verdict(val, result["benchmarks"]["val"], data.periods_per_year),
               "saturation": {name: result["saturation"][name]["val"] for name in logs},  # the kept agents'
               "saturation_test": {name: res["saturation"] for name, res in result["results"]["test"].items()},
               "paired": paired, "diagnosis": diagnosis, "distribution_shift": result["distribution_shift"],
               "sps_learning_phase": {name: round(log.sps, 1) for name, log in logs.items()},
               "compile_seconds": {name: round(log.compile_seconds, 2) for name, log in logs.items()},
               "wall_time_s": round(time.time() - min(log.start for log in logs.values()), 2)}
    write_json_atomic(os.path.join(run_dir, "summary.json"), summary)
    print_table(result["eval"], summary["saturation_test"], f"the checkpoints kept at steps {selected} by validation "
                f"Sharpe" if args.keep_best else "the final policies", summary["verdict"],
                {"policies": f"the final policies (step {args.total_timesteps}) on test", "paired": summary["paired"],
                 "near_bound": {name: res["saturation"]["near_bound_ratio"] for name, res in final_test.items()},
                 "diagnosis": summary["diagnosis"] or {"advice": summary["distribution_shift"]}})
    print(f"-> {run_dir} ({summary['wall_time_s']:.0f} s)")
    return summary


def end_early(args: Args, run_dir: str, trained: dict, error: Optional[Diverged] = None,
              signum: Optional[int] = None) -> dict:
    """A run stopped by a signal or by divergence: summary.json says how and how far, nothing else is
    evaluated (a half-trained pair would audit nothing)."""
    steps = {name: t["log"].steps for name, t in trained.items()} | ({error.agent: error.step} if error else {})
    status = "diverged" if error else "interrupted"
    summary = {"status": status, "exit_code": 128 + signum if signum is not None else EXIT_CODES[status],
               "run_dir": run_dir, "seed": args.seed, "total_timesteps": args.total_timesteps, "steps": steps,
               **({"error": str(error)} if error else {"signal": signal.Signals(signum).name})}
    write_json_atomic(os.path.join(run_dir, "summary.json"), summary)
    print(f"error: {error}" if error else f"interrupted by {summary['signal']} after {steps} of {args.total_timesteps}"
          f" steps per agent: nothing evaluated; runs are short, start again -> {run_dir}", file=sys.stderr)
    return summary


def evaluation_report(args: Args, run_dir: str, data: MarketData, agents: dict, normalizer: Optional[StateNormalizer],
                      fit_range: tuple, splits: list[str]) -> dict:
    """Every agent on each split; eval_{split}.json and the plots of the last split; the shift audit."""
    results = {split: {name: evaluate_split(agent, trading_env(data, split, args, training=False),
                                            data.periods_per_year) for name, agent in agents.items()}
               for split in splits}
    bench = {s: benchmark_metrics(data.close, data.features["realized_vol_10"], data.splits[s], data.vol_threshold,
                                  args.cost_bp * 1e-4, data.periods_per_year) for s in splits}
    split = splits[-1]
    lo, hi = data.splits[split]
    eval_json = {"split": split, "steps": hi - lo - 1, "dates": data.dates and [data.dates[lo], data.dates[hi - 1]],
                 "periods_per_year": data.periods_per_year, "frequency": data.frequency,
                 "agents": {name: res["metrics"] for name, res in results[split].items()},
                 **bench[split]["metrics"], "vol_filter_threshold": data.vol_threshold}
    write_json_atomic(os.path.join(run_dir, f"eval_{split}.json"), eval_json)
    plot_equity(results[split], bench[split]["equity"], args.initial_equity, split,
                os.path.join(run_dir, "eval_equity.png"))
    plot_saturation(results[split], split, os.path.join(run_dir, "action_saturation.png"))
    clip = normalizer.clip if normalizer else None
    shift = {name: {s: shift_stats(network_inputs(results[s][name]["observations"], normalizer), *fit_range, clip,
                                   data.names) for s in splits} for name in agents}
    saturation = {name: {s: results[s][name]["saturation"] for s in splits} for name in agents}
    return {"results": results, "eval": eval_json, "shift": shift, "saturation": saturation,
            "benchmarks": {s: b["metrics"] for s, b in bench.items()},
            "distribution_shift": distribution_shift(shift, saturation, fix=input_fix(args))}


def write_scale_summary(run_dir: str, args: Args, data: MarketData, normalizer: Optional[StateNormalizer],
                        result: Optional[dict] = None) -> None:
    """state_scale_summary.json: the fit sample, raw and as the networks see it; after training, the shift."""
    names, ref = data.names, data.fit_states
    pre, post = scale_stats(ref, names), scale_stats(network_inputs(ref, normalizer), names)
    summary = {"mode": args.state_norm_kind if args.state_norm else "none",
               "log_volume": bool(args.state_norm and args.log_volume),
               "stationary": data.stationary,
               "feature_names": names, "feature_transforms": dict(zip(names, feature_transforms(args, names))),
               "fit_sample_count": len(ref), "pre_stats": pre, "post_stats": post,
               "p99_abs_spread": {"pre": p99_abs_spread(pre), "post": p99_abs_spread(post)}}
    if result is not None:
        summary["shift"] = {"clip": normalizer.clip if normalizer else None, "clip_ratio_threshold": SHIFT_CLIP_RATIO,
                            "near_bound_threshold": SHIFT_NEAR_BOUND, "agents": result["shift"],
                            "distribution_shift": result["distribution_shift"]}
    write_json_atomic(os.path.join(run_dir, "state_scale_summary.json"), summary)


def print_table(eval_json: dict, saturation: dict, agents: str, verdicts: Optional[dict], audit: dict) -> None:
    """The table of the tested agents (agents: which policies they are), the verdicts from validation, then
    the audit, which says which policies it describes."""
    period = " from {} to {}".format(*eval_json["dates"]) if eval_json["dates"] else ""
    print(f"{eval_json['split']} split{period}, {eval_json['steps']} steps, {eval_json['periods_per_year']} bars a "
          f"year ({eval_json['frequency']})\nagents: {agents}")
    print(f"{'agent':<14}{'Sharpe':>8}{'return':>9}{'max DD':>8}{'near-bound':>12}{'kappa':>8}")
    for name, m in [*eval_json["agents"].items(), *((n, eval_json[n]) for n in ("buy_and_hold", "vol_filter", "flat"))]:
        columns = f"{saturation[name]['near_bound_ratio']:12.3f}{saturation[name]['kappa_mean']:8.3f}" \
            if name in saturation else ""
        print(f"{name:<14}{m['sharpe']:8.2f}{m['total_return']:9.1%}{m['max_drawdown']:8.1%}{columns}")
    for v in (verdicts or {}).values():
        print(f"verdict {v['text']}")
    paired, diagnosis = audit["paired"], audit["diagnosis"]
    if paired is not None:
        print(f"audit of {audit['policies']}: near-bound " + ", ".join(f"{name} {near:.3f}" for name, near in
                                                                      audit["near_bound"].items()))
        print(f"paired: action_equal_ratio {paired['action_equal_ratio']:.4f}, eval_value_mae "
              f"{paired['eval_value_mae']:.2f}, " + (f"intrinsic_mean_delta {paired['intrinsic_mean_delta']:.4g}, "
                                                    if "intrinsic_mean_delta" in paired else "")
              + f"q1_delta_mean {paired['q1_delta_mean']:.4g}")
    if diagnosis is not None and "code" in diagnosis:
        print(f"diagnosis {diagnosis['code']}: {diagnosis['text']}")
    if diagnosis is not None and diagnosis["advice"]:
        print(f"advice: {diagnosis['advice']}")


def make_run_dir(runs_dir: str, name: str) -> str:
    """runs_dir/{name}__{start second}, made new: a run of the same name started in the same second gets a
    folder of its own (-2, -3, ...), never another run's files."""
    base, n = os.path.join(runs_dir, f"{name}__{int(time.time())}"), 1
    while True:
        path = base if n == 1 else f"{base}-{n}"
        try:
            os.makedirs(path)
            return path
        except FileExistsError:
            n += 1
        except OSError as err:
            raise UserError(f"cannot make the run folder under --runs-dir '{runs_dir}': {err}") from None


# FILES AND PLOTS --------------------------------------------------------------------------------
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
        replace_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)


def plot_equity(results: dict, benchmarks: dict, initial_equity: float, split: str, path: str) -> None:
    fig, (ax, ax_pos) = plt.subplots(2, 1, figsize=(11, 6.5), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    steps = np.arange(len(benchmarks["buy_and_hold"]))
    styles = {"buy_and_hold": ("grey", "-"), "vol_filter": ("black", ":"), "flat": ("silver", "--")}
    for name, (color, style) in styles.items():
        ax.plot(steps, benchmarks[name] * initial_equity, color=color, ls=style, lw=1.2, label=name.replace("_", " "))
    for name, res in results.items():
        line, = ax.plot(steps[: len(res["equity"])], res["equity"], lw=1.2,
                        label=f"{name} (Sharpe {res['metrics']['sharpe']:.2f})")
        ax_pos.plot(steps[1: len(res["positions"]) + 1], res["positions"], lw=0.9, color=line.get_color(), label=name)
        near = np.flatnonzero(np.abs(res["actions"]) >= NEAR_BOUND)
        if len(near):
            ax_pos.scatter(near + 1, res["positions"][near], s=6, color="#d62728", zorder=3)
    ax.set(ylabel="equity", title=f"{split} split: agents against buy and hold, the volatility filter and flat")
    ax.legend()
    ax_pos.set(ylabel="position p_t", ylim=(-1.08, 1.08),
               xlabel=f"{split} step (red dots: raw actor output at the bound, |a| ≥ {NEAR_BOUND})")
    save_figure(fig, path)


def plot_saturation(results: dict, split: str, path: str) -> None:
    fig, (ax_a, ax_k) = plt.subplots(1, 2, figsize=(11, 4))
    for name, res in results.items():
        ax_a.hist(res["actions"], bins=np.linspace(-1, 1, 41), alpha=0.55, label=name)
        ax_k.hist(kappa(res["actions"]), bins=np.linspace(0, 1, 41), alpha=0.55, label=name)
    ax_a.set(xlabel="raw actor output a / a_max", ylabel=f"{split} steps",
             title="actor outputs (mass at ±1 = collapse)")
    ax_k.set(xlabel="κ = 1 − (a/a_max)²", title="tanh gate: the share of the critic's gradient reaching the actor")
    for ax in (ax_a, ax_k):
        ax.legend()
    save_figure(fig, path)


# CSV READING: --data-csv, as spreadsheets and data vendors export it ------------------------------
def read_csv_rows(path: str) -> tuple[list[list[str]], list[int], str]:
    """The records of a CSV (gzipped if it ends in .gz) from its header on, the file line each starts on, and
    the delimiter: a UTF-8 byte-order mark ("CSV UTF-8" exports) and blank lines before the header are
    dropped; lines end in LF, CRLF or CR (old Mac exports); the delimiter (comma, semicolon or tab) is the
    one the header uses most; a quoted field may span lines."""
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rt", newline="", encoding="utf-8-sig") as f:
            text = f.read()
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as err:  # EOFError: a truncated .gz
        raise UserError(f"cannot read --data-csv '{path}': {err}") from None
    lines = re.split(r"\r\n|\r|\n", text)
    first = next((i for i, line in enumerate(lines) if line.strip()), None)  # the header
    if first is None:
        raise UserError(f"--data-csv '{path}' is empty")
    delimiter = max((",", ";", "\t"), key=lines[first].count)
    reader = csv.reader(io.StringIO("\n".join(lines[first:])), delimiter=delimiter)
    rows, starts, start = [], [], first + 1
    try:
        for row in reader:
            rows.append(row)
            starts.append(start)
            start = first + reader.line_num + 1
    except csv.Error as err:  # a field outgrew csv's limit: a quote never closed swallowed the rest of the file
        raise UserError(f"--data-csv '{path}' line {start}: {err} (a quote (\") never closed?)") from None
    if any("\n" in cell for cell in rows[-1]):  # the last record ran to the end of the file
        raise UserError(f"--data-csv '{path}' line {starts[-1]}: a quote (\") opens a field that never closes; "
                        "close it or remove it")
    return rows, starts, delimiter


def date_then_time(fmt: str):
    """A parser: fmt's date, then optionally an ISO time after a space (a Date and a Time column, joined)."""
    def parse(text: str) -> datetime:
        day, _, clock = text.partition(" ")
        return datetime.fromisoformat(f"{datetime.strptime(day, fmt).date()}T{clock or '00:00'}")
    return parse


DATE_FORMATS = {"ISO (2024-01-31 or 2024-01-31T09:30)": datetime.fromisoformat,
                "DD.MM.YYYY HH:MM:SS.000 [GMT+0100]": lambda s: datetime.strptime(
                    s, "%d.%m.%Y %H:%M:%S.%f" + (" GMT%z" if "GMT" in s else "")),  # Dukascopy's Gmt/Local Time
                "MM/DD/YYYY [HH:MM]": date_then_time("%m/%d/%Y"), "DD/MM/YYYY [HH:MM]": date_then_time("%d/%m/%Y")}


def parse_dates(texts: list[str], row_nos: list[int]) -> list:
    """One format for the whole file: the first that reads every row. 03/04/2001 reads as March and as
    April, so a file both slash formats read is refused; a file that mixes time zones with none too."""
    fits = []
    for name, parse in DATE_FORMATS.items():
        try:
            fits.append((name, [parse(t) for t in texts]))
        except ValueError:
            pass
    fits = [(name, dates) for name, dates in fits if "/" not in name] or fits
    if not fits:
        for text, row_no in zip(texts, row_nos):
            if not any(_parses(parse, text) for parse in DATE_FORMATS.values()):
                raise UserError(f"row {row_no}: date '{text}' is none of: {', '.join(DATE_FORMATS)}")
        first = next(name for name, parse in DATE_FORMATS.items() if _parses(parse, texts[0]))
        row_no, text = next((n, t) for n, t in zip(row_nos, texts) if not _parses(DATE_FORMATS[first], t))
        raise UserError(f"row {row_no}: date '{text}' is not in the format of the rows before it ({first}); use one")
    if len(fits) > 1:
        raise UserError(f"the dates read both as MM/DD/YYYY and as DD/MM/YYYY (row {row_nos[0]}: '{texts[0]}'); "
                        "write them as ISO dates (2001-03-04)")
    dates = fits[0][1]
    zoned = [d.tzinfo is not None for d in dates]
    if any(zoned) and not all(zoned):
        i = zoned.index(not zoned[0])  # the first row that differs from the first row
        raise UserError(f"row {row_nos[i]}: timestamp '{texts[i]}' has {'a' if zoned[i] else 'no'} time zone, "
                        f"row {row_nos[0]}'s ('{texts[0]}') {'has one' if zoned[0] else 'has none'}: give every "
                        "timestamp the same convention")
    return dates


def _parses(parse, text: str) -> bool:
    try:
        parse(text)
        return True
    except ValueError:
        return False


def parse_number(cell: str, name: str, row_no: int, decimal_comma: bool) -> float:
    if decimal_comma and re.fullmatch(r"-?\d+,\d+", cell):
        cell = cell.replace(",", ".")
    try:
        value = float(cell)
    except ValueError:
        raise UserError(f"row {row_no}: {name} '{cell}' is not a number") from None
    if not math.isfinite(value) or abs(value) > MAX_VALUE:
        raise UserError(f"row {row_no}: {name} is {cell}; every value must be a finite number up to {MAX_VALUE:g}")
    if name == "volume" and value < 0 or name != "volume" and value <= 0:
        raise UserError(f"row {row_no}: {name} {cell} must be {'>= 0' if name == 'volume' else 'positive'}")
    return value


def elapsed_days(dates: list) -> np.ndarray:
    """Days from the first timestamp to each: the file's time axis, on which gaps and bars per year are read."""
    return np.array([(d - dates[0]).total_seconds() / 86400 for d in dates])


def suspect_rows(dates: list, row_nos: list[int], close: np.ndarray, adjusted: bool) -> Optional[str]:
    """The first likely error of a date-sorted file, or None: a repeated timestamp; a gap of over a month and
    10 median gaps (rows missing: the move across it would be one bar); without adjusted prices,
    a one-step move by a split ratio (x1/2, 1/3, 1/4, 1/5, 1/7, 1/10 or the reverse, within 15%) that the next
    closes keep (a crash that rebounds is not a split); a one-step move beyond +100% / -90% -- a typo, a
    lost decimal point."""
    repeated = [i for i in range(1, len(dates)) if dates[i] == dates[i - 1]]
    if repeated:
        i, more = repeated[0], f" ({len(repeated) - 1} more repeated rows)" if len(repeated) > 1 else ""
        return f"row {row_nos[i]}: timestamp {dates[i].isoformat()} repeats row {row_nos[i - 1]}{more}"
    gaps = np.diff(elapsed_days(dates))
    median = float(np.median(gaps))
    holes = np.flatnonzero(gaps > max(MAX_GAP_DAYS, MAX_GAP_RATIO * median)) + 1
    if len(holes):
        i, more = holes[0], f" ({len(holes) - 1} more such gaps)" if len(holes) > 1 else ""
        return (f"row {row_nos[i]}: timestamp {dates[i].isoformat()} is {gaps[i - 1]:.0f} days after row "
                f"{row_nos[i - 1]}'s (bars are a median {median:.3g} day{'s' * (median != 1)} apart): rows "
                f"missing? the move across the gap would be one bar{more}")
    ratio = close[1:] / close[:-1]
    factors = np.array([1 / k for k in SPLIT_RATIOS] + list(SPLIT_RATIOS))
    nearest = factors[np.argmin(np.abs(np.log(ratio)[:, None] - np.log(factors)), axis=1)]  # per step
    steps = np.flatnonzero(np.abs(np.log(ratio / nearest)) < SPLIT_TOLERANCE) + 1 if not adjusted else []
    for i in steps:  # a k:1 split moves the close by 1/k in one step (reverse: by k), and the next closes stay there
        level = np.median(close[i:i + 5]) / np.median(close[max(i - 5, 0):i])
        if abs(math.log(level / nearest[i - 1])) < SPLIT_TOLERANCE:
            k = round(max(nearest[i - 1], 1 / nearest[i - 1]))
            before = f"the closes dated before {dates[i].isoformat()} by {k}"  # by date: a file may run newest first
            split, fix = (f"{k}:1 split", f"divide {before}") if ratio[i - 1] < 1 \
                else (f"1:{k} reverse split", f"multiply {before}")
            return (f"row {row_nos[i]}: close {close[i]:g} is x{ratio[i - 1]:.3g} row {row_nos[i - 1]}'s "
                    f"({close[i - 1]:g}), likely an unadjusted {split}: use adjusted prices (an Adj Close "
                    f"column) or {fix}")
    jumps = np.flatnonzero((ratio - 1 > MAX_STEP_MOVE) | (ratio - 1 < MIN_STEP_MOVE)) + 1
    if len(jumps):
        i, more = jumps[0], f" ({len(jumps) - 1} more such moves)" if len(jumps) > 1 else ""
        move = f"{ratio[i - 1] - 1:+.0%}" if ratio[i - 1] < 1e3 else f"x{ratio[i - 1]:.3g}"
        return (f"row {row_nos[i]}: close {close[i]:g} is a one-step move of {move} from row "
                f"{row_nos[i - 1]} ({close[i - 1]:g}){more}")
    return None


def bars_per_year(dates: list) -> tuple[int, str]:
    """periods_per_year from the timestamps. A median gap of 5 days or more: bars per year of the file's span
    (weekly 52, twice a month 24, monthly 12). Else days a year with bars: 260.9 weekdays x the share of the
    weekdays with a full day of bars (at least half the median bars a day: FX's Sunday-evening bars are not a
    day) + 104.4 weekend days x their share, both over the weeks that have bars, snapped to 252 (exchange
    days), 260 (weekdays) or 365 (every day) when within 2%; times the median bars a day. The span runs from the
    first to the last full day: a file cut mid-session says nothing about the days it cut."""
    elapsed = elapsed_days(dates)
    gap = float(np.median(np.diff(elapsed)))
    if gap >= 5:
        return round((len(dates) - 1) / (elapsed[-1] / 365.25)), f"bars about {gap:.0f} days apart (median gap)"
    day_of = [d.date() for d in dates]
    day, count = np.unique(np.array(day_of, dtype="datetime64[D]"), return_counts=True)
    per_day = int(np.median(count))
    full = day[count >= per_day / 2]
    week = lambda d: (d.astype(np.int64) + 3) // 7  # noqa: E731  (from Monday: 1970-01-01 was a Thursday)
    weekend = lambda d: (d.astype(np.int64) + 3) % 7 >= 5  # noqa: E731
    span = np.arange(full[0], full[-1] + 1)  # a file cut mid-session: its partial first or last day is no sample
    span = span[np.isin(week(span), week(day))]  # a week without a bar (an outage, a gap in the file) is no sample
    share = [np.isin(span[weekend(span) == w], full).mean() if (weekend(span) == w).any() else 0.0 for w in (0, 1)]
    days = 365.25 * 5 / 7 * share[0] + 365.25 * 2 / 7 * share[1]
    calendar = min((252, 260, 365), key=lambda c: abs(c - days))
    days = calendar if abs(days - calendar) <= 0.02 * calendar else round(days)
    found = f"median gap {gap * 24:.3g} h, {days} days with bars a year"
    return (days, f"daily bars ({found})") if per_day == 1 else \
        (per_day * days, f"intraday bars ({found} x {per_day} bars a day)")


def load_csv(path: str, accept_suspect_rows: bool = False) -> Market:
    """Price CSV without pandas: a date (or Date and Time, or an unnamed first) column, Close, Volume and an
    optional adjusted close, used as the close (splits, dividends); sorted by date. Rows with an empty or `null`
    value (Yahoo's holidays) are skipped with one warning; repeated timestamps and implausible one-step moves
    stop the run unless accepted."""
    rows, line_nos, delimiter = read_csv_rows(path)
    header = [h.strip().lower().replace("_", " ").replace(".", "") for h in rows[0]]  # Adj. Close (Quandl's WIKI)
    col = {}
    for name, options in (("date", ("date", "datetime", "timestamp", "time", "gmt time", "local time")),
                          ("close", ("close",)), ("volume", ("volume",)),
                          ("adj close", ("adj close", "adjclose", "adjusted close"))):
        found = [i for i, h in enumerate(header) if h in options]
        if not found and name == "date" and header[0] == "":  # pandas' to_csv writes its date index unnamed
            found = [0]
        if len(found) > 1 and (name != "date" or len({header[i] for i in found}) < len(found)):  # not Date, Time
            names = ", ".join(rows[0][i] for i in found)
            raise UserError(f"--data-csv '{path}' has {len(found)} {name} columns ({names}): which one is meant is "
                            "a guess; keep one")
        if found:
            col[name] = found[0]
        elif name != "adj close":
            raise UserError(f"--data-csv '{path}' has no {name} column (header: {', '.join(rows[0])}; "
                            f"read as '{delimiter}'-separated)")
    date_columns = [header.index("date"), header.index("time")] if {"date", "time"} <= set(header) \
        else [col["date"]]  # Date and Time in two columns (intraday exports): one timestamp
    marks = {mark for row in rows[1:] for name, i in col.items() if name != "date" and i < len(row) for mark in ",."
             if mark in row[i]}
    if len(marks) > 1:  # 1,234.5 or 1.234,5: which mark is the decimal point is a guess; refuse to guess
        raise UserError(f"--data-csv '{path}': its numbers hold both ',' and '.' (thousands separators?): "
                        "export them without digit grouping")
    decimal_comma = marks == {","} and delimiter != ","  # 101,5 in a semicolon or tab file (European locales)
    records, skipped = [], []
    for row_no, row in zip(line_nos[1:], rows[1:]):  # the file's line numbers: what an editor shows
        if not any(cell.strip() for cell in row):
            continue
        if len(row) < len(header) or any(cell.strip() for cell in row[len(header):]):
            raise UserError(f"row {row_no}: {len(row)} fields, the header has {len(header)}"
                            + (" (decimal commas in a comma-separated file?)" if len(row) > len(header) else ""))
        cells = {name: row[i].strip() for name, i in col.items() if name != "date"}
        if any(cell.lower() in MISSING_VALUES for cell in cells.values()):
            skipped.append(row_no)
            continue
        values = {name: parse_number(cell, name, row_no, decimal_comma) for name, cell in cells.items()}
        records.append((" ".join(row[i].strip() for i in date_columns), row_no, values))
    if skipped:
        print(f"warning: --data-csv '{path}': skipped {len(skipped)} rows with an empty or null value "
              f"(rows {', '.join(map(str, skipped[:5]))}{', ...' if len(skipped) > 5 else ''})", file=sys.stderr)
    if len(records) < MIN_ROWS:
        raise UserError(f"--data-csv '{path}' has {len(records)} data rows"
                        + (f" once {len(skipped)} with empty or null values are skipped" if skipped else "")
                        + f"; at least {MIN_ROWS} are needed")
    dates = parse_dates([text for text, _, _ in records], [r for _, r, _ in records])
    records = sorted(zip(dates, records), key=lambda r: r[0])  # ascending; stable: equal stamps keep file order
    dates, row_nos = [d for d, _ in records], [r[1] for _, r in records]
    adjusted = "adj close" in col
    close = np.array([v["adj close" if adjusted else "close"] for _, (_, _, v) in records])
    suspect = suspect_rows(dates, row_nos, close, adjusted)
    if suspect and not accept_suspect_rows:
        raise UserError(f"{suspect}; fix the file, or pass --accept-suspect-rows if the data is right")
    if np.ptp(close) == 0:
        raise UserError(f"--data-csv '{path}': the close is {close[0]:g} on every row; "
                        "a constant price has nothing to learn or trade")
    if not adjusted:
        print(f"warning: --data-csv '{path}' has no adjusted close column (Adj Close): the close is used as it "
              "is, splits and dividends unadjusted", file=sys.stderr)
    periods, frequency = bars_per_year(dates)
    return Market(close=close, volume=np.array([v["volume"] for _, (_, _, v) in records]),
                  dates=[d.isoformat() for d in dates], periods_per_year=periods, frequency=frequency)


# MODEL FILES AND --eval-only -------------------------------------------------------------------
def save_model(path: str, args: Args, data: MarketData, agents: dict, fit_range: tuple, selected: dict) -> None:
    """model.pt: every agent's networks and normalizer with the settings that built them and the step they were
    kept at, as tensors and plain values (torch.load(weights_only=True) reads it without running code)."""
    model = {"format": MODEL_FORMAT, "feature_names": data.names,  # the CSV by its full path: --eval-only elsewhere
             "args": {**dataclasses.asdict(args), "data_csv": args.data_csv and os.path.abspath(args.data_csv)},
             "vol_filter_threshold": data.vol_threshold, "fit_range": [r.tolist() for r in fit_range],
             "agents": {name: {"selected_step": selected[name],
                               "normalizer": agent.normalizer.state_dict() if agent.normalizer else None,
                               **agent.state_dicts()}
                        for name, agent in agents.items()}}
    replace_atomic(path, lambda tmp: torch.save(model, tmp))  # never a half-written model


def load_model(path: str) -> dict:
    """model.pt written by --save-model; a missing, unreadable or foreign file is one UserError. weights_only=True:
    a file from someone else holds tensors and plain values only, never code that runs when it is read."""
    if not os.path.isfile(path):
        where = "is a folder: give the model.pt in it" if os.path.isdir(path) else "does not exist"
        raise UserError(f"--checkpoint '{path}' {where} (write one with --save-model)")
    try:
        model = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "GLOBAL" in str(err):  # a pickle that would call code: someone else's file, not ours
            raise UserError(f"--checkpoint '{path}' holds more than tensors and plain values; refused, nothing in it "
                            "ran") from None
        raise UserError(f"--checkpoint '{path}' is not a readable model.pt (not a file torch.save wrote)") from None
    except Exception as err:  # a truncated file, a zip of something else, ...
        raise UserError(f"--checkpoint '{path}' is not a readable model.pt ({type(err).__name__})") from None
    if not isinstance(model, dict) or model.get("format") != MODEL_FORMAT:
        found = model.get("format", "no format tag") if isinstance(model, dict) else type(model).__name__
        raise UserError(f"--checkpoint '{path}' is not a {MODEL_FORMAT} model ({found}); "
                        "it comes from another script or an older feature layout: retrain with --save-model")
    return model


MODEL_SETTINGS = ("hidden_size", "state_norm", "state_norm_kind", "log_volume", "stationary")  # build the networks
EVAL_SETTINGS = ("data_csv", "market_seed", "market_steps", "train_frac", "val_frac", "cost_bp", "initial_equity",
                 "periods_per_year")  # change what an evaluation measures


def eval_settings(args: Args, saved: Args) -> tuple[Args, dict]:
    """--eval-only's settings: the networks' as saved (asking for others is an error); each evaluation
    setting from the command line when given there, else the training run's ("given" = not the default:
    asking for the default value keeps the checkpoint's; the printed settings say where each came from). New
    data (--data-csv, or --market-seed/--market-steps: the synthetic market) brings its own bars per year."""
    default = Args()
    for name in MODEL_SETTINGS:
        if name in ("state_norm_kind", "log_volume", "stationary") and not saved.state_norm:
            continue  # they act only with --state-norm
        if getattr(args, name) != getattr(default, name) and getattr(args, name) != getattr(saved, name):
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: the checkpoint's networks were built "
                            f"with {getattr(saved, name)}; --eval-only evaluates them as saved")
    given = {name for name in EVAL_SETTINGS if getattr(args, name) != getattr(default, name)}
    if given & {"market_seed", "market_steps"}:
        if "data_csv" in given:
            raise UserError("--market-seed and --market-steps shape the synthetic market; --data-csv replaces it")
        given.add("data_csv")  # None: evaluate on the synthetic market
    if "data_csv" in given:
        given.add("periods_per_year")  # not the training data's: as given, else from the new data
    run_args = dataclasses.replace(args, eval_only=True, compile=False,
                                   **{name: getattr(saved, name) for name in MODEL_SETTINGS},
                                   **{name: getattr(saved, name) for name in EVAL_SETTINGS if name not in given})
    try:
        check_args(run_args)  # the command line's splits with the checkpoint's, say
    except UserError as err:
        raise UserError(f"{err} (with the checkpoint's settings for what the command line does not give)") from None
    return run_args, {name: {"value": getattr(run_args, name), "from": "command line" if name in given else
                             "checkpoint"} for name in EVAL_SETTINGS}


def evaluate_checkpoint(args: Args, device: torch.device) -> dict:
    """--eval-only: every saved agent, with its saved normalizer, over a split or a whole file."""
    model = load_model(args.checkpoint)
    fields = {f.name for f in dataclasses.fields(Args)}
    run_args, settings = eval_settings(args, Args(**{k: v for k, v in model["args"].items() if k in fields}))
    if settings["data_csv"]["from"] == "checkpoint" and run_args.data_csv and not os.path.isfile(run_args.data_csv):
        raise UserError(f"the checkpoint's --data-csv '{run_args.data_csv}' is not there: pass --data-csv PATH")
    data = prepare_data(run_args, *load_market(run_args))
    if run_args.periods_per_year is None:  # no flag set it: from the data (the value used is recorded)
        settings["periods_per_year"] = {"value": data.periods_per_year, "from": data.frequency}
    elif settings["periods_per_year"]["from"] == "checkpoint":
        data.frequency = "--periods-per-year of the training run"
    if model["feature_names"] != data.names:
        raise UserError(f"--checkpoint '{args.checkpoint}' was saved with features {model['feature_names']}, "
                        f"its settings build {data.names}: retrain with --save-model")
    lo, hi = data.splits[args.eval_split]
    if hi - lo < 2:
        raise UserError(f"the {args.eval_split} split of {data.source} has {hi - lo} rows; pick --eval-split all")
    threshold = "the median realized vol of this data's train split"
    if args.eval_split == "all" or math.isnan(data.vol_threshold):  # no data before the evaluated rows to fit it on
        data.vol_threshold = float(model["vol_filter_threshold"])
        why = "--eval-split all leaves" if args.eval_split == "all" else "this data's train split has"
        threshold = f"the training run's ({why} no earlier data to fit one on)"
    normalizer, saved_normalizer = None, next(iter(model["agents"].values()))["normalizer"]  # one for every agent
    if saved_normalizer is not None:
        normalizer = StateNormalizer(data.names, run_args.state_norm_kind, run_args.log_volume).to(device)
        normalizer.load_state_dict(saved_normalizer)
    agents = {name: TD3(len(data.names), run_args, device, normalizer, run_args.seed) for name in model["agents"]}
    for name, agent in agents.items():
        agent.load_state_dicts(model["agents"][name])
    run_dir = make_run_dir(args.runs_dir, f"{data.source}__{run_args.exp_name}__eval__{run_args.seed}")
    fit_range = tuple(np.asarray(r) for r in model["fit_range"])
    result = evaluation_report(run_args, run_dir, data, agents, normalizer, fit_range, [args.eval_split])
    paired = final_paired(agents, result["results"][args.eval_split])
    write_json_atomic(os.path.join(run_dir, "td3_action_saturation.json"), {
        "near_bound_threshold": NEAR_BOUND, "collapse_threshold": COLLAPSE_RATIO, "split": args.eval_split,
        "agents": result["saturation"], "paired": paired})
    write_json_atomic(os.path.join(run_dir, "shift_audit.json"), {"split": args.eval_split, "agents": result["shift"]})
    selected = {name: state["selected_step"] for name, state in model["agents"].items()}
    summary = {"status": "completed", "exit_code": EXIT_CODES["completed"], "run_dir": run_dir,
               "checkpoint": args.checkpoint, "selected_step": selected, "split": args.eval_split,
               "source": data.source, "settings": settings, "periods_per_year": data.periods_per_year,
               "frequency": data.frequency, "vol_filter_threshold": {"value": data.vol_threshold, "from": threshold},
               args.eval_split: result["eval"], "paired": paired,
               "saturation": {name: s[args.eval_split] for name, s in result["saturation"].items()}}
    write_json_atomic(os.path.join(run_dir, "summary.json"), summary)
    print("settings: " + ", ".join(f"{name} {s['value']} ({s['from']})" for name, s in settings.items()))
    print(f"vol_filter threshold {data.vol_threshold:.4g}: {threshold}")
    print_table(result["eval"], summary["saturation"], f"the saved agents, kept at steps {selected}", None,
                {"policies": "the saved agents (each its kept step: not the training audit's final pair)",
                 "paired": paired, "diagnosis": None,
                 "near_bound": {name: sat["near_bound_ratio"] for name, sat in summary["saturation"].items()}})
    print(f"-> {run_dir}")
    return summary


# SET-UP, FAULTS AND THE COMMAND LINE ------------------------------------------------------------
def check_args(args: Args) -> None:
    """Reject values that would crash later or silently do something else."""
    for name in ("total_timesteps", "buffer_size", "batch_size", "policy_frequency", "eval_frequency", "hidden_size",
                 "learning_rate", "episode_length", "initial_equity", "periods_per_year", "reward_scale", "rnd_hidden"):
        if getattr(args, name) is not None and not 0 < getattr(args, name) < math.inf:  # NaN fails it too
            raise UserError(f"--{name.replace('_', '-')} must be finite and > 0, got {getattr(args, name)}")
    for name in ("learning_starts", "threads", "policy_noise", "exploration_noise", "noise_clip",
                 "cost_bp", "risk_penalty", "intrinsic_coef", "preactivation_penalty"):
        if getattr(args, name) is not None and not 0 <= getattr(args, name) < math.inf:
            raise UserError(f"--{name.replace('_', '-')} must be finite and >= 0, got {getattr(args, name)}")
    if not (0.0 <= args.gamma < 1.0 and 0.0 < args.tau <= 1.0):
        raise UserError(f"--gamma must be in [0, 1) and --tau in (0, 1], got {args.gamma} and {args.tau}")
    if not (0 < args.train_frac < 1 and 0 < args.val_frac < 1 and args.train_frac + args.val_frac < 1):
        raise UserError(f"--train-frac ({args.train_frac}) and --val-frac ({args.val_frac}) must be "
                        "positive and sum to less than 1 (the rest is the test split)")
    if args.intrinsic_kind == "none" and not args.paired:
        raise UserError("--no-paired trains only the intrinsic agent, so it needs --intrinsic-kind rnd or sa-rnd")
    if args.eval_only != bool(args.checkpoint) or args.eval_only and args.save_model or \
            not args.eval_only and args.eval_split != "test":
        raise UserError("--eval-only needs --checkpoint runs/.../model.pt (written by --save-model); --checkpoint and "
                        "--eval-split are only read with --eval-only, which writes no model")
    if not (args.initial_equity <= 1e12 and args.cost_bp < 1e4):  # else equity overflows or goes below 0 in a trade
        raise UserError(f"--initial-equity must be <= 1e12 and --cost-bp < 10000 (100%), got {args.initial_equity:g} "
                        f"and {args.cost_bp:g}")
    for name in ("seed", "market_seed"):  # numpy's seeds
        if not 0 <= getattr(args, name) < 2 ** 32:
            raise UserError(f"--{name.replace('_', '-')} must be in [0, 2**32), got {getattr(args, name)}")
    if not args.eval_only and args.learning_starts >= args.total_timesteps:
        raise UserError(f"--learning-starts ({args.learning_starts}) must be below --total-timesteps "
                        f"({args.total_timesteps}): else no update runs and an untrained agent is reported")
    if args.data_csv is None and args.market_steps < MIN_ROWS:
        raise UserError(f"--market-steps must be >= {MIN_ROWS}, got {args.market_steps}")


def setup_torch(args: Args) -> torch.device:
    """Threads and device (each agent seeds itself: identical seeds for both agents of a pair)."""
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    if args.compile and not args.eval_only:
        require_cxx_compiler(device)
    return device


def require_cxx_compiler(device: torch.device) -> None:
    """torch.compile on CPU builds C++ kernels: say so at start, not with a traceback at the first update."""
    if device.type == "cpu" and not any(shutil.which(cxx) for cxx in ("g++", "c++", "clang++")):
        raise UserError("--compile on CPU needs a C++ compiler (e.g. apt install g++); or pass --no-compile")


def compile_update(agent: TD3) -> None:
    """--compile: each gradient one graph of C++ kernels (the RND predictor's too); agents in one process share
    the graphs. Code dynamo cannot trace runs eagerly (a graph break: slower, still right)."""
    # cpp_wrapper: the code that calls a graph's kernels is C++ too, not Python: at 32 wide an update is
    # mostly per-call overhead, and this cuts it (docs/speed.md)
    options = {"cpp_wrapper": True}
    agent.critic_gradients = torch.compile(agent.critic_gradients, options=options)
    agent.actor_gradients = torch.compile(agent.actor_gradients, options=options)
    if isinstance(agent.intrinsic, RND):
        agent.intrinsic.predictor_gradients = torch.compile(agent.intrinsic.predictor_gradients, options=options)


def uncompile_update(agent: TD3) -> None:
    """Undo compile_update: the plain methods again (a compiled function cannot be pickled)."""
    for part in [part for part in (agent, agent.intrinsic) if part is not None]:
        for name in ("critic_gradients", "actor_gradients", "predictor_gradients"):
            vars(part).pop(name, None)


# AGENTS SIDE BY SIDE: one process per agent ---------------------------------------------------------
def side_by_side(names: list[str], device: torch.device) -> bool:
    """Each agent in its own process when there is a thread for each (on CPU): at 32 wide an update is per-call
    overhead that a second thread does not split, so two agents side by side take the time of one."""
    return len(names) > 1 and device.type == "cpu" and torch.get_num_threads() >= len(names)


def train_side_by_side(names: list[str], args: Args, data: MarketData, normalizer: Optional[StateNormalizer],
                       device: torch.device, run_dir: str, stop, intrinsic: dict, trained: dict) -> None:
    """train_agent for every agent at once, each in a spawned process with an equal share of the threads: the
    same seeds, so the same numbers as one after the other. Fills trained in names' order; a divergence stops
    the other agents (their partial runs fill trained), then the first diverged agent's Diverged is raised."""
    ctx = multiprocessing.get_context("spawn")  # a fork would copy torch's thread pools in whatever state they are
    stop_value = ctx.RawValue("i", 0)  # what the processes read as stop.signum: a signal, or -1 after a divergence
    work, done = ctx.Queue(), ctx.Queue()  # queues: starting a process never waits for it to read its arguments
    threads = torch.get_num_threads() // len(names)
    processes = [ctx.Process(target=train_in_process, args=(work, done, stop_value, threads, os.getpid()), daemon=True)
                 for _ in names]
    results, diverged = {}, {}
    try:
        with signals_ignored_by_children():
            for process in processes:
                process.start()
        for name in names:  # plain pickles: torch would share tensors through file descriptors, in this memory
            work.put(pickle.dumps((name, args, data, normalizer, device, run_dir, intrinsic[name])))
        while len(results) + len(diverged) < len(names):
            stop_value.value = stop.signum or (-1 if diverged else 0)
            try:
                name, result = pickle.loads(done.get(timeout=0.2))
            except queue.Empty:
                failed = [process.exitcode for process in processes if process.exitcode not in (None, 0)]
                if failed:
                    raise RuntimeError(f"an agent's process ended (exit code {failed[0]}) without a result; its "
                                       "error is printed above") from None
                continue
            if "diverged" in result:
                diverged[name] = Diverged(*result["diverged"])
            else:
                results[name] = result
    finally:  # after an error or a second Ctrl-C no process is left running (SIGKILL: they ignore the others)
        work.cancel_join_thread()  # work no process took is dropped: exiting never waits on it
        for process in processes:
            if process.is_alive() and len(results) + len(diverged) < len(names):
                process.kill()
            if process.pid is not None:
                process.join()
    trained.update((name, results[name]) for name in names if name in results)
    if diverged:
        raise diverged[next(name for name in names if name in diverged)]


@contextlib.contextmanager
def signals_ignored_by_children():
    """Processes started here ignore SIGINT and SIGTERM (an ignored signal stays ignored through exec): Ctrl-C,
    or a scheduler's SIGTERM, reaches every process of the group, and only the parent acts on it."""
    if threading.current_thread() is not threading.main_thread():  # handlers are the main thread's to set
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def train_in_process(work, done, stop_value, threads: int, parent: int) -> None:
    """One agent in a spawned process: train_agent's arguments (but stop) from the work queue; the result, or
    the divergence, onto the done queue. A process whose parent is gone ends without either."""
    torch.set_num_threads(threads)
    stop, job = SharedStop(stop_value, parent), None
    while job is None and not stop.orphaned:  # the parent may die before it hands out the work
        with contextlib.suppress(queue.Empty):
            job = work.get(timeout=1.0)
    if job is None:
        return
    name, args, data, normalizer, device, run_dir, intrinsic = pickle.loads(job)
    try:
        result = train_agent(name, args, data, normalizer, device, run_dir, stop, intrinsic)
    except Diverged as err:
        result = {"diverged": (str(err), err.agent, err.step)}
    else:
        result["log"].writer = None  # closed; a writer cannot be pickled, nor can a compiled function
        uncompile_update(result["agent"])
    if not stop.orphaned:  # else nobody reads it, and a full queue would keep this process from exiting
        done.put(pickle.dumps((name, result)))


class SharedStop:
    """StopOnSignal's signum in a spawned process: the parent writes it into a shared value. A parent killed
    with SIGKILL cannot write it: a process whose parent is gone stops too, rather than train for nobody."""

    def __init__(self, value, parent: int):
        self.value, self.parent = value, parent

    @property
    def orphaned(self) -> bool:
        return os.getppid() != self.parent  # an orphan is adopted by another process

    @property
    def signum(self) -> Optional[int]:
        return signal.SIGKILL if self.orphaned else self.value.value or None


class StopOnSignal:
    """SIGINT (Ctrl-C) and SIGTERM (what schedulers send) only set `signum`: the training loop checks it
    at each step boundary and the run writes its files first. A second signal stops at once."""

    def __enter__(self) -> "StopOnSignal":
        self.signum, self._previous = None, {}  # the signal received; the handlers to put back
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt(signum)  # run_command_line exits 128 + signum: 130 SIGINT, 143 SIGTERM
        self.signum = signum
        print(f"{signal.Signals(signum).name}: stopping after this step (again to stop at once)",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


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


def run_command_line(main_fn, args_type) -> None:
    """The entry point: a user's mistake is one `error:` line and exit code 2; else the run's own exit code."""
    try:
        summary = main_fn(parse_cli(args_type))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as err:  # before training started (Python's own: no signal number), or a second signal
        print("error: interrupted; stopped at once, without a summary (files already written are complete)",
              file=sys.stderr)
        sys.exit(128 + (err.args[0] if err.args else signal.SIGINT))
    sys.exit(summary.get("exit_code", 0))


if __name__ == "__main__":
    run_command_line(main, Args)
