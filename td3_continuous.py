"""TD3 (Fujimoto, van Hoof & Meger, 2018) for gymnasium 1.x continuous control, in one file.

Reproduces "Addressing Function Approximation Error in Actor-Critic Methods": clipped double-Q
learning, target policy smoothing and delayed policy updates, in the CleanRL style, with the
authors' evaluation protocol (deterministic episodes on a separate env seeded seed + 100).

Run:     python td3_continuous.py --env-id Hopper-v5 --seed 1        (--help lists every flag)
Writes:  runs/{env_id}__{exp_name}__{seed}__{unix_time}/ with TensorBoard events, evaluations.csv,
         learning_curve.png, summary.json, td3_action_saturation.json, state_scale_summary.json,
         model.pt (--save-model) and checkpoint.pt (--checkpoint-frequency N, for --resume).

Reading map. The lesson comes first, in the order it runs; the machinery follows one signpost.
  Args                                  every flag, with its meaning
  make_env, transitions_to_store        the environment; gymnasium 1.x episode ends  (FORK: environment)
  Actor, QNetwork, TwinQ                the networks                                 (FORK: a layer)
  ReplayBuffer, RunningMeanStd          what is stored, and --state-norm
  smoothing_noise, td3_target, TD3      the algorithm box: the two losses, one update (FORK: optimizer)
  evaluate                              the authors' protocol and the paper's overestimation check
  main                                  the loop: act, step, store, update; when to evaluate, log, save
"""

import contextlib
import copy
import csv
import dataclasses
import io
import json
import math
import os
import pathlib
import pickle
import random
import re
import shutil
import signal
import sys
import threading
import time
from typing import Optional

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


