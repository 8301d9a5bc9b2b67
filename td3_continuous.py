"""TD3 (Fujimoto, van Hoof & Meger, 2018) for gymnasium 1.x continuous control, in one file.

Reproduces "Addressing Function Approximation Error in Actor-Critic Methods": clipped
double-Q learning, delayed policy updates and target policy smoothing, in the CleanRL style,
with the authors' evaluation protocol (deterministic episodes on a separate env, seed + 100).

Run:     python td3_continuous.py --env-id Hopper-v5 --seed 1
Help:    python td3_continuous.py --help
Writes:  runs/{env_id}__{exp_name}__{seed}__{unix_time}/ with TensorBoard events,
         evaluations.csv, summary.json, state_scale_summary.json, td3_action_saturation.json,
         model.pt (--save-model) and checkpoint.pt (--checkpoint-frequency N, for --resume).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import importlib.util
import io
import json
import math
import os
import random
import re
import sys
import time
from dataclasses import asdict, dataclass
from typing import Optional

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter


@dataclass
class Args:
    exp_name: str = "td3_continuous"
    """the name of this experiment (part of the run folder name)"""
    seed: int = 1
    """seed of the experiment (python, numpy, torch, env resets and action-space sampling)"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True` (CPU runs are deterministic anyway)"""
    cuda: bool = True
    """if toggled, cuda is used when available"""
    threads: int = 0
    """torch intra-op threads (0 keeps torch's default, one per core)"""
    compile: bool = False
    """torch.compile the loss computations of the update (CUDA: with CUDA graphs)"""
    runs_dir: str = "runs"
    """root folder of the run folders"""
    save_model: bool = False
    """write model.pt (networks, optimizers, normalizer, args, step) at the end"""
    capture_video: bool = False
    """record the first evaluation episode of every evaluation to {run_dir}/videos (needs moviepy)"""
    checkpoint_frequency: int = 0
    """write checkpoint.pt (model + replay buffer + RNG states) every N env steps; 0 disables"""
    resume: Optional[str] = None
    """path of a checkpoint.pt to continue an interrupted run (its saved arguments are used)"""
    eval_only: bool = False
    """only evaluate the model in --checkpoint and exit"""
    checkpoint: Optional[str] = None
    """model.pt or checkpoint.pt to evaluate with --eval-only"""

    # Algorithm specific arguments
    env_id: str = "Hopper-v5"
    """the id of the environment (any registered id, or the `module:EnvId` form)"""
    total_timesteps: int = 1000000
    """total environment steps of the experiment (summed over --num-envs)"""
    num_envs: int = 1
    """parallel environments; each loop iteration takes one step in each and does as many updates"""
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
    learning_starts: int = 25000
    """env steps of uniform random actions before learning starts"""
    policy_frequency: int = 2
    """the frequency of training the policy and the targets (delayed policy updates)"""
    noise_clip: float = 0.5
    """clip of the target policy smoothing noise, as a fraction of the action half-range"""
    state_norm: bool = False
    """normalize observations with running mean/variance (raw stored, frozen at evaluation)"""
    eval_frequency: int = 5000
    """evaluate every N env steps (and at the end)"""
    eval_episodes: int = 10
    """deterministic episodes per evaluation, on a separate env seeded seed + 100"""


class UserError(Exception):
    """A mistake in the command line or inputs: reported as one line on stderr, exit code 2."""


# Metrics are read back from tensors only every LOG_EVERY_UPDATES updates: `.item()` forces a
# device sync, so doing it every update would slow the hot path for nothing.
LOG_EVERY_UPDATES = 100
# Progress lines also come at least this often, so a long run between evaluations never looks hung.
PROGRESS_EVERY_SECONDS = 30.0
NEAR_BOUND = 0.999  # |a| >= 0.999 a_max counts as "at the bound" (audit, SPEC 3.6)
COLLAPSE_RATIO = 0.95  # near_bound_ratio at or above this means the actor collapsed to the bound
VALUE_BIAS_TAIL = 0.01  # value_bias skips states whose unseen tail weight gamma^(T-t) exceeds this


