"""TD3 on an inline trading environment, with an intrinsic reward and the action-freeze audit.

The question this script answers with measurements: why can an intrinsic reward move the
critic's values while the actor does not move at all? Two mechanisms, both audited here:
  1. Scale: raw market features (prices ~1e2, volume ~1e6, equity ~1e5) push the tanh actor's
     pre-activation so far out that kappa = 1 - (a/a_max)^2 is 0: the actor is frozen at the
     bound whatever the critic says. `--state-norm` removes it.
  2. Action gap: r_tot = r_env + w*r_int only changes the greedy action if w*supDelta exceeds
     the action gap m; an action-independent r_int (plain RND on s') "raises the water level"
     and leaves the ranking of actions, hence the actor, alone. (toy_td3_intrinsic_experiments.py)

Run:     python td3_intrinsic_trading.py --state-norm          (the main command)
         python td3_intrinsic_trading.py                        (raw features: the freeze)
         python td3_intrinsic_trading.py --data-csv prices.csv  (your own OHLCV data)
Writes:  runs/{run_name}/ with summary.json, state_scale_summary.json, td3_action_saturation.json,
         eval_test.json, eval_equity.png, action_saturation.png, evaluations.csv and TensorBoard
         events (one sub-folder per agent).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import io
import json
import math
import os
import random
import re
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Literal, Optional

import gymnasium as gym
import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter


@dataclass
class Args:
    exp_name: str = "td3_intrinsic_trading"
    """the name of this experiment (part of the run folder name)"""
    seed: int = 1
    """training seed: weights, exploration noise, replay sampling, episode starts"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True` (CPU runs are deterministic anyway)"""
    cuda: bool = True
    """if toggled, cuda is used when available"""
    threads: int = 0
    """torch intra-op threads (0 keeps torch's default, one per core)"""
    runs_dir: str = "runs"
    """root folder of the run folders"""
    save_model: bool = False
    """write model.pt (networks and normalizer of every agent) at the end"""

    # Market data
    data_csv: Optional[str] = None
    """OHLCV CSV (Date or Time, Open, High, Low, Close, [Adj Close], Volume); default: synthetic"""
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
    periods_per_year: int = 252
    """steps per year, for annualized return, volatility, Sharpe and Sortino"""

    # State normalization
    state_norm: bool = False
    """normalize observations with statistics fitted once on a random-action rollout of the train split"""
    state_norm_kind: Literal["zscore", "robust"] = "zscore"
    """zscore: (x - mean)/std; robust: (x - median)/IQR"""
    log_volume: bool = True
    """with --state-norm, feed log1p(volume) instead of volume"""

    # Intrinsic reward and paired runs
    intrinsic_kind: Literal["none", "rnd", "sa-rnd"] = "rnd"
    """rnd: novelty of s' (action-independent but for position/equity); sa-rnd: novelty of (s, a)"""
    intrinsic_coef: float = 0.5
    """w in r_tot = r_env + w * r_int"""
    paired: bool = True
    """also train a baseline (w = 0) on identical seeds, the audit's counterfactual"""

    # TD3
    total_timesteps: int = 30000
    """environment steps per agent"""
    learning_starts: int = 5000
    """env steps of uniform random actions before learning starts"""
    learning_rate: float = 3e-4
    """the learning rate of both optimizers"""
    buffer_size: int = int(1e6)
    """the replay memory buffer size"""
    gamma: float = 0.99
    """the discount factor gamma"""
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
    noise_clip: float = 0.5
    """clip of the target policy smoothing noise, as a fraction of the action half-range"""
    eval_frequency: int = 5000
    """evaluate on the validation split every N env steps (and at the end)"""


class UserError(Exception):
    """A mistake in the command line or inputs: reported as one line on stderr, exit code 2."""


LOG_EVERY_UPDATES = 100  # read metrics back from tensors only this often: .item() syncs
PROGRESS_EVERY_SECONDS = 30.0  # a progress line at least this often: long runs never look hung
NEAR_BOUND = 0.999  # |a| >= 0.999 a_max counts as "at the bound" (SPEC 3.6)
COLLAPSE_RATIO = 0.95  # near_bound_ratio at or above this: actor_collapse_detected
WARMUP = 20  # the longest feature window (MA20): the first usable step
MIN_ROWS = 200  # fewer rows cannot fill three splits after the warm-up