@dataclasses.dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (part of the run folder name); default: this file's name, so a fork's runs say so"""
    seed: int = 1
    """seed of the experiment (python, numpy, torch, env resets and action-space sampling)"""
    cuda: bool = True
    """if toggled, cuda is used when available"""
    threads: int = 0
    """torch intra-op threads (0 keeps torch's default, one per core)"""
    compile: bool = True
    """torch.compile the two losses (~30 s at the first updates on an empty inductor cache; needs a C++ compiler)"""
    bf16: bool = not torch.cuda.is_available() and (torch.cpu._is_avx512_bf16_supported()
                                                    or torch.cpu._is_amx_tile_supported())
    """bfloat16 matmuls in the losses (autocast); default: on on a CPU with AVX512-BF16/AMX and no CUDA device"""
    runs_dir: str = "runs"
    """root folder of the run folders"""
    save_model: bool = False
    """write model.pt (networks, optimizers, normalizer, args, step) at the end"""
    checkpoint_frequency: int = 0
    """write checkpoint.pt (model + replay buffer + RNG states) every N env steps; 0 disables"""
    resume: Optional[str] = None
    """a checkpoint.pt: continue its run with its saved settings; --threads, --cuda, --compile, --bf16 as given"""
    eval_only: bool = False
    """only evaluate the model in --checkpoint with its settings, but --seed, --eval-episodes and where it runs"""
    checkpoint: Optional[str] = None
    """model.pt or checkpoint.pt to evaluate with --eval-only"""

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


# ENVIRONMENT ------------------------------------------------------------------------------------
def make_env(env_id: str):
    """FORK: the environment. Any gymnasium env with a flat Box observation and a Box action space."""
    return lambda: gym.make(env_id)


def transitions_to_store(next_obs, infos, autoreset_mode, prev_done):
    """The true next observations of a vector step, and which rows are real transitions. Gymnasium 1.x
    autoresets in one of two ways, each a trap. SAME_STEP: at the step an episode ends, `next_obs` is
    already the *reset* observation; the true last one is in infos["final_obs"] (mask "_final_obs").
    NEXT_STEP: the step after a done is a reset step whose "transition" joins two episodes: drop it."""
    real_next_obs = np.array(next_obs, copy=True)
    keep = np.ones(len(next_obs), dtype=bool)
    if autoreset_mode == gym.vector.AutoresetMode.SAME_STEP:
        for i in np.flatnonzero(infos.get("_final_obs", [])):
            real_next_obs[i] = infos["final_obs"][i]
    elif autoreset_mode == gym.vector.AutoresetMode.NEXT_STEP:
        keep = ~prev_done
    else:
        raise ValueError(f"autoreset mode {autoreset_mode} is not supported")
    return real_next_obs, keep


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


# REPLAY BUFFER AND NORMALIZER -------------------------------------------------------------------
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


class TD3:
    """Actor, twin critic, their targets and optimizers; `update` is one step of the algorithm box. Gradients
    come from torch.func, as CleanRL's JAX script uses jax.value_and_grad: a loss is a function of the weights
    and grad_and_value returns its gradient. The weights need no autograd graph (requires_grad off: backward()
    or a tensor hook fails loudly rather than doing nothing), and torch.compile makes each gradient one graph."""

    def __init__(self, obs_dim: int, action_space: gym.spaces.Box, args: Args, device: torch.device):
        self.args, self.device = args, device
        low, high = action_space.low, action_space.high
        self.actor = Actor(obs_dim, low, high, args.hidden_sizes).to(device).requires_grad_(False)
        self.qf = TwinQ(obs_dim, action_space.shape[0], args.hidden_sizes).to(device).requires_grad_(False)
        self.actor_target, self.qf_target = copy.deepcopy(self.actor), copy.deepcopy(self.qf)
        # FORK: the optimizer: any torch.optim optimizer (e.g. torch.optim.AdamW; a scheduler: build it here, step
        # it in update()). fused=True runs Adam as one C++ kernel for all tensors instead of ~10 ops per tensor.
        self.q_optimizer = torch.optim.Adam(self.qf.parameters(), lr=args.learning_rate, fused=True)
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=args.learning_rate, fused=True)
        self.normalizer = RunningMeanStd(obs_dim).to(device) if args.state_norm else None
        self.action_low, self.action_high = (torch.as_tensor(b, dtype=torch.float32).to(device) for b in (low, high))
        self.n_updates, self.last_actor_loss = 0, None  # the loss of the last actor step, in every update's metrics

    def norm(self, obs: torch.Tensor) -> torch.Tensor:
        return obs if self.normalizer is None else self.normalizer.normalize(obs)

    @torch.inference_mode()
    def act(self, obs: np.ndarray, exploration_noise: float = 0.0) -> np.ndarray:
        """pi(s) (+ N(0, noise*scale) when exploring), clipped to the bounds of each dimension."""
        actions = self.actor(self.norm(torch.as_tensor(obs, dtype=torch.float32, device=self.device)))
        if exploration_noise > 0:
            actions += torch.randn_like(actions) * (exploration_noise * self.actor.action_scale)
        return torch.clamp(actions, self.action_low, self.action_high).cpu().numpy()

    def bf16(self):
        """--bf16: the networks' matmuls in bfloat16 (autocast); weights, losses and Adam stay fp32."""
        return torch.autocast(self.device.type, torch.bfloat16, enabled=self.args.bf16)

    def critic_gradients(self, obs, actions, rewards, terminations, next_obs, noise):
        """Gradient of the critic loss: both critics regress on the clipped double-Q target."""
        with torch.no_grad(), self.bf16():
            y = td3_target(self.actor_target, self.qf_target, next_obs, rewards, terminations, noise,
                           self.args.gamma, self.action_low, self.action_high).float()

        def critic_loss(qf_params):
            with self.bf16():
                q = torch.func.functional_call(self.qf, qf_params, (obs, actions)).float()  # [2, batch]
            qf_losses = (q - y).square().mean(dim=1)  # [qf1_loss, qf2_loss]
            return qf_losses.sum(), {"qf_losses": qf_losses, "q_means": q.mean(dim=1)}
        grads, (_, metrics) = torch.func.grad_and_value(critic_loss, has_aux=True)(dict(self.qf.named_parameters()))
        return grads, metrics

    def actor_loss(self, actor_params: dict, obs: torch.Tensor) -> torch.Tensor:
        """-mean Q1(s, pi(s)) as a function of the actor's weights: the deterministic policy gradient."""
        with self.bf16():
            return -self.qf.q1(obs, torch.func.functional_call(self.actor, actor_params, (obs,))).float().mean()

    def actor_gradients(self, obs):
        return torch.func.grad_and_value(self.actor_loss)(dict(self.actor.named_parameters()), obs)

    def update(self, batch) -> dict:
        """One critic step; every policy_frequency-th call also an actor step and a target update."""
        obs, actions, rewards, terminations, next_obs = batch
        obs, next_obs = self.norm(obs), self.norm(next_obs)
        noise = smoothing_noise(actions, self.args.policy_noise, self.args.noise_clip, self.actor.action_scale)
        grads, metrics = self.critic_gradients(obs, actions, rewards, terminations, next_obs, noise)
        optimizer_step(self.q_optimizer, self.qf, grads)
        self.n_updates += 1
        # Delayed policy updates: the actor follows a critic that has had time to settle.
        if self.n_updates % self.args.policy_frequency == 0:
            grads, self.last_actor_loss = self.actor_gradients(obs)
            optimizer_step(self.actor_optimizer, self.actor, grads)
            soft_update_(list(self.actor_target.parameters()) + list(self.qf_target.parameters()),
                         list(self.actor.parameters()) + list(self.qf.parameters()), self.args.tau)
        return {**metrics, "actor_loss": self.last_actor_loss}


# EVALUATION -------------------------------------------------------------------------------------
def evaluate(agent: TD3, env: gym.Env, episodes: int, seed: int, gamma: float) -> dict:
    """The authors' protocol: the deterministic policy (no noise) on a separate env whose first reset
    only is seeded (every evaluation replays the same start states). Plus the paper's overestimation
    check: value_bias = mean of Q1(s_t, pi(s_t)) - the discounted return collected from s_t."""
    returns, all_obs, mc_returns = [], [], []
    for episode in range(episodes):
        obs, _ = env.reset(seed=seed if episode == 0 else None)
        ep_obs, ep_rewards, done, terminated = [], [], False, False
        while not done:
            ep_obs.append(obs)
            obs, reward, terminated, truncated, _ = env.step(agent.act(obs[None])[0])
            ep_rewards.append(float(reward))
            done = terminated or truncated
        returns.append(sum(ep_rewards))
        all_obs.append(np.asarray(ep_obs, dtype=np.float32))
        mc_returns.append(discounted_returns(ep_rewards, terminated, gamma))
    obs_all, mask = np.concatenate(all_obs), np.concatenate([fair for _, fair in mc_returns])
    value_bias = None
    if mask.any():
        with torch.no_grad():
            obs_t = agent.norm(torch.as_tensor(obs_all[mask], device=agent.device))
            q1 = agent.qf.q1(obs_t, agent.actor(obs_t)).cpu().numpy()
        value_bias = float(np.mean(q1 - np.concatenate([g for g, _ in mc_returns])[mask]))
    return {"returns": returns, "obs": obs_all, "value_bias": value_bias,
            "mean": float(np.mean(returns)), "std": float(np.std(returns))}


