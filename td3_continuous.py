"""TD3 (Fujimoto, van Hoof & Meger, 2018) for gymnasium 1.x continuous control, in one file.

Reproduces "Addressing Function Approximation Error in Actor-Critic Methods": clipped
double-Q learning, delayed policy updates and target policy smoothing, in the CleanRL style,
with the authors' evaluation protocol (deterministic episodes on a separate env, seed + 100).

Run:     python td3_continuous.py --env-id Hopper-v5 --seed 1
Help:    python td3_continuous.py --help
Writes:  runs/{env_id}__{exp_name}__{seed}__{unix_time}/ with TensorBoard events,
         evaluations.csv, learning_curve.png, summary.json, state_scale_summary.json,
         td3_action_saturation.json, model.pt (--save-model) and checkpoint.pt (--checkpoint-frequency N, for --resume).
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
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from typing import Optional

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
    compile: bool = True
    """torch.compile each update step into one graph (~15 s once; CUDA: replayed as a CUDA graph)"""
    bf16: bool = False
    """bfloat16 matmuls in the update (autocast; fast on CPUs with AVX512-BF16/AMX), fp32 weights"""
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
    benchmark: bool = False
    """print the matmul ceiling, the bare update's rate and a short run's learning-phase SPS, then exit"""

    # Algorithm specific arguments
    env_id: str = "Hopper-v5"
    """the id of the environment (any registered id, or the `module:EnvId` form)"""
    total_timesteps: int = 1000000
    """total environment steps of the experiment (summed over --num-envs)"""
    num_envs: int = 1
    """parallel environments; each loop iteration takes one step in each and does as many updates"""
    hidden_sizes: tuple[int, int] = (256, 256)
    """widths of the two hidden layers of the actor and of each critic (the 2018 paper: 400 300)"""
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


class Diverged(Exception):
    """A loss, a Q-value or a weight stopped being finite: the run ends with status "diverged"."""


# How a training run ends: summary.json's "status" and the process's exit code. 130 and 143 are
# the shell's 128 + signal number, so schedulers and shells read them as SIGINT and SIGTERM.
EXIT_CODES = {"completed": 0, "diverged": 1, "interrupted": None}  # interrupted: 128 + signal number


# Metrics are read back from tensors only every LOG_EVERY_UPDATES updates: `.item()` forces a
# device sync, so doing it every update would slow the hot path for nothing.
LOG_EVERY_UPDATES = 100
# Progress lines also come at least this often, so a long run between evaluations never looks hung.
PROGRESS_EVERY_SECONDS = 30.0
NEAR_BOUND = 0.999  # |a| >= 0.999 a_max counts as "at the bound" (audit, SPEC 3.6)
COLLAPSE_RATIO = 0.95  # near_bound_ratio at or above this means the actor collapsed to the bound
# Above these, the divergence message names the learning rate, the reward or the observations as
# the likely cause (else it lists them all): the usual TD3 scales are lr <= 1e-3, |r| and |s| ~ 1-10.
DIVERGENCE_HINTS = {"learning_rate": 1e-3, "reward": 100.0, "observation": 100.0}
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
    if min(args.hidden_sizes) <= 0:
        raise UserError(f"--hidden-sizes must be two widths > 0, got {' '.join(map(str, args.hidden_sizes))}")
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

    def __init__(self, obs_dim: int, action_low: np.ndarray, action_high: np.ndarray,
                 hidden_sizes: tuple[int, int] = (256, 256)):
        super().__init__()
        h1, h2 = hidden_sizes
        self.fc1 = nn.Linear(obs_dim, h1)
        self.fc2 = nn.Linear(h1, h2)
        self.fc_mu = nn.Linear(h2, len(action_low))
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

    def __init__(self, obs_dim: int, action_dim: int, hidden_sizes: tuple[int, int] = (256, 256)):
        super().__init__()
        sizes = [obs_dim + action_dim, *hidden_sizes, 1]
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
def batch_fields(rows: torch.Tensor, obs_dim: int, action_dim: int):
    """(obs, actions, rewards, terminations, next_obs) as views of replay rows."""
    o, a = obs_dim, action_dim
    return rows[:, :o], rows[:, 2 * o:2 * o + a], rows[:, -2], rows[:, -1], rows[:, o:2 * o]


class ReplayBuffer:
    """Ring buffer of transitions as rows of one preallocated tensor on the training device.

    One row is [obs | next_obs | action | reward | terminated]: a batch is one random gather of
    rows (one op instead of five), and its fields are column views of it.
    """

    def __init__(self, capacity: int, obs_dim: int, action_dim: int, device: torch.device):
        self.capacity, self.device = capacity, device
        self.obs_dim, self.action_dim = obs_dim, action_dim
        self.storage = torch.zeros(capacity, 2 * obs_dim + action_dim + 2, device=device)
        self.pos, self.size = 0, 0

    @property
    def obs(self) -> torch.Tensor:
        return self.storage[:, :self.obs_dim]

    @property
    def terminations(self) -> torch.Tensor:
        return self.storage[:, -1]

    def add(self, obs, next_obs, actions, rewards, terminations) -> None:
        n = len(obs)
        if n == 0:
            return
        rows = torch.as_tensor(np.concatenate(
            [obs, next_obs, actions, np.reshape(rewards, (n, 1)), np.reshape(terminations, (n, 1))],
            axis=1, dtype=np.float32), device=self.device)
        if self.pos + n <= self.capacity:  # the usual case: a slice write, no index tensor
            self.storage[self.pos:self.pos + n] = rows
        else:
            self.storage[torch.arange(self.pos, self.pos + n, device=self.device) % self.capacity] = rows
        self.pos = (self.pos + n) % self.capacity
        self.size = min(self.size + n, self.capacity)

    def sample(self, batch_size: int):
        rows = self.storage[torch.randint(0, self.size, (batch_size,), device=self.device)]
        return batch_fields(rows, self.obs_dim, self.action_dim)

    def state_dict(self) -> dict:
        return {"pos": self.pos, "size": self.size, "storage": self.storage[: self.size].cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.pos, self.size = state["pos"], state["size"]
        self.storage[: self.size] = state["storage"].to(self.device)


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


def require_cxx_compiler(device: torch.device) -> None:
    """torch.compile on CPU builds C++ kernels: say so at start, not with a traceback at the first update."""
    if device.type == "cpu" and not any(shutil.which(cxx) for cxx in ("g++", "c++", "clang++")):
        raise UserError("--compile on CPU needs a C++ compiler (e.g. apt install g++); or pass --no-compile")


class Adam:
    """Adam (Kingma & Ba, 2015) on a list of tensors, in place, in eight foreach ops.

    Written out instead of torch.optim.Adam so that one TD3 update -- loss, gradient and
    optimizer step -- is a pure tensor function that torch.compile turns into one graph (the
    optimizer's Python bookkeeping is half the eager update's overhead at these sizes). The step
    count is a 0-dim tensor, so a compiled graph does not recompile as it counts.
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

    def state_dict(self) -> dict:
        return {"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq, "step": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            torch._foreach_copy_(self.exp_avg, state["exp_avg"])
            torch._foreach_copy_(self.exp_avg_sq, state["exp_avg_sq"])
            self.step_count.copy_(state["step"])


class TD3:
    """Actor, twin critic, their targets and optimizers; `update` is one TD3 gradient step.

    The two steps of the algorithm box are pure functions of tensors (`critic_step`,
    `actor_step`): loss, gradient (torch.func) and Adam in one place. With --compile (the
    default) torch.compile makes each one graph -- inductor's C++ kernels fuse the elementwise
    work around the matmuls -- and on CUDA also replays it as a CUDA graph.
    """

    def __init__(self, obs_dim: int, action_low: np.ndarray, action_high: np.ndarray, args: Args,
                 device: torch.device):
        self.args, self.device = args, device
        # requires_grad off: gradients come from torch.func.grad, so autograd need not record
        # every forward (acting, evaluation, targets) for a backward that never comes.
        self.actor = Actor(obs_dim, action_low, action_high, args.hidden_sizes).to(device).requires_grad_(False)
        self.qf = TwinQ(obs_dim, len(action_low), args.hidden_sizes).to(device).requires_grad_(False)
        self.actor_target = copy.deepcopy(self.actor)
        self.qf_target = copy.deepcopy(self.qf)
        self.action_low = torch.as_tensor(action_low, dtype=torch.float32, device=device)
        self.action_high = torch.as_tensor(action_high, dtype=torch.float32, device=device)
        self.actor_params = dict(self.actor.named_parameters())
        self.qf_params = dict(self.qf.named_parameters())
        self.q_optimizer = Adam(list(self.qf_params.values()), args.learning_rate)
        self.actor_optimizer = Adam(list(self.actor_params.values()), args.learning_rate)
        self.normalizer = RunningMeanStd(obs_dim, device) if args.state_norm else None
        self.n_updates = 0
        self._sources = list(self.actor.parameters()) + list(self.qf.parameters())
        self._targets = list(self.actor_target.parameters()) + list(self.qf_target.parameters())
        self.critic_step, self.actor_step = self._critic_step, self._actor_step
        if args.compile:
            if device.type == "cpu":  # the graph's launcher in C++ too: no Python between kernels
                torch._inductor.config.cpp_wrapper = True
            mode = "reduce-overhead" if device.type == "cuda" else None  # CUDA graphs on GPU
            self.critic_step = torch.compile(self._critic_step, mode=mode, fullgraph=True)
            self.actor_step = torch.compile(self._actor_step, mode=mode, fullgraph=True)

    def norm(self, obs: torch.Tensor) -> torch.Tensor:
        return obs if self.normalizer is None else self.normalizer.normalize(obs)

    @torch.inference_mode()
    def act(self, obs: np.ndarray, exploration_noise: float = 0.0) -> np.ndarray:
        """pi(s) (+ N(0, noise*scale) when exploring), clipped to the bounds of each dimension."""
        actions = self.actor(self.norm(torch.as_tensor(obs, dtype=torch.float32, device=self.device)))
        if exploration_noise > 0:
            actions += torch.randn_like(actions) * (exploration_noise * self.actor.action_scale)
        return torch.clamp(actions, self.action_low, self.action_high).cpu().numpy()

    def matmul_precision(self):
        """--bf16: the networks run in bfloat16 inside the update; weights, losses, Adam stay fp32."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.args.bf16)

    def _critic_step(self, obs, actions, rewards, terminations, next_obs, noise):
        """Clipped double-Q regression of both critics on the smoothed target, one Adam step."""
        with torch.no_grad(), self.matmul_precision():
            y = td3_target(self.actor_target, self.qf_target, next_obs, rewards, terminations, noise,
                           self.args.gamma, self.action_low, self.action_high)

        def loss(qf_params):
            with self.matmul_precision():
                q = torch.func.functional_call(self.qf, qf_params, (obs, actions)).float()
            qf_losses = (q - y).square().mean(dim=1)  # [qf1_loss, qf2_loss]
            return qf_losses.sum(), (qf_losses, q.mean(dim=1))

        grads, (qf_loss, (qf_losses, q_means)) = torch.func.grad_and_value(loss, has_aux=True)(self.qf_params)
        with torch.no_grad():
            self.q_optimizer.step(list(grads.values()))
        return qf_loss, qf_losses, q_means

    def actor_loss(self, actor_params: dict, obs: torch.Tensor) -> torch.Tensor:
        """-mean Q1(s, pi(s)) as a function of the actor's parameters (TD3 differentiates Q1 only)."""
        return -self.qf.q1(obs, torch.func.functional_call(self.actor, actor_params, (obs,))).float().mean()

    def _actor_step(self, obs):
        """Deterministic policy gradient through Q1 only, one Adam step, then Polyak targets."""
        with self.matmul_precision():
            grads, actor_loss = torch.func.grad_and_value(self.actor_loss)(self.actor_params, obs)
        with torch.no_grad():
            self.actor_optimizer.step(list(grads.values()))
            soft_update_(self._targets, self._sources, self.args.tau)
        return actor_loss

    def update(self, batch) -> dict:
        """One critic step; every policy_frequency-th call also one actor step and a target update."""
        obs, actions, rewards, terminations, next_obs = batch
        obs, next_obs = self.norm(obs), self.norm(next_obs)
        # Target policy smoothing noise, drawn here so compiled and eager runs draw the same numbers.
        noise = smoothing_noise(actions, self.args.policy_noise, self.args.noise_clip, self.actor.action_scale)
        qf_loss, qf_losses, q_means = self.critic_step(obs, actions, rewards, terminations, next_obs, noise)
        self.n_updates += 1
        metrics = {"qf_loss": qf_loss, "qf_losses": qf_losses, "q_means": q_means}
        # Delayed policy updates: the actor follows a critic that has had time to settle.
        if self.n_updates % self.args.policy_frequency == 0:
            metrics["actor_loss"] = self.actor_step(obs)
        return metrics

    def compile_now(self, batch_size: int) -> float:
        """With --compile, build both compiled steps before training; returns the seconds it took.

        One critic and one actor step on a dummy batch, then every tensor and RNG state is put
        back, so the run's numbers do not depend on it; the compile time is reported on its own
        instead of inside the first learning step.
        """
        if not self.args.compile:
            return 0.0
        start = time.perf_counter()
        saved = copy.deepcopy(self.state_dict())
        obs_dim, action_dim = self.actor.fc1.in_features, len(self.action_low)
        zeros = ReplayBuffer(batch_size, obs_dim, action_dim, self.device).storage
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            for _ in range(self.args.policy_frequency):
                self.update(batch_fields(zeros, obs_dim, action_dim))
        self.load_state_dict(saved)
        return time.perf_counter() - start

    def state_dict(self) -> dict:
        return {"actor": self.actor.state_dict(), "qf": self.qf.state_dict(),
                "actor_target": self.actor_target.state_dict(), "qf_target": self.qf_target.state_dict(),
                "actor_optimizer": self.actor_optimizer.state_dict(),
                "q_optimizer": self.q_optimizer.state_dict(),
                "normalizer": None if self.normalizer is None else self.normalizer.state_dict(),
                "n_updates": self.n_updates}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():  # in place: the optimizers and compiled steps hold these tensors
            for name in ("actor", "qf", "actor_target", "qf_target"):
                getattr(self, name).load_state_dict(state[name])
        for name in ("actor_optimizer", "q_optimizer"):
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
    grads = torch.func.grad(agent.actor_loss)(agent.actor_params, obs)
    with torch.no_grad():
        actions = agent.actor(obs)
        q = agent.qf(obs, actions)
    stats = action_saturation_stats(actions.cpu().numpy(), agent.actor.action_scale.cpu().numpy(),
                                    agent.actor.action_bias.cpu().numpy())
    stats["actor_grad_norm"] = float(torch.sqrt(sum(g.square().sum() for g in grads.values())))
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

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    replace_atomic(path, write)


def save_torch_atomic(path: str, obj) -> None:
    replace_atomic(path, lambda tmp: torch.save(obj, tmp))


EVAL_CSV_FIELDS = ["global_step", "eval_return_mean", "eval_return_std", "value_bias", "wall_time_s"]


def write_evaluations_csv(path: str, history: list[dict]) -> None:
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=EVAL_CSV_FIELDS)
            writer.writeheader()
            writer.writerows({k: row[k] for k in EVAL_CSV_FIELDS} for row in history)

    replace_atomic(path, write)


