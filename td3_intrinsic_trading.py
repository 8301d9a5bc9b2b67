"""TD3 on an inline trading environment, with an intrinsic reward and the action-freeze audit.

The question this script answers with measurements: why can an intrinsic reward move the
critic's values while the actor does not move at all? Two mechanisms, both audited here:
  1. Scale: raw market features (prices ~1e2, volume ~1e6, equity ~1e5) push the tanh actor's
     pre-activation so far out that kappa = 1 - (a/a_max)^2 is 0: the actor is frozen at the
     bound whatever the critic says. `--state-norm` removes it.
  2. Action gap: r_tot = r_env + w*r_int only changes the greedy action if w*supDelta exceeds
     the action gap m; an action-independent r_int (plain RND on s') "raises the water level"
     and leaves the ranking of actions, hence the actor, alone. (toy_td3_intrinsic_experiments.py)
A third lesson comes out of sample: a normalizer fitted on the train split cannot tame a level
that trends (price, equity). `--state-norm` first makes them relative (stationary), and the
shift audit in state_scale_summary.json shows what happens with `--no-stationary`.

Run:     python td3_intrinsic_trading.py --state-norm          (the main command)
         python td3_intrinsic_trading.py                        (raw features: the freeze)
         python td3_intrinsic_trading.py --state-norm --no-stationary   (z-scored levels: the shift)
         python td3_intrinsic_trading.py --data-csv prices.csv --state-norm --save-model
         python td3_intrinsic_trading.py --eval-only --checkpoint runs/.../model.pt [--data-csv other.csv]
Writes:  runs/{run_name}/ with summary.json, state_scale_summary.json, td3_action_saturation.json,
         eval_test.json, eval_equity.png, action_saturation.png and TensorBoard events (one
         sub-folder per agent); model.pt with --save-model.
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
import shutil
import signal
import sys
import threading
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
import torch._inductor.config
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
    compile: bool = True
    """torch.compile the critic step (the RND bonus included) and the actor step, each into one graph (~10 s once)"""
    runs_dir: str = "runs"
    """root folder of the run folders"""
    save_model: bool = False
    """write model.pt (networks and normalizer of every agent) at the end"""
    eval_only: bool = False
    """only evaluate the agents of --checkpoint (with their saved normalizer and settings), then exit"""
    checkpoint: Optional[str] = None
    """model.pt written by --save-model, for --eval-only"""
    eval_split: Literal["test", "val", "train", "all"] = "test"
    """--eval-only: the split to evaluate on (all: the whole file from its first usable row)"""

    # Market data
    data_csv: Optional[str] = None
    """OHLCV CSV (Date or Time, Open, High, Low, Close, [Adj Close], Volume; comma, semicolon or tab);
    default: synthetic"""
    accept_suspect_rows: bool = False
    """--data-csv: keep duplicated timestamps and one-step moves beyond +100%/-90% (stopped as likely
    errors) when you know the data has them"""
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
    stationary: bool = True
    """with --state-norm, first turn the price and equity levels into relative quantities (price against
    its 20-step high, equity drawdown); --no-stationary z-scores the raw levels (the out-of-sample failure)"""

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
    learning_rate: float = 3e-5
    """the learning rate of both optimizers (low: the reward's noise is ~10x its action-dependent drift)"""
    hidden_size: int = 32
    """width of the two hidden layers of the actor and of each critic (small: 7000 train steps to fit)"""
    buffer_size: int = int(1e6)
    """the replay memory buffer size"""
    gamma: float = 0.5
    """the discount factor gamma (short: an action sets the position for one step; a long horizon mostly adds
    the noise of future returns to the critic's targets)"""
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
    """beta of beta * mean(u^2) added to the actor loss, u the pre-tanh output: keeps the actor off the bound
    where kappa ~ 0 (rlkit's policy_pre_activation_weight); default 1e-3 with --state-norm (chosen on
    validation), 0 without it, so the raw-feature run stays plain TD3 (the freeze demo)"""
    noise_clip: float = 0.5
    """clip of the target policy smoothing noise, as a fraction of the action half-range"""
    eval_frequency: int = 1000
    """evaluate on the validation split every N env steps (and at the end)"""
    keep_best: bool = True
    """test the checkpoint with the best validation Sharpe (early stopping on the validation split)"""


class UserError(Exception):
    """A mistake in the command line or inputs: reported as one line on stderr, exit code 2."""


class Diverged(Exception):
    """A loss, a Q-value or a weight stopped being finite: the run ends with status "diverged"."""

    def __init__(self, message: str, agent: str, step: int):
        super().__init__(message)
        self.agent, self.step = agent, step


# How a training run ends: summary.json's "status" and the exit code (interrupted: 128 + signal
# number, i.e. 130 for SIGINT and 143 for SIGTERM, as a shell reports them).
EXIT_CODES = {"completed": 0, "diverged": 1}


class StopOnSignal:
    """SIGINT (Ctrl-C) and SIGTERM (what schedulers send) only set `signum`: training stops at
    the next step boundary and the run still writes summary.json. A second signal stops at once.
    """

    def __enter__(self) -> "StopOnSignal":
        self.signum: Optional[int] = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"{signal.Signals(signum).name}: stopping after this step (again to stop at once)",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


LOG_EVERY_UPDATES = 100  # read metrics back from tensors only this often: .item() syncs
PROGRESS_EVERY_SECONDS = 30.0  # a progress line at least this often: long runs never look hung
NEAR_BOUND = 0.999  # |a| >= 0.999 a_max counts as "at the bound" (SPEC 3.6)
COLLAPSE_RATIO = 0.95  # near_bound_ratio at or above this: actor_collapse_detected
WARMUP = 20  # the longest feature window (MA20): the first usable step
MIN_ROWS = 200  # fewer rows cannot fill three splits after the warm-up
CSV_DELIMITERS = (",", ";", "\t")
MISSING_VALUES = {"", "null"}  # what Yahoo-style exports write on holidays: the row is skipped
MAX_STEP_MOVE, MIN_STEP_MOVE = 1.0, -0.9  # a one-step close move beyond +100% / -90% is likely a data error
# Above these, the divergence message names the learning rate or the reward as the likely cause
# (else it lists every cause): this script's scales are lr ~ 3e-5 and |r_tot| ~ 1-10.
DIVERGENCE_HINTS = {"learning_rate": 1e-3, "reward": 100.0}


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
    for name in ("total_timesteps", "buffer_size", "batch_size", "policy_frequency", "eval_frequency", "hidden_size",
                 "learning_rate", "episode_length", "initial_equity", "periods_per_year", "reward_scale"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    for name in ("learning_starts", "threads", "policy_noise", "exploration_noise", "noise_clip",
                 "cost_bp", "risk_penalty", "intrinsic_coef"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.preactivation_penalty is not None and args.preactivation_penalty < 0:
        raise UserError(f"--preactivation-penalty must be >= 0, got {args.preactivation_penalty}")
    if not 0.0 <= args.gamma < 1.0:
        raise UserError(f"--gamma must be in [0, 1), got {args.gamma}")
    if not 0.0 < args.tau <= 1.0:
        raise UserError(f"--tau must be in (0, 1], got {args.tau}")
    if not (0 < args.train_frac < 1 and 0 < args.val_frac < 1 and args.train_frac + args.val_frac < 1):
        raise UserError(f"--train-frac ({args.train_frac}) and --val-frac ({args.val_frac}) must be "
                        "positive and sum to less than 1 (the rest is the test split)")
    if args.intrinsic_kind == "none" and not args.paired:
        raise UserError("--no-paired trains only the intrinsic agent, so it needs --intrinsic-kind rnd or sa-rnd")
    if args.eval_only and not args.checkpoint:
        raise UserError("--eval-only needs --checkpoint runs/.../model.pt (written by --save-model)")
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


def read_csv_rows(path: str) -> tuple[list[list[str]], str]:
    """The cells of a CSV as spreadsheets and data vendors export it, and its delimiter: a UTF-8
    byte-order mark is dropped; the delimiter (comma, semicolon or tab) is the one the header uses most."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # "CSV UTF-8" files start with a BOM
            text = f.read()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read --data-csv '{path}': {err}") from None
    if not text.strip():
        raise UserError(f"--data-csv '{path}' is empty")
    header_line = text.lstrip().splitlines()[0]
    delimiter = max(CSV_DELIMITERS, key=header_line.count)
    return list(csv.reader(io.StringIO(text.lstrip()), delimiter=delimiter)), delimiter


def parse_number(cell: str, name: str, row_no: int, decimal_comma: bool) -> float:
    if decimal_comma and re.fullmatch(r"-?\d+,\d+", cell):  # 101,5 in a semicolon or tab file (European locales)
        cell = cell.replace(",", ".")
    try:
        value = float(cell)
    except ValueError:
        raise UserError(f"row {row_no}: {name} '{cell}' is not a number") from None
    if not math.isfinite(value):
        raise UserError(f"row {row_no}: {name} is {cell}; every value must be a finite number")
    if name == "volume" and value < 0 or name != "volume" and value <= 0:
        raise UserError(f"row {row_no}: {name} {cell} must be {'>= 0' if name == 'volume' else 'positive'}")
    return value


def suspect_rows(dates: list, row_nos: list[int], close: np.ndarray) -> Optional[str]:
    """The first likely error of a date-sorted file, or None: a repeated timestamp, or a one-step
    move of the (adjusted) close beyond +100% / -90% -- a typo, a lost decimal point, an unadjusted split."""
    repeated = [i for i in range(1, len(dates)) if dates[i] == dates[i - 1]]
    if repeated:
        i = repeated[0]
        more = f" ({len(repeated) - 1} more repeated rows)" if len(repeated) > 1 else ""
        return f"row {row_nos[i]}: timestamp {dates[i].isoformat()} repeats row {row_nos[i - 1]}{more}"
    moves = close[1:] / close[:-1] - 1.0
    jumps = np.flatnonzero((moves > MAX_STEP_MOVE) | (moves < MIN_STEP_MOVE)) + 1
    if len(jumps):
        i = jumps[0]
        more = f" ({len(jumps) - 1} more such moves)" if len(jumps) > 1 else ""
        return (f"row {row_nos[i]}: close {close[i]:g} is a one-step move of {moves[i - 1]:+.0%} from row "
                f"{row_nos[i - 1]} ({close[i - 1]:g}){more}")
    return None


def load_csv(path: str, accept_suspect_rows: bool = False) -> Market:
    """OHLCV CSV without pandas: columns matched case-insensitively, sorted by date ascending.

    Rows with an empty or `null` value (market holidays in Yahoo exports) are skipped with one
    warning; repeated timestamps and implausible one-step moves stop the run unless accepted.
    """
    rows, delimiter = read_csv_rows(path)
    header = [h.strip().lower().replace("_", " ") for h in rows[0]]
    col = {}
    for name, options in (("date", ("date", "time", "datetime", "gmt time", "local time")), ("open", ("open",)),
                          ("high", ("high",)), ("low", ("low",)), ("close", ("close",)),
                          ("volume", ("volume",)), ("adj close", ("adj close", "adjclose"))):
        found = [i for i, h in enumerate(header) if h in options]
        if found:
            col[name] = found[0]
        elif name != "adj close":
            raise UserError(f"--data-csv '{path}' has no {name} column (header: {', '.join(rows[0])}; "
                            f"read as '{delimiter}'-separated)")
    records, skipped = [], []
    for row_no, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) < len(header):
            raise UserError(f"row {row_no}: {len(row)} fields, the header has {len(header)}")
        cells = {name: row[i].strip() for name, i in col.items() if name != "date"}
        if any(cell.lower() in MISSING_VALUES for cell in cells.values()):
            skipped.append(row_no)
            continue
        values = {name: parse_number(cell, name, row_no, decimal_comma=delimiter != ",") for name, cell in cells.items()}
        records.append((parse_date(row[col["date"]], row_no), row_no, values))
    if skipped:
        print(f"warning: --data-csv '{path}': skipped {len(skipped)} rows with an empty or null value "
              f"(rows {', '.join(map(str, skipped[:5]))}{', ...' if len(skipped) > 5 else ''})", file=sys.stderr)
    if len(records) < MIN_ROWS:
        raise UserError(f"--data-csv '{path}' has {len(records)} data rows"
                        + (f" once {len(skipped)} with empty or null values are skipped" if skipped else "")
                        + f"; at least {MIN_ROWS} are needed")
    records.sort(key=lambda r: r[0])  # ascending; a stable sort keeps equal stamps in file order
    get = lambda name: np.array([v[name] for _, _, v in records])  # noqa: E731
    close = get("close")
    factor = get("adj close") / close if "adj close" in col else np.ones(len(close))  # splits, dividends
    suspect = suspect_rows([d for d, _, _ in records], [r for _, r, _ in records], close * factor)
    if suspect and not accept_suspect_rows:
        raise UserError(f"{suspect}; fix the file, or pass --accept-suspect-rows if the data is right")
    if np.ptp(close * factor) == 0:
        raise UserError(f"--data-csv '{path}': the close is {close[0] * factor[0]:g} on every row; "
                        "a constant price has nothing to learn or trade")
    return Market(close=close * factor, volume=get("volume"), open=get("open") * factor, high=get("high") * factor,
                  low=get("low") * factor, dates=[d.isoformat() for d, _, _ in records])


def split_bounds(n: int, train_frac: float, val_frac: float) -> dict:
    """Chronological [start, end) index ranges, never shuffled; training starts after the warm-up."""
    train_end = int(n * train_frac)
    val_end = int(n * (train_frac + val_frac))
    return {"train": (WARMUP, train_end), "val": (train_end, val_end), "test": (val_end, n)}


# Observation layout. Raw scales on purpose, as real pipelines feed them (FinRL passes cash
# ~1e6 and prices ~1e2 unnormalized): this is what freezes the actor without --state-norm.
FEATURE_NAMES = ["close", "volume", "log_return", "realized_vol_10", "momentum_10", "close_over_ma20_minus_1",
                 "position", "equity"]
# Under --state-norm (unless --no-stationary) the two levels become relative quantities first.
STATIONARY_FEATURE_NAMES = ["log_close_over_max20", *FEATURE_NAMES[1:-1], "equity_drawdown"]
CLOSE_IDX, VOLUME_IDX, VOL_IDX, POSITION_IDX, EQUITY_IDX = 0, 1, 3, 6, 7
N_MARKET_FEATURES = 6


def market_features(close: np.ndarray, volume: np.ndarray, stationary: bool = False) -> np.ndarray:
    """[n, 6] features; row t uses data up to t only (no look-ahead); rows < WARMUP are NaN.

    stationary: column 0 is log(C_t / max(C_{t-19..t})), the price against its trailing 20-step
    high, instead of the close itself. A level trends out of any range fitted on the past (the
    synthetic close ends x73 above its start; a stock over ten years does the same), so a
    z-score fitted on the train split puts test prices at +10; a ratio of two prices means the
    same in every year and is unchanged when the whole series is scaled by k.
    """
    n = len(close)
    log_ret = np.full(n, np.nan)
    log_ret[1:] = np.diff(np.log(close))
    feats = np.full((n, N_MARKET_FEATURES), np.nan)
    feats[:, 0], feats[:, 1], feats[:, 2] = close, volume, log_ret
    for t in range(WARMUP, n):
        window = close[t - 19: t + 1]
        feats[t, 3] = np.std(log_ret[t - 9: t + 1])  # realized vol of the last 10 returns
        feats[t, 4] = math.log(close[t] / close[t - 10])  # 10-step momentum
        feats[t, 5] = close[t] / window.mean() - 1.0  # distance from MA20
        if stationary:
            feats[t, 0] = math.log(close[t] / window.max())
    if stationary:
        feats[:WARMUP, 0] = np.nan
    return feats


def feature_transforms(args: Args) -> list[str]:
    """What the networks see of each feature, in order (named in state_scale_summary.json)."""
    if not args.state_norm:
        return ["raw"] * len(FEATURE_NAMES)
    scale = "robust (x - median)/IQR" if args.state_norm_kind == "robust" else "zscore (x - mean)/std"
    steps = [""] * len(FEATURE_NAMES)
    if args.log_volume:
        steps[VOLUME_IDX] = "log1p, "
    if args.stationary:
        steps[CLOSE_IDX] = "log(close_t / max(close_t-19..t)), "
        steps[EQUITY_IDX] = "equity_t / running peak of the episode - 1, "
    return [f"{step}{scale}, clip +-10" for step in steps]


def stationary_layout(args: Args) -> bool:
    """The stationary step runs under --state-norm unless --no-stationary."""
    return args.state_norm and args.stationary


def observation_names(args: Args) -> list[str]:
    return STATIONARY_FEATURE_NAMES if stationary_layout(args) else FEATURE_NAMES


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

    relative_equity: the last observation is equity / its running peak in the episode - 1 (the
    drawdown, in (-1, 0]) instead of the equity in currency. Equity grows with the episode's
    length (a 1500-step evaluation ends far above anything a 256-step training window saw);
    its drawdown from the peak means the same in any window and for any starting capital.
    """

    metadata = {"render_modes": []}

    def __init__(self, close: np.ndarray, features: np.ndarray, start: int, end: int, episode_length: Optional[int],
                 cost: float = 0.001, risk_penalty: float = 10.0, reward_scale: float = 100.0,
                 initial_equity: float = 1e5, relative_equity: bool = False):
        super().__init__()
        if end - start < 2:
            raise ValueError(f"split [{start}, {end}) is too short for one step")
        self.close, self.features = close, features
        self.start, self.end = start, end  # steps t in [start, end - 1): C_{t+1} stays inside
        self.episode_length = episode_length  # None: the whole split, from its start
        self.cost, self.risk_penalty, self.reward_scale = cost, risk_penalty, reward_scale
        self.initial_equity, self.relative_equity = initial_equity, relative_equity
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (len(FEATURE_NAMES),), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
        self.t = self.t_end = start
        self.position, self.equity = 0.0, initial_equity
        self.peak_equity = initial_equity

    def _obs(self) -> np.ndarray:
        equity = self.equity / self.peak_equity - 1.0 if self.relative_equity else self.equity
        return np.concatenate([self.features[self.t], [self.position, equity]]).astype(np.float32)

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
        self.peak_equity = self.initial_equity
        return self._obs(), {}

    def step(self, action):
        p = float(np.clip(np.asarray(action, dtype=np.float64).reshape(-1)[0], -1.0, 1.0))
        asset_return = self.close[self.t + 1] / self.close[self.t] - 1.0
        sigma = self.features[self.t, VOL_IDX]
        traded = abs(p - self.position)
        pnl = p * asset_return - self.cost * traded
        reward = self.reward_scale * (pnl - self.risk_penalty * p * p * sigma * sigma)
        self.equity *= 1.0 + pnl
        self.peak_equity = max(self.peak_equity, self.equity)
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

    def forward(self, obs: torch.Tensor, with_preactivation: bool = False):
        """pi(s); with_preactivation: (pi(s), u), u the pre-tanh output (kappa = 1 - tanh(u)^2)."""
        u = self.fc_mu(F.relu(self.fc2(F.relu(self.fc1(obs)))))
        action = torch.tanh(u) * self.action_scale + self.action_bias
        return (action, u) if with_preactivation else action


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
    """Ring buffer of rows [obs | next_obs | action | reward | terminated] in one preallocated
    tensor: a step is one row write, a batch one gather (with the agent's own generator)."""

    def __init__(self, capacity: int, obs_dim: int, action_dim: int, device: torch.device):
        self.capacity, self.device = capacity, device
        self.obs_dim, self.action_dim = obs_dim, action_dim
        self.storage = torch.zeros(capacity, 2 * obs_dim + action_dim + 2, device=device)
        self.pos, self.size = 0, 0

    @property
    def obs(self) -> torch.Tensor:
        return self.storage[:, :self.obs_dim]

    def add(self, obs, next_obs, action, reward: float, terminated: bool) -> None:
        self.storage[self.pos] = torch.as_tensor(np.concatenate(
            [obs, next_obs, np.reshape(action, -1), [reward, float(terminated)]]), dtype=torch.float32)
        self.pos = (self.pos + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, batch_size: int, generator: torch.Generator):
        """(obs, actions, rewards, terminations, next_obs) as views of the sampled rows."""
        rows = self.storage[torch.randint(0, self.size, (batch_size,), device=self.device, generator=generator)]
        o, a = self.obs_dim, self.action_dim
        return rows[:, :o], rows[:, 2 * o:2 * o + a], rows[:, -2], rows[:, -1], rows[:, o:2 * o]


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
        self._center_t = torch.as_tensor(self.center, dtype=torch.float32)
        self._scale_t = torch.as_tensor(self.scale, dtype=torch.float32)

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
        if self._center_t.device != obs.device:  # moved once, on the first call on a GPU
            self._center_t, self._scale_t = self._center_t.to(obs.device), self._scale_t.to(obs.device)
        return ((self.transform_raw(obs, self.log_volume) - self._center_t) / self._scale_t).clamp(-self.clip, self.clip)

    def state_dict(self) -> dict:
        return {"center": self.center, "scale": self.scale, "log_volume": self.log_volume, "kind": self.kind,
                "fit_count": self.fit_count, "clip": self.clip}

    @classmethod
    def from_state_dict(cls, state: dict) -> "StateNormalizer":
        return cls(np.asarray(state["center"]), np.asarray(state["scale"]), state["log_volume"], state["kind"],
                   state["fit_count"], state["clip"])


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


# OPTIMIZER --------------------------------------------------------------------------------------
def require_cxx_compiler(device: torch.device) -> None:
    """torch.compile on CPU builds C++ kernels: say so at start, not with a traceback at the first update."""
    if device.type == "cpu" and not any(shutil.which(cxx) for cxx in ("g++", "c++", "clang++")):
        raise UserError("--compile on CPU needs a C++ compiler (e.g. apt install g++); or pass --no-compile")


class Adam:
    """Adam (Kingma & Ba, 2015) on a list of tensors, in place, in eight foreach ops.

    Written out instead of torch.optim.Adam so that a whole step -- loss, gradient and
    optimizer -- is a pure tensor function that torch.compile turns into one graph; at 32-wide
    networks the optimizer's Python bookkeeping costs more than its arithmetic. The step count
    is a 0-dim tensor, so a compiled graph does not recompile as it counts.
    """

    def __init__(self, params: list[torch.Tensor], lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.params, self.lr, self.betas, self.eps = params, lr, betas, eps
        self.exp_avg = [torch.zeros_like(p) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in params]
        self.step_count = torch.zeros((), device=params[0].device)
        for state in (*self.exp_avg, *self.exp_avg_sq, self.step_count):
            # fixed addresses, as torch.optim does for compiled optimizers: a CUDA graph may then
            # update these tensors in place instead of refusing a graph with mutated inputs
            torch._dynamo.mark_static_address(state)

    def step(self, grads: list[torch.Tensor]) -> None:
        b1, b2 = self.betas
        self.step_count.add_(1)
        torch._foreach_lerp_(self.exp_avg, grads, 1 - b1)  # m <- b1 m + (1 - b1) g
        torch._foreach_mul_(self.exp_avg_sq, b2)  # v <- b2 v + (1 - b2) g^2
        torch._foreach_addcmul_(self.exp_avg_sq, grads, grads, 1 - b2)
        # bias-corrected step: theta -= lr/(1 - b1^t) * m / (sqrt(v/(1 - b2^t)) + eps)
        denom = torch._foreach_div(torch._foreach_sqrt(self.exp_avg_sq), (1 - b2 ** self.step_count).sqrt())
        torch._foreach_add_(denom, self.eps)
        torch._foreach_addcdiv_(self.params, torch._foreach_mul(self.exp_avg, -self.lr / (1 - b1 ** self.step_count)), denom)


# INTRINSIC REWARD -------------------------------------------------------------------------------
class RunningMeanStd:
    """Running mean/variance (Chan et al.'s parallel update) of a batch of vectors, float64."""

    def __init__(self, dim: int, device: torch.device):
        self.mean = torch.zeros(dim, dtype=torch.float64, device=device)
        self.var = torch.ones(dim, dtype=torch.float64, device=device)
        # A tensor updated in place, so the compiled RND step neither recompiles as it counts nor
        # loses the state it mutates. Shape (1,), not 0-dim: torch.compile (2.13) silently drops
        # in-place updates of a 0-dim float64 CPU tensor.
        self.count = torch.zeros(1, dtype=torch.float64, device=device)

    def update(self, batch: torch.Tensor) -> None:
        batch = batch.detach().to(torch.float64)
        n = batch.shape[0]
        total = self.count + n
        delta = batch.mean(0) - self.mean
        m2 = self.var * self.count + batch.var(0, unbiased=False) * n + delta.square() * (self.count * n / total)
        self.mean.add_(delta * (n / total))
        self.var.copy_(m2 / total)
        self.count.add_(n)

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
        self.predictor = mlp().requires_grad_(False)  # gradients come from torch.func.grad
        self.predictor_params = dict(self.predictor.named_parameters())
        self.optimizer = Adam(list(self.predictor_params.values()), lr)
        self.input_stats = RunningMeanStd(in_dim, device)
        self.error_stats = RunningMeanStd(1, device)

    def inputs(self, obs: torch.Tensor, actions: torch.Tensor, next_obs: torch.Tensor) -> torch.Tensor:
        return next_obs if self.kind == "rnd" else torch.cat([obs, actions], dim=-1)

    def _error(self, x: torch.Tensor, predictor_params: Optional[dict] = None) -> torch.Tensor:
        x = ((x - self.input_stats.mean.float()) / self.input_stats.std).clamp(-5.0, 5.0)
        prediction = torch.func.functional_call(self.predictor, predictor_params or self.predictor_params, (x,))
        return (prediction - self.target(x)).square().mean(dim=-1)

    def prediction_error(self, obs, actions, next_obs) -> torch.Tensor:
        """Squared error of the predictor on normalized, clipped inputs (the novelty signal)."""
        return self._error(self.inputs(obs, actions, next_obs))

    def bonus(self, obs, actions, next_obs) -> torch.Tensor:
        """r_int for a training batch: update the input stats, score, train the predictor on it.

        Pure tensor code (no Python state changes), so it runs inside the agent's compiled critic step.
        """
        x = self.inputs(obs, actions, next_obs)
        self.input_stats.update(x)

        def loss(predictor_params):
            error = self._error(x, predictor_params)
            return error.mean(), error

        grads, (_, error) = torch.func.grad_and_value(loss, has_aux=True)(self.predictor_params)
        with torch.no_grad():
            self.optimizer.step(list(grads.values()))
        self.error_stats.update(error[:, None])
        return error / self.error_stats.std


class IntrinsicReward:
    """The reward hook: r_tot = r_env + w * r_int, fresh on each sampled batch; keeps the mean
    of r_tot - r_env over all training batches (intrinsic_mean_delta), as a tensor (no sync)."""

    def __init__(self, rnd: RND, coef: float, device: torch.device):
        self.rnd, self.coef = rnd, coef
        # tensors updated in place (shape (1,): see RunningMeanStd.count), so the hook can run
        # inside the compiled critic step
        self.delta_sum = torch.zeros(1, dtype=torch.float64, device=device)
        self.batches = torch.zeros(1, dtype=torch.float64, device=device)

    def __call__(self, obs, actions, rewards, next_obs) -> torch.Tensor:
        r_tot = rewards + self.coef * self.rnd.bonus(obs, actions, next_obs)
        self.delta_sum.add_((r_tot - rewards).mean())
        self.batches.add_(1)
        return r_tot

    def mean_delta(self) -> float:
        return float(self.delta_sum) / max(float(self.batches), 1.0)


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


def preactivation_penalty(args: Args) -> float:
    """beta: as given, else 1e-3 under --state-norm and 0 on raw features (plain TD3: the freeze demo).

    On raw features u is ~1e3-1e5, so even a small beta * u^2 has a gradient large enough to
    flip the sign of a saturated actor now and then: it would blur the demo of a frozen actor.
    """
    if args.preactivation_penalty is not None:
        return args.preactivation_penalty
    return 1e-3 if args.state_norm else 0.0


class TD3:
    """One agent: actor, twin critic, targets, optimizers, its own random generator.

    Each agent draws exploration noise, smoothing noise and replay indices from its own
    torch.Generator, so two agents built with the same seed stay bit-identical as long as they
    see the same rewards, whatever else runs in the process.
    """

    def __init__(self, obs_dim: int, args: Args, device: torch.device, normalizer: Optional[StateNormalizer],
                 seed: int, reward_fn=None):
        torch.manual_seed(seed)  # identical initial weights for every agent of a paired run
        low, high = np.array([-1.0], np.float32), np.array([1.0], np.float32)
        self.args, self.device, self.normalizer = args, device, normalizer
        # reward_fn(obs, actions, rewards, next_obs) -> r_tot is the hook where an intrinsic reward
        # enters: the buffer stores r_env, r_tot is computed fresh on every sampled batch.
        self.reward_fn = reward_fn
        self.generator = torch.Generator(device=device).manual_seed(seed)
        # requires_grad off: gradients come from torch.func.grad, so autograd need not record
        # every forward (acting, evaluation, targets) for a backward that never comes.
        self.actor = Actor(obs_dim, low, high, args.hidden_size).to(device).requires_grad_(False)
        self.qf = TwinQ(obs_dim, 1, args.hidden_size).to(device).requires_grad_(False)
        self.actor_target = copy.deepcopy(self.actor)
        self.qf_target = copy.deepcopy(self.qf)
        self.action_low = torch.as_tensor(low, device=device)
        self.action_high = torch.as_tensor(high, device=device)
        self.actor_params = dict(self.actor.named_parameters())
        self.qf_params = dict(self.qf.named_parameters())
        self.q_optimizer = Adam(list(self.qf_params.values()), args.learning_rate)
        self.actor_optimizer = Adam(list(self.actor_params.values()), args.learning_rate)
        self.n_updates = 0
        self.preactivation_penalty = preactivation_penalty(args)
        self._sources = list(self.actor.parameters()) + list(self.qf.parameters())
        self._targets = list(self.actor_target.parameters()) + list(self.qf_target.parameters())
        self.critic_step, self.actor_step = self._critic_step, self._actor_step
        if args.compile:  # each step one graph (the reward hook included): inductor fuses the many
            # small ops of 32-wide networks, and the RND bonus costs no extra Python round trip
            if device.type == "cpu":  # the graph's launcher in C++ too: no Python between kernels
                torch._inductor.config.cpp_wrapper = True
            self.critic_step = torch.compile(self._critic_step, fullgraph=True)
            self.actor_step = torch.compile(self._actor_step, fullgraph=True)

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

    def update(self, batch) -> dict:
        """One critic step (+ actor and targets every policy_frequency-th call), on raw observations."""
        obs, actions, rewards, terminations, next_obs = batch
        noise = smoothing_noise(actions, self.args.policy_noise, self.args.noise_clip, self.actor.action_scale,
                                self.generator)
        qf_losses, q_means, rewards, obs = self.critic_step(obs, actions, rewards, terminations, next_obs, noise)
        self.n_updates += 1
        metrics = {"qf_losses": qf_losses, "q_means": q_means, "rewards": rewards}
        if self.n_updates % self.args.policy_frequency == 0:  # delayed policy updates
            metrics["actor_loss"] = self.actor_step(obs)
        return metrics

    def _critic_step(self, obs, actions, rewards, terminations, next_obs, noise):
        """r_tot from the hook (on raw states), then the clipped double-Q regression of both critics
        on the smoothed target and one Adam step. Returns the losses, the mean Q values, r_tot and
        the normalized states (for the actor step)."""
        if self.reward_fn is not None:
            rewards = self.reward_fn(obs, actions, rewards, next_obs)
        obs, next_obs = self.norm(obs), self.norm(next_obs)
        with torch.no_grad():
            y = td3_target(self.actor_target, self.qf_target, next_obs, rewards, terminations, noise,
                           self.args.gamma, self.action_low, self.action_high)

        def loss(qf_params):
            q = torch.func.functional_call(self.qf, qf_params, (obs, actions))
            qf_losses = (q - y).square().mean(dim=1)
            return qf_losses.sum(), (qf_losses, q.mean(dim=1))

        grads, (_, (qf_losses, q_means)) = torch.func.grad_and_value(loss, has_aux=True)(self.qf_params)
        with torch.no_grad():
            self.q_optimizer.step(list(grads.values()))
        return qf_losses, q_means, rewards, obs

    def _actor_step(self, obs):
        """Policy gradient through Q1 (+ the pre-activation penalty) on normalized states, one Adam
        step, Polyak targets."""
        def loss(actor_params):
            actions_pi, pre = torch.func.functional_call(self.actor, actor_params, (obs,), {"with_preactivation": True})
            actor_loss = -self.qf.q1(obs, actions_pi).mean()
            if self.preactivation_penalty:  # at the bound kappa ~ 0 and the critic's gradient no longer
                # reaches the actor; beta * u^2 pulls it back, and inside the bound it is tiny
                actor_loss = actor_loss + self.preactivation_penalty * pre.square().mean()
            return actor_loss

        grads, actor_loss = torch.func.grad_and_value(loss)(self.actor_params)
        with torch.no_grad():
            self.actor_optimizer.step(list(grads.values()))
            soft_update_(self._targets, self._sources, self.args.tau)
        return actor_loss

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
            "observations": np.asarray(observations), "actions": np.array(actions), "positions": np.array(positions), "equity": np.array(equity),
            "q1_mean": float(q1.mean()), "saturation": action_saturation_stats(np.array(actions))}


def position_returns(close: np.ndarray, positions: np.ndarray, bounds: tuple, cost: float) -> np.ndarray:
    """Step returns of a fixed position schedule over a split, the agents' cost model: p_t earns
    C_{t+1}/C_t - 1 and pays cost * |p_t - p_{t-1}|, starting flat."""
    start, end = bounds
    asset = close[start + 1: end] / close[start: end - 1] - 1.0
    traded = np.abs(np.diff(np.concatenate([[0.0], positions])))
    return positions * asset - cost * traded


def volatility_filter_positions(realized_vol: np.ndarray, threshold: float) -> np.ndarray:
    """The rule baseline: long (1) while the 10-step realized vol is below the threshold, else flat.

    The threshold is the median realized vol of the train split: a bear regime is twice as
    volatile, so low vol says "bull" without looking ahead.
    """
    return (realized_vol < threshold).astype(np.float64)


def benchmark_metrics(close: np.ndarray, features: np.ndarray, bounds: tuple, vol_threshold: float,
                      args: Args) -> dict:
    """Buy-and-hold (one entry cost), flat and the volatility filter over the agents' evaluation steps."""
    start, end = bounds
    schedules = {"buy_and_hold": np.ones(end - start - 1), "flat": np.zeros(end - start - 1),
                 "vol_filter": volatility_filter_positions(features[start: end - 1, VOL_IDX], vol_threshold)}
    out = {"metrics": {}, "equity": {}}
    for name, positions in schedules.items():
        returns = position_returns(close, positions, bounds, args.cost_bp * 1e-4)
        out["metrics"][name] = performance_metrics(returns, positions, args.periods_per_year)
        out["equity"][name] = np.concatenate([[1.0], np.cumprod(1.0 + returns)])
    return out


# FILES AND PLOTS --------------------------------------------------------------------------------
def replace_atomic(path: str, write, tmp_suffix: str = ".tmp") -> None:
    """write(tmp) then os.replace: a reader never sees half a file, and no error (nor a second
    Ctrl-C) leaves the temp file behind."""
    tmp = f"{path}{tmp_suffix}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json_atomic(path: str, obj) -> None:
    text = json.dumps(obj, indent=2, allow_nan=False)  # a NaN fails here, before any file is touched

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    replace_atomic(path, write)


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
    ax.set_ylabel("equity")
    ax.set_title(f"{split} split: agents against buy and hold, the volatility filter and flat")
    ax.legend()
    ax_pos.set_ylabel("position p_t")
    ax_pos.set_xlabel(f"{split} step (red dots: raw actor output at the bound, |a| ≥ 0.999)")
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
@dataclass
class MarketData:
    """The market in the run's observation layout, and what is fitted on its train split."""

    close: np.ndarray
    features: np.ndarray  # market_features() in the run's layout (raw or stationary)
    splits: dict  # name -> [start, end)
    vol_threshold: float  # the rule baseline's threshold: median realized vol of the train split
    source: str  # for the run name: the CSV's file name or synthetic{market_seed}


def load_market(args: Args) -> tuple[Market, str]:
    if args.data_csv:
        return load_csv(args.data_csv, args.accept_suspect_rows), os.path.basename(args.data_csv)
    return synthetic_market(args.market_steps, args.market_seed), f"synthetic{args.market_seed}"


def prepare_data(args: Args, market: Market, source: str) -> MarketData:
    """Features in the run's layout; the three chronological splits and "all" (every usable row)."""
    features = market_features(market.close, market.volume, stationary=stationary_layout(args))
    splits = {**split_bounds(len(market.close), args.train_frac, args.val_frac), "all": (WARMUP, len(market.close))}
    lo, hi = splits["train"]
    return MarketData(market.close, features, splits, float(np.median(features[lo:hi, VOL_IDX])), source)


def check_split_lengths(data: MarketData, args: Args, names: tuple) -> None:
    for split in names:
        lo, hi = data.splits[split]
        if hi - lo < 2 * max(args.episode_length // 4, 10):
            raise UserError(f"the {split} split has {hi - lo} steps; use more data or change --train-frac/--val-frac")


def make_env(data: MarketData, bounds: tuple, args: Args, training: bool) -> TradingEnv:
    return TradingEnv(data.close, data.features, *bounds, episode_length=args.episode_length if training else None,
                      cost=args.cost_bp * 1e-4, risk_penalty=args.risk_penalty, reward_scale=args.reward_scale,
                      initial_equity=args.initial_equity, relative_equity=stationary_layout(args))


def training_values(metrics: dict) -> dict:
    """The update's losses, mean Q-values and max |r_tot| as floats (reading them back syncs)."""
    q_means, qf_losses = metrics["q_means"].tolist(), metrics["qf_losses"].tolist()
    values = {"qf1_values": q_means[0], "qf2_values": q_means[1], "qf1_loss": qf_losses[0], "qf2_loss": qf_losses[1],
              "reward_abs_max": metrics["rewards"].abs().max().item()}
    if "actor_loss" in metrics:
        values["actor_loss"] = metrics["actor_loss"].item()
    return values


class TrainingLog:
    """One agent's plumbing: TensorBoard, the learning-phase clock, validation history, progress lines."""

    def __init__(self, name: str, args: Args, run_dir: str):
        self.name, self.args = name, args
        self.writer = SummaryWriter(os.path.join(run_dir, name))
        self.writer.add_text("hyperparameters",
                             "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items()))
        self.ep_return, self.ep_length, self.history = 0.0, 0, []
        self.last_metrics: Optional[dict] = None
        self.learn_seconds, self.learn_steps = 0.0, 0
        self.first_update_seconds: Optional[float] = None
        self.start = self.last_print = time.time()
        self.clock = time.perf_counter()

    def env_step(self, reward: float, done: bool, step: int) -> None:
        self.ep_return += reward
        self.ep_length += 1
        if done:
            self.writer.add_scalar("charts/episodic_return", self.ep_return, step)
            self.writer.add_scalar("charts/episodic_length", self.ep_length, step)
            self.ep_return, self.ep_length = 0.0, 0

    def update(self, metrics: dict, agent: "TD3", intrinsic: Optional[IntrinsicReward], step: int) -> None:
        """CleanRL's loss curves, read back (and checked for divergence) every LOG_EVERY_UPDATES updates."""
        self.last_metrics = metrics
        if agent.n_updates % LOG_EVERY_UPDATES:
            return  # reading a tensor back (.item()) waits for it: only every LOG_EVERY_UPDATES updates
        values = training_values(metrics)
        self.check_finite(agent, step, values)
        for name, value in values.items():
            if name != "reward_abs_max":
                self.writer.add_scalar(f"losses/{name}", value, step)
        self.writer.add_scalar("losses/qf_loss", (values["qf1_loss"] + values["qf2_loss"]) / 2, step)
        self.writer.add_scalar("charts/SPS", int(self.sps), step)
        if intrinsic is not None:
            self.writer.add_scalar("charts/intrinsic_mean_delta", intrinsic.mean_delta(), step)

    def check_finite(self, agent: "TD3", step: int, values: Optional[dict] = None) -> None:
        """Raise Diverged if a loss, a mean Q-value, r_tot (the last update's unless given) or a
        weight is NaN/inf: at every logging interval and before every evaluation."""
        if values is None:
            values = training_values(self.last_metrics) if self.last_metrics is not None else {}
        bad = next(((name, value) for name, value in values.items() if not math.isfinite(value)), None)
        params = list(agent.actor_params.values()) + list(agent.qf_params.values())
        if bad is None and not bool(torch.isfinite(torch.stack([p.sum() for p in params])).all()):
            bad = ("a network weight", math.nan)
        if bad is None:
            return
        causes = {  # cause: whether this run's numbers point at it
            f"too high a learning rate (--learning-rate {self.args.learning_rate:g}; the default is 3e-5)":
                self.args.learning_rate > DIVERGENCE_HINTS["learning_rate"],
            f"the reward scale (|r_tot| up to {values.get('reward_abs_max', math.nan):.3g}; --reward-scale "
            f"{self.args.reward_scale:g}, --intrinsic-coef {self.args.intrinsic_coef:g})":
                values.get("reward_abs_max", 0.0) > DIVERGENCE_HINTS["reward"],
        }
        if not self.args.state_norm:  # never advise an option the run already uses
            causes["unnormalized inputs (price and equity levels ~1e2-1e5; use --state-norm)"] = True
        likely = [cause for cause, flagged in causes.items() if flagged] or list(causes)
        raise Diverged(f"[{self.name}] training diverged at step {step}: {bad[0]} = {bad[1]:g}. "
                       f"Likely cause: {'; or '.join(likely)}", self.name, step)

    def evaluation(self, result: dict, intrinsic: Optional[IntrinsicReward], step: int) -> dict:
        entry = {"global_step": step, **result["saturation"], "val_sharpe": result["metrics"]["sharpe"],
                 "val_total_return": result["metrics"]["total_return"], "q1_mean": result["q1_mean"]}
        if intrinsic is not None:
            entry["intrinsic_mean_delta"] = intrinsic.mean_delta()
        self.history.append(entry)
        self.writer.add_scalar("eval/sharpe", entry["val_sharpe"], step)
        self.writer.add_scalar("eval/total_return", entry["val_total_return"], step)
        for key in ("near_bound_ratio", "kappa_mean"):
            self.writer.add_scalar(f"audit/{key}", entry[key], step)
        self.progress(step, force=True)
        return entry

    def end_step(self, step: int, learning: bool) -> None:
        """Close the step on the learning-phase clock (evaluation excluded) and print progress now and then."""
        now = time.perf_counter()
        if learning and self.first_update_seconds is None:  # with --compile: the compile, timed on its own
            self.first_update_seconds = now - self.clock
        elif learning:
            self.learn_seconds += now - self.clock
            self.learn_steps += 1
        self.clock = now
        self.progress(step)

    @property
    def sps(self) -> float:
        return self.learn_steps / self.learn_seconds if self.learn_seconds else 0.0

    def progress(self, step: int, force: bool = False) -> None:
        if not force and time.time() - self.last_print <= PROGRESS_EVERY_SECONDS:
            return
        last = self.history[-1] if self.history else None
        if self.learn_seconds > 0:
            eta = (self.args.total_timesteps - step) / self.sps
            rate, eta_text = f"learning SPS {self.sps:.0f}", f"{int(eta // 60)}m{int(eta % 60):02d}s"
        else:  # uniform-random phase: no update timed yet, so no honest ETA
            rate, eta_text = f"random-phase SPS {step / (time.time() - self.start):.0f}", "? (learning not started)"
        print(f"[{self.name}] step {step}/{self.args.total_timesteps} | {rate} | val Sharpe "
              f"{last['val_sharpe']:.2f} | near-bound {last['near_bound_ratio']:.3f} | ETA {eta_text}"
              if last else f"[{self.name}] step {step}/{self.args.total_timesteps} | {rate} | ETA {eta_text}",
              flush=True)
        self.last_print = time.time()
        self.clock = time.perf_counter()  # the time spent evaluating and printing is not learning time

    def close(self) -> None:
        self.writer.close()


class BestCheckpoint:
    """Early stopping on the validation split: the actor and critic with the best validation Sharpe.

    The reward's noise is 10x its action-dependent drift, so a critic trained long enough fits
    the noise of the 7000 train steps; validation Sharpe says when that starts.
    """

    def __init__(self):
        self.sharpe, self.step, self.state = -math.inf, 0, None

    def offer(self, sharpe: float, agent: "TD3", step: int) -> None:
        if sharpe > self.sharpe:  # ties keep the earlier checkpoint
            self.sharpe, self.step = sharpe, step
            self.state = copy.deepcopy({"actor": agent.actor.state_dict(), "qf": agent.qf.state_dict()})

    def restore(self, agent: "TD3") -> None:
        agent.actor.load_state_dict(self.state["actor"])
        agent.qf.load_state_dict(self.state["qf"])


def train_agent(name: str, args: Args, data: MarketData, normalizer: Optional[StateNormalizer],
                device: torch.device, run_dir: str, intrinsic: Optional[IntrinsicReward] = None,
                stop: Optional[StopOnSignal] = None) -> dict:
    """Train one agent on the train split; evaluate on the validation split every eval_frequency steps.

    Stops early, at a step boundary, when `stop` has caught a signal ("steps" says how far it got);
    raises Diverged when training stops being finite.

    Every agent of a run starts from the same seeds (weights, noise, replay indices, episode
    starts), so the only difference between the baseline and the intrinsic agent is w * r_int.
    """
    random.seed(args.seed)
    np.random.seed(args.seed)
    obs_dim = len(FEATURE_NAMES)
    agent = TD3(obs_dim, args, device, normalizer, args.seed, reward_fn=intrinsic)
    rb = ReplayBuffer(min(args.buffer_size, args.total_timesteps), obs_dim, 1, device)
    env = make_env(data, data.splits["train"], args, training=True)
    val_env = make_env(data, data.splits["val"], args, training=False)
    env.action_space.seed(args.seed)
    log, best, val_results = TrainingLog(name, args, run_dir), BestCheckpoint(), []
    obs, _ = env.reset(seed=args.seed)
    steps_done = 0
    for global_step in range(1, args.total_timesteps + 1):
        if stop is not None and stop.signum is not None:
            break
        learning = global_step > args.learning_starts
        # ALGO LOGIC: act (uniform random, then pi(s) + exploration noise), step, store r_env
        action = agent.explore(obs[None])[0] if learning else env.action_space.sample()
        next_obs, reward, terminated, truncated, _ = env.step(action)
        rb.add(obs, next_obs, action, reward, terminated)
        log.env_step(reward, terminated or truncated, global_step)
        obs = env.reset()[0] if terminated or truncated else next_obs
        # ALGO LOGIC: one TD3 update per env step; r_tot = r_env + w * r_int is made per sampled batch
        if learning:
            log.update(agent.update(rb.sample(args.batch_size, agent.generator)), agent, intrinsic,
                       global_step)
        if global_step % args.eval_frequency == 0 or global_step == args.total_timesteps:
            log.check_finite(agent, global_step)  # never evaluate (or keep as best) a diverged network
            val_results.append(evaluate(agent, val_env, args))
            entry = log.evaluation(val_results[-1], intrinsic, global_step)
            best.offer(entry["val_sharpe"], agent, global_step)
        log.end_step(global_step, learning)
        steps_done = global_step
    log.close()
    return {"steps": steps_done, "agent": agent, "best": best, "history": log.history, "val_results": val_results, "intrinsic": intrinsic,
            "sps_learning_phase": log.sps, "first_update_seconds": log.first_update_seconds,
            "wall_time_s": time.time() - log.start}


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


def input_fix(args: Args) -> Optional[str]:
    """The input change that can free an actor stuck at its bound, or None if the run already has it
    (advice never tells a run to use an option it already uses)."""
    if not args.state_norm:
        return "use --state-norm"
    if not stationary_layout(args):
        return "make the levels relative (drop --no-stationary)"
    return None


def diagnose(paired: dict, near_bound: float, initial_equity: float, shift: Optional[str] = None,
             fix: Optional[str] = "use --state-norm") -> dict:
    """R1-R4 of SPEC 3.6, plus what to change (a distribution shift, when found, comes first).

    fix: input_fix(args), the input change still open to the run (None: inputs already normalized)."""
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
    if near_bound >= COLLAPSE_RATIO and fix:
        advice = ("the actor sits at its bound (kappa ~ 0, no gradient reaches it): check state_scale_summary.json "
                  f"(p99_abs_spread) and {fix} before judging the intrinsic reward")
    elif near_bound >= COLLAPSE_RATIO:
        advice = ("the actor sits at its bound (kappa ~ 0) although its inputs are normalized and relative: check the "
                  "data (a flat or trendless price gives it nothing to follow), then a lower --learning-rate or a "
                  "larger --preactivation-penalty")
    elif frozen and moved:
        advice = ("the actor can move (near-bound low) yet ignores r_int: the intrinsic term is action-independent "
                  "and only raises every action's value; redesign it (e.g. --intrinsic-kind sa-rnd) rather than "
                  "tuning normalization")
    elif not moved:
        advice = "nothing to audit: raise --intrinsic-coef or pick --intrinsic-kind rnd/sa-rnd"
    else:
        advice = "the intrinsic reward changes the policy: judge it by the test Sharpe and drawdown of both agents"
    return {"code": code, "text": text, "advice": f"{shift}; then: {advice}" if shift else advice}


# SHIFT AUDIT: do the evaluation states stay inside the range the normalizer was fitted on? -------
SHIFT_CLIP_RATIO = 0.01  # a feature at the +-clip on >= 1% of steps has left the fitted range
SHIFT_NEAR_BOUND = 0.5  # ... or the actor at its bound on half the steps


def network_inputs(observations: np.ndarray, normalizer: Optional[StateNormalizer]) -> np.ndarray:
    """What the networks see of raw observations: normalized and clipped, or raw without --state-norm."""
    if normalizer is None:
        return np.asarray(observations, dtype=np.float64)
    return normalizer(torch.as_tensor(np.asarray(observations), dtype=torch.float32)).double().numpy()


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


def distribution_shift(shift: dict, saturation: dict, fix: Optional[str] = "make the levels relative (drop --no-stationary)"
                       ) -> Optional[str]:
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
        parts.append(f"the actor is at its bound on {test_near:.0%} of test steps (validation {val_near:.0%})")
        remedy = (f"{fix} rather than retuning the agent" if fix else
                  "the test period lies outside what the train split showed: train on more or more recent data")
        return (f"distribution shift ({name}): " + ", ".join(parts) + ": an input left the range fitted on the "
                f"train split; {remedy}")
    return None


# REPORT: the files and the table, after training or for --eval-only ------------------------------
def evaluation_report(args: Args, run_dir: str, data: MarketData, agents: dict, normalizer: Optional[StateNormalizer],
                      fit_range: tuple, splits: list[str]) -> dict:
    """Evaluate every agent on each split; eval_{split}.json, the plots of the last split, the shift audit."""
    names = observation_names(args)
    results = {split: {name: evaluate(agent, make_env(data, data.splits[split], args, training=False), args)
                       for name, agent in agents.items()} for split in splits}
    main_split = splits[-1]
    bench = benchmark_metrics(data.close, data.features, data.splits[main_split], data.vol_threshold, args)
    eval_json = {"split": main_split, "steps": data.splits[main_split][1] - data.splits[main_split][0] - 1,
                 "agents": {name: res["metrics"] for name, res in results[main_split].items()},
                 **bench["metrics"], "vol_filter_threshold": data.vol_threshold}
    write_json_atomic(os.path.join(run_dir, f"eval_{main_split}.json"), eval_json)
    plot_equity(results[main_split], bench["equity"], args.initial_equity, main_split,
                os.path.join(run_dir, "eval_equity.png"))
    plot_saturation(results[main_split], os.path.join(run_dir, "action_saturation.png"))
    clip = normalizer.clip if normalizer else None
    shift = {name: {split: shift_stats(network_inputs(results[split][name]["observations"], normalizer),
                                       *fit_range, clip, names) for split in splits} for name in agents}
    saturation = {name: {split: results[split][name]["saturation"] for split in splits} for name in agents}
    return {"results": results, "eval": eval_json, "shift": shift, "saturation": saturation,
            "distribution_shift": distribution_shift(shift, saturation, input_fix(args))}


def write_scale_summary(path: str, args: Args, ref: np.ndarray, normalizer: Optional[StateNormalizer],
                        shift: Optional[dict] = None) -> None:
    names = observation_names(args)
    pre = scale_stats(ref, names)
    post = scale_stats(network_inputs(ref, normalizer), names)
    summary = {"mode": args.state_norm_kind if args.state_norm else "none",
               "log_volume": bool(args.state_norm and args.log_volume),
               "stationary": stationary_layout(args), "feature_names": names,
               "feature_transforms": dict(zip(names, feature_transforms(args))), "fit_sample_count": len(ref),
               "pre_stats": pre, "post_stats": post,
               "p99_abs_spread": {"pre": p99_abs_spread(pre), "post": p99_abs_spread(post)}}
    if shift is not None:
        summary["shift"] = {"clip": normalizer.clip if normalizer else None,
                            "clip_ratio_threshold": SHIFT_CLIP_RATIO, "near_bound_threshold": SHIFT_NEAR_BOUND,
                            "agents": shift["shift"], "distribution_shift": shift["distribution_shift"]}
    write_json_atomic(path, summary)


def save_model(path: str, args: Args, data: MarketData, agents: dict, fit_range: tuple) -> None:
    model = {"format": MODEL_FORMAT, "args": asdict(args), "feature_names": observation_names(args),
             "vol_filter_threshold": data.vol_threshold, "fit_range": [r.tolist() for r in fit_range],
             "agents": {name: agent.state_dict() for name, agent in agents.items()}}
    replace_atomic(path, lambda tmp: torch.save(model, tmp))  # never a half-written model


def main(args: Args) -> dict:
    """Fit the normalizer, train every agent, keep each one's best validation checkpoint, test, audit."""
    validate_args(args)
    start = time.time()
    device = setup_torch(args)
    if args.eval_only:
        return evaluate_checkpoint(args, device)
    if args.compile:
        require_cxx_compiler(device)
    data = prepare_data(args, *load_market(args))
    check_split_lengths(data, args, ("train", "val", "test"))
    # --state-norm: fitted once on a random-action rollout over the train split, then frozen.
    ref = reference_states(make_env(data, data.splits["train"], args, training=False), args.seed)
    normalizer = StateNormalizer.fit(ref, args.state_norm_kind, args.log_volume) if args.state_norm else None
    run_dir = make_run_dir(args, data.source, "")
    write_scale_summary(os.path.join(run_dir, "state_scale_summary.json"), args, ref, normalizer)

    trained = {}
    with StopOnSignal() as stop:  # Ctrl-C / SIGTERM: end the step, write summary.json, exit 130 / 143
        try:
            for name in agent_names(args):  # the baseline (w = 0) and the intrinsic agent, on identical seeds
                intrinsic = None
                if name == "intrinsic":
                    intrinsic = IntrinsicReward(RND(args.intrinsic_kind, len(FEATURE_NAMES), device, args.seed),
                                                args.intrinsic_coef, device)
                trained[name] = train_agent(name, args, data, normalizer, device, run_dir, intrinsic, stop)
                if stop.signum is not None:
                    return end_early(args, run_dir, start, {n: t["steps"] for n, t in trained.items()}, signum=stop.signum)
        except Diverged as err:
            steps = {**{n: t["steps"] for n, t in trained.items()}, err.agent: err.step}
            return end_early(args, run_dir, start, steps, error=str(err))
    agents = {name: t["agent"] for name, t in trained.items()}
    # The paired audit asks what training with r_int did to the policy: the final agents, on test.
    test_env = make_env(data, data.splits["test"], args, training=False)
    final_test = {name: evaluate(agent, test_env, args) for name, agent in agents.items()}
    selected_step = {name: args.total_timesteps for name in trained}
    if args.keep_best:  # the performance table asks how good the kept agent is: best validation Sharpe
        for name, t in trained.items():
            t["best"].restore(t["agent"])
            selected_step[name] = t["best"].step
    inputs = network_inputs(ref, normalizer)  # the range the networks saw fitted: the shift audit's yardstick
    fit_range = (inputs.min(axis=0), inputs.max(axis=0))
    report = evaluation_report(args, run_dir, data, agents, normalizer, fit_range, ["val", "test"])
    write_scale_summary(os.path.join(run_dir, "state_scale_summary.json"), args, ref, normalizer, report)
    # summary/history: the eval trajectory during training (validation split), summary = last eval;
    # selected: the checkpoint kept (best validation Sharpe); test: the same statistics on the test split.
    saturation = {"near_bound_threshold": NEAR_BOUND, "collapse_threshold": COLLAPSE_RATIO,
                  "summary_split": "val", "history_split": "val", "test_split": "test",
                  "agents": {name: {"summary": t["history"][-1], "history": t["history"],
                                    "final_test": final_test[name]["saturation"], "selected_step": selected_step[name],
                                    "selected_val": report["saturation"][name]["val"],
                                    "test": report["saturation"][name]["test"]} for name, t in trained.items()},
                  "paired": None, "diagnosis": None, "distribution_shift": report["distribution_shift"]}
    if "baseline" in trained and "intrinsic" in trained:
        paired = {**paired_metrics(final_test["baseline"], final_test["intrinsic"]),
                  "intrinsic_mean_delta": trained["intrinsic"]["intrinsic"].mean_delta()}
        per_eval = [{"global_step": h["global_step"], **paired_metrics(b, i), "intrinsic_mean_delta": h["intrinsic_mean_delta"]}
                    for b, i, h in zip(trained["baseline"]["val_results"], trained["intrinsic"]["val_results"],
                                       trained["intrinsic"]["history"])]
        for key in ("action_equal_ratio", "eval_value_mae", "intrinsic_mean_delta", "q1_delta_mean"):
            paired[f"{key}_mean"] = float(np.mean([row[key] for row in per_eval]))
        paired["history"] = per_eval
        near = max(res["saturation"]["near_bound_ratio"] for res in final_test.values())
        saturation["paired"] = paired
        saturation["diagnosis"] = diagnose(paired, near, args.initial_equity, report["distribution_shift"],
                                           input_fix(args))
    write_json_atomic(os.path.join(run_dir, "td3_action_saturation.json"), saturation)
    if args.save_model:
        save_model(os.path.join(run_dir, "model.pt"), args, data, agents, fit_range)

    summary = {"status": "completed", "exit_code": EXIT_CODES["completed"],
               "run_dir": run_dir, "seed": args.seed, "state_norm": args.state_norm,
               "stationary": stationary_layout(args), "total_timesteps": args.total_timesteps,
               "test": report["eval"],
               "val": {name: res["metrics"] for name, res in report["results"]["val"].items()},
               "selected_step": selected_step,
               "saturation": {name: t["history"][-1] for name, t in trained.items()},
               "saturation_test": {name: res["saturation"] for name, res in report["results"]["test"].items()},
               "paired": None if saturation["paired"] is None else {k: v for k, v in saturation["paired"].items() if k != "history"},
               "diagnosis": saturation["diagnosis"], "distribution_shift": report["distribution_shift"],
               "sps_learning_phase": {name: round(t["sps_learning_phase"], 1) for name, t in trained.items()},
               "first_update_seconds": {name: round(t["first_update_seconds"] or 0.0, 2) for name, t in trained.items()},
               "wall_time_s": round(time.time() - start, 2)}
    write_json_atomic(os.path.join(run_dir, "summary.json"), summary)
    print_table(report["eval"], summary["saturation_test"], summary["selected_step"], summary["paired"],
                summary["diagnosis"], summary["distribution_shift"])
    print(f"-> {run_dir} ({summary['wall_time_s']:.0f} s)")
    return summary


def end_early(args: Args, run_dir: str, start: float, steps: dict, error: Optional[str] = None,
              signum: Optional[int] = None) -> dict:
    """A run stopped by a signal or by divergence: summary.json says how and how far, nothing else
    is evaluated (a half-trained pair would audit nothing)."""
    status = "diverged" if error else "interrupted"
    summary = {"status": status, "exit_code": 128 + signum if signum is not None else EXIT_CODES[status],
               "run_dir": run_dir, "seed": args.seed, "total_timesteps": args.total_timesteps, "steps": steps,
               "wall_time_s": round(time.time() - start, 2)}
    if error:
        summary["error"] = error
    else:
        summary["signal"] = signal.Signals(signum).name
    write_json_atomic(os.path.join(run_dir, "summary.json"), summary)
    if error:
        print(f"error: {error}", file=sys.stderr)
    else:
        print(f"interrupted by {summary['signal']} after {steps} of {args.total_timesteps} steps per agent: "
              f"nothing evaluated; runs are short, start again -> {run_dir}", file=sys.stderr)
    return summary


def setup_torch(args: Args) -> torch.device:
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    return torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")


def make_run_dir(args: Args, source: str, suffix: str) -> str:
    run_dir = os.path.join(args.runs_dir, f"{source}__{args.exp_name}{suffix}__{args.seed}__{int(time.time())}")
    os.makedirs(run_dir, exist_ok=True)
    return run_dir


# EVAL-ONLY: a saved agent on other data ----------------------------------------------------------
MODEL_FORMAT = "td3_intrinsic_trading/2"  # bumped when the observation layout or the file's keys change


def load_checkpoint(path: str) -> dict:
    """model.pt written by --save-model; anything else is one clear UserError."""
    if not os.path.isfile(path):
        raise UserError(f"--checkpoint '{path}' does not exist (write one with --save-model)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a truncated file, a zip of something else, ...
        raise UserError(f"--checkpoint '{path}' is not a readable model.pt ({type(err).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != MODEL_FORMAT:
        found = ckpt.get("format", "no format tag") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise UserError(f"--checkpoint '{path}' is not a {MODEL_FORMAT} model ({found}); "
                        "it comes from another script or an older feature layout: retrain with --save-model")
    return ckpt


def evaluate_checkpoint(args: Args, device: torch.device) -> dict:
    """--eval-only: every saved agent, with its saved normalizer, over a split or a whole file."""
    ckpt = load_checkpoint(args.checkpoint)
    saved = Args(**{k: v for k, v in ckpt["args"].items() if k in {f.name for f in dataclasses.fields(Args)}})
    run_args = dataclasses.replace(saved, data_csv=args.data_csv or saved.data_csv, runs_dir=args.runs_dir,
                                   eval_only=True, checkpoint=args.checkpoint, eval_split=args.eval_split,
                                   accept_suspect_rows=args.accept_suspect_rows)
    if ckpt["feature_names"] != observation_names(run_args):
        raise UserError(f"--checkpoint '{args.checkpoint}' was saved with features {ckpt['feature_names']}, "
                        f"its settings build {observation_names(run_args)}: retrain with --save-model")
    data = prepare_data(run_args, *load_market(run_args))
    lo, hi = data.splits[args.eval_split]
    if hi - lo < 2:
        raise UserError(f"the {args.eval_split} split of {data.source} has {hi - lo} rows; pick --eval-split all")
    data.vol_threshold = float(ckpt["vol_filter_threshold"])  # fitted on the training data's train split
    agents, normalizer = {}, None
    for name, state in ckpt["agents"].items():
        normalizer = StateNormalizer.from_state_dict(state["normalizer"]) if state["normalizer"] else None
        agent = TD3(len(FEATURE_NAMES), run_args, device, normalizer, run_args.seed)
        agent.actor.load_state_dict(state["actor"])
        agent.qf.load_state_dict(state["qf"])
        agents[name] = agent
    run_dir = make_run_dir(run_args, data.source, "__eval")
    fit_range = tuple(np.asarray(r) for r in ckpt["fit_range"])
    report = evaluation_report(run_args, run_dir, data, agents, normalizer, fit_range, [args.eval_split])
    results = report["results"][args.eval_split]
    paired = paired_metrics(results["baseline"], results["intrinsic"]) if {"baseline", "intrinsic"} <= set(agents) else None
    write_json_atomic(os.path.join(run_dir, "td3_action_saturation.json"), {
        "near_bound_threshold": NEAR_BOUND, "collapse_threshold": COLLAPSE_RATIO, "split": args.eval_split,
        "agents": {name: {args.eval_split: sat[args.eval_split]} for name, sat in report["saturation"].items()},
        "paired": paired})
    write_json_atomic(os.path.join(run_dir, "shift_audit.json"), {"split": args.eval_split, "agents": report["shift"]})
    summary = {"run_dir": run_dir, "checkpoint": args.checkpoint, "split": args.eval_split, "source": data.source,
               args.eval_split: report["eval"], "saturation": {n: s[args.eval_split] for n, s in report["saturation"].items()},
               "paired": paired}
    write_json_atomic(os.path.join(run_dir, "summary.json"), summary)
    print_table(report["eval"], summary["saturation"], None, paired, None, None)
    print(f"-> {run_dir}")
    return summary


def print_table(eval_json: dict, saturation: dict, selected_step: Optional[dict], paired: Optional[dict],
                diagnosis: Optional[dict], shift: Optional[str]) -> None:
    print(f"{eval_json['split']} split, {eval_json['steps']} steps"
          + (f" (checkpoints kept at steps {selected_step} by validation Sharpe)" if selected_step else ""))
    print(f"{'agent':<14}{'Sharpe':>8}{'return':>9}{'max DD':>8}{'near-bound':>12}{'kappa':>8}")
    for name, m in eval_json["agents"].items():
        s = saturation[name]
        print(f"{name:<14}{m['sharpe']:8.2f}{m['total_return']:9.1%}{m['max_drawdown']:8.1%}"
              f"{s['near_bound_ratio']:12.3f}{s['kappa_mean']:8.3f}")
    for name in ("buy_and_hold", "vol_filter", "flat"):
        m = eval_json[name]
        print(f"{name:<14}{m['sharpe']:8.2f}{m['total_return']:9.1%}{m['max_drawdown']:8.1%}")
    if paired is not None:
        print(f"paired: action_equal_ratio {paired['action_equal_ratio']:.4f}, eval_value_mae "
              f"{paired['eval_value_mae']:.2f}" + (f", intrinsic_mean_delta {paired['intrinsic_mean_delta']:.4g}"
                                                  if "intrinsic_mean_delta" in paired else "")
              + f", q1_delta_mean {paired['q1_delta_mean']:.4g}")
    if diagnosis is not None:
        print(f"diagnosis {diagnosis['code']}: {diagnosis['text']}")
        print(f"advice: {diagnosis['advice']}")
    elif shift:
        print(f"advice: {shift}")


if __name__ == "__main__":
    try:
        summary = main(parse_cli())
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # before training started, or a second Ctrl-C
        print("error: interrupted; stopped at once, without a summary", file=sys.stderr)
        sys.exit(130)
    sys.exit(summary.get("exit_code", 0))