def parse_cli(argv: Optional[list[str]] = None) -> Args:
    """tyro.cli, but a parse error becomes one line on stderr and exit code 2."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            return tyro.cli(Args, args=argv)
    except SystemExit as exit_:
        if exit_.code in (0, None):
            raise
        lines = [re.sub(r"[╭╮╰╯│]", "", line).strip() for line in captured.getvalue().splitlines()]
        title = lines[0].strip("─ ") if lines else "bad arguments"
        body = []
        for line in lines[1:]:
            if not line or set(line) <= {"─"}:
                break
            body.append(line)
        print(f"error: {title}: {' '.join(body)} (see --help)", file=sys.stderr)
        sys.exit(2)


def validate_args(args: Args) -> None:
    for name in ("total_timesteps", "buffer_size", "batch_size", "policy_frequency", "eval_frequency",
                 "learning_rate", "episode_length", "initial_equity", "periods_per_year", "reward_scale"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    for name in ("learning_starts", "threads", "policy_noise", "exploration_noise", "noise_clip",
                 "cost_bp", "risk_penalty", "intrinsic_coef"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if not 0.0 <= args.gamma < 1.0:
        raise UserError(f"--gamma must be in [0, 1), got {args.gamma}")
    if not 0.0 < args.tau <= 1.0:
        raise UserError(f"--tau must be in (0, 1], got {args.tau}")
    if not (0 < args.train_frac < 1 and 0 < args.val_frac < 1 and args.train_frac + args.val_frac < 1):
        raise UserError(f"--train-frac ({args.train_frac}) and --val-frac ({args.val_frac}) must be "
                        "positive and sum to less than 1 (the rest is the test split)")
    if args.intrinsic_kind == "none" and not args.paired:
        raise UserError("--no-paired trains only the intrinsic agent, so it needs --intrinsic-kind rnd or sa-rnd")
    if args.data_csv is None and args.market_steps < MIN_ROWS:
        raise UserError(f"--market-steps must be >= {MIN_ROWS}, got {args.market_steps}")


# MARKET DATA ------------------------------------------------------------------------------------
@dataclass
class Market:
    close: np.ndarray
    volume: np.ndarray
    open: np.ndarray
    high: np.ndarray
    low: np.ndarray
    dates: Optional[list] = None
    regime: Optional[np.ndarray] = None  # synthetic only: 1 = bear


def synthetic_market(n_steps: int, seed: int) -> Market:
    """Two-regime market: daily log-returns N(mu, sigma) in a Markov chain of bull/bear regimes.

    bull mu=+0.0012 sigma=0.010 stay 0.985; bear mu=-0.0015 sigma=0.018 stay 0.97; start 100;
    log V = log(3e6) + 0.4 bear + 8|r| + 0.3 N(0,1). Learnable (the regime shows in volatility
    and volume), not trivial; the price level itself carries no signal.
    """
    rng = np.random.default_rng(seed)
    mu, sigma, stay = np.array([0.0012, -0.0015]), np.array([0.010, 0.018]), np.array([0.985, 0.97])
    regime = np.zeros(n_steps, dtype=int)
    for t in range(1, n_steps):
        regime[t] = regime[t - 1] if rng.random() < stay[regime[t - 1]] else 1 - regime[t - 1]
    log_ret = mu[regime] + sigma[regime] * rng.standard_normal(n_steps)
    log_ret[0] = 0.0
    close = 100.0 * np.exp(np.cumsum(log_ret))
    volume = np.exp(np.log(3e6) + 0.4 * regime + 8 * np.abs(log_ret) + 0.3 * rng.standard_normal(n_steps))
    open_ = np.concatenate([[close[0]], close[:-1]]) * np.exp(0.002 * rng.standard_normal(n_steps))
    wiggle = sigma[regime] / 2
    high = np.maximum(open_, close) * np.exp(np.abs(rng.standard_normal(n_steps)) * wiggle)
    low = np.minimum(open_, close) * np.exp(-np.abs(rng.standard_normal(n_steps)) * wiggle)
    return Market(close=close, volume=volume, open=open_, high=high, low=low, regime=regime)


def parse_date(text: str, row: int):
    text = text.strip()
    for parse in (datetime.fromisoformat, lambda s: datetime.strptime(s, "%d.%m.%Y %H:%M:%S.%f")):
        try:
            return parse(text)
        except ValueError:
            pass
    raise UserError(f"row {row}: date '{text}' is neither ISO (2024-01-31) nor DD.MM.YYYY HH:MM:SS.000")


def load_csv(path: str) -> Market:
    """OHLCV CSV without pandas: columns matched case-insensitively, sorted by date ascending."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read --data-csv '{path}': {err}") from None
    if not rows:
        raise UserError(f"--data-csv '{path}' is empty")
    header = [h.strip().lower().replace("_", " ") for h in rows[0]]
    col = {}
    for name, options in (("date", ("date", "time", "datetime", "gmt time", "local time")), ("open", ("open",)),
                          ("high", ("high",)), ("low", ("low",)), ("close", ("close",)),
                          ("volume", ("volume",)), ("adj close", ("adj close", "adjclose"))):
        found = [i for i, h in enumerate(header) if h in options]
        if found:
            col[name] = found[0]
        elif name != "adj close":
            raise UserError(f"--data-csv '{path}' has no {name} column (header: {', '.join(rows[0])})")
    records = []
    for row_no, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) < len(header):
            raise UserError(f"row {row_no}: {len(row)} fields, the header has {len(header)}")
        values = {}
        for name in ("open", "high", "low", "close", "volume", "adj close"):
            if name not in col:
                continue
            cell = row[col[name]].strip()
            try:
                value = float(cell)
            except ValueError:
                raise UserError(f"row {row_no}: {name} '{cell}' is not a number") from None
            if not math.isfinite(value):
                raise UserError(f"row {row_no}: {name} is {cell}; every value must be a finite number")
            if name == "volume" and value < 0 or name != "volume" and value <= 0:
                raise UserError(f"row {row_no}: {name} {cell} must be {'>= 0' if name == 'volume' else 'positive'}")
            values[name] = value
        records.append((parse_date(row[col["date"]], row_no), values))
    if len(records) < MIN_ROWS:
        raise UserError(f"--data-csv '{path}' has {len(records)} data rows; at least {MIN_ROWS} are needed")
    records.sort(key=lambda r: r[0])  # ascending; a stable sort keeps equal stamps in file order
    get = lambda name: np.array([v[name] for _, v in records])
    close = get("close")
    factor = get("adj close") / close if "adj close" in col else np.ones(len(close))  # splits, dividends
    return Market(close=close * factor, volume=get("volume"), open=get("open") * factor, high=get("high") * factor,
                  low=get("low") * factor, dates=[d.isoformat() for d, _ in records])


def split_bounds(n: int, train_frac: float, val_frac: float) -> dict:
    """Chronological [start, end) index ranges, never shuffled; training starts after the warm-up."""
    train_end = int(n * train_frac)
    val_end = int(n * (train_frac + val_frac))
    return {"train": (WARMUP, train_end), "val": (train_end, val_end), "test": (val_end, n)}


# Observation layout. Raw scales on purpose, as real pipelines feed them (FinRL passes cash
# ~1e6 and prices ~1e2 unnormalized): this is what freezes the actor without --state-norm.
FEATURE_NAMES = ["close", "volume", "log_return", "realized_vol_10", "momentum_10", "close_over_ma20_minus_1",
                 "position", "equity"]
VOLUME_IDX, VOL_IDX, POSITION_IDX, EQUITY_IDX = 1, 3, 6, 7
N_MARKET_FEATURES = 6


def market_features(close: np.ndarray, volume: np.ndarray) -> np.ndarray:
    """[n, 6] features; row t uses data up to t only (no look-ahead); rows < WARMUP are NaN."""
    n = len(close)
    log_ret = np.full(n, np.nan)
    log_ret[1:] = np.diff(np.log(close))
    feats = np.full((n, N_MARKET_FEATURES), np.nan)
    feats[:, 0], feats[:, 1], feats[:, 2] = close, volume, log_ret
    for t in range(WARMUP, n):
        feats[t, 3] = np.std(log_ret[t - 9: t + 1])  # realized vol of the last 10 returns
        feats[t, 4] = math.log(close[t] / close[t - 10])  # 10-step momentum
        feats[t, 5] = close[t] / close[t - 19: t + 1].mean() - 1.0  # distance from MA20
    return feats