def save_learning_curve(path: str, history: list[dict], title: str) -> None:
    """learning_curve.png: eval return mean +- std against steps, and the paper's overestimation
    check (value_bias = Q1 estimate - discounted return collected; > 0 means overestimation)."""
    steps = np.array([row["global_step"] for row in history])
    mean = np.array([row["eval_return_mean"] for row in history])
    std = np.array([row["eval_return_std"] for row in history])
    biased = [(row["global_step"], row["value_bias"]) for row in history if row["value_bias"] is not None]
    fig, (ax_return, ax_bias) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=(2, 1))
    try:
        ax_return.plot(steps, mean, marker="o", markersize=3)
        ax_return.fill_between(steps, mean - std, mean + std, alpha=0.25, label="± std over eval episodes")
        ax_return.set(ylabel="eval return (deterministic)", title=title)
        ax_return.legend(loc="lower right")
        if biased:
            ax_bias.plot(*zip(*biased), marker="o", markersize=3, color="tab:red")
        else:
            ax_bias.text(0.5, 0.5, "no evaluated state qualifies (unseen tail gamma^(T-t) > 1%, e.g. 200-step Pendulum)", ha="center",
                         va="center", transform=ax_bias.transAxes)
        ax_bias.axhline(0.0, color="grey", linewidth=0.8)
        ax_bias.set(xlabel="environment steps", ylabel="value bias (Q1 - return)")
        fig.tight_layout()
        replace_atomic(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    finally:
        plt.close(fig)


def load_torch_file(path: str, what: str) -> dict:
    if not os.path.isfile(path):
        raise UserError(f"{what} '{path}' does not exist; give the path of a model.pt or checkpoint.pt")
    try:
        # weights_only=False: our own files also hold numpy RNG states. Only load files you trust.
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a truncated or foreign file: say which, not a traceback
        raise UserError(f"{what} '{path}' cannot be read ({type(err).__name__}: {err})") from None
    found = state.get("format") if isinstance(state, dict) else None
    if isinstance(found, str) and found.startswith("td3_continuous/") and found != CHECKPOINT_FORMAT:
        raise UserError(f"{what} '{path}' was written by another version of td3_continuous.py "
                        f"(format {found}; this one reads {CHECKPOINT_FORMAT})")
    if found != CHECKPOINT_FORMAT:
        raise UserError(f"{what} '{path}' is not a td3_continuous.py model.pt or checkpoint.pt")
    return state


CHECKPOINT_FORMAT = "td3_continuous/2"


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
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    if args.compile and not args.eval_only:
        require_cxx_compiler(device)
    return device


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


# BENCHMARK: how fast the update is, and how fast it could be on this machine ------------------------
def update_flops(obs_dim: int, action_dim: int, hidden_sizes: tuple[int, int], batch_size: int,
                 policy_frequency: int) -> float:
    """Matmul FLOPs of one update (2 per multiply-add), counted layer by layer.

    critic step: target actor and twin target forward, twin forward, twin backward (weight
    gradients of every layer, input gradients of all but the first); actor step, every
    policy_frequency-th update: actor and Q1 forward, Q1 backward to its action input,
    actor backward (weights; inputs of all but the first layer).
    """
    h1, h2 = hidden_sizes
    actor = [(obs_dim, h1), (h1, h2), (h2, action_dim)]
    critic = [(obs_dim + action_dim, h1), (h1, h2), (h2, 1)]
    size = lambda layers: sum(n_in * n_out for n_in, n_out in layers)  # noqa: E731
    critic_step = size(actor) + 2 * size(critic) + 2 * size(critic) + 2 * (size(critic) + size(critic[1:]))
    actor_step = 2 * size(actor) + size(actor[1:]) + 2 * size(critic)
    return 2.0 * batch_size * (critic_step + actor_step / policy_frequency)


def matmul_gflops(batch_size: int, hidden: int, dtype: torch.dtype, device: torch.device, seconds: float = 1.0) -> float:
    """Throughput of the update's dominant matmul, [batch, hidden] @ [hidden, hidden], in GFLOP/s."""
    a = torch.randn(batch_size, hidden, device=device).to(dtype)
    b = torch.randn(hidden, hidden, device=device).to(dtype)
    for _ in range(20):
        a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(50):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        count += 50
    return 2.0 * batch_size * hidden * hidden * count / (time.perf_counter() - start) / 1e9


def benchmark(args: Args) -> dict:
    """--benchmark: the machine's matmul ceiling, the bare update (no env) with these arguments
    against the plain eager fp32 update, and a short run's learning-phase SPS.

    The two updates run in alternating blocks in one process: on a shared machine the speed
    drifts by 10-30% within minutes, so numbers from separate runs are not comparable.
    """
    device = select_device(args)
    seed_everything(args.seed)
    env = make_checked_env(args.env_id)
    obs_dim, action_dim = env.observation_space.shape[0], env.action_space.shape[0]
    low, high = env.action_space.low, env.action_space.high
    env.close()
    variants = {"these arguments": args, "eager fp32": dataclasses.replace(args, compile=False, bf16=False)}
    agents = {name: TD3(obs_dim, low, high, a, device) for name, a in variants.items()}
    hidden = max(args.hidden_sizes)  # the ceiling: a square matmul as wide as the widest layer
    result = {"env_id": args.env_id, "threads": torch.get_num_threads(), "compile": args.compile, "bf16": args.bf16,
              "fp32_matmul_gflops": matmul_gflops(args.batch_size, hidden, torch.float32, device)}
    try:
        result["bf16_matmul_gflops"] = matmul_gflops(args.batch_size, hidden, torch.bfloat16, device)
    except RuntimeError:  # no bf16 matmul on this device
        result["bf16_matmul_gflops"] = None
    rb = ReplayBuffer(10_000, obs_dim, action_dim, device)
    rb.add(np.random.randn(10_000, obs_dim), np.random.randn(10_000, obs_dim),
           np.random.uniform(low, high, (10_000, action_dim)), np.random.randn(10_000), np.zeros(10_000))
    result["compile_seconds"] = agents["these arguments"].compile_now(args.batch_size)
    rates = {name: [] for name in agents}
    for _ in range(7):
        for name, agent in agents.items():
            start = time.perf_counter()
            for _ in range(200):
                agent.update(rb.sample(args.batch_size))
            if device.type == "cuda":
                torch.cuda.synchronize()
            rates[name].append(200 / (time.perf_counter() - start))
    result["updates_per_second"] = float(np.median(rates["these arguments"]))
    result["eager_fp32_updates_per_second"] = float(np.median(rates["eager fp32"]))
    flops = update_flops(obs_dim, action_dim, args.hidden_sizes, args.batch_size, args.policy_frequency)
    result["update_gflop"] = flops / 1e9
    result["update_gflops"] = flops * result["updates_per_second"] / 1e9
    result["share_of_fp32_ceiling"] = result["update_gflops"] / result["fp32_matmul_gflops"]
    with tempfile.TemporaryDirectory() as runs_dir:
        run = main(dataclasses.replace(args, benchmark=False, runs_dir=runs_dir, learning_starts=1000,
                                       total_timesteps=4000, eval_frequency=4000, eval_episodes=1,
                                       checkpoint_frequency=0, save_model=False))
    result["sps_learning_phase"] = run["sps_learning_phase"]
    print_benchmark(result, args, hidden)
    return result


def print_benchmark(result: dict, args: Args, hidden: int) -> None:
    bf16 = result["bf16_matmul_gflops"]
    print(f"matmul [{args.batch_size}x{hidden}]@[{hidden}x{hidden}]: fp32 {result['fp32_matmul_gflops']:.0f} GFLOP/s, "
          f"bf16 {f'{bf16:.0f} GFLOP/s' if bf16 else 'n/a'} ({result['threads']} threads)")
    print(f"bare update (compile {args.compile}, bf16 {args.bf16}; compiled in {result['compile_seconds']:.1f} s): "
          f"{result['updates_per_second']:.0f} updates/s x {result['update_gflop']:.3f} GFLOP = "
          f"{result['update_gflops']:.0f} GFLOP/s, {100 * result['share_of_fp32_ceiling']:.0f}% of the fp32 matmul rate")
    print(f"bare update, eager fp32, in alternating blocks with the above: "
          f"{result['eager_fp32_updates_per_second']:.0f} updates/s "
          f"(x{result['updates_per_second'] / result['eager_fp32_updates_per_second']:.2f})")
    print(f"learning-phase SPS of a 4000-step run (learning from step 1000): {result['sps_learning_phase']:.0f}")


# FAULTS: a run that diverges or is stopped ends with a status, a summary and what can be kept --------
class StopOnSignal:
    """SIGINT (Ctrl-C) and SIGTERM (what schedulers send) only set `signum`: the training loop
    checks it at each step boundary, so the run can write its summary and checkpoint first.
    A second signal stops at once (KeyboardInterrupt). Outside the main thread it does nothing.
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


def training_values(metrics: dict) -> dict:
    """The update's losses and mean Q-values as floats (reading them back syncs the device)."""
    q_means, qf_losses = metrics["q_means"].tolist(), metrics["qf_losses"].tolist()
    values = {"qf1_values": q_means[0], "qf2_values": q_means[1], "qf1_loss": qf_losses[0], "qf2_loss": qf_losses[1]}
    if "actor_loss" in metrics:
        values["actor_loss"] = metrics["actor_loss"].item()
    return values


class RunFolder:
    """Everything a training run writes and counts: TensorBoard, evaluations.csv, the audit JSON
    files, progress lines, checkpoint.pt, model.pt and summary.json.

    `progress` is the run's bookkeeping (steps, episodes, evaluation history, learning-phase
    clock); it goes into every checkpoint, so a resumed run counts every step once.
    """

    def __init__(self, args: Args, agent: TD3, rb: ReplayBuffer, envs, resume_state: Optional[dict]):
        self.args, self.agent, self.rb, self.envs = args, agent, rb, envs
        self.progress = {"global_step": 0, "episodes": 0, "eval_history": [], "saturation_history": [],
                         "wall_time_s": 0.0, "learn_seconds": 0.0, "learn_steps": 0}
        purge_step = None
        if resume_state is None:
            self.dir = os.path.join(args.runs_dir, f"{args.env_id.replace(':', '_')}__{args.exp_name}__{args.seed}__{int(time.time())}")
            os.makedirs(self.dir, exist_ok=True)
        else:
            self.dir = os.path.dirname(os.path.abspath(args.resume))
            self.progress.update(resume_state["progress"], global_step=resume_state["global_step"])
            purge_step = self.global_step + 1  # TensorBoard drops events logged after the checkpoint
            print(f"resuming {self.dir} at step {self.global_step} with the arguments saved in the checkpoint")
        self.csv_path = os.path.join(self.dir, "evaluations.csv")
        write_evaluations_csv(self.csv_path, self.progress["eval_history"])
        self.writer = SummaryWriter(self.dir, purge_step=purge_step)
        self.writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items()))
        self.feature_names = [f"obs_{i}" for i in range(rb.obs_dim)]
        self.start_time, self.start_step, self.last_progress = time.time(), self.global_step, time.time()
        self.wall_before = self.progress["wall_time_s"]
        self.checkpoint_step = None if resume_state is None else self.global_step  # of the checkpoint.pt on disk
        self.last_metrics: Optional[dict] = None
        self.status, self.error, self.signum = "running", None, None

    @property
    def global_step(self) -> int:
        return self.progress["global_step"]

    def wall_time(self) -> float:
        return self.wall_before + time.time() - self.start_time

    def learning_sps(self) -> float:
        seconds = self.progress["learn_seconds"]
        return self.progress["learn_steps"] / seconds if seconds > 0 else 0.0

    def count_step(self, seconds: Optional[float]) -> None:
        """One loop iteration (num_envs env steps); `seconds` is its time if it was a learning step."""
        self.progress["global_step"] += self.args.num_envs
        if seconds is not None:
            self.progress["learn_seconds"] += seconds
            self.progress["learn_steps"] += self.args.num_envs

    def log_episode(self, episodic_return: float, length: int) -> None:
        self.progress["episodes"] += 1
        self.writer.add_scalar("charts/episodic_return", episodic_return, self.global_step)
        self.writer.add_scalar("charts/episodic_length", length, self.global_step)

    def log_update(self, metrics: dict) -> None:
        """CleanRL's loss curves, read back (and checked for divergence) every LOG_EVERY_UPDATES updates."""
        self.last_metrics = metrics
        if self.agent.n_updates % LOG_EVERY_UPDATES:
            return
        values = training_values(metrics)
        self.check_finite(values, step=self.global_step + self.args.num_envs)  # the step in progress
        for name, value in values.items():
            self.writer.add_scalar(f"losses/{name}", value, self.global_step)
        self.writer.add_scalar("losses/qf_loss", (values["qf1_loss"] + values["qf2_loss"]) / 2.0, self.global_step)
        self.writer.add_scalar("charts/SPS", int(self.learning_sps()), self.global_step)

    def check_finite(self, values: Optional[dict] = None, step: Optional[int] = None) -> None:
        """Raise Diverged if a loss, a mean Q-value (the last update's unless given) or a weight is NaN/inf.

        Runs at every logging interval and before anything is evaluated or saved, so no
        evaluation, checkpoint or model file ever holds a diverged network.
        """
        step = self.global_step if step is None else step
        if values is None:
            values = training_values(self.last_metrics) if self.last_metrics is not None else {}
        for name, value in values.items():
            if not math.isfinite(value):
                raise Diverged(self.divergence_message(name, value, step))
        params = list(self.agent.actor_params.values()) + list(self.agent.qf_params.values())
        if not bool(torch.isfinite(torch.stack([p.sum() for p in params])).all()):
            raise Diverged(self.divergence_message("a network weight", math.nan, step))

    def divergence_message(self, what: str, value: float, step: int) -> str:
        """One line: where, what, the likely cause with this run's numbers, and what was kept."""
        args, stored = self.args, self.rb.storage[: self.rb.size]
        finite_max = lambda x: float(x[torch.isfinite(x)].abs().max()) if x.numel() else 0.0  # noqa: E731
        max_reward, max_obs = finite_max(stored[:, -2]), finite_max(stored[:, : self.rb.obs_dim])
        causes = {  # cause: whether this run's numbers point at it
            f"too high a learning rate (--learning-rate {args.learning_rate:g}; the default is 3e-4)":
                args.learning_rate > DIVERGENCE_HINTS["learning_rate"],
            f"the reward scale (|reward| up to {max_reward:.3g})": max_reward > DIVERGENCE_HINTS["reward"],
        }
        if not args.state_norm:  # never advise an option the run already uses
            causes[f"unnormalized inputs (|observation| up to {max_obs:.3g}; try --state-norm)"] = \
                max_obs > DIVERGENCE_HINTS["observation"]
        likely = [cause for cause, flagged in causes.items() if flagged] or list(causes)
        kept = ("no checkpoint (--checkpoint-frequency N keeps the last finite one)" if self.checkpoint_step is None
                else f"the last finite checkpoint (step {self.checkpoint_step}) is {os.path.join(self.dir, 'checkpoint.pt')}")
        return (f"training diverged at step {step}: {what} = {value:g}. "
                f"Likely cause: {'; or '.join(likely)}. Kept: {kept}")

    def evaluate(self, eval_env: gym.Env) -> None:
        """Evaluate, audit, log and write the per-evaluation files (not counted as learning time)."""
        args, agent, step = self.args, self.agent, self.global_step
        result = evaluate(agent, eval_env, args.eval_episodes, args.seed + 100, args.gamma)
        audit = actor_critic_audit(agent, result["obs"])
        row = {"global_step": step, "eval_return_mean": result["mean"], "eval_return_std": result["std"],
               "value_bias": result["value_bias"], "wall_time_s": round(self.wall_time(), 2)}
        self.progress["eval_history"].append(row)
        self.progress["saturation_history"].append({"global_step": step, **audit})
        with open(self.csv_path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=EVAL_CSV_FIELDS).writerow(row)
        save_learning_curve(os.path.join(self.dir, "learning_curve.png"), self.progress["eval_history"],
                            f"TD3 {args.env_id}, seed {args.seed}")
        self.writer.add_scalar("eval/episodic_return", result["mean"], step)
        self.writer.add_scalar("eval/episodic_return_std", result["std"], step)
        if result["value_bias"] is not None:
            self.writer.add_scalar("eval/value_bias", result["value_bias"], step)
        for key in ("near_bound_ratio", "kappa_mean", "actor_grad_norm", "q_twin_gap"):
            self.writer.add_scalar(f"audit/{key}", audit[key], step)
        write_json_atomic(os.path.join(self.dir, "td3_action_saturation.json"), {
            "near_bound_threshold": NEAR_BOUND, "collapse_threshold": COLLAPSE_RATIO,
            "agents": {"td3": {"summary": audit, "history": self.progress["saturation_history"]}}})
        raw = self.rb.obs[: self.rb.size : max(1, self.rb.size // 100_000)]
        pre = scale_stats(raw.cpu().numpy(), self.feature_names)
        post = scale_stats(agent.norm(raw).cpu().numpy(), self.feature_names)
        write_json_atomic(os.path.join(self.dir, "state_scale_summary.json"), {
            "mode": "running_zscore" if args.state_norm else "none", "log_volume": False,
            "feature_names": self.feature_names,
            "fit_sample_count": agent.normalizer.count if agent.normalizer is not None else 0,
            "pre_stats": pre, "post_stats": post,
            "p99_abs_spread": {"pre": p99_abs_spread(pre), "post": p99_abs_spread(post)}})
        self.print_progress()

    def print_progress(self) -> None:
        history, args = self.progress["eval_history"], self.args
        last = f"{history[-1]['eval_return_mean']:.1f}" if history else "-"
        sps = self.learning_sps()
        if sps > 0:
            rate, eta = f"learning SPS {sps:.0f}", format_eta((args.total_timesteps - self.global_step) / sps)
        else:  # uniform-random phase: no update timed yet, so no honest ETA
            elapsed = max(time.time() - self.start_time, 1e-9)
            rate = f"random-phase SPS {(self.global_step - self.start_step) / elapsed:.0f}"
            eta = "? (learning not started)"
        print(f"step {self.global_step}/{args.total_timesteps} | {rate} | last eval {last} | ETA {eta}", flush=True)
        self.last_progress = time.time()

    def after_step(self, eval_env: gym.Env) -> None:
        """Evaluate, print progress and checkpoint when their step (or time) has come."""
        step, n, args = self.global_step, self.args.num_envs, self.args
        evaluate_now = crossed(step, n, args.eval_frequency) or step >= args.total_timesteps
        checkpoint_now = crossed(step, n, args.checkpoint_frequency)
        if evaluate_now or checkpoint_now:
            self.check_finite()
        if evaluate_now:
            self.evaluate(eval_env)
        elif time.time() - self.last_progress > PROGRESS_EVERY_SECONDS:
            self.print_progress()
        if checkpoint_now:
            self.save_checkpoint()

    def stopped(self, signum: Optional[int]) -> None:
        """The loop ended: completed, or interrupted by a signal (then a last checkpoint, if they are on)."""
        self.check_finite()
        self.status, self.signum = ("completed", None) if signum is None else ("interrupted", signum)
        if signum is not None and self.args.checkpoint_frequency > 0:
            self.save_checkpoint()

    def diverged(self, err: Diverged) -> None:
        self.status, self.error = "diverged", str(err)

    def model_state(self) -> dict:
        """What model.pt holds; checkpoint.pt adds the buffer, RNG states and run progress."""
        return {"format": CHECKPOINT_FORMAT, "args": asdict(self.args), "global_step": self.global_step,
                "agent": self.agent.state_dict()}

    def save_checkpoint(self) -> None:
        self.progress["wall_time_s"] = self.wall_time()
        self.checkpoint_step = self.global_step
        save_torch_atomic(os.path.join(self.dir, "checkpoint.pt"), {
            **self.model_state(), "buffer": self.rb.state_dict(), "progress": self.progress,
            "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                    "action_space": self.envs.action_space.np_random.bit_generator.state}})

    def finish(self, compile_seconds: float) -> dict:
        """summary.json (and model.pt with --save-model, unless diverged), then the closing line."""
        history, saturation = self.progress["eval_history"], self.progress["saturation_history"]
        last = history[-1] if history else {}  # a run may diverge or stop before its first evaluation
        last10 = [row["eval_return_mean"] for row in history[-10:]]
        exit_code = 128 + self.signum if self.status == "interrupted" else EXIT_CODES[self.status]
        summary = {
            "status": self.status, "exit_code": exit_code, "env_id": self.args.env_id, "seed": self.args.seed,
            "global_step": self.global_step, "total_timesteps": self.args.total_timesteps,
            "episodes": self.progress["episodes"], "updates": self.agent.n_updates,
            "eval_return_last": last.get("eval_return_mean"),
            "eval_return_std_last": last.get("eval_return_std"),
            "eval_return_mean_last10": float(np.mean(last10)) if last10 else None,
            "value_bias_last": last.get("value_bias"),
            "sps_learning_phase": round(self.learning_sps(), 1),
            "compile_seconds": round(compile_seconds, 2),
            "wall_time_s": round(self.wall_time(), 2),
            "audit": saturation[-1] if saturation else None, "run_dir": self.dir,
            "checkpoint_step": self.checkpoint_step,
        }
        if self.error:
            summary["error"] = self.error
        if self.signum is not None:
            summary["signal"] = signal.Signals(self.signum).name
        if self.args.save_model and self.status != "diverged":
            save_torch_atomic(os.path.join(self.dir, "model.pt"), self.model_state())
        write_json_atomic(os.path.join(self.dir, "summary.json"), summary)
        self.writer.close()
        self.print_end(summary, len(last10))
        return summary

    def print_end(self, summary: dict, n_last: int) -> None:
        if self.status == "diverged":
            print(f"error: {self.error}", file=sys.stderr)
            return
        evals = (f"last eval {summary['eval_return_last']:.1f}, mean of last {n_last} evals "
                 f"{summary['eval_return_mean_last10']:.1f}, " if n_last else "no evaluation yet, ")
        if self.status == "completed":
            print(f"done: {self.global_step} steps, {evals}learning SPS {summary['sps_learning_phase']:.0f} -> {self.dir}")
            return
        resume = (f"continue with: python td3_continuous.py --resume {os.path.join(self.dir, 'checkpoint.pt')}"
                  if self.checkpoint_step == self.global_step else "no checkpoint (--checkpoint-frequency N makes a run resumable)")
        print(f"interrupted by {summary['signal']} at step {self.global_step}/{self.args.total_timesteps}, {evals}"
              f"{resume}", file=sys.stderr)


def load_resume(args: Args) -> tuple[Args, Optional[dict]]:
    """--resume PATH: the checkpoint and the arguments saved in it (None, args without --resume)."""
    if not args.resume:
        return args, None
    state = load_torch_file(args.resume, "--resume")
    if "buffer" not in state:
        raise UserError(f"'{args.resume}' is a model file without replay buffer; resume needs a "
                        "checkpoint.pt written with --checkpoint-frequency N")
    return dataclasses.replace(Args(**state["args"]), resume=args.resume), state


def start_or_restore(envs, agent: TD3, rb: ReplayBuffer, args: Args, resume_state: Optional[dict]):
    """First observations of a new run, or a checkpoint's networks, buffer and RNG states."""
    if resume_state is None:
        envs.action_space.seed(args.seed)
        return envs.reset(seed=args.seed)[0]
    agent.load_state_dict(resume_state["agent"])
    rb.load_state_dict(resume_state["buffer"])
    rng = resume_state["rng"]
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    envs.action_space.np_random.bit_generator.state = rng["action_space"]
    # The env state itself cannot be saved (MuJoCo), so the episode in progress at the
    # checkpoint is cut: fresh episodes start from a seed that depends on the step.
    return envs.reset(seed=args.seed + resume_state["global_step"])[0]


def main(args: Args) -> dict:
    """Train TD3 (or evaluate with --eval-only); returns the summary also written to summary.json."""
    validate_args(args)
    if args.eval_only:
        return eval_only(args)
    if args.benchmark:
        return benchmark(args)
    args, resume_state = load_resume(args)
    device = select_device(args)
    seed_everything(args.seed)
    envs = make_checked_env(args.env_id, num_envs=args.num_envs)
    obs_dim = envs.single_observation_space.shape[0]
    agent = TD3(obs_dim, envs.single_action_space.low, envs.single_action_space.high, args, device)
    rb = ReplayBuffer(min(args.buffer_size, args.total_timesteps), obs_dim, envs.single_action_space.shape[0], device)
    run = RunFolder(args, agent, rb, envs, resume_state)
    obs = start_or_restore(envs, agent, rb, args, resume_state)
    eval_env = make_eval_env(args, run.dir)
    ep_returns, ep_lengths = np.zeros(args.num_envs), np.zeros(args.num_envs, dtype=int)
    prev_done = np.zeros(args.num_envs, dtype=bool)

    with StopOnSignal() as stop:  # Ctrl-C / SIGTERM: finish the step, save, exit 130 / 143
        compile_seconds = agent.compile_now(args.batch_size)
        try:
            while run.global_step < args.total_timesteps and stop.signum is None:
                learning = run.global_step >= args.learning_starts
                iteration_start = time.perf_counter()
                # ALGO LOGIC: put action logic here (uniform random actions until learning starts)
                actions = agent.act(obs, args.exploration_noise) if learning else envs.action_space.sample()
                next_obs, rewards, terminations, truncations, infos = envs.step(actions)
                real_next_obs, keep = transitions_to_store(next_obs, terminations, truncations, infos,
                                                           envs.metadata["autoreset_mode"], prev_done)
                rb.add(obs[keep], real_next_obs[keep], actions[keep], rewards[keep], terminations[keep])
                if agent.normalizer is not None:
                    agent.normalizer.update(torch.as_tensor(obs[keep], device=device))
                ep_returns[keep] += rewards[keep]
                ep_lengths[keep] += 1
                prev_done = terminations | truncations
                for i in np.flatnonzero(prev_done):
                    run.log_episode(ep_returns[i], ep_lengths[i])
                    ep_returns[i], ep_lengths[i] = 0.0, 0
                obs = next_obs

                # ALGO LOGIC: training (one update per env step, the paper's update-to-data ratio of 1)
                if learning:
                    for _ in range(args.num_envs):
                        metrics = agent.update(rb.sample(args.batch_size))
                        run.log_update(metrics)  # also stops a diverging run (NaN/inf) with Diverged
                run.count_step(time.perf_counter() - iteration_start if learning else None)
                run.after_step(eval_env)
            run.stopped(stop.signum)
        except Diverged as err:
            run.diverged(err)

    envs.close()
    eval_env.close()
    return run.finish(compile_seconds)


if __name__ == "__main__":
    try:
        summary = main(parse_cli())
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # before training started, or a second Ctrl-C
        print("error: interrupted; stopped at once, without a summary (the last checkpoint.pt, if any, is intact)",
              file=sys.stderr)
        sys.exit(130)
    sys.exit(summary.get("exit_code", 0))