def parse_cli(argv: Optional[list[str]] = None) -> Args:
    """tyro.cli, but a parse error becomes one line on stderr and exit code 2."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            return tyro.cli(Args, args=argv)
    except SystemExit as exit_:
        if exit_.code in (0, None):
            raise
        # tyro draws a box; keep its title and first paragraph as the one-line message.
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
    """Reject values that would crash later or silently do something else."""
    positive = ["total_timesteps", "num_envs", "buffer_size", "batch_size", "policy_frequency",
                "eval_frequency", "eval_episodes", "learning_rate"]
    for name in positive:
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    for name in ["learning_starts", "checkpoint_frequency", "threads", "policy_noise",
                 "exploration_noise", "noise_clip"]:
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if not 0.0 <= args.gamma < 1.0:
        raise UserError(f"--gamma must be in [0, 1), got {args.gamma}")
    if not 0.0 < args.tau <= 1.0:
        raise UserError(f"--tau must be in (0, 1], got {args.tau}")
    if args.total_timesteps % args.num_envs:
        raise UserError(f"--total-timesteps ({args.total_timesteps}) must be a multiple of "
                        f"--num-envs ({args.num_envs}): it counts env steps, not iterations")
    if args.eval_only and not args.checkpoint:
        raise UserError("--eval-only needs --checkpoint PATH (a model.pt or checkpoint.pt)")
    if args.checkpoint and not args.eval_only:
        raise UserError("--checkpoint is only read with --eval-only; to continue training use --resume")
    if args.capture_video and importlib.util.find_spec("moviepy") is None:
        raise UserError("--capture-video needs the optional package moviepy: pip install moviepy")


# ENVIRONMENT ------------------------------------------------------------------------------------
def make_env(env_id: str, render_mode: Optional[str] = None):
    def thunk():
        # only pass render_mode when asked: custom envs need not accept the keyword
        return gym.make(env_id) if render_mode is None else gym.make(env_id, render_mode=render_mode)

    return thunk


def make_checked_env(env_id: str, num_envs: Optional[int] = None, render_mode: Optional[str] = None):
    """One env (num_envs=None) or a SyncVectorEnv in SAME_STEP autoreset mode, with clear errors."""
    try:
        if num_envs is None:
            env = make_env(env_id, render_mode)()
            obs_space, act_space = env.observation_space, env.action_space
        else:
            env = gym.vector.SyncVectorEnv([make_env(env_id)] * num_envs,
                                           autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
            obs_space, act_space = env.single_observation_space, env.single_action_space
    except (gym.error.Error, ImportError) as err:
        raise UserError(f"cannot make env '{env_id}': {err} Use a registered id such as "
                        "Hopper-v5 or Pendulum-v1, or the module:EnvId form.") from None
    if not isinstance(act_space, gym.spaces.Box) or len(act_space.shape) != 1:
        env.close()
        raise UserError(f"'{env_id}' has action space {act_space}; TD3 needs a 1-D continuous "
                        "Box (for discrete actions use DQN, e.g. CleanRL's dqn.py)")
    if not (np.all(np.isfinite(act_space.low)) and np.all(np.isfinite(act_space.high))):
        env.close()
        raise UserError(f"'{env_id}' has unbounded actions {act_space}; TD3's tanh actor needs finite bounds")
    if not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1:
        env.close()
        raise UserError(f"'{env_id}' has observation space {obs_space}; this script needs a flat Box "
                        "(wrap the env in gymnasium.wrappers.FlattenObservation)")
    return env


def transitions_to_store(next_obs, terminations, truncations, infos, autoreset_mode, prev_done):
    """The true next observations of a vector step, and which rows are real transitions.

    Gymnasium 1.x autoresets in one of two ways, and both hide a trap:
    SAME_STEP: at the step an episode ends, `next_obs` is already the *reset* observation; the
      true last observation is in infos["final_obs"] (mask infos["_final_obs"]).
    NEXT_STEP: the step after a done is a reset step (reward 0, both flags False) whose
      "transition" joins the last state of one episode to the first of the next: drop it.
    Either way no stored transition may cross an episode boundary.
    """
    real_next_obs = np.array(next_obs, copy=True)
    keep = np.ones(len(next_obs), dtype=bool)
    if autoreset_mode == gym.vector.AutoresetMode.SAME_STEP:
        if "_final_obs" in infos:
            for i in np.flatnonzero(infos["_final_obs"]):
                real_next_obs[i] = infos["final_obs"][i]
    elif autoreset_mode == gym.vector.AutoresetMode.NEXT_STEP:
        keep = ~prev_done
    else:
        raise ValueError(f"autoreset mode {autoreset_mode} is not supported")
    return real_next_obs, keep


# NETWORKS ---------------------------------------------------------------------------------------
class Actor(nn.Module):
    """pi(s) = tanh(MLP(s)) * action_scale + action_bias: any Box bounds, asymmetric included."""

    def __init__(self, obs_dim: int, action_low: np.ndarray, action_high: np.ndarray, hidden: int = 256):
        super().__init__()
        self.fc1 = nn.Linear(obs_dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc_mu = nn.Linear(hidden, len(action_low))
        low = torch.as_tensor(action_low, dtype=torch.float32)
        high = torch.as_tensor(action_high, dtype=torch.float32)
        self.register_buffer("action_scale", (high - low) / 2.0)
        self.register_buffer("action_bias", (high + low) / 2.0)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc1(obs))
        x = F.relu(self.fc2(x))
        return torch.tanh(self.fc_mu(x)) * self.action_scale + self.action_bias


class TwinQ(nn.Module):
    """Both TD3 critics in one module: weights stacked as [2, out, in], one baddbmm per layer.

    At batch 256 on a CPU the per-op overhead of two separate MLPs costs as much as the math;
    stacking halves the number of ops. Weights keep nn.Linear's [out, in] layout (used
    transposed), which MKL multiplies faster here than [in, out]; initialised like nn.Linear
    (U(+-1/sqrt(fan_in)) for weights and biases).
    """

    def __init__(self, obs_dim: int, action_dim: int, hidden: int = 256):
        super().__init__()
        sizes = [obs_dim + action_dim, hidden, hidden, 1]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            bound = 1.0 / math.sqrt(fan_in)
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
    """Preallocated tensors on the training device, ring-indexed, sampled with torch.randint."""

    def __init__(self, capacity: int, obs_dim: int, action_dim: int, device: torch.device):
        self.capacity, self.device = capacity, device
        self.obs = torch.zeros(capacity, obs_dim, device=device)
        self.next_obs = torch.zeros(capacity, obs_dim, device=device)
        self.actions = torch.zeros(capacity, action_dim, device=device)
        self.rewards = torch.zeros(capacity, device=device)
        self.terminations = torch.zeros(capacity, device=device)
        self.pos, self.size = 0, 0

    def add(self, obs, next_obs, actions, rewards, terminations) -> None:
        n = len(obs)
        if n == 0:
            return
        idx = torch.arange(self.pos, self.pos + n, device=self.device) % self.capacity
        for store, values in ((self.obs, obs), (self.next_obs, next_obs), (self.actions, actions),
                              (self.rewards, rewards), (self.terminations, terminations)):
            store[idx] = torch.as_tensor(np.asarray(values, dtype=np.float32), device=self.device)
        self.pos = (self.pos + n) % self.capacity
        self.size = min(self.size + n, self.capacity)

    def sample(self, batch_size: int):
        idx = torch.randint(0, self.size, (batch_size,), device=self.device)
        return self.obs[idx], self.actions[idx], self.rewards[idx], self.terminations[idx], self.next_obs[idx]

    def state_dict(self) -> dict:
        keep = slice(0, self.size)
        return {"pos": self.pos, "size": self.size, "obs": self.obs[keep].cpu(),
                "next_obs": self.next_obs[keep].cpu(), "actions": self.actions[keep].cpu(),
                "rewards": self.rewards[keep].cpu(), "terminations": self.terminations[keep].cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.pos, self.size = state["pos"], state["size"]
        for name in ("obs", "next_obs", "actions", "rewards", "terminations"):
            getattr(self, name)[: self.size] = state[name].to(self.device)


# NORMALIZER -------------------------------------------------------------------------------------
class RunningMeanStd:
    """Running mean/variance of observations (Chan et al.'s parallel update), float64 stats.

    normalize(x) = clip((x - mean) / sqrt(var + eps), -10, 10). Raw observations are stored in
    the replay buffer and normalized when sampled, so the stats can keep moving during training
    without stale copies in the buffer; at evaluation they are frozen (update is not called).
    """

    def __init__(self, dim: int, device: torch.device, eps: float = 1e-8, clip: float = 10.0):
        self.mean = torch.zeros(dim, dtype=torch.float64, device=device)
        self.var = torch.ones(dim, dtype=torch.float64, device=device)
        self.count = 0
        self.eps, self.clip = eps, clip
        self._refresh()

    def _refresh(self) -> None:
        # float32 copies for the hot path, computed once per update instead of once per use.
        self._mean32 = self.mean.float()
        self._inv_std32 = torch.rsqrt(self.var + self.eps).float()

    def update(self, batch: torch.Tensor) -> None:
        batch = batch.to(torch.float64)
        n = batch.shape[0]
        if n == 0:
            return
        batch_mean = batch.mean(0)
        batch_var = batch.var(0, unbiased=False)
        total = self.count + n
        delta = batch_mean - self.mean
        m2 = self.var * self.count + batch_var * n + delta.square() * (self.count * n / total)
        self.mean = self.mean + delta * (n / total)
        self.var = m2 / total
        self.count = total
        self._refresh()

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self._mean32) * self._inv_std32).clamp(-self.clip, self.clip)

    def state_dict(self) -> dict:
        return {"mean": self.mean.cpu(), "var": self.var.cpu(), "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean = state["mean"].to(self.mean.device)
        self.var = state["var"].to(self.var.device)
        self.count = state["count"]
        self._refresh()


# ALGO LOGIC: the TD3 mechanisms, one function each ------------------------------------------------
def smoothing_noise(actions: torch.Tensor, policy_noise: float, noise_clip: float,
                    action_scale: torch.Tensor) -> torch.Tensor:
    """Target policy smoothing noise: N(0, policy_noise*scale) clipped to +-noise_clip*scale, per dim."""
    noise = torch.randn_like(actions) * (policy_noise * action_scale)
    limit = noise_clip * action_scale
    return torch.maximum(torch.minimum(noise, limit), -limit)


def td3_target(actor_target, qf_target, next_obs, rewards, terminations, noise, gamma,
               action_low, action_high) -> torch.Tensor:
    """y = r + gamma * (1 - terminated) * min(Q1', Q2')(s', clamp(pi'(s') + noise, low, high)).

    Clipped double-Q (the min) fights overestimation; only termination stops the bootstrap:
    a time-limit truncation is not a terminal state, so its value is bootstrapped.
    """
    next_actions = torch.clamp(actor_target(next_obs) + noise, action_low, action_high)
    next_q = qf_target(next_obs, next_actions).min(dim=0).values
    return rewards + gamma * (1.0 - terminations) * next_q


def soft_update_(targets: list[torch.Tensor], sources: list[torch.Tensor], tau: float) -> None:
    """Polyak averaging theta' <- (1 - tau) theta' + tau theta, as one fused foreach lerp."""
    torch._foreach_lerp_(targets, sources, tau)


class TD3:
    """Actor, twin critic, their targets and optimizers; `update` is one TD3 gradient step."""

    def __init__(self, obs_dim: int, action_low: np.ndarray, action_high: np.ndarray, args: Args,
                 device: torch.device):
        self.args, self.device = args, device
        self.actor = Actor(obs_dim, action_low, action_high).to(device)
        self.qf = TwinQ(obs_dim, len(action_low)).to(device)
        self.actor_target = copy.deepcopy(self.actor).requires_grad_(False)
        self.qf_target = copy.deepcopy(self.qf).requires_grad_(False)
        self.action_low = torch.as_tensor(action_low, dtype=torch.float32, device=device)
        self.action_high = torch.as_tensor(action_high, dtype=torch.float32, device=device)
        # fused Adam: one kernel for all parameters instead of a handful of ops per tensor.
        self.q_optimizer = torch.optim.Adam(self.qf.parameters(), lr=args.learning_rate, fused=True)
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=args.learning_rate, fused=True)
        self.normalizer = RunningMeanStd(obs_dim, device) if args.state_norm else None
        self.n_updates = 0
        self._sources = list(self.actor.parameters()) + list(self.qf.parameters())
        self._targets = list(self.actor_target.parameters()) + list(self.qf_target.parameters())
        self._actor_params = list(self.actor.parameters())
        self.critic_loss = self._critic_loss
        self.actor_loss = self._actor_loss
        if args.compile:
            mode = "reduce-overhead" if device.type == "cuda" else None  # CUDA graphs on GPU
            self.critic_loss = torch.compile(self._critic_loss, mode=mode)
            self.actor_loss = torch.compile(self._actor_loss, mode=mode)

    def norm(self, obs: torch.Tensor) -> torch.Tensor:
        return obs if self.normalizer is None else self.normalizer.normalize(obs)

    @torch.no_grad()
    def act(self, obs: np.ndarray, exploration_noise: float = 0.0) -> np.ndarray:
        """pi(s) (+ N(0, noise*scale) when exploring), clipped to the bounds of each dimension."""
        actions = self.actor(self.norm(torch.as_tensor(obs, dtype=torch.float32, device=self.device)))
        if exploration_noise > 0:
            actions += torch.randn_like(actions) * (exploration_noise * self.actor.action_scale)
        return torch.clamp(actions, self.action_low, self.action_high).cpu().numpy()

    def _critic_loss(self, obs, actions, rewards, terminations, next_obs):
        with torch.no_grad():
            noise = smoothing_noise(actions, self.args.policy_noise, self.args.noise_clip,
                                    self.actor.action_scale)
            y = td3_target(self.actor_target, self.qf_target, next_obs, rewards, terminations, noise,
                           self.args.gamma, self.action_low, self.action_high)
        q = self.qf(obs, actions)
        qf_losses = (q - y).square().mean(dim=1)  # [qf1_loss, qf2_loss]
        return qf_losses.sum(), qf_losses.detach(), q.detach().mean(dim=1)

    def _actor_loss(self, obs):
        return -self.qf.q1(obs, self.actor(obs)).mean()

    def update(self, batch) -> dict:
        """One critic step; every policy_frequency-th call also one actor step and a target update."""
        obs, actions, rewards, terminations, next_obs = batch
        obs, next_obs = self.norm(obs), self.norm(next_obs)
        qf_loss, qf_losses, q_means = self.critic_loss(obs, actions, rewards, terminations, next_obs)
        self.q_optimizer.zero_grad(set_to_none=True)
        qf_loss.backward()
        self.q_optimizer.step()
        self.n_updates += 1
        metrics = {"qf_loss": qf_loss.detach(), "qf_losses": qf_losses, "q_means": q_means}
        # Delayed policy updates: the actor follows a critic that has had time to settle.
        if self.n_updates % self.args.policy_frequency == 0:
            actor_loss = self.actor_loss(obs)
            self.actor_optimizer.zero_grad(set_to_none=True)
            actor_loss.backward(inputs=self._actor_params)  # no grads wasted on the critic
            self.actor_optimizer.step()
            with torch.no_grad():
                soft_update_(self._targets, self._sources, self.args.tau)
            metrics["actor_loss"] = actor_loss.detach()
        return metrics

    def state_dict(self) -> dict:
        return {"actor": self.actor.state_dict(), "qf": self.qf.state_dict(),
                "actor_target": self.actor_target.state_dict(), "qf_target": self.qf_target.state_dict(),
                "actor_optimizer": self.actor_optimizer.state_dict(),
                "q_optimizer": self.q_optimizer.state_dict(),
                "normalizer": None if self.normalizer is None else self.normalizer.state_dict(),
                "n_updates": self.n_updates}

    def load_state_dict(self, state: dict) -> None:
        for name in ("actor", "qf", "actor_target", "qf_target", "actor_optimizer", "q_optimizer"):
            getattr(self, name).load_state_dict(state[name])
        if self.normalizer is not None:
            self.normalizer.load_state_dict(state["normalizer"])
        self.n_updates = state["n_updates"]


# AUDIT: how close the actor sits to its bounds, and the scale of what it sees ---------------------
def kappa(actions_normalized: np.ndarray) -> np.ndarray:
    """tanh gate kappa = 1 - (a/a_max)^2: the factor d tanh/dx that every actor gradient passes.

    At the bound kappa -> 0 and the actor can no longer move, whatever the critic says.
    """
    return 1.0 - np.square(actions_normalized)


def action_saturation_stats(actions: np.ndarray, action_scale: np.ndarray, action_bias: np.ndarray) -> dict:
    """near-bound share, kappa mean/p10 and action mean/std of raw actor outputs (per component)."""
    a = (np.asarray(actions, dtype=np.float64) - action_bias) / action_scale  # in [-1, 1]
    k = kappa(a)
    near = float(np.mean(np.abs(a) >= NEAR_BOUND))
    return {"near_bound_ratio": near, "actor_collapse_detected": bool(near >= COLLAPSE_RATIO),
            "kappa_mean": float(k.mean()), "kappa_p10": float(np.percentile(k, 10)),
            "action_mean": float(np.mean(actions)), "action_std": float(np.std(actions))}


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


def actor_critic_audit(agent: TD3, eval_obs: np.ndarray) -> dict:
    """Saturation, kappa, actor gradient norm and twin gap on the (raw) eval states."""
    obs = agent.norm(torch.as_tensor(eval_obs, dtype=torch.float32, device=agent.device))
    actions = agent.actor(obs)
    actor_loss = -agent.qf.q1(obs, actions).mean()
    grads = torch.autograd.grad(actor_loss, agent._actor_params)
    with torch.no_grad():
        q = agent.qf(obs, actions)
    stats = action_saturation_stats(actions.detach().cpu().numpy(), agent.actor.action_scale.cpu().numpy(),
                                    agent.actor.action_bias.cpu().numpy())
    stats["actor_grad_norm"] = float(torch.sqrt(sum(g.square().sum() for g in grads)))
    stats["q_twin_gap"] = float((q[0] - q[1]).abs().mean())
    return stats


# EVALUATION -------------------------------------------------------------------------------------
def discounted_returns(rewards: np.ndarray, gamma: float) -> np.ndarray:
    """G_t = sum_{k >= t} gamma^(k - t) r_k, for every t of one episode."""
    out = np.zeros(len(rewards))
    running = 0.0
    for t in range(len(rewards) - 1, -1, -1):
        running = rewards[t] + gamma * running
        out[t] = running
    return out


def value_bias_mask(length: int, terminated: bool, gamma: float) -> np.ndarray:
    """States whose Monte-Carlo return is a fair target: all if terminated, else those whose
    missing tail (weight gamma^(T - t)) is at most VALUE_BIAS_TAIL."""
    if terminated:
        return np.ones(length, dtype=bool)
    return gamma ** (length - np.arange(length)) <= VALUE_BIAS_TAIL


def evaluate(agent: TD3, env: gym.Env, episodes: int, seed: int, gamma: float) -> dict:
    """The authors' protocol: deterministic policy (no noise) on a separate env.

    Only the first reset is seeded, so every evaluation replays the same `episodes` start states.
    Also returns the overestimation check of the TD3 paper: value_bias = mean of
    Q1(s_t, pi(s_t)) - discounted return actually collected from s_t.
    """
    returns, lengths, all_obs, mc_returns, masks = [], [], [], [], []
    obs, _ = env.reset(seed=seed)
    for episode in range(episodes):
        if episode > 0:
            obs, _ = env.reset()
        ep_obs, ep_rewards, done, terminated = [], [], False, False
        while not done:
            ep_obs.append(obs)
            action = agent.act(obs[None])[0]
            obs, reward, terminated, truncated, _ = env.step(action)
            ep_rewards.append(float(reward))
            done = terminated or truncated
        returns.append(sum(ep_rewards))
        lengths.append(len(ep_rewards))
        all_obs.append(np.asarray(ep_obs, dtype=np.float32))
        mc_returns.append(discounted_returns(np.asarray(ep_rewards), gamma))
        masks.append(value_bias_mask(len(ep_rewards), bool(terminated), gamma))
    obs_all = np.concatenate(all_obs)
    mask = np.concatenate(masks)
    value_bias = None
    if mask.any():
        with torch.no_grad():
            obs_t = agent.norm(torch.as_tensor(obs_all[mask], device=agent.device))
            q1 = agent.qf.q1(obs_t, agent.actor(obs_t)).cpu().numpy()
        value_bias = float(np.mean(q1 - np.concatenate(mc_returns)[mask]))
    return {"returns": returns, "lengths": lengths, "obs": obs_all, "value_bias": value_bias,
            "mean": float(np.mean(returns)), "std": float(np.std(returns))}


# FILES ------------------------------------------------------------------------------------------
def write_json_atomic(path: str, obj) -> None:
    """temp file + os.replace: an interrupted run never leaves half a JSON file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, allow_nan=False)
    os.replace(tmp, path)


def save_torch_atomic(path: str, obj) -> None:
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


EVAL_CSV_FIELDS = ["global_step", "eval_return_mean", "eval_return_std", "value_bias", "wall_time_s"]


def write_evaluations_csv(path: str, history: list[dict]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=EVAL_CSV_FIELDS)
        writer.writeheader()
        writer.writerows({k: row[k] for k in EVAL_CSV_FIELDS} for row in history)
    os.replace(tmp, path)


def load_torch_file(path: str, what: str) -> dict:
    if not os.path.isfile(path):
        raise UserError(f"{what} '{path}' does not exist; give the path of a model.pt or checkpoint.pt")
    try:
        # weights_only=False: our own files also hold numpy RNG states. Only load files you trust.
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a truncated or foreign file: say which, not a traceback
        raise UserError(f"{what} '{path}' cannot be read ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{what} '{path}' is not a td3_continuous.py model.pt or checkpoint.pt")
    return state


CHECKPOINT_FORMAT = "td3_continuous/1"


def crossed(step: int, stride: int, frequency: int) -> bool:
    """True when the last `stride` steps passed a multiple of `frequency` (0 = never)."""
    return frequency > 0 and step // frequency > (step - stride) // frequency


def format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"


def select_device(args: Args) -> torch.device:
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    return torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_eval_env(args: Args, run_dir: str) -> gym.Env:
    if not args.capture_video:
        return make_checked_env(args.env_id)
    env = make_checked_env(args.env_id, render_mode="rgb_array")
    try:  # fail now, with the fix, rather than at the first evaluation
        env.reset(seed=args.seed + 100)
        env.render()
    except Exception as err:
        raise UserError(f"--capture-video cannot render '{args.env_id}' ({type(err).__name__}: {err}); "
                        "classic control needs pygame, MuJoCo an OpenGL backend (MUJOCO_GL=egl or osmesa)") from None
    return gym.wrappers.RecordVideo(env, os.path.join(run_dir, "videos"), disable_logger=True,
                                    episode_trigger=lambda ep: ep % args.eval_episodes == 0)


def eval_only(args: Args) -> dict:
    """--eval-only --checkpoint PATH: load a model and run the evaluation protocol once."""
    state = load_torch_file(args.checkpoint, "--checkpoint")
    saved = Args(**state["args"])
    env_args = dataclasses.replace(saved, eval_episodes=args.eval_episodes, capture_video=args.capture_video,
                                   seed=args.seed)
    device = select_device(args)
    seed_everything(args.seed)
    env = make_checked_env(saved.env_id)
    agent = TD3(env.observation_space.shape[0], env.action_space.low, env.action_space.high, saved, device)
    env.close()
    agent.load_state_dict(state["agent"])
    run_dir = os.path.join(args.runs_dir, f"{saved.env_id.replace(':', '_')}__{saved.exp_name}-eval__{args.seed}__{int(time.time())}")
    os.makedirs(run_dir, exist_ok=True)
    eval_env = make_eval_env(env_args, run_dir)
    result = evaluate(agent, eval_env, args.eval_episodes, args.seed + 100, saved.gamma)
    eval_env.close()
    summary = {"env_id": saved.env_id, "checkpoint": args.checkpoint, "checkpoint_step": state["global_step"],
               "eval_episodes": args.eval_episodes, "eval_return_mean": result["mean"],
               "eval_return_std": result["std"], "eval_returns": result["returns"],
               "value_bias": result["value_bias"], "run_dir": run_dir}
    write_json_atomic(os.path.join(run_dir, "summary.json"), summary)
    print(f"eval of {args.checkpoint} (step {state['global_step']}): "
          f"{result['mean']:.1f} +- {result['std']:.1f} over {args.eval_episodes} episodes -> {run_dir}")
    return summary


def main(args: Args) -> dict:
    """Train TD3 (or evaluate with --eval-only); returns the summary also written to summary.json."""
    validate_args(args)
    if args.eval_only:
        return eval_only(args)

    resume_state = None
    if args.resume:
        resume_state = load_torch_file(args.resume, "--resume")
        if "buffer" not in resume_state:
            raise UserError(f"'{args.resume}' is a model file without replay buffer; resume needs a "
                            "checkpoint.pt written with --checkpoint-frequency N")
        args = dataclasses.replace(Args(**resume_state["args"]), resume=args.resume)

    device = select_device(args)
    seed_everything(args.seed)
    envs = make_checked_env(args.env_id, num_envs=args.num_envs)
    obs_dim = envs.single_observation_space.shape[0]
    action_low, action_high = envs.single_action_space.low, envs.single_action_space.high
    agent = TD3(obs_dim, action_low, action_high, args, device)
    rb = ReplayBuffer(min(args.buffer_size, args.total_timesteps), obs_dim, len(action_low), device)

    # Run state, all of it in the checkpoint so a resumed run counts every step once.
    global_step, episodes, eval_history, saturation_history = 0, 0, [], []
    wall_before, learn_seconds_before, learn_steps_before = 0.0, 0.0, 0
    if resume_state is None:
        run_dir = os.path.join(args.runs_dir, f"{args.env_id.replace(':', '_')}__{args.exp_name}__{args.seed}__{int(time.time())}")
        os.makedirs(run_dir, exist_ok=True)
        obs, _ = envs.reset(seed=args.seed)
        envs.action_space.seed(args.seed)
        purge_step = None
    else:
        run_dir = os.path.dirname(os.path.abspath(args.resume))
        agent.load_state_dict(resume_state["agent"])
        rb.load_state_dict(resume_state["buffer"])
        progress = resume_state["progress"]
        global_step, episodes = resume_state["global_step"], progress["episodes"]
        eval_history, saturation_history = progress["eval_history"], progress["saturation_history"]
        wall_before, learn_seconds_before = progress["wall_time_s"], progress["learn_seconds"]
        learn_steps_before = progress["learn_steps"]
        # The env state itself cannot be saved (MuJoCo), so the episode in progress at the
        # checkpoint is cut: fresh episodes start from a seed that depends on the step.
        obs, _ = envs.reset(seed=args.seed + global_step)
        rng = resume_state["rng"]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        envs.action_space.np_random.bit_generator.state = rng["action_space"]
        purge_step = global_step + 1  # TensorBoard drops events logged after the checkpoint
        write_evaluations_csv(os.path.join(run_dir, "evaluations.csv"), eval_history)
        print(f"resuming {run_dir} at step {global_step} with the arguments saved in the checkpoint")

    writer = SummaryWriter(run_dir, purge_step=purge_step)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items()))
    eval_env = make_eval_env(args, run_dir)
    feature_names = [f"obs_{i}" for i in range(obs_dim)]
    csv_path = os.path.join(run_dir, "evaluations.csv")
    if resume_state is None:
        write_evaluations_csv(csv_path, [])

    ep_returns = np.zeros(args.num_envs)
    ep_lengths = np.zeros(args.num_envs, dtype=int)
    prev_done = np.zeros(args.num_envs, dtype=bool)
    start_time, start_step = time.time(), global_step
    learn_seconds, learn_steps, last_progress = 0.0, 0, time.time()

    def learning_sps() -> float:
        seconds = learn_seconds_before + learn_seconds
        return (learn_steps_before + learn_steps) / seconds if seconds > 0 else 0.0

    def run_evaluation() -> None:
        """Evaluate, audit, log and write the per-eval files (not counted as learning time)."""
        result = evaluate(agent, eval_env, args.eval_episodes, args.seed + 100, args.gamma)
        audit = actor_critic_audit(agent, result["obs"])
        wall = wall_before + time.time() - start_time
        row = {"global_step": global_step, "eval_return_mean": result["mean"], "eval_return_std": result["std"],
               "value_bias": result["value_bias"], "wall_time_s": round(wall, 2)}
        eval_history.append(row)
        saturation_history.append({"global_step": global_step, **audit})
        with open(csv_path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=EVAL_CSV_FIELDS).writerow(row)
        writer.add_scalar("eval/episodic_return", result["mean"], global_step)
        writer.add_scalar("eval/episodic_return_std", result["std"], global_step)
        if result["value_bias"] is not None:
            writer.add_scalar("eval/value_bias", result["value_bias"], global_step)
        for key in ("near_bound_ratio", "kappa_mean", "actor_grad_norm", "q_twin_gap"):
            writer.add_scalar(f"audit/{key}", audit[key], global_step)
        write_json_atomic(os.path.join(run_dir, "td3_action_saturation.json"), {
            "near_bound_threshold": NEAR_BOUND, "collapse_threshold": COLLAPSE_RATIO,
            "agents": {"td3": {"summary": saturation_history[-1], "history": saturation_history}}})
        raw = rb.obs[: rb.size : max(1, rb.size // 100_000)]
        pre = scale_stats(raw.cpu().numpy(), feature_names)
        post = scale_stats(agent.norm(raw).cpu().numpy(), feature_names)
        write_json_atomic(os.path.join(run_dir, "state_scale_summary.json"), {
            "mode": "running_zscore" if args.state_norm else "none", "log_volume": False,
            "feature_names": feature_names,
            "fit_sample_count": agent.normalizer.count if agent.normalizer is not None else 0,
            "pre_stats": pre, "post_stats": post,
            "p99_abs_spread": {"pre": p99_abs_spread(pre), "post": p99_abs_spread(post)}})

    def model_state() -> dict:
        """What model.pt holds; checkpoint.pt adds the buffer, RNG states and run progress."""
        return {"format": CHECKPOINT_FORMAT, "args": asdict(args), "global_step": global_step,
                "agent": agent.state_dict()}

    def save_checkpoint() -> None:
        save_torch_atomic(os.path.join(run_dir, "checkpoint.pt"), {
            **model_state(), "buffer": rb.state_dict(),
            "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                    "action_space": envs.action_space.np_random.bit_generator.state},
            "progress": {"episodes": episodes, "eval_history": eval_history,
                         "saturation_history": saturation_history,
                         "wall_time_s": wall_before + time.time() - start_time,
                         "learn_seconds": learn_seconds_before + learn_seconds,
                         "learn_steps": learn_steps_before + learn_steps}})

    def print_progress() -> None:
        last = f"{eval_history[-1]['eval_return_mean']:.1f}" if eval_history else "-"
        sps = learning_sps()
        if sps > 0:
            rate = f"learning SPS {sps:.0f}"
            eta = format_eta((args.total_timesteps - global_step) / sps)
        else:  # uniform-random phase: no update timed yet, so no honest ETA
            rate = f"random-phase SPS {(global_step - start_step) / max(time.time() - start_time, 1e-9):.0f}"
            eta = "? (learning not started)"
        print(f"step {global_step}/{args.total_timesteps} | {rate} | last eval {last} | ETA {eta}", flush=True)

    while global_step < args.total_timesteps:
        learning = global_step >= args.learning_starts
        iteration_start = time.perf_counter()
        # ALGO LOGIC: put action logic here
        if learning:
            actions = agent.act(obs, args.exploration_noise)
        else:
            actions = envs.action_space.sample()
        next_obs, rewards, terminations, truncations, infos = envs.step(actions)
        global_step += args.num_envs

        real_next_obs, keep = transitions_to_store(next_obs, terminations, truncations, infos,
                                                   envs.metadata["autoreset_mode"], prev_done)
        rb.add(obs[keep], real_next_obs[keep], actions[keep], rewards[keep], terminations[keep])
        if agent.normalizer is not None:
            agent.normalizer.update(torch.as_tensor(obs[keep], device=device))
        ep_returns[keep] += rewards[keep]
        ep_lengths[keep] += 1
        prev_done = terminations | truncations
        for i in np.flatnonzero(prev_done):
            episodes += 1
            writer.add_scalar("charts/episodic_return", ep_returns[i], global_step)
            writer.add_scalar("charts/episodic_length", ep_lengths[i], global_step)
            ep_returns[i], ep_lengths[i] = 0.0, 0
        obs = next_obs

        # ALGO LOGIC: training (one update per env step, the paper's update-to-data ratio of 1)
        if learning:
            for _ in range(args.num_envs):
                metrics = agent.update(rb.sample(args.batch_size))
                if agent.n_updates % LOG_EVERY_UPDATES == 0:
                    writer.add_scalar("losses/qf1_values", metrics["q_means"][0].item(), global_step)
                    writer.add_scalar("losses/qf2_values", metrics["q_means"][1].item(), global_step)
                    writer.add_scalar("losses/qf1_loss", metrics["qf_losses"][0].item(), global_step)
                    writer.add_scalar("losses/qf2_loss", metrics["qf_losses"][1].item(), global_step)
                    writer.add_scalar("losses/qf_loss", metrics["qf_loss"].item() / 2.0, global_step)
                    if "actor_loss" in metrics:
                        writer.add_scalar("losses/actor_loss", metrics["actor_loss"].item(), global_step)
                    writer.add_scalar("charts/SPS", int(learning_sps()), global_step)
            learn_seconds += time.perf_counter() - iteration_start
            learn_steps += args.num_envs

        if crossed(global_step, args.num_envs, args.eval_frequency) or global_step >= args.total_timesteps:
            run_evaluation()
            print_progress()
            last_progress = time.time()
        elif time.time() - last_progress > PROGRESS_EVERY_SECONDS:
            print_progress()
            last_progress = time.time()
        if crossed(global_step, args.num_envs, args.checkpoint_frequency):
            save_checkpoint()

    envs.close()
    eval_env.close()
    last10 = [row["eval_return_mean"] for row in eval_history[-10:]]
    summary = {
        "env_id": args.env_id, "seed": args.seed, "global_step": global_step, "episodes": episodes,
        "updates": agent.n_updates,
        "eval_return_last": eval_history[-1]["eval_return_mean"],
        "eval_return_std_last": eval_history[-1]["eval_return_std"],
        "eval_return_mean_last10": float(np.mean(last10)),
        "value_bias_last": eval_history[-1]["value_bias"],
        "sps_learning_phase": round(learning_sps(), 1),
        "wall_time_s": round(wall_before + time.time() - start_time, 2),
        "audit": saturation_history[-1], "run_dir": run_dir,
    }
    if args.save_model:
        save_torch_atomic(os.path.join(run_dir, "model.pt"), model_state())
    write_json_atomic(os.path.join(run_dir, "summary.json"), summary)
    writer.close()
    print(f"done: {global_step} steps, last eval {summary['eval_return_last']:.1f}, "
          f"mean of last {len(last10)} evals {summary['eval_return_mean_last10']:.1f}, "
          f"learning SPS {summary['sps_learning_phase']:.0f} -> {run_dir}")
    return summary


if __name__ == "__main__":
    try:
        main(parse_cli())
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