# ENVIRONMENT ------------------------------------------------------------------------------------
class TradingEnv(gym.Env):
    """One asset, target-position actions, no look-ahead.

    At step t the agent observes the close C_t (and features up to t), chooses p_t in [-1, 1]
    (a fraction of equity, short...long) and earns over t -> t+1:

        reward = reward_scale * [p_t (C_{t+1}/C_t - 1) - cost |p_t - p_{t-1}| - lambda p_t^2 sigma_t^2]

    sigma_t is the 10-step realized volatility. The risk term makes the optimal position
    interior, p* = mu / (2 lambda sigma^2): with lambda = 10 the default market's regimes want
    about +0.6 (bull) and -0.2 (bear), so an actor pinned at +-1 is a symptom, not the optimum.
    Equity moves by the first two terms (the risk term is a preference, not a cash flow).
    Training episodes are random windows of `episode_length` steps (truncated at the end);
    evaluation runs a whole split from flat. Terminated only on ruin (equity <= 10% of start).
    """

    metadata = {"render_modes": []}

    def __init__(self, close: np.ndarray, features: np.ndarray, start: int, end: int, episode_length: Optional[int],
                 cost: float = 0.001, risk_penalty: float = 10.0, reward_scale: float = 100.0,
                 initial_equity: float = 1e5):
        super().__init__()
        if end - start < 2:
            raise ValueError(f"split [{start}, {end}) is too short for one step")
        self.close, self.features = close, features
        self.start, self.end = start, end  # steps t in [start, end - 1): C_{t+1} stays inside
        self.episode_length = episode_length  # None: the whole split, from its start
        self.cost, self.risk_penalty, self.reward_scale = cost, risk_penalty, reward_scale
        self.initial_equity = initial_equity
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (len(FEATURE_NAMES),), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
        self.t = self.t_end = start
        self.position, self.equity = 0.0, initial_equity

    def _obs(self) -> np.ndarray:
        return np.concatenate([self.features[self.t], [self.position, self.equity]]).astype(np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        last_step = self.end - 1  # exclusive bound on t
        if options and "start" in options:  # continue from a given step (the reference rollout)
            if not self.start <= options["start"] < last_step:
                raise ValueError(f"start {options['start']} outside [{self.start}, {last_step})")
            self.t, self.t_end = int(options["start"]), last_step
        elif self.episode_length is None or last_step - self.start <= self.episode_length:
            self.t = self.start
            self.t_end = last_step
        else:
            self.t = int(self.np_random.integers(self.start, last_step - self.episode_length + 1))
            self.t_end = self.t + self.episode_length
        self.position, self.equity = 0.0, self.initial_equity
        return self._obs(), {}

    def step(self, action):
        p = float(np.clip(np.asarray(action, dtype=np.float64).reshape(-1)[0], -1.0, 1.0))
        asset_return = self.close[self.t + 1] / self.close[self.t] - 1.0
        sigma = self.features[self.t, VOL_IDX]
        traded = abs(p - self.position)
        pnl = p * asset_return - self.cost * traded
        reward = self.reward_scale * (pnl - self.risk_penalty * p * p * sigma * sigma)
        self.equity *= 1.0 + pnl
        self.position = p
        self.t += 1
        terminated = self.equity <= 0.1 * self.initial_equity
        truncated = not terminated and self.t >= self.t_end
        return self._obs(), float(reward), bool(terminated), bool(truncated), {"step_return": pnl, "traded": traded}


# NETWORKS ---------------------------------------------------------------------------------------
class Actor(nn.Module):
    """pi(s) = tanh(MLP(s)) * action_scale + action_bias."""

    def __init__(self, obs_dim: int, action_low: np.ndarray, action_high: np.ndarray, hidden: int = 256):
        super().__init__()
        self.fc1 = nn.Linear(obs_dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc_mu = nn.Linear(hidden, len(action_low))
        low = torch.as_tensor(action_low, dtype=torch.float32)
        high = torch.as_tensor(action_high, dtype=torch.float32)
        self.register_buffer("action_scale", (high - low) / 2.0)
        self.register_buffer("action_bias", (high + low) / 2.0)

    def pre_activation(self, obs: torch.Tensor) -> torch.Tensor:
        return self.fc_mu(F.relu(self.fc2(F.relu(self.fc1(obs)))))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.pre_activation(obs)) * self.action_scale + self.action_bias


class TwinQ(nn.Module):
    """Both TD3 critics in one module: weights stacked as [2, out, in], one baddbmm per layer."""

    def __init__(self, obs_dim: int, action_dim: int, hidden: int = 256):
        super().__init__()
        sizes = [obs_dim + action_dim, hidden, hidden, 1]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            bound = 1.0 / math.sqrt(fan_in)  # nn.Linear's default initialisation
            self.weights.append(nn.Parameter(torch.empty(2, fan_out, fan_in).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(2, 1, fan_out).uniform_(-bound, bound)))

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """[Q1, Q2] as a [2, batch] tensor."""
        x = torch.cat([obs, actions], dim=-1).expand(2, -1, -1)
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = torch.baddbmm(b, x, w.transpose(1, 2))
            if i < last:
                x = F.relu(x)
        return x.squeeze(-1)

    def q1(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Q1 alone, for the actor loss (TD3 differentiates only the first critic)."""
        x = torch.cat([obs, actions], dim=-1)
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = F.linear(x, w[0], b[0, 0])
            if i < last:
                x = F.relu(x)
        return x.squeeze(-1)


# REPLAY BUFFER ----------------------------------------------------------------------------------
class ReplayBuffer:
    """Preallocated tensors, ring-indexed, sampled with the agent's own torch generator."""

    def __init__(self, capacity: int, obs_dim: int, action_dim: int, device: torch.device):
        self.capacity, self.device = capacity, device
        self.obs = torch.zeros(capacity, obs_dim, device=device)
        self.next_obs = torch.zeros(capacity, obs_dim, device=device)
        self.actions = torch.zeros(capacity, action_dim, device=device)
        self.rewards = torch.zeros(capacity, device=device)
        self.terminations = torch.zeros(capacity, device=device)
        self.pos, self.size = 0, 0

    def add(self, obs, next_obs, action, reward: float, terminated: bool) -> None:
        i = self.pos
        self.obs[i] = torch.as_tensor(obs, device=self.device)
        self.next_obs[i] = torch.as_tensor(next_obs, device=self.device)
        self.actions[i] = torch.as_tensor(action, device=self.device)
        self.rewards[i] = reward
        self.terminations[i] = float(terminated)
        self.pos = (self.pos + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, batch_size: int, generator: torch.Generator):
        idx = torch.randint(0, self.size, (batch_size,), device=self.device, generator=generator)
        return self.obs[idx], self.actions[idx], self.rewards[idx], self.terminations[idx], self.next_obs[idx]


# NORMALIZER -------------------------------------------------------------------------------------
class StateNormalizer:
    """Fitted once on reference states, then frozen: (f(x) - center) / scale, clipped to +-10.

    f applies log1p to volume when asked (volume spans orders of magnitude, so its z-score
    would still be dominated by a few spikes). kind: zscore (mean/std) or robust (median/IQR).
    """

    def __init__(self, center: np.ndarray, scale: np.ndarray, log_volume: bool, kind: str, fit_count: int,
                 clip: float = 10.0):
        self.center, self.scale = center.astype(np.float64), scale.astype(np.float64)
        self.log_volume, self.kind, self.fit_count, self.clip = log_volume, kind, fit_count, clip
        self._center_t = self._scale_t = None

    @staticmethod
    def transform_raw(x, log_volume: bool):
        if not log_volume:
            return x
        if isinstance(x, np.ndarray):  # fitting, in float64
            x = x.copy()
            x[..., VOLUME_IDX] = np.log1p(x[..., VOLUME_IDX])
        else:  # every sampled batch
            x = x.clone()
            x[..., VOLUME_IDX] = torch.log1p(x[..., VOLUME_IDX])
        return x

    @classmethod
    def fit(cls, states: np.ndarray, kind: str, log_volume: bool) -> "StateNormalizer":
        x = cls.transform_raw(np.asarray(states, dtype=np.float64), log_volume)
        if kind == "robust":
            center = np.median(x, axis=0)
            scale = np.percentile(x, 75, axis=0) - np.percentile(x, 25, axis=0)
        else:
            center, scale = x.mean(axis=0), x.std(axis=0)
        scale = np.where(scale > 1e-12, scale, 1.0)  # a constant feature passes through centred
        return cls(center, scale, log_volume, kind, len(states))

    def __call__(self, obs: torch.Tensor) -> torch.Tensor:
        if self._center_t is None or self._center_t.device != obs.device:
            self._center_t = torch.as_tensor(self.center, dtype=torch.float32, device=obs.device)
            self._scale_t = torch.as_tensor(self.scale, dtype=torch.float32, device=obs.device)
        return ((self.transform_raw(obs, self.log_volume) - self._center_t) / self._scale_t).clamp(-self.clip, self.clip)

    def state_dict(self) -> dict:
        return {"center": self.center, "scale": self.scale, "log_volume": self.log_volume, "kind": self.kind,
                "fit_count": self.fit_count}


def reference_states(env: TradingEnv, seed: int) -> np.ndarray:
    """One state per step of a whole split, from a uniform-random-action rollout (the fit sample).

    Random trading pays about 7 bp a step in costs and is ruined long before the split ends;
    on ruin the rollout starts again flat at the same step, so every market state is covered.
    """
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
class RunningMeanStd:
    """Running mean/variance (Chan et al.'s parallel update) of a batch of vectors, float64."""

    def __init__(self, dim: int, device: torch.device):
        self.mean = torch.zeros(dim, dtype=torch.float64, device=device)
        self.var = torch.ones(dim, dtype=torch.float64, device=device)
        self.count = 0

    def update(self, batch: torch.Tensor) -> None:
        batch = batch.detach().to(torch.float64)
        n = batch.shape[0]
        total = self.count + n
        delta = batch.mean(0) - self.mean
        m2 = self.var * self.count + batch.var(0, unbiased=False) * n + delta.square() * (self.count * n / total)
        self.mean = self.mean + delta * (n / total)
        self.var = m2 / total
        self.count = total

    @property
    def std(self) -> torch.Tensor:
        return torch.sqrt(self.var + 1e-8).float()


class RND:
    """Random Network Distillation (Burda et al. 2018): novelty = error of a trained predictor
    against a fixed random target network.

    kind "rnd" looks at s' only: it depends on the action just through s'[position] and
    s'[equity], so it mostly raises every action's value alike ("the water level").
    kind "sa-rnd" looks at concat(s, a): the novelty of the state-action pair, which ranks
    actions differently and can move the greedy action. Inputs are normalized by their own
    running stats and clipped to +-5; r_int = squared error / its running std.
    """

    def __init__(self, kind: str, obs_dim: int, device: torch.device, seed: int, hidden: int = 64, out: int = 32,
                 lr: float = 1e-4):
        in_dim = obs_dim if kind == "rnd" else obs_dim + 1
        gen = torch.Generator().manual_seed(seed + 7919)  # its own stream: the agents' draws stay untouched
        def mlp():
            net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                nn.Linear(hidden, out))
            for layer in net:
                if isinstance(layer, nn.Linear):
                    bound = 1.0 / math.sqrt(layer.in_features)
                    with torch.no_grad():
                        layer.weight.copy_(torch.rand(layer.weight.shape, generator=gen) * 2 * bound - bound)
                        layer.bias.copy_(torch.rand(layer.bias.shape, generator=gen) * 2 * bound - bound)
            return net.to(device)
        self.kind = kind
        self.target = mlp().requires_grad_(False)
        self.predictor = mlp()
        self.optimizer = torch.optim.Adam(self.predictor.parameters(), lr=lr)
        self.input_stats = RunningMeanStd(in_dim, device)
        self.error_stats = RunningMeanStd(1, device)

    def inputs(self, obs: torch.Tensor, actions: torch.Tensor, next_obs: torch.Tensor) -> torch.Tensor:
        return next_obs if self.kind == "rnd" else torch.cat([obs, actions], dim=-1)

    def _error(self, x: torch.Tensor) -> torch.Tensor:
        x = ((x - self.input_stats.mean.float()) / self.input_stats.std).clamp(-5.0, 5.0)
        return (self.predictor(x) - self.target(x)).square().mean(dim=-1)

    def prediction_error(self, obs, actions, next_obs) -> torch.Tensor:
        """Squared error of the predictor on normalized, clipped inputs (the novelty signal)."""
        return self._error(self.inputs(obs, actions, next_obs))

    def bonus(self, obs, actions, next_obs) -> torch.Tensor:
        """r_int for a training batch: update the input stats, score, train the predictor on it."""
        x = self.inputs(obs, actions, next_obs)
        self.input_stats.update(x)
        error = self._error(x)
        self.optimizer.zero_grad(set_to_none=True)
        error.mean().backward()
        self.optimizer.step()
        self.error_stats.update(error.detach()[:, None])
        return error.detach() / self.error_stats.std


class IntrinsicReward:
    """The reward hook: r_tot = r_env + w * r_int, fresh on each sampled batch; keeps the mean
    of r_tot - r_env over all training batches (intrinsic_mean_delta), as a tensor (no sync)."""

    def __init__(self, rnd: RND, coef: float, device: torch.device):
        self.rnd, self.coef = rnd, coef
        self.delta_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.batches = 0

    def __call__(self, obs, actions, rewards, next_obs) -> torch.Tensor:
        r_tot = rewards + self.coef * self.rnd.bonus(obs, actions, next_obs)
        self.delta_sum += (r_tot - rewards).mean()
        self.batches += 1
        return r_tot

    def mean_delta(self) -> float:
        return float(self.delta_sum) / max(self.batches, 1)


# ALGO LOGIC: TD3 --------------------------------------------------------------------------------
def smoothing_noise(actions: torch.Tensor, policy_noise: float, noise_clip: float, action_scale: torch.Tensor,
                    generator: torch.Generator) -> torch.Tensor:
    """Target policy smoothing noise: N(0, policy_noise*scale) clipped to +-noise_clip*scale, per dim."""
    noise = torch.randn(actions.shape, generator=generator, device=actions.device) * (policy_noise * action_scale)
    limit = noise_clip * action_scale
    return torch.maximum(torch.minimum(noise, limit), -limit)


def td3_target(actor_target, qf_target, next_obs, rewards, terminations, noise, gamma, action_low, action_high):
    """y = r + gamma * (1 - terminated) * min(Q1', Q2')(s', clamp(pi'(s') + noise, low, high))."""
    next_actions = torch.clamp(actor_target(next_obs) + noise, action_low, action_high)
    next_q = qf_target(next_obs, next_actions).min(dim=0).values
    return rewards + gamma * (1.0 - terminations) * next_q


def soft_update_(targets: list[torch.Tensor], sources: list[torch.Tensor], tau: float) -> None:
    """Polyak averaging theta' <- (1 - tau) theta' + tau theta, as one fused foreach lerp."""
    torch._foreach_lerp_(targets, sources, tau)


class TD3:
    """One agent: actor, twin critic, targets, optimizers, its own random generator.

    Each agent draws exploration noise, smoothing noise and replay indices from its own
    torch.Generator, so two agents built with the same seed stay bit-identical as long as they
    see the same rewards, whatever else runs in the process.
    """

    def __init__(self, obs_dim: int, args: Args, device: torch.device, normalizer: Optional[StateNormalizer],
                 seed: int):
        torch.manual_seed(seed)  # identical initial weights for every agent of a paired run
        low, high = np.array([-1.0], np.float32), np.array([1.0], np.float32)
        self.args, self.device, self.normalizer = args, device, normalizer
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.actor = Actor(obs_dim, low, high).to(device)
        self.qf = TwinQ(obs_dim, 1).to(device)
        self.actor_target = copy.deepcopy(self.actor).requires_grad_(False)
        self.qf_target = copy.deepcopy(self.qf).requires_grad_(False)
        self.action_low = torch.as_tensor(low, device=device)
        self.action_high = torch.as_tensor(high, device=device)
        self.q_optimizer = torch.optim.Adam(self.qf.parameters(), lr=args.learning_rate, fused=True)
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=args.learning_rate, fused=True)
        self.n_updates = 0
        self._sources = list(self.actor.parameters()) + list(self.qf.parameters())
        self._targets = list(self.actor_target.parameters()) + list(self.qf_target.parameters())
        self._actor_params = list(self.actor.parameters())

    def norm(self, obs: torch.Tensor) -> torch.Tensor:
        return obs if self.normalizer is None else self.normalizer(obs)

    @torch.no_grad()
    def raw_action(self, obs: np.ndarray) -> np.ndarray:
        """The actor's output before any noise or clipping (what the audit inspects)."""
        return self.actor(self.norm(torch.as_tensor(obs, dtype=torch.float32, device=self.device))).cpu().numpy()

    @torch.no_grad()
    def explore(self, obs: np.ndarray) -> np.ndarray:
        a = self.actor(self.norm(torch.as_tensor(obs, dtype=torch.float32, device=self.device)))
        a += torch.randn(a.shape, generator=self.generator, device=self.device) * (
            self.args.exploration_noise * self.actor.action_scale)
        return torch.clamp(a, self.action_low, self.action_high).cpu().numpy()

    def update(self, batch, reward_fn=None) -> dict:
        """One critic step (+ actor and targets every policy_frequency-th call).

        reward_fn(obs, actions, rewards, next_obs) -> r_tot is the hook where an intrinsic reward
        enters: the buffer stores r_env, r_tot is computed fresh on every sampled batch.
        """
        obs, actions, rewards, terminations, next_obs = batch
        if reward_fn is not None:
            rewards = reward_fn(obs, actions, rewards, next_obs)
        obs, next_obs = self.norm(obs), self.norm(next_obs)
        with torch.no_grad():
            noise = smoothing_noise(actions, self.args.policy_noise, self.args.noise_clip, self.actor.action_scale,
                                    self.generator)
            y = td3_target(self.actor_target, self.qf_target, next_obs, rewards, terminations, noise,
                           self.args.gamma, self.action_low, self.action_high)
        q = self.qf(obs, actions)
        qf_losses = (q - y).square().mean(dim=1)
        qf_loss = qf_losses.sum()
        self.q_optimizer.zero_grad(set_to_none=True)
        qf_loss.backward()
        self.q_optimizer.step()
        self.n_updates += 1
        metrics = {"qf_losses": qf_losses.detach(), "q_means": q.detach().mean(dim=1), "rewards": rewards}
        if self.n_updates % self.args.policy_frequency == 0:  # delayed policy updates
            actor_loss = -self.qf.q1(obs, self.actor(obs)).mean()
            self.actor_optimizer.zero_grad(set_to_none=True)
            actor_loss.backward(inputs=self._actor_params)
            self.actor_optimizer.step()
            with torch.no_grad():
                soft_update_(self._targets, self._sources, self.args.tau)
            metrics["actor_loss"] = actor_loss.detach()
        return metrics

    def state_dict(self) -> dict:
        return {"actor": self.actor.state_dict(), "qf": self.qf.state_dict(),
                "actor_target": self.actor_target.state_dict(), "qf_target": self.qf_target.state_dict(),
                "normalizer": None if self.normalizer is None else self.normalizer.state_dict(),
                "n_updates": self.n_updates}