# THE TRAINING LOOP ------------------------------------------------------------------------------
def main(args: Args) -> dict:
    """Train TD3 (or evaluate a saved model with --eval-only); returns the summary, also in summary.json."""
    check_args(args)
    if args.eval_only:
        return eval_only(args)
    args, checkpoint = load_saved(args)  # --resume: the arguments and state saved in a checkpoint.pt
    device = setup_torch(args)
    # SAME_STEP autoreset: see transitions_to_store; the episode statistics land in infos["episode"]
    envs = gym.wrappers.vector.RecordEpisodeStatistics(checked_env(args.env_id, lambda: gym.vector.SyncVectorEnv(
        [make_env(args.env_id)] * args.num_envs, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)))
    obs_dim, action_dim = envs.single_observation_space.shape[0], envs.single_action_space.shape[0]
    agent = TD3(obs_dim, envs.single_action_space, args, device)
    if args.compile:
        compile_update(agent)
    rb = ReplayBuffer(min(args.buffer_size, args.total_timesteps), obs_dim, action_dim, device)
    run = RunFolder(args, checkpoint)  # writes the run's files; the loop below decides when
    eval_env = checked_env(args.env_id, make_env(args.env_id))
    obs, global_step = start_or_resume(envs, agent, rb, args, checkpoint)
    prev_done = np.zeros(args.num_envs, dtype=bool)

    with StopOnSignal() as stop:  # Ctrl-C / SIGTERM: finish the step, save, exit 130 / 143
        try:
            while global_step < args.total_timesteps and stop.signum is None:
                learning = global_step >= args.learning_starts
                # ALGO LOGIC: act (uniform random until learning starts), step, store the true transitions
                actions = agent.act(obs, args.exploration_noise) if learning else envs.action_space.sample()
                next_obs, rewards, terminations, truncations, infos = envs.step(actions)
                real_next_obs, keep = transitions_to_store(next_obs, infos, envs.metadata["autoreset_mode"], prev_done)
                rb.add(obs[keep], real_next_obs[keep], actions[keep], rewards[keep], terminations[keep])
                if agent.normalizer is not None:  # --state-norm: the statistics follow the states acted from
                    agent.normalizer.update(torch.as_tensor(obs[keep], device=device))
                prev_done, obs = terminations | truncations, next_obs
                global_step += args.num_envs
                run.log_episodes(infos, global_step)

                # ALGO LOGIC: one update per env step (the paper's ratio), num_envs of them per iteration
                if learning:
                    for _ in range(args.num_envs):
                        metrics = agent.update(rb.sample(args.batch_size))
                    if crossed(agent.n_updates, args.num_envs, LOG_EVERY_UPDATES):
                        run.log_losses(metrics, agent, rb, global_step)  # raises Diverged on NaN/inf
                run.tick(learning, global_step)
                if crossed(global_step, args.num_envs, args.eval_frequency) or global_step >= args.total_timesteps:
                    result = evaluate(agent, eval_env, args.eval_episodes, args.seed + 100, args.gamma)
                    run.log_evaluation(result, audit(agent, result["obs"]), agent, rb, global_step)
                if crossed(global_step, args.num_envs, args.checkpoint_frequency):
                    run.save_checkpoint(agent, rb, envs, global_step)
            run.stopped(stop.signum, agent, rb, envs, global_step)
        except Diverged as err:
            run.status, run.error = "diverged", str(err)
        envs.close()
        eval_env.close()
        return run.finish(agent, global_step)  # a signal now waits for the files; a second one stops at once


# ===== MACHINERY (skip on a first read): the audit, the run folder, checkpoints and resume, =========
# ===== eval-only, faults and signals, the command line, the compile set-up ============================
LOG_EVERY_UPDATES = 100  # metrics are read back (.item() waits for the device) only this often
PROGRESS_EVERY_SECONDS = 30.0  # a progress line at least this often: a long run never looks hung
NEAR_BOUND = 0.999  # |a| >= 0.999 a_max counts as "at the bound" (the saturation audit)
COLLAPSE_RATIO = 0.95  # near_bound_ratio at or above this means the actor collapsed to the bound
VALUE_BIAS_TAIL = 0.01  # value_bias skips states whose unseen tail weight gamma^(T-t) exceeds this
# Above these, the divergence message names the learning rate, the reward or the observations as
# the likely cause (else it lists them all): the usual TD3 scales are lr <= 1e-3, |r| and |s| ~ 1-10.
DIVERGENCE_HINTS = {"learning_rate": 1e-3, "reward": 100.0, "observation": 100.0}
EXIT_CODES = {"completed": 0, "diverged": 1}  # interrupted: 128 + the signal (130 SIGINT, 143 SIGTERM)
CHECKPOINT_FORMAT = "td3_continuous/3"
RUNTIME = ("threads", "cuda", "compile", "bf16")  # where and how fast a run runs: --resume takes them as given
EVAL_CSV_FIELDS = ["global_step", "eval_return_mean", "eval_return_std", "value_bias", "wall_time_s"]


class UserError(Exception):
    """A mistake in the command line or inputs: reported as one line on stderr, exit code 2."""


