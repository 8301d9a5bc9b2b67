"""Tiny environments whose right answers are known, registered on import.

Used through gymnasium's `module:EnvId` form, e.g. `--env-id tiny_envs:Counting-v0`.
"""

import gymnasium as gym
import numpy as np

ACTION_LOW = np.array([-2.0, 0.5], dtype=np.float32)  # asymmetric, different per dimension
ACTION_HIGH = np.array([1.0, 3.0], dtype=np.float32)


class CountingEnv(gym.Env):
    """obs = [episode number, t]; reward = t after the step.

    Even-numbered episodes terminate when t reaches 3; odd ones run until the TimeLimit (5)
    truncates them. Any action outside the (asymmetric) bounds raises, so a run that
    finishes sent only valid actions.
    """

    def __init__(self):
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)
        self.action_space = gym.spaces.Box(ACTION_LOW, ACTION_HIGH, dtype=np.float32)
        self.episode, self.t = -1, 0

    def _obs(self):
        return np.array([self.episode, self.t], dtype=np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.episode += 1
        self.t = 0
        return self._obs(), {}

    def step(self, action):
        action = np.asarray(action)
        if np.any(action < ACTION_LOW) or np.any(action > ACTION_HIGH):
            raise ValueError(f"action {action} outside [{ACTION_LOW}, {ACTION_HIGH}]")
        self.t += 1
        terminated = self.episode % 2 == 0 and self.t == 3
        return self._obs(), float(self.t), terminated, False, {}


class ConstantRewardEnv(gym.Env):
    """Reward 1 at every step, never terminates, truncated by the TimeLimit (50 steps).

    The true value of every state is 1 / (1 - gamma): a learner that treats truncation as
    termination instead learns values that fall to 1 near the end of the episode.
    """

    horizon = 50

    def __init__(self):
        self.observation_space = gym.spaces.Box(0.0, 1.0, (1,), np.float32)
        self.action_space = gym.spaces.Box(-2.0, 1.0, (1,), np.float32)
        self.t = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.array([0.0], dtype=np.float32), {}

    def step(self, action):
        self.t += 1
        return np.array([self.t / self.horizon], dtype=np.float32), 1.0, False, False, {}


gym.register("Counting-v0", entry_point=CountingEnv, max_episode_steps=5)
gym.register("ConstantReward-v0", entry_point=ConstantRewardEnv, max_episode_steps=ConstantRewardEnv.horizon)