# AUDIT ------------------------------------------------------------------------------------------
def kappa(actions_normalized: np.ndarray) -> np.ndarray:
    """tanh gate kappa = 1 - (a/a_max)^2: every actor gradient is multiplied by it; 0 at the bound."""
    return 1.0 - np.square(actions_normalized)


def action_saturation_stats(actions: np.ndarray) -> dict:
    """On raw actor outputs in [-1, 1] (a_max = 1)."""
    a = np.asarray(actions, dtype=np.float64).reshape(-1)
    k = kappa(a)
    near = float(np.mean(np.abs(a) >= NEAR_BOUND))
    return {"near_bound_ratio": near, "actor_collapse_detected": bool(near >= COLLAPSE_RATIO),
            "kappa_mean": float(k.mean()), "kappa_p10": float(np.percentile(k, 10)),
            "action_mean": float(a.mean()), "action_std": float(a.std())}


def scale_stats(x: np.ndarray, names: list[str]) -> dict:
    """The schema of state_scale_summary.json's pre_stats/post_stats (SPEC 3.6)."""
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


# EVALUATION -------------------------------------------------------------------------------------
def performance_metrics(step_returns: np.ndarray, positions: np.ndarray, periods_per_year: int) -> dict:
    """Return, risk and cost figures of one equity curve built from per-step returns.

    Sharpe = sqrt(P) mean/std of step returns; Sortino uses the downside deviation
    sqrt(mean(min(r, 0)^2)); max drawdown = max_t 1 - equity_t / max_{s<=t} equity_s;
    turnover = sum |p_t - p_{t-1}| (fractions of equity traded, entry from flat included).
    """
    r = np.asarray(step_returns, dtype=np.float64)
    equity = np.concatenate([[1.0], np.cumprod(1.0 + r)])
    total = float(equity[-1] - 1.0)
    n = len(r)
    std = float(r.std())
    downside = float(np.sqrt(np.mean(np.minimum(r, 0.0) ** 2)))
    mean = float(r.mean())
    peaks = np.maximum.accumulate(equity)
    return {"total_return": total,
            "annualized_return": float(equity[-1] ** (periods_per_year / n) - 1.0) if equity[-1] > 0 else -1.0,
            "volatility": std * math.sqrt(periods_per_year),
            "sharpe": mean / std * math.sqrt(periods_per_year) if std > 0 else 0.0,
            "sortino": mean / downside * math.sqrt(periods_per_year) if downside > 0 else 0.0,
            "max_drawdown": float(np.max(1.0 - equity / peaks)),
            "turnover": float(np.sum(np.abs(np.diff(np.concatenate([[0.0], positions]))))),
            "steps": n}