class Diverged(Exception):
    """A loss, a Q-value or a weight stopped being finite: the run ends with status "diverged"."""


# AUDIT: the returns behind value_bias; how close the actor sits to its bound ----------------------
def discounted_returns(rewards: list[float], terminated: bool, gamma: float) -> tuple[np.ndarray, np.ndarray]:
    """G_t = sum_{k >= t} gamma^(k - t) r_k for every t of one episode, and which G_t are fair targets:
    all if the episode terminated, else those whose unseen tail gamma^(T - t) is at most VALUE_BIAS_TAIL."""
    returns, running, length = np.zeros(len(rewards)), 0.0, len(rewards)
    for t in range(length - 1, -1, -1):
        returns[t] = running = rewards[t] + gamma * running
    fair = np.ones(length, dtype=bool) if terminated else gamma ** (length - np.arange(length)) <= VALUE_BIAS_TAIL
    return returns, fair


def kappa(actions_normalized: np.ndarray) -> np.ndarray:
    """tanh gate kappa = 1 - (a/a_max)^2, the factor d tanh/du on every actor gradient: 0 at the bound."""
    return 1.0 - np.square(actions_normalized)


def audit(agent: TD3, eval_obs: np.ndarray) -> dict:
    """On the eval states: the actor's nearness to its bound, kappa, its gradient norm, the twins' disagreement."""
    obs = agent.norm(torch.as_tensor(eval_obs, dtype=torch.float32, device=agent.device))
    grads = torch.func.grad(agent.actor_loss)(dict(agent.actor.named_parameters()), obs)
    with torch.no_grad():
        actions, u = agent.actor(obs, with_preactivation=True)
        q = agent.qf(obs, actions)
    a = np.tanh(u.double().cpu().numpy())  # a / a_max, per dimension
    k, near = kappa(a), float(np.mean(np.abs(a) >= NEAR_BOUND))
    return {"near_bound_ratio": near, "actor_collapse_detected": bool(near >= COLLAPSE_RATIO),
            "kappa_mean": float(k.mean()), "kappa_p10": float(np.percentile(k, 10)),
            "action_mean": float(actions.mean()), "action_std": float(actions.std(unbiased=False)),
            "actor_grad_norm": float(torch.sqrt(sum(g.square().sum() for g in grads.values()))),
            "q_twin_gap": float((q[0] - q[1]).abs().mean())}


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