def evaluate(agent: TD3, env: TradingEnv, args: Args) -> dict:
    """Deterministic policy over a whole split from flat; raw actor outputs kept for the audit."""
    obs, _ = env.reset(seed=0)
    observations, actions, returns, positions, equity, done = [], [], [], [], [env.equity], False
    while not done:
        a = agent.raw_action(obs[None])[0]
        observations.append(obs)
        actions.append(float(a[0]))
        obs, _, terminated, truncated, info = env.step(a)  # the env clips to [-1, 1]
        returns.append(info["step_return"])
        positions.append(env.position)
        equity.append(env.equity)
        done = terminated or truncated
    obs_t = agent.norm(torch.as_tensor(np.asarray(observations), device=agent.device))
    with torch.no_grad():
        q1 = agent.qf.q1(obs_t, agent.actor(obs_t)).cpu().numpy()
    return {"metrics": performance_metrics(np.array(returns), np.array(positions), args.periods_per_year),
            "actions": np.array(actions), "positions": np.array(positions), "equity": np.array(equity),
            "q1_mean": float(q1.mean()), "saturation": action_saturation_stats(np.array(actions))}


def benchmark_metrics(close: np.ndarray, bounds: tuple, args: Args) -> dict:
    """Buy-and-hold (one entry cost) and flat over the same steps as the agents' evaluation."""
    start, end = bounds
    asset = close[start + 1: end] / close[start: end - 1] - 1.0
    bh = asset.copy()
    bh[0] -= args.cost_bp * 1e-4  # enter once from flat, then hold
    return {"buy_and_hold": performance_metrics(bh, np.ones_like(bh), args.periods_per_year),
            "flat": performance_metrics(np.zeros_like(asset), np.zeros_like(asset), args.periods_per_year),
            "_buy_and_hold_equity": np.concatenate([[1.0], np.cumprod(1.0 + bh)])}