def scale_summary(agent: TD3, rb: ReplayBuffer) -> dict:
    """state_scale_summary.json: the stored (raw) states and what the networks see of them."""
    raw = rb.storage[: rb.size : max(1, rb.size // 100_000), : rb.obs_dim]
    names = [f"obs_{i}" for i in range(rb.obs_dim)]
    pre, post = scale_stats(raw.cpu().numpy(), names), scale_stats(agent.norm(raw).cpu().numpy(), names)
    return {"mode": "running_zscore" if agent.normalizer else "none", "log_volume": False, "feature_names": names,
            "fit_sample_count": int(agent.normalizer.count) if agent.normalizer else 0, "pre_stats": pre,
            "post_stats": post, "p99_abs_spread": {"pre": p99_abs_spread(pre), "post": p99_abs_spread(post)}}


# SET-UP: arguments, environments, torch and the compiled update ----------------------------------
def check_args(args: Args) -> None:
    """Reject values that would crash later or silently do something else."""
    rules = {"hidden_sizes": (lambda x: min(x) > 0, "two widths > 0"), "gamma": (lambda x: 0 <= x < 1, "in [0, 1)"),
             "seed": (lambda x: 0 <= x < 2**32, "in [0, 2**32 - 1]"), "tau": (lambda x: 0 < x <= 1, "in (0, 1]"),
             **dict.fromkeys(("total_timesteps", "buffer_size", "batch_size", "policy_frequency", "eval_frequency",
                              "eval_episodes", "learning_rate"), (lambda x: 0 < x < math.inf, "finite and > 0")),
             **dict.fromkeys(("learning_starts", "checkpoint_frequency", "threads", "policy_noise",
                              "exploration_noise", "noise_clip"), (lambda x: 0 <= x < math.inf, "finite and >= 0")),
             "num_envs": (lambda n: n > 0 and args.total_timesteps % n == 0,
                          f"> 0 and divide --total-timesteps ({args.total_timesteps} env steps, not iterations)"),
             "runs_dir": (lambda p: next(os.path.isdir(a) and os.access(a, os.W_OK) for a in
                                         [p, *pathlib.Path(p).parents] if os.path.exists(a)), "a folder you can write")}
    for name, (valid, text) in rules.items():
        if not valid(getattr(args, name)):  # each test is written so that NaN (it compares False) and inf fail
            raise UserError(f"--{name.replace('_', '-')} must be {text}, got {getattr(args, name)}")
    if args.eval_only != bool(args.checkpoint):
        raise UserError("--eval-only needs --checkpoint PATH (a model.pt or checkpoint.pt), and --checkpoint is "
                        "only read with --eval-only (to continue training use --resume)")


def checked_env(env_id: str, build):
    """build() an env (or a vector env) of env_id; a bad id or a space TD3 cannot handle is one UserError."""
    try:
        env = build()
    except (gym.error.Error, ImportError) as err:
        raise UserError(f"cannot make env '{env_id}': {err} Use a registered id such as "
                        "Hopper-v5 or Pendulum-v1, or the module:EnvId form.") from None
    obs_space = getattr(env, "single_observation_space", env.observation_space)
    act_space = getattr(env, "single_action_space", env.action_space)
    if not isinstance(act_space, gym.spaces.Box) or len(act_space.shape) != 1:
        problem = f"action space {act_space}; TD3 needs a 1-D continuous Box (for discrete actions use DQN)"
    elif not np.all(np.isfinite(act_space.high - act_space.low)):
        problem = f"unbounded actions {act_space}; TD3's tanh actor needs finite bounds"
    elif not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1:
        problem = f"observation space {obs_space}; wrap it in gymnasium.wrappers.FlattenObservation"
    else:
        return env
    env.close()
    raise UserError(f"'{env_id}' has {problem}")


def setup_torch(args: Args) -> torch.device:
    """Threads, device and the seeds of python, numpy and torch (the envs are seeded at their first reset)."""
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    if args.compile and not args.eval_only:  # eval-only builds no graph
        require_cxx_compiler(device)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    return device


def require_cxx_compiler(device: torch.device) -> None:
    """torch.compile on CPU builds C++ kernels: say so at start, not with a traceback at the first update."""
    if device.type == "cpu" and not any(shutil.which(cxx) for cxx in ("g++", "c++", "clang++")):
        raise UserError("--compile on CPU needs a C++ compiler (e.g. apt install g++); or pass --no-compile")


def compile_update(agent) -> None:
    """--compile: each gradient one graph of C++ kernels; code dynamo cannot trace runs eagerly (slower, right)."""
    agent.critic_gradients = torch.compile(agent.critic_gradients)
    agent.actor_gradients = torch.compile(agent.actor_gradients)


def crossed(step: int, stride: int, frequency: int) -> bool:
    """True when the last `stride` steps passed a multiple of `frequency` (0 = never)."""
    return frequency > 0 and step // frequency > (step - stride) // frequency


# THE RUN FOLDER: what a run writes, and its learning-phase clock -------------------------------------
class RunFolder:
    """Everything a training run writes: TensorBoard, evaluations.csv, learning_curve.png, the audit JSON
    files, checkpoint.pt, model.pt, summary.json; the loop decides when. `progress` (steps, episodes,
    evaluations, the clock) goes into every checkpoint: a resumed run counts every step once."""

    def __init__(self, args: Args, checkpoint: Optional[dict]):
        self.args, self.status, self.error, self.signum, self.last_losses = args, "running", None, None, {}
        self.progress = {"global_step": 0, "episodes": 0, "eval_history": [], "saturation_history": [],
                         "wall_time_s": 0.0, "learn_seconds": 0.0, "learn_steps": 0, "compile_seconds": 0.0}
        self.dir = os.path.join(args.runs_dir, f"{args.env_id.replace(':', '_')}__{args.exp_name}__{args.seed}__"
                                               f"{int(time.time())}")
        if checkpoint is not None:
            self.dir = os.path.dirname(os.path.abspath(args.resume))
            self.progress.update(checkpoint["progress"])
            print(f"resuming {self.dir} at step {self.progress['global_step']} (saved arguments; bf16 {args.bf16})")
        os.makedirs(self.dir, exist_ok=True)
        self.checkpoint_step = None if checkpoint is None else self.progress["global_step"]  # of checkpoint.pt
        write_evaluations_csv(os.path.join(self.dir, "evaluations.csv"), self.progress["eval_history"])
        # on resume, TensorBoard drops the events logged after the checkpoint
        self.writer = SummaryWriter(self.dir, purge_step=None if checkpoint is None else self.checkpoint_step + 1)
        self.writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(
            f"|{k}|{v}|" for k, v in dataclasses.asdict(args).items()))
        self.start_time, self.wall_before = time.time(), self.progress["wall_time_s"]
        # the first critic and the first actor gradient are where torch.compile builds its graphs
        self.compile_iterations = math.ceil(args.policy_frequency / args.num_envs) if args.compile else 0
        self.clock = self.last_print = time.perf_counter()

    def tick(self, learning: bool, global_step: int) -> None:
        """The learning-phase clock (not evaluating, saving, nor compiling) and a progress line now and then."""
        now, progress = time.perf_counter(), self.progress
        if learning and self.compile_iterations > 0:
            self.compile_iterations -= 1
            progress["compile_seconds"] += now - self.clock
        elif learning:
            progress["learn_seconds"] += now - self.clock
            progress["learn_steps"] += global_step - progress["global_step"]
        progress["global_step"], self.clock = global_step, now
        if now - self.last_print > PROGRESS_EVERY_SECONDS:
            self.print_progress()

    def sps(self) -> float:
        return self.progress["learn_steps"] / self.progress["learn_seconds"] if self.progress["learn_seconds"] else 0.0

    def print_progress(self) -> None:
        """A progress line; the time since the last tick (an evaluation, a checkpoint) is not learning time."""
        step, history, total = self.progress["global_step"], self.progress["eval_history"], self.args.total_timesteps
        last = f"{history[-1]['eval_return_mean']:.1f}" if history else "-"
        eta = int((total - step) / max(self.sps(), 1e-9))  # no update timed yet: no honest ETA
        eta = f"{eta // 3600}h{eta % 3600 // 60:02d}m{eta % 60:02d}s" if self.sps() else "? (learning not started)"
        print(f"step {step}/{total} | learning SPS {self.sps():.0f} | last eval {last} | ETA {eta}", flush=True)
        self.last_print = self.clock = time.perf_counter()

    def log_episodes(self, infos: dict, global_step: int) -> None:
        for i in np.flatnonzero(infos.get("_episode", [])):
            self.progress["episodes"] += 1
            self.writer.add_scalar("charts/episodic_return", float(infos["episode"]["r"][i]), global_step)
            self.writer.add_scalar("charts/episodic_length", int(infos["episode"]["l"][i]), global_step)

    def log_losses(self, metrics: dict, agent: TD3, rb: ReplayBuffer, global_step: int) -> None:
        """CleanRL's loss curves; a NaN or inf in them ends the run (Diverged)."""
        (q1, q2), (l1, l2) = metrics["q_means"].tolist(), metrics["qf_losses"].tolist()
        losses = {"qf1_values": q1, "qf2_values": q2, "qf1_loss": l1, "qf2_loss": l2, "qf_loss": (l1 + l2) / 2,
                  "actor_loss": metrics["actor_loss"]}  # of the last actor step, whichever update that was
        self.last_losses = {name: float(value) for name, value in losses.items() if value is not None}
        self.check_finite(agent, rb, global_step)
        for name, value in self.last_losses.items():
            self.writer.add_scalar(f"losses/{name}", value, global_step)
        self.writer.add_scalar("charts/SPS", int(self.sps()), global_step)

    def check_finite(self, agent: TD3, rb: ReplayBuffer, step: int) -> None:
        """Diverged if a logged loss or Q-value or a weight is NaN/inf: checked at every logging interval and
        before any evaluation is written or a model saved, so no file ever holds a diverged network."""
        bad = next(((name, v) for name, v in self.last_losses.items() if not math.isfinite(v)), None)
        weights = torch.stack([p.sum() for p in list(agent.actor.parameters()) + list(agent.qf.parameters())])
        if bad is None and not bool(torch.isfinite(weights).all()):
            bad = ("a network weight", math.nan)
        if bad is None:
            return
        finite_max = lambda x: float(x[torch.isfinite(x)].abs().max()) if x.numel() else 0.0  # noqa: E731
        max_reward, max_obs = finite_max(rb.storage[: rb.size, -2]), finite_max(rb.storage[: rb.size, : rb.obs_dim])
        causes = {  # cause: whether this run's numbers point at it
            f"too high a learning rate (--learning-rate {self.args.learning_rate:g}; default {Args.learning_rate:g})":
                self.args.learning_rate > DIVERGENCE_HINTS["learning_rate"],
            f"the reward scale (|reward| up to {max_reward:.3g})": max_reward > DIVERGENCE_HINTS["reward"]}
        if not self.args.state_norm:  # never advise an option the run already uses
            causes[f"unnormalized inputs (|observation| up to {max_obs:.3g}; try --state-norm)"] = \
                max_obs > DIVERGENCE_HINTS["observation"]
        likely = [cause for cause, flagged in causes.items() if flagged] or list(causes)
        kept = ("no checkpoint (--checkpoint-frequency N keeps the last finite one)" if self.checkpoint_step is None
                else f"the last finite checkpoint (step {self.checkpoint_step}) is {self.dir}/checkpoint.pt")
        raise Diverged(f"training diverged at step {step}: {bad[0]} = {bad[1]:g}. "
                       f"Likely cause: {'; or '.join(likely)}. Kept: {kept}")

    def log_evaluation(self, result: dict, saturation: dict, agent: TD3, rb: ReplayBuffer, step: int) -> None:
        """evaluations.csv, learning_curve.png, the audit files, TensorBoard and a progress line."""
        self.check_finite(agent, rb, step)
        history = self.progress["eval_history"]
        history.append({"global_step": step, "eval_return_mean": result["mean"], "eval_return_std": result["std"],
                        "value_bias": result["value_bias"], "wall_time_s": round(self.wall_time(), 2)})
        self.progress["saturation_history"].append({"global_step": step, **saturation})
        write_evaluations_csv(os.path.join(self.dir, "evaluations.csv"), history)
        save_learning_curve(os.path.join(self.dir, "learning_curve.png"), history, f"TD3 {self.args.env_id}, "
                                                                                   f"seed {self.args.seed}")
        audited = ("near_bound_ratio", "kappa_mean", "actor_grad_norm", "q_twin_gap")
        scalars = {"eval/episodic_return": result["mean"], "eval/episodic_return_std": result["std"],
                   "eval/value_bias": result["value_bias"], **{f"audit/{k}": saturation[k] for k in audited}}
        for name, value in scalars.items():
            if value is not None:
                self.writer.add_scalar(name, value, step)
        write_json_atomic(os.path.join(self.dir, "td3_action_saturation.json"), {
            "near_bound_threshold": NEAR_BOUND, "collapse_threshold": COLLAPSE_RATIO,
            "agents": {"td3": {"summary": saturation, "history": self.progress["saturation_history"]}}})
        write_json_atomic(os.path.join(self.dir, "state_scale_summary.json"), scale_summary(agent, rb))
        self.print_progress()

    def wall_time(self) -> float:
        return self.wall_before + time.time() - self.start_time

    def save(self, name: str, agent: TD3, step: int, **extra) -> None:
        """model.pt (networks, optimizers, normalizer, args, step); checkpoint.pt adds buffer, RNG and progress."""
        state = {"format": CHECKPOINT_FORMAT, "args": dataclasses.asdict(self.args), "global_step": step,
                 "agent": agent_state(agent), **extra}
        replace_atomic(os.path.join(self.dir, name), lambda tmp: torch.save(state, tmp))

    def save_checkpoint(self, agent: TD3, rb: ReplayBuffer, envs, step: int) -> None:
        self.check_finite(agent, rb, step)
        self.progress["wall_time_s"] = self.wall_time()
        self.save("checkpoint.pt", agent, step, progress=self.progress, rng=rng_state(envs),
                  buffer={"pos": rb.pos, "size": rb.size, "storage": rb.storage[: rb.size].cpu()})
        self.checkpoint_step, self.clock = step, time.perf_counter()  # saving is not learning time

    def stopped(self, signum: Optional[int], agent: TD3, rb: ReplayBuffer, envs, step: int) -> None:
        """The loop ended: completed (a signal at the last step too), or interrupted (then a last checkpoint)."""
        self.check_finite(agent, rb, step)
        done = signum is None or step >= self.args.total_timesteps
        self.status, self.signum = ("completed", None) if done else ("interrupted", signum)
        if self.signum is not None and self.args.checkpoint_frequency > 0:
            self.save_checkpoint(agent, rb, envs, step)

    def finish(self, agent: TD3, step: int) -> dict:
        """summary.json (and model.pt with --save-model, unless diverged), then the closing line."""
        history, saturation = self.progress["eval_history"], self.progress["saturation_history"]
        last = history[-1] if history else {}  # a run may diverge or stop before its first evaluation
        last10 = [row["eval_return_mean"] for row in history[-10:]]
        summary = {
            "status": self.status, "exit_code": 128 + self.signum if self.signum else EXIT_CODES[self.status],
            "env_id": self.args.env_id, "exp_name": self.args.exp_name, "seed": self.args.seed, "global_step": step,
            "total_timesteps": self.args.total_timesteps, "bf16": self.args.bf16, "episodes": self.progress["episodes"],
            "updates": agent.n_updates, "eval_return_last": last.get("eval_return_mean"),
            "eval_return_std_last": last.get("eval_return_std"),
            "eval_return_mean_last10": float(np.mean(last10)) if last10 else None,
            "value_bias_last": last.get("value_bias"), "sps_learning_phase": round(self.sps(), 1),
            "compile_seconds": round(self.progress["compile_seconds"], 2), "wall_time_s": round(self.wall_time(), 2),
            "audit": saturation[-1] if saturation else None, "run_dir": self.dir,
            "checkpoint_step": self.checkpoint_step, **({"error": self.error} if self.error else {}),
            **({"signal": signal.Signals(self.signum).name} if self.signum else {})}
        if self.args.save_model and self.status != "diverged":
            self.save("model.pt", agent, step)
        write_json_atomic(os.path.join(self.dir, "summary.json"), summary)
        self.writer.close()
        evals = (f"last eval {last['eval_return_mean']:.1f}, mean of last {len(last10)} evals "
                 f"{summary['eval_return_mean_last10']:.1f}, " if last10 else "no evaluation yet, ")
        resume = (f"continue with: python td3_continuous.py --resume {self.dir}/checkpoint.pt"
                  if self.checkpoint_step == step else "no checkpoint (--checkpoint-frequency N makes a run resumable)")
        if self.status == "diverged":
            print(f"error: {self.error}", file=sys.stderr)
        elif self.status == "completed":
            print(f"done: {step} steps, {evals}learning SPS {self.sps():.0f} -> {self.dir}")
        else:
            print(f"interrupted by {summary['signal']} at step {step}/{self.args.total_timesteps}, {evals}{resume}",
                  file=sys.stderr)
        return summary


# FILES: atomic writes, evaluations.csv, learning_curve.png -----------------------------------------
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
    steps, mean, std = (np.array([row[k] for row in history]) for k in ("global_step", "eval_return_mean",
                                                                        "eval_return_std"))
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
            ax_bias.text(0.05, 0.5, "no evaluated state qualifies (unseen tail gamma^(T-t) > 1%)",
                         transform=ax_bias.transAxes)
        ax_bias.axhline(0.0, color="grey", linewidth=0.8)
        ax_bias.set(xlabel="environment steps", ylabel="value bias (Q1 - return)")
        fig.tight_layout()
        replace_atomic(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    finally:
        plt.close(fig)


# CHECKPOINTS: model.pt and checkpoint.pt, --resume and --eval-only --------------------------------
AGENT_PARTS = ("actor", "qf", "actor_target", "qf_target", "actor_optimizer", "q_optimizer", "normalizer")


def agent_state(agent: TD3) -> dict:
    parts = {name: getattr(agent, name) for name in AGENT_PARTS}
    return {"n_updates": agent.n_updates, **{name: part.state_dict() for name, part in parts.items() if part}}


def load_agent_state(agent: TD3, state: dict) -> None:
    for name in [name for name in AGENT_PARTS if getattr(agent, name) is not None]:  # the normalizer may be off
        getattr(agent, name).load_state_dict(state[name])
    agent.n_updates = state["n_updates"]


def rng_state(envs) -> dict:
    """The run's CPU random states, as tensors and plain values (what torch.load(weights_only=True) reads)."""
    kind, keys, *rest = np.random.get_state()
    return {"python": random.getstate(), "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all(),
            "numpy": [kind, torch.as_tensor(keys.astype(np.int64)), *rest],
            "action_space": envs.action_space.np_random.bit_generator.state}


def set_rng_state(state: dict, envs) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available():  # on a GPU the noise and the batches are drawn there
        torch.cuda.set_rng_state_all(state.get("cuda", []))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    envs.action_space.np_random.bit_generator.state = state["action_space"]


def load_torch_file(path: str, what: str) -> dict:
    """A model.pt or checkpoint.pt of this script. weights_only=True: tensors and plain values, never code."""
    if not os.path.isfile(path):
        raise UserError(f"{what} '{path}' {'is a folder, not a file' if os.path.isdir(path) else 'does not exist'}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "GLOBAL" in str(err):  # a pickle that would call code: someone else's file, not ours
            raise UserError(f"{what} '{path}' holds more than tensors and plain values; refused, nothing in it "
                            "ran") from None
        raise UserError(f"{what} '{path}' cannot be read (not a file torch.save wrote)") from None
    except Exception as err:  # a truncated or foreign file: say which, not a traceback
        raise UserError(f"{what} '{path}' cannot be read ({type(err).__name__}: {err})") from None
    if (found := state.get("format") if isinstance(state, dict) else None) != CHECKPOINT_FORMAT:
        raise UserError(f"{what} '{path}' is not a td3_continuous.py model.pt or checkpoint.pt of format "
                        f"{CHECKPOINT_FORMAT} (found: {found}); files of other versions cannot be read")
    state["args"] = Args(**{**state["args"], "hidden_sizes": tuple(state["args"]["hidden_sizes"])})
    return state


def load_saved(args: Args, own: tuple = ("resume",)) -> tuple[Args, Optional[dict]]:
    """--resume or --eval-only: the checkpoint's settings and the checkpoint. `own` settings come from the command
    line where given, RUNTIME ones always (their defaults are this machine's); any other given unlike it: refused."""
    path, flag = (args.checkpoint, "--eval-only") if args.eval_only else (args.resume, "--resume")
    state = load_torch_file(path, "--checkpoint" if args.eval_only else flag) if path else None
    if state is not None and not args.eval_only and "buffer" not in state:
        raise UserError(f"'{args.resume}' has no replay buffer: resume from a checkpoint.pt (--checkpoint-frequency N)")
    saved, default = state["args"] if state else args, type(args)()  # a subclass's own defaults: bf16_rounding.py
    for (name, value), old in zip(dataclasses.asdict(args).items(), dataclasses.astuple(saved)):
        if name not in (*own, *RUNTIME) and value != getattr(default, name) and value != old:  # given, not saved
            raise UserError(f"--{name.replace('_', '-')} {value}: {flag} keeps the checkpoint's settings ({old})")
    given = {k: v for k, v in vars(args).items() if k in RUNTIME or k in own and v != getattr(default, k)}
    return dataclasses.replace(saved, **given), state


def start_or_resume(envs, agent: TD3, rb: ReplayBuffer, args: Args, checkpoint: Optional[dict]):
    """(first observations, global step) of a new run, or after restoring a checkpoint's state."""
    if checkpoint is None:
        envs.action_space.seed(args.seed)
        return envs.reset(seed=args.seed)[0], 0
    load_agent_state(agent, checkpoint["agent"])
    rb.pos, rb.size = checkpoint["buffer"]["pos"], checkpoint["buffer"]["size"]
    rb.storage[: rb.size] = checkpoint["buffer"]["storage"].to(rb.device)
    set_rng_state(checkpoint["rng"], envs)
    # The env state cannot be saved (MuJoCo): the episode in progress is cut; new ones start from a step-dependent seed
    return envs.reset(seed=args.seed + checkpoint["global_step"])[0], checkpoint["global_step"]


def eval_only(args: Args) -> dict:
    """--eval-only --checkpoint PATH: the evaluation protocol once, with the checkpoint's settings (load_saved)."""
    saved, state = load_saved(args, ("eval_only", "checkpoint", "runs_dir", "seed", "eval_episodes"))
    given = [k for k in ("seed", "eval_episodes") if getattr(args, k) != getattr(type(args)(), k)]
    device = setup_torch(saved)
    run_dir = os.path.join(args.runs_dir, f"{saved.env_id.replace(':', '_')}__{saved.exp_name}-eval__{saved.seed}__"
                                          f"{int(time.time())}")
    with checked_env(saved.env_id, make_env(saved.env_id)) as eval_env:
        agent = TD3(eval_env.observation_space.shape[0], eval_env.action_space, saved, device)
        load_agent_state(agent, state["agent"])
        result = evaluate(agent, eval_env, saved.eval_episodes, saved.seed + 100, saved.gamma)
    os.makedirs(run_dir, exist_ok=True)
    summary = {"env_id": saved.env_id, "checkpoint": args.checkpoint, "checkpoint_step": state["global_step"],
               "seed": saved.seed, "eval_episodes": saved.eval_episodes, "from_command_line": sorted(given),
               "eval_return_mean": result["mean"], "eval_return_std": result["std"], "eval_returns": result["returns"],
               "value_bias": result["value_bias"], "run_dir": run_dir, "status": "completed", "exit_code": 0}
    write_json_atomic(os.path.join(run_dir, "summary.json"), summary)
    print(f"eval of {args.checkpoint} (step {state['global_step']}): {result['mean']:.1f} +- {result['std']:.1f} "
          f"over {saved.eval_episodes} episodes, seed {saved.seed} -> {run_dir}")
    return summary


# FAULTS AND THE COMMAND LINE --------------------------------------------------------------------
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