# FILES AND PLOTS --------------------------------------------------------------------------------
def write_json_atomic(path: str, obj) -> None:
    """temp file + os.replace: an interrupted run never leaves half a JSON file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, allow_nan=False)
    os.replace(tmp, path)


def save_figure(fig, path: str) -> None:
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def plot_equity(test_results: dict, bh_equity: np.ndarray, initial_equity: float, path: str) -> None:
    fig, (ax, ax_pos) = plt.subplots(2, 1, figsize=(11, 6.5), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    steps = np.arange(len(bh_equity))
    ax.plot(steps, bh_equity * initial_equity, color="grey", lw=1.2, label="buy and hold")
    for name, res in test_results.items():
        line, = ax.plot(steps[: len(res["equity"])], res["equity"], lw=1.2,
                        label=f"{name} (Sharpe {res['metrics']['sharpe']:.2f})")
        ax_pos.plot(steps[1: len(res["positions"]) + 1], res["positions"], lw=0.9, color=line.get_color(), label=name)
        near = np.flatnonzero(np.abs(res["actions"]) >= NEAR_BOUND)
        if len(near):
            ax_pos.scatter(near + 1, res["positions"][near], s=6, color="#d62728", zorder=3)
    ax.set_ylabel("equity")
    ax.set_title("test split: equity vs buy and hold")
    ax.legend()
    ax_pos.set_ylabel("position p_t")
    ax_pos.set_xlabel("test step (red dots: raw actor output at the bound, |a| ≥ 0.999)")
    ax_pos.set_ylim(-1.08, 1.08)
    save_figure(fig, path)


def plot_saturation(test_results: dict, path: str) -> None:
    fig, (ax_a, ax_k) = plt.subplots(1, 2, figsize=(11, 4))
    bins = np.linspace(-1, 1, 41)
    for name, res in test_results.items():
        ax_a.hist(res["actions"], bins=bins, alpha=0.55, label=name)
        ax_k.hist(kappa(res["actions"]), bins=np.linspace(0, 1, 41), alpha=0.55, label=name)
    ax_a.set_xlabel("raw actor output a / a_max")
    ax_a.set_ylabel("test steps")
    ax_a.set_title("actor outputs (mass at ±1 = collapse)")
    ax_k.set_xlabel("κ = 1 − (a/a_max)²")
    ax_k.set_title("tanh gate: the share of the critic's gradient that reaches the actor")
    for ax in (ax_a, ax_k):
        ax.legend()
    save_figure(fig, path)


# TRAINING ---------------------------------------------------------------------------------------
def make_env(market: Market, features: np.ndarray, bounds: tuple, args: Args, training: bool) -> TradingEnv:
    return TradingEnv(market.close, features, *bounds, episode_length=args.episode_length if training else None,
                      cost=args.cost_bp * 1e-4, risk_penalty=args.risk_penalty, reward_scale=args.reward_scale,
                      initial_equity=args.initial_equity)


def train_agent(name: str, args: Args, market: Market, features: np.ndarray, splits: dict,
                normalizer: Optional[StateNormalizer], device: torch.device, run_dir: str,
                intrinsic: Optional[IntrinsicReward] = None) -> dict:
    """Train one agent on the train split; evaluate on the validation split every eval_frequency steps.

    Every agent of a run starts from the same seeds (weights, noise, replay indices, episode
    starts), so the only difference between the baseline and the intrinsic agent is w * r_int.
    """
    random.seed(args.seed)
    np.random.seed(args.seed)
    obs_dim = len(FEATURE_NAMES)
    agent = TD3(obs_dim, args, device, normalizer, args.seed)
    rb = ReplayBuffer(min(args.buffer_size, args.total_timesteps), obs_dim, 1, device)
    env = make_env(market, features, splits["train"], args, training=True)
    val_env = make_env(market, features, splits["val"], args, training=False)
    env.action_space.seed(args.seed)
    writer = SummaryWriter(os.path.join(run_dir, name))
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items()))
    obs, _ = env.reset(seed=args.seed)
    ep_return, ep_length, history, val_results = 0.0, 0, [], []
    learn_seconds, learn_steps, start, last_print = 0.0, 0, time.time(), time.time()
    for global_step in range(1, args.total_timesteps + 1):
        learning = global_step > args.learning_starts
        tick = time.perf_counter()
        action = agent.explore(obs[None])[0] if learning else env.action_space.sample()
        next_obs, reward, terminated, truncated, _ = env.step(action)
        rb.add(obs, next_obs, action, reward, terminated)  # r_env is stored; r_tot is made per batch
        ep_return += reward
        ep_length += 1
        if terminated or truncated:
            writer.add_scalar("charts/episodic_return", ep_return, global_step)
            writer.add_scalar("charts/episodic_length", ep_length, global_step)
            obs, _ = env.reset()
            ep_return, ep_length = 0.0, 0
        else:
            obs = next_obs
        if learning:
            metrics = agent.update(rb.sample(args.batch_size, agent.generator), intrinsic)
            learn_seconds += time.perf_counter() - tick
            learn_steps += 1
            if agent.n_updates % LOG_EVERY_UPDATES == 0:
                writer.add_scalar("losses/qf1_values", metrics["q_means"][0].item(), global_step)
                writer.add_scalar("losses/qf2_values", metrics["q_means"][1].item(), global_step)
                writer.add_scalar("losses/qf1_loss", metrics["qf_losses"][0].item(), global_step)
                writer.add_scalar("losses/qf2_loss", metrics["qf_losses"][1].item(), global_step)
                writer.add_scalar("losses/qf_loss", metrics["qf_losses"].mean().item(), global_step)
                if "actor_loss" in metrics:
                    writer.add_scalar("losses/actor_loss", metrics["actor_loss"].item(), global_step)
                writer.add_scalar("charts/SPS", int(learn_steps / max(learn_seconds, 1e-9)), global_step)
                if intrinsic is not None:
                    writer.add_scalar("charts/intrinsic_mean_delta", intrinsic.mean_delta(), global_step)
        evaluate_now = global_step % args.eval_frequency == 0 or global_step == args.total_timesteps
        if evaluate_now:
            result = evaluate(agent, val_env, args)
            entry = {"global_step": global_step, **result["saturation"], "val_sharpe": result["metrics"]["sharpe"],
                     "val_total_return": result["metrics"]["total_return"], "q1_mean": result["q1_mean"]}
            if intrinsic is not None:
                entry["intrinsic_mean_delta"] = intrinsic.mean_delta()
            history.append(entry)
            val_results.append(result)
            writer.add_scalar("eval/sharpe", entry["val_sharpe"], global_step)
            writer.add_scalar("eval/total_return", entry["val_total_return"], global_step)
            for key in ("near_bound_ratio", "kappa_mean"):
                writer.add_scalar(f"audit/{key}", entry[key], global_step)
        if evaluate_now or time.time() - last_print > PROGRESS_EVERY_SECONDS:
            last = f"{history[-1]['val_sharpe']:.2f}" if history else "-"
            near = f"{history[-1]['near_bound_ratio']:.3f}" if history else "-"
            if learn_seconds > 0:
                sps = learn_steps / learn_seconds
                eta = (args.total_timesteps - global_step) / sps
                rate, eta_text = f"learning SPS {sps:.0f}", f"{int(eta // 60)}m{int(eta % 60):02d}s"
            else:  # uniform-random phase: no update timed yet, so no honest ETA
                rate, eta_text = f"random-phase SPS {global_step / (time.time() - start):.0f}", "? (learning not started)"
            print(f"[{name}] step {global_step}/{args.total_timesteps} | {rate} | val Sharpe {last} | "
                  f"near-bound {near} | ETA {eta_text}", flush=True)
            last_print = time.time()
    writer.close()
    return {"agent": agent, "history": history, "val_results": val_results, "intrinsic": intrinsic,
            "sps_learning_phase": learn_steps / learn_seconds if learn_seconds else 0.0, "wall_time_s": time.time() - start}


def agent_names(args: Args) -> list[str]:
    """baseline (w = 0) unless --no-paired; intrinsic unless --intrinsic-kind none."""
    names = ["baseline"] if args.paired or args.intrinsic_kind == "none" else []
    return names + (["intrinsic"] if args.intrinsic_kind != "none" else [])


# PAIRED AUDIT: did the intrinsic reward move the value, the policy, or both? ---------------------
def paired_metrics(base: dict, intr: dict) -> dict:
    """Step-aligned comparison of two evaluations over the same market segment."""
    n = min(len(base["actions"]), len(intr["actions"]))
    m = min(len(base["equity"]), len(intr["equity"]))
    return {"action_equal_ratio": float(np.mean(np.isclose(intr["actions"][:n], base["actions"][:n], rtol=0.0, atol=1e-6))),
            "eval_value_mae": float(np.mean(np.abs(intr["equity"][:m] - base["equity"][:m]))),
            "q1_delta_mean": intr["q1_mean"] - base["q1_mean"]}


def diagnose(paired: dict, near_bound: float, initial_equity: float) -> dict:
    """R1-R4 of SPEC 3.6, plus what to change."""
    moved = abs(paired["intrinsic_mean_delta"]) > 1e-9
    frozen = paired["action_equal_ratio"] >= 0.999
    same_value = paired["eval_value_mae"] <= 1e-6 * initial_equity
    if not moved:
        code, text = "R4", "no intrinsic effect: w * r_int is zero on the training batches"
    elif frozen:
        code, text = "R1", "value moved, policy frozen: r_int changed the targets but the actions are identical"
    elif same_value:
        code, text = "R2", "actions differ, but the portfolio value curves are equal"
    else:
        code, text = "R3", "actions and portfolio value both differ: the intrinsic reward changed behaviour"
    if near_bound >= COLLAPSE_RATIO:
        advice = ("the actor sits at its bound (kappa ~ 0, no gradient reaches it): check state_scale_summary.json "
                  "(p99_abs_spread) and use --state-norm before judging the intrinsic reward")
    elif frozen and moved:
        advice = ("the actor can move (near-bound low) yet ignores r_int: the intrinsic term is action-independent "
                  "and only raises every action's value; redesign it (e.g. --intrinsic-kind sa-rnd) rather than "
                  "tuning normalization")
    elif not moved:
        advice = "nothing to audit: raise --intrinsic-coef or pick --intrinsic-kind rnd/sa-rnd"
    else:
        advice = "the intrinsic reward changes the policy: judge it by the test Sharpe and drawdown of both agents"
    return {"code": code, "text": text, "advice": advice}


def main(args: Args) -> dict:
    """Fit the normalizer, train every agent, evaluate on the test split, write the audit files."""
    validate_args(args)
    start = time.time()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    market = load_csv(args.data_csv) if args.data_csv else synthetic_market(args.market_steps, args.market_seed)
    features = market_features(market.close, market.volume)
    splits = split_bounds(len(market.close), args.train_frac, args.val_frac)
    for split, (lo, hi) in splits.items():
        if hi - lo < 2 * max(args.episode_length // 4, 10):
            raise UserError(f"the {split} split has {hi - lo} steps; use more data or change --train-frac/--val-frac")

    # Reference states for the scale audit (and the normalizer): one random-action rollout.
    ref = reference_states(make_env(market, features, splits["train"], args, training=False), args.seed)
    normalizer = StateNormalizer.fit(ref, args.state_norm_kind, args.log_volume) if args.state_norm else None
    source = os.path.basename(args.data_csv) if args.data_csv else f"synthetic{args.market_seed}"
    run_name = f"{source}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = os.path.join(args.runs_dir, run_name)
    os.makedirs(run_dir, exist_ok=True)
    pre = scale_stats(ref, FEATURE_NAMES)
    post = scale_stats(normalizer(torch.as_tensor(ref, dtype=torch.float32)).numpy() if normalizer else ref, FEATURE_NAMES)
    write_json_atomic(os.path.join(run_dir, "state_scale_summary.json"), {
        "mode": args.state_norm_kind if args.state_norm else "none", "log_volume": bool(args.state_norm and args.log_volume),
        "feature_names": FEATURE_NAMES, "fit_sample_count": len(ref), "pre_stats": pre, "post_stats": post,
        "p99_abs_spread": {"pre": p99_abs_spread(pre), "post": p99_abs_spread(post)}})

    trained = {}
    for name in agent_names(args):
        intrinsic = None
        if name == "intrinsic":
            intrinsic = IntrinsicReward(RND(args.intrinsic_kind, len(FEATURE_NAMES), device, args.seed),
                                        args.intrinsic_coef, device)
        trained[name] = train_agent(name, args, market, features, splits, normalizer, device, run_dir, intrinsic)

    test_env = make_env(market, features, splits["test"], args, training=False)
    test = {name: evaluate(t["agent"], test_env, args) for name, t in trained.items()}
    bench = benchmark_metrics(market.close, splits["test"], args)
    eval_test = {"split": "test", "steps": splits["test"][1] - splits["test"][0] - 1,
                 "agents": {name: res["metrics"] for name, res in test.items()},
                 "buy_and_hold": bench["buy_and_hold"], "flat": bench["flat"]}
    write_json_atomic(os.path.join(run_dir, "eval_test.json"), eval_test)
    # summary/history: the eval trajectory during training (validation split), summary = last eval;
    # test: the same statistics on the test split at the end.
    saturation = {"near_bound_threshold": NEAR_BOUND, "collapse_threshold": COLLAPSE_RATIO,
                  "summary_split": "val", "history_split": "val", "test_split": "test",
                  "agents": {name: {"summary": trained[name]["history"][-1], "history": trained[name]["history"],
                                    "test": test[name]["saturation"]} for name in trained},
                  "paired": None, "diagnosis": None}
    if "baseline" in trained and "intrinsic" in trained:
        delta = trained["intrinsic"]["intrinsic"].mean_delta()
        paired = {**paired_metrics(test["baseline"], test["intrinsic"]), "intrinsic_mean_delta": delta}
        per_eval = [{"global_step": h["global_step"], **paired_metrics(b, i), "intrinsic_mean_delta": h["intrinsic_mean_delta"]}
                    for b, i, h in zip(trained["baseline"]["val_results"], trained["intrinsic"]["val_results"],
                                       trained["intrinsic"]["history"])]
        for key in ("action_equal_ratio", "eval_value_mae", "intrinsic_mean_delta", "q1_delta_mean"):
            paired[f"{key}_mean"] = float(np.mean([row[key] for row in per_eval]))
        paired["history"] = per_eval
        near = max(test[n]["saturation"]["near_bound_ratio"] for n in trained)
        saturation["paired"] = paired
        saturation["diagnosis"] = diagnose(paired, near, args.initial_equity)
    write_json_atomic(os.path.join(run_dir, "td3_action_saturation.json"), saturation)
    plot_equity(test, bench["_buy_and_hold_equity"], args.initial_equity, os.path.join(run_dir, "eval_equity.png"))
    plot_saturation(test, os.path.join(run_dir, "action_saturation.png"))
    if args.save_model:
        model_path = os.path.join(run_dir, "model.pt")
        torch.save({"args": asdict(args), "agents": {n: t["agent"].state_dict() for n, t in trained.items()}},
                   f"{model_path}.tmp")
        os.replace(f"{model_path}.tmp", model_path)  # never a half-written model

    summary = {"run_dir": run_dir, "seed": args.seed, "state_norm": args.state_norm,
               "total_timesteps": args.total_timesteps, "test": eval_test,
               "saturation": {name: trained[name]["history"][-1] for name in trained},
               "saturation_test": {name: test[name]["saturation"] for name in trained},
               "paired": None if saturation["paired"] is None else {k: v for k, v in saturation["paired"].items() if k != "history"},
               "diagnosis": saturation["diagnosis"],
               "sps_learning_phase": {name: round(t["sps_learning_phase"], 1) for name, t in trained.items()},
               "wall_time_s": round(time.time() - start, 2)}
    write_json_atomic(os.path.join(run_dir, "summary.json"), summary)
    print_table(eval_test, summary["saturation_test"], summary["paired"], summary["diagnosis"])
    print(f"-> {run_dir} ({summary['wall_time_s']:.0f} s)")
    return summary


def print_table(eval_test: dict, saturation: dict, paired: Optional[dict], diagnosis: Optional[dict]) -> None:
    print(f"test split, {eval_test['steps']} steps")
    print(f"{'agent':<14}{'Sharpe':>8}{'return':>9}{'max DD':>8}{'near-bound':>12}{'kappa':>8}")
    for name, m in eval_test["agents"].items():
        s = saturation[name]
        print(f"{name:<14}{m['sharpe']:8.2f}{m['total_return']:9.1%}{m['max_drawdown']:8.1%}"
              f"{s['near_bound_ratio']:12.3f}{s['kappa_mean']:8.3f}")
    for name in ("buy_and_hold", "flat"):
        m = eval_test[name]
        print(f"{name:<14}{m['sharpe']:8.2f}{m['total_return']:9.1%}{m['max_drawdown']:8.1%}{'':>12}{'':>8}")
    if paired is not None:
        print(f"paired (test): action_equal_ratio {paired['action_equal_ratio']:.4f}, eval_value_mae "
              f"{paired['eval_value_mae']:.2f}, intrinsic_mean_delta {paired['intrinsic_mean_delta']:.4g}, "
              f"q1_delta_mean {paired['q1_delta_mean']:.4g}")
        print(f"diagnosis {diagnosis['code']}: {diagnosis['text']}")
        print(f"advice: {diagnosis['advice']}")


if __name__ == "__main__":
    try:
        main(parse_cli())
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
