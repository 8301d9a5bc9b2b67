"""Tests of td3_continuous.py: mechanisms against hand-computed numbers, then short real runs."""

import copy
import csv
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time

import gymnasium as gym
import numpy as np
import pytest
import torch

import benchmark_update
import td3_continuous as td3
import tiny_envs
from unsafe_model import assert_code_running_model_file_is_refused

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "td3_continuous.py")


# One network shape for every test that compiles (obs 3, action 1, 64-wide, batch 128: Pendulum's):
# on a fresh machine each new shape costs a C++ build of its graphs, so they all reuse one, and they are
# marked xdist_group("compiled_td3"): one worker builds the graphs once and the other never waits on it.
# In fp32 on every machine (--bf16 is the default where the CPU has bf16 matmuls: test_bf16_rounding.py).
SHAPE = dict(hidden_sizes=(64, 64), batch_size=128, bf16=False)


def small_args(tmp_path, **overrides) -> td3.Args:
    """Short runs, eager: the compiled update is tested where it matters (parity, determinism, forks)."""
    base = dict(env_id="Pendulum-v1", total_timesteps=1000, learning_starts=400, eval_frequency=500,
                eval_episodes=2, runs_dir=str(tmp_path), cuda=False, compile=False, **SHAPE)
    base.update(overrides)
    return td3.Args(**base)


def run_script(*argv, **kwargs):
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "tests")}
    return subprocess.run([sys.executable, SCRIPT, *argv], capture_output=True, text=True, env=env,
                          timeout=600, **kwargs)


def run_cli(capsys, monkeypatch, *argv):
    """The command line in process, as its __main__ runs it (a subprocess costs seconds of imports):
    (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", [SCRIPT, *argv])
    with pytest.raises(SystemExit) as exit_:
        td3.run_command_line(td3.main, td3.Args)
    return exit_.value.code, capsys.readouterr().err


# --- mechanisms, by hand ------------------------------------------------------------------------
@pytest.mark.parametrize("cuda, avx512_bf16, amx, default", [(False, False, False, False), (False, True, False, True),
                                                             (False, False, True, True), (True, True, True, False)])
def test_bf16_is_the_default_only_on_cpus_with_bf16_matmuls(monkeypatch, cuda, avx512_bf16, amx, default):
    """--bf16 learns as well as fp32 (docs/mujoco.md) but its update runs 10-26x slower on a CPU without AVX512-BF16
    or AMX; with a CUDA device the update runs there, whatever the CPU: fp32 unless asked."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    spec = importlib.util.spec_from_file_location("td3_on_another_cpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)  # Args' defaults are fixed when the class is made: on import
    assert module.Args().bf16 is default
    assert td3.parse_cli(module.Args, []).bf16 is default  # the command line's default too
    assert td3.parse_cli(module.Args, ["--no-bf16" if default else "--bf16"]).bf16 is not default


def test_td3_target_clipped_double_q_with_smoothing_by_hand():
    next_obs = torch.tensor([[1.0], [2.0], [-4.0], [3.0]])
    actor_target = lambda o: 0.5 * o  # pi'(s') = [0.5, 1.0, -2.0, 1.5]
    qf_target = lambda o, a: torch.stack([(o + a).squeeze(-1), (2 * o - a).squeeze(-1)])
    noise = torch.tensor([[0.3], [0.2], [-0.1], [0.0]])
    # next actions: clamp([0.8, 1.2, -2.1, 1.5], -1, 1) = [0.8, 1.0, -1.0, 1.0] (both bounds reached)
    # Q1' = [1.8, 3.0, -5.0, 4.0], Q2' = [1.2, 3.0, -7.0, 5.0], min = [1.2, 3.0, -7.0, 4.0]
    # y = [1 + 0.9 * 1.2, -1 + 0.9 * 3.0, 0.5 + 0.9 * -7.0, 2 + 0.9 * 0 * 4.0] (the last transition terminated)
    # without the clamp rows 2 and 3 would read 1.52 and -4.99
    y = td3.td3_target(actor_target, qf_target, next_obs, torch.tensor([1.0, -1.0, 0.5, 2.0]),
                       torch.tensor([0.0, 0.0, 0.0, 1.0]), noise, 0.9, torch.tensor([-1.0]), torch.tensor([1.0]))
    assert torch.allclose(y, torch.tensor([2.08, 1.70, -5.8, 2.0]))


def test_smoothing_noise_is_clipped_per_dimension():
    torch.manual_seed(0)
    scale = torch.tensor([1.5, 0.25])  # bounds [-2, 1] and [0, 0.5]: different half-ranges
    noise = td3.smoothing_noise(torch.zeros(200_000, 2), 0.2, 0.5, scale)
    limit = 0.5 * scale
    assert torch.all(noise.abs() <= limit)
    # the clip sits at 2.5 standard deviations: P(|z| > 2.5) = 0.01242 of samples land on it
    at_limit = (noise.abs() == limit).float().mean(0)
    assert torch.allclose(at_limit, torch.tensor([0.01242, 0.01242]), atol=0.0015)
    # inside the clip the std is scaled per dimension: ratio of the two dims = 1.5 / 0.25
    ratio = noise[:, 0].std() / noise[:, 1].std()
    assert abs(ratio.item() - 6.0) < 0.05


def test_polyak_step_by_hand():
    targets = [torch.tensor([0.0, 1.0]), torch.tensor([[4.0]])]
    sources = [torch.tensor([10.0, 3.0]), torch.tensor([[0.0]])]
    td3.soft_update_(targets, sources, 0.25)
    assert torch.allclose(targets[0], torch.tensor([2.5, 1.5]))  # 0.75*0 + 0.25*10, 0.75*1 + 0.25*3
    assert torch.allclose(targets[1], torch.tensor([[3.0]]))


def test_optimizer_step_with_a_strided_gradient_moves_each_weight_the_right_way():
    """Regression: fused CPU Adam (torch 2.13) silently misreads a non-contiguous p.grad, and torch.func
    returns strided views. Adam's first step is -lr * sign(g) for every weight, so each one is known."""
    module = torch.nn.Linear(5, 3, bias=False)
    grad = torch.randn(5, 3, generator=torch.Generator().manual_seed(0)).t()  # a transposed view
    assert not grad.is_contiguous()
    before = module.weight.detach().clone()
    optimizer = torch.optim.Adam(module.parameters(), lr=0.1, fused=True)
    td3.optimizer_step(optimizer, module, {"weight": grad})
    assert torch.allclose(module.weight.detach() - before, -0.1 * torch.sign(grad), atol=1e-6)


ACTIONS = gym.spaces.Box(np.array([-2.0], np.float32), np.array([1.0], np.float32))  # asymmetric bounds


def make_agent(**overrides):
    args = td3.Args(**{"cuda": False, "compile": False, **SHAPE, **overrides})
    torch.manual_seed(0)
    agent = td3.TD3(3, ACTIONS, args, torch.device("cpu"))
    if args.compile:
        td3.compile_update(agent)
    return agent


def random_batch(n=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, generator=g), torch.rand(n, 1, generator=g) * 3 - 2, torch.randn(n, generator=g),
            (torch.rand(n, generator=g) < 0.2).float(), torch.randn(n, 3, generator=g))


def flat(module):
    return torch.cat([p.detach().flatten().clone() for p in module.parameters()])


def test_audit_by_hand_on_actors_of_known_output():
    """The saturation audit on actors whose output is known (fc_mu's weight zeroed: u = its bias on every state):
    pinned at the upper bound, at the middle, at tanh(u) = 0.6; bounds [-2, 1], so a = 1.5 tanh(u) - 0.5."""
    agent = make_agent()
    obs = np.random.default_rng(0).normal(size=(50, 3))
    fc_mu = agent.actor.fc_mu

    def audit_with_bias(u):
        with torch.no_grad():
            fc_mu.weight.zero_()
            fc_mu.bias.fill_(u)
        return td3.audit(agent, obs)

    pinned = audit_with_bias(100.0)
    assert pinned["near_bound_ratio"] == 1.0 and pinned["actor_collapse_detected"]
    assert pinned["kappa_mean"] == pinned["kappa_p10"] == 0.0
    assert pinned["action_mean"] == pytest.approx(1.0) and pinned["action_std"] == 0.0
    assert pinned["actor_grad_norm"] == 0.0  # tanh's gate is closed: no gradient reaches the actor
    middle = audit_with_bias(0.0)
    assert middle["near_bound_ratio"] == 0.0 and not middle["actor_collapse_detected"]
    assert middle["kappa_mean"] == middle["kappa_p10"] == 1.0 and middle["action_mean"] == pytest.approx(-0.5)
    inside = audit_with_bias(math.log(2.0))  # atanh(0.6) = ln 2
    assert inside["kappa_mean"] == pytest.approx(0.64) and inside["action_mean"] == pytest.approx(0.4)
    # the gradient of -mean Q1(s, pi(s)), by the chain rule: only fc_mu gets one (its zero weight stops the rest);
    # d/du = -dQ1/da * 1.5 * kappa / n per state, times fc_mu's input h for the weight
    o = torch.as_tensor(obs, dtype=torch.float32)
    a = torch.full((50, 1), 0.4, requires_grad=True)
    dq_da = torch.autograd.grad(agent.qf.q1(o, a).sum(), a)[0]
    with torch.no_grad():
        h = torch.relu(agent.actor.fc2(torch.relu(agent.actor.fc1(o))))
        d_du = -dq_da * 1.5 * 0.64 / 50
        expected = torch.sqrt(d_du.sum() ** 2 + (d_du * h).sum(dim=0).square().sum())
    assert inside["actor_grad_norm"] == pytest.approx(expected.item(), rel=1e-4)
    assert inside["actor_grad_norm"] > 0


def test_exploration_noise_is_a_fraction_of_the_half_range_and_stays_in_bounds():
    agent = make_agent()  # bounds [-2, 1]: half-range 1.5
    obs = np.zeros((20000, 3), np.float32)
    torch.manual_seed(0)
    greedy, noisy = agent.act(obs), agent.act(obs, 0.1)
    assert np.all(greedy == greedy[0]) and -1.5 < greedy[0, 0] < 0.5  # the same state, far from either bound
    assert np.std(noisy - greedy) == pytest.approx(0.1 * 1.5, rel=0.03) and abs(np.mean(noisy - greedy)) < 0.005
    wide = agent.act(obs, 10.0)  # noise far beyond the bounds: clipped to them
    assert wide.min() == -2.0 and wide.max() == 1.0 and np.mean(wide == 1.0) > 0.3


def test_delayed_actor_and_target_updates_count_and_polyak():
    agent = make_agent(policy_frequency=2, tau=0.1)
    actor0, actor_target0, qf_target0 = flat(agent.actor), flat(agent.actor_target), flat(agent.qf_target)
    assert agent.update(random_batch(seed=1))["actor_loss"] is None  # update 1: critic only
    assert torch.equal(flat(agent.actor), actor0)
    assert torch.equal(flat(agent.actor_target), actor_target0)
    assert torch.equal(flat(agent.qf_target), qf_target0)
    assert not torch.equal(flat(agent.qf), flat(agent.qf_target))  # the critic did move
    obs, actor_before = random_batch(seed=2)[0], copy.deepcopy(agent.actor)
    metrics = agent.update(random_batch(seed=2))  # update 2: critic, actor, then targets
    # the actor's loss -mean Q1(s, pi(s)): the critic after this update's critic step, the actor before its own
    with torch.no_grad():
        assert metrics["actor_loss"].item() == pytest.approx(-agent.qf.q1(obs, actor_before(obs)).mean().item(),
                                                             rel=1e-6)
    assert not torch.equal(flat(agent.actor), actor0)
    # one Polyak step of tau = 0.1 from the initial targets toward the current networks
    assert torch.allclose(flat(agent.actor_target), 0.9 * actor_target0 + 0.1 * flat(agent.actor), atol=1e-7)
    assert torch.allclose(flat(agent.qf_target), 0.9 * qf_target0 + 0.1 * flat(agent.qf), atol=1e-7)
    for seed in range(3, 8):  # 7 updates in all: actor steps at 2, 4, 6
        agent.update(random_batch(seed=seed))
    assert agent.n_updates == 7
    step_count = lambda optimizer: optimizer.state[optimizer.param_groups[0]["params"][0]]["step"].item()  # noqa: E731
    assert step_count(agent.q_optimizer) == 7 and step_count(agent.actor_optimizer) == 3


def test_the_actor_loss_is_logged_whichever_update_was_the_last_actor_step(tmp_path):
    """With --policy-frequency 3 the update that reaches a logging interval is an actor step only every third
    time: the logged actor loss is the last actor step's (update 3 here, logged at update 4)."""
    agent = make_agent(policy_frequency=3)
    metrics = [agent.update(random_batch(seed=seed)) for seed in range(4)]
    assert metrics[0]["actor_loss"] is None and metrics[3]["actor_loss"] is metrics[2]["actor_loss"]
    rb = td3.ReplayBuffer(10, 3, 1, torch.device("cpu"))
    rb.add(np.zeros((4, 3)), np.zeros((4, 3)), np.zeros((4, 1)), np.zeros(4), np.zeros(4))
    run = td3.RunFolder(small_args(tmp_path), None)
    run.log_losses(metrics[3], agent, rb, 4)
    run.writer.close()
    assert run.last_losses["actor_loss"] == metrics[2]["actor_loss"].item()
    assert run.last_losses["qf_loss"] == pytest.approx(metrics[3]["qf_losses"].mean().item())


def test_the_critic_gradient_is_the_gradient_of_the_written_loss():
    """torch.func's gradient against autograd on the same loss, written out by hand."""
    agent = make_agent()
    obs, actions, rewards, terminations, next_obs = random_batch(seed=3)
    noise = torch.zeros_like(actions)
    grads, metrics = agent.critic_gradients(obs, actions, rewards, terminations, next_obs, noise)
    with torch.no_grad():
        next_q = agent.qf_target(next_obs, torch.clamp(agent.actor_target(next_obs), -2.0, 1.0)).min(0).values
        y = rewards + 0.99 * (1 - terminations) * next_q
    qf = copy.deepcopy(agent.qf).requires_grad_(True)
    q = qf(obs, actions)
    loss = ((q[0] - y) ** 2).mean() + ((q[1] - y) ** 2).mean()
    loss.backward()
    for (name, p) in qf.named_parameters():
        assert torch.allclose(grads[name], p.grad, atol=1e-6), name
    assert torch.allclose(metrics["qf_losses"].sum(), loss.detach())


@pytest.mark.xdist_group("compiled_td3")
def test_compiled_update_matches_eager_update():
    """The one compiled-vs-eager parity test (at SHAPE, which the other compiled tests reuse)."""
    eager, compiled = make_agent(policy_frequency=2), make_agent(policy_frequency=2, compile=True)
    assert torch.equal(flat(compiled.qf), flat(eager.qf))
    for seed in range(4):
        torch.manual_seed(seed)
        m_eager = eager.update(random_batch(seed=seed))
        torch.manual_seed(seed)
        m_compiled = compiled.update(random_batch(seed=seed))
        assert torch.allclose(m_eager["qf_losses"], m_compiled["qf_losses"], rtol=1e-4)
    # same math, different kernels: equal up to float rounding after two actor steps
    for name in ("actor", "qf", "actor_target", "qf_target"):
        a, b = flat(getattr(eager, name)), flat(getattr(compiled, name))
        assert torch.allclose(a, b, atol=1e-5), name
    assert not torch.equal(flat(eager.actor), flat(make_agent().actor))


def test_update_flops_match_torch_flop_counter():
    """The benchmark helper's FLOP formula against torch's own count of the matmuls one update runs."""
    from torch.utils.flop_counter import FlopCounterMode
    agent = make_agent(policy_frequency=2, batch_size=32, hidden_sizes=(256, 256))
    with FlopCounterMode(display=False) as counter:
        agent.update(random_batch(n=32, seed=1))  # critic step
        agent.update(random_batch(n=32, seed=2))  # critic and actor step
    expected = 2 * benchmark_update.update_flops(obs_dim=3, action_dim=1, hidden_sizes=(256, 256), batch_size=32,
                                                 policy_frequency=2)
    assert counter.get_total_flops() == expected
    # Hopper at batch 256: about 0.40 GFLOP per update (the estimate was ~0.42)
    assert benchmark_update.update_flops(11, 3, (256, 256), 256, 2) / 1e9 == pytest.approx(0.4038, abs=1e-4)


def test_twin_q_is_two_independent_qnetworks():
    torch.manual_seed(0)
    qf = td3.TwinQ(3, 2, (16, 16))
    obs, act = torch.randn(5, 3), torch.randn(5, 2)
    q = qf(obs, act)
    assert q.shape == (2, 5)
    assert torch.allclose(qf.q1(obs, act), q[0], atol=1e-6)
    assert not torch.allclose(q[0], q[1])
    # each slice of the stacked weights is an ordinary QNetwork: load critic 2 into one and compare
    plain = td3.QNetwork(3, 2, (16, 16))
    plain.load_state_dict({name: w[1] for name, w in zip(qf.names, qf.stacked)})
    assert torch.allclose(plain(obs, act), q[1], atol=1e-6)
    # initialised like nn.Linear (U(+-1/sqrt(fan_in))), each critic on its own draw
    w1 = dict(zip(qf.names, qf.stacked))["fc1.weight"]
    assert w1.abs().max() <= 1 / math.sqrt(5) and not torch.equal(w1[0], w1[1])


def test_actor_respects_asymmetric_bounds():
    actor = td3.Actor(2, tiny_envs.ACTION_LOW, tiny_envs.ACTION_HIGH, (16, 16))
    with torch.no_grad():
        actor.fc_mu.bias.fill_(100.0)  # drive tanh to +1
        hi = actor(torch.zeros(1, 2))[0]
        actor.fc_mu.bias.fill_(-100.0)
        lo = actor(torch.zeros(1, 2))[0]
    assert torch.allclose(hi, torch.tensor([1.0, 3.0]))
    assert torch.allclose(lo, torch.tensor([-2.0, 0.5]))


def test_replay_buffer_wraps_around():
    rb = td3.ReplayBuffer(5, 1, 1, torch.device("cpu"))
    rb.add(*[np.arange(3.0).reshape(-1, 1)] * 3, np.arange(3.0), np.zeros(3))
    rb.add(*[np.arange(3.0, 7.0).reshape(-1, 1)] * 3, np.arange(3.0, 7.0), np.ones(4))
    # rows 3, 4 then wrap to 0, 1: the two oldest (0, 1) are overwritten by 5, 6
    assert rb.storage[:, 0].tolist() == [5.0, 6.0, 2.0, 3.0, 4.0]  # obs
    assert rb.storage[:, -1].tolist() == [1.0, 1.0, 0.0, 1.0, 1.0]  # terminated
    assert (rb.pos, rb.size) == (2, 5)
    torch.manual_seed(0)
    sample = rb.sample(1000)
    assert set(sample[2].tolist()) == {2.0, 3.0, 4.0, 5.0, 6.0}  # rewards of the live rows only


def test_running_normalizer_matches_numpy():
    rng = np.random.default_rng(0)
    chunks = [rng.normal(loc=[1e6, 1e-2, -5.0], scale=[1e5, 1e-3, 2.0], size=(n, 3)) for n in (1, 7, 64, 3, 500)]
    rms = td3.RunningMeanStd(3)
    for chunk in chunks:
        rms.update(torch.as_tensor(chunk))
    rms.update(torch.zeros(0, 3))  # an empty batch changes nothing
    data = np.concatenate(chunks)
    assert rms.count.item() == len(data)
    np.testing.assert_allclose(rms.mean.numpy(), data.mean(0), rtol=1e-10)
    np.testing.assert_allclose(rms.var.numpy(), data.var(0), rtol=1e-9)
    x = np.array([[1e6 + 3e5, 1.3e-2, -5.0], [1e6 + 5e6, 0.0, 100.0]])
    expected = np.clip((x - data.mean(0)) / np.sqrt(data.var(0) + 1e-8), -10, 10)
    np.testing.assert_allclose(rms.normalize(torch.as_tensor(x, dtype=torch.float32)).numpy(), expected, rtol=1e-4)
    assert expected[1, 0] == 10.0 and expected[1, 2] == 10.0  # the clip was exercised


# --- episode boundaries (gymnasium 1.x) ---------------------------------------------------------
def check_counting_transitions(obs, next_obs, rewards, terminations):
    """Every stored transition stays inside one episode and carries the right flags."""
    assert len(obs) > 0
    np.testing.assert_array_equal(next_obs[:, 0], obs[:, 0])  # same episode number
    np.testing.assert_array_equal(next_obs[:, 1], obs[:, 1] + 1)  # t -> t + 1
    np.testing.assert_array_equal(rewards, next_obs[:, 1])
    expected_term = (next_obs[:, 0] % 2 == 0) & (next_obs[:, 1] == 3)
    np.testing.assert_array_equal(terminations.astype(bool), expected_term)
    assert expected_term.any()  # both kinds of episode end were seen
    assert (next_obs[:, 1] == 5).any()  # a truncated final step is stored, flagged not terminal


@pytest.mark.parametrize("mode", [gym.vector.AutoresetMode.SAME_STEP, gym.vector.AutoresetMode.NEXT_STEP])
@pytest.mark.parametrize("num_envs", [1, 3])
def test_transitions_to_store_never_cross_episodes(mode, num_envs):
    envs = gym.vector.SyncVectorEnv([lambda: gym.make("tiny_envs:Counting-v0")] * num_envs, autoreset_mode=mode)
    obs, _ = envs.reset(seed=0)
    prev_done = np.zeros(num_envs, dtype=bool)
    stored = {"obs": [], "next_obs": [], "rewards": [], "terminations": []}
    steps = 40
    for _ in range(steps):
        next_obs, rewards, terms, truncs, infos = envs.step(envs.action_space.sample())
        real_next, keep = td3.transitions_to_store(next_obs, infos, mode, prev_done)
        for key, value in (("obs", obs), ("next_obs", real_next), ("rewards", rewards), ("terminations", terms)):
            stored[key].append(value[keep])
        prev_done = terms | truncs
        obs = next_obs
    stored = {k: np.concatenate(v) for k, v in stored.items()}
    check_counting_transitions(**stored)
    # Per env, episodes alternate 3 and 5 steps. SAME_STEP: all 40 env steps are transitions.
    # NEXT_STEP: each episode end costs one reset step, so a 10-step cycle (3 + R + 5 + R)
    # holds 8 transitions and 40 steps hold 32.
    per_env = 40 if mode == gym.vector.AutoresetMode.SAME_STEP else 32
    assert len(stored["obs"]) == per_env * num_envs


def read_json(path):
    with open(path) as f:
        return json.load(f)


def test_main_on_tiny_env_stores_only_real_transitions_and_writes_run_folder(tmp_path):
    args = small_args(tmp_path, env_id="tiny_envs:Counting-v0", num_envs=2, total_timesteps=600,
                      learning_starts=200, eval_frequency=300, checkpoint_frequency=600, batch_size=32)
    summary = td3.main(args)
    run_dir = summary["run_dir"]
    assert summary["global_step"] == 600
    assert summary["updates"] == 400  # one update per env step after learning_starts
    ckpt = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)
    buf = ckpt["buffer"]
    assert buf["size"] == 600  # SAME_STEP autoreset: every env step is a real transition
    rows = buf["storage"].numpy()  # [obs | next_obs | action | reward | terminated], 2 + 2 + 2 + 1 + 1
    obs, next_obs, acts, rewards, terminations = rows[:, :2], rows[:, 2:4], rows[:, 4:6], rows[:, 6], rows[:, 7]
    check_counting_transitions(obs, next_obs, rewards, terminations)
    assert np.all(acts >= tiny_envs.ACTION_LOW) and np.all(acts <= tiny_envs.ACTION_HIGH)
    # the first 200 transitions (learning starts at step 200) are uniform random actions: mean and std of U(low, high)
    # per dimension, within 4 standard errors
    half = (tiny_envs.ACTION_HIGH - tiny_envs.ACTION_LOW) / 2
    assert np.all(np.abs(acts[:200].mean(axis=0) - (tiny_envs.ACTION_LOW + half)) < 4 * half / np.sqrt(3 * 200))
    assert np.allclose(acts[:200].std(axis=0), half / np.sqrt(3), rtol=0.1)

    files = set(os.listdir(run_dir))
    assert {"summary.json", "evaluations.csv", "state_scale_summary.json", "td3_action_saturation.json"} <= files
    assert any(f.startswith("events.out.tfevents") for f in files)
    assert not any(f.endswith(".tmp") for f in files)
    on_disk = read_json(os.path.join(run_dir, "summary.json"))
    for key in ("global_step", "eval_return_last", "eval_return_mean_last10", "sps_learning_phase", "wall_time_s"):
        assert on_disk[key] == summary[key]
    with open(os.path.join(run_dir, "evaluations.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["global_step"]) for r in rows] == [300, 600]
    assert on_disk["eval_return_mean_last10"] == pytest.approx(np.mean([float(r["eval_return_mean"]) for r in rows]))

    sat = read_json(os.path.join(run_dir, "td3_action_saturation.json"))
    agent = sat["agents"]["td3"]
    assert [row["global_step"] for row in agent["history"]] == [300, 600]
    assert agent["history"][-1] == {"global_step": 600, **agent["summary"]}  # the audit's numbers: by hand above
    scale = read_json(os.path.join(run_dir, "state_scale_summary.json"))
    assert scale["mode"] == "none" and scale["feature_names"] == ["obs_0", "obs_1"]
    pre = scale["pre_stats"]["per_dim"]
    assert pre[1]["min"] == 0.0 and pre[1]["max"] == 4.0  # t of stored (source) states: 0..4
    assert scale["p99_abs_spread"]["pre"] == pytest.approx(pre[0]["p99_abs"] / pre[1]["p99_abs"])


def test_learned_q_matches_1_over_1_minus_gamma_when_only_truncated(tmp_path):
    gamma = 0.8  # true value 1 / (1 - 0.8) = 5 in every state
    args = small_args(tmp_path, env_id="tiny_envs:ConstantReward-v0", gamma=gamma, total_timesteps=2000,
                      learning_starts=500, eval_frequency=2000, eval_episodes=1, save_model=True, tau=0.05)
    summary = td3.main(args)
    state = torch.load(os.path.join(summary["run_dir"], "model.pt"), weights_only=True)
    agent = make_agent_for(state, 1, np.array([-2.0]), np.array([1.0]))
    obs = torch.arange(50, dtype=torch.float32).reshape(-1, 1) / 50.0
    with torch.no_grad():
        q = agent.qf(obs, agent.actor(obs))
    # Treating the time limit as terminal would give ~1 at t = 49 and ~4.6 on average.
    assert q.mean().item() == pytest.approx(5.0, abs=0.25)
    assert q[:, -5:].mean().item() == pytest.approx(5.0, abs=0.3)
    # and the eval overestimation check sees the same: Q minus the collected discounted return
    assert abs(summary["value_bias_last"]) < 0.3


def make_agent_for(state, obs_dim, low, high):
    args = td3.Args(**{**state["args"], "hidden_sizes": tuple(state["args"]["hidden_sizes"])})
    agent = td3.TD3(obs_dim, gym.spaces.Box(low.astype(np.float32), high.astype(np.float32)), args, torch.device("cpu"))
    td3.load_agent_state(agent, state["agent"])
    return agent


# --- user errors --------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, words", [
    (["--env-id", "NoSuchEnv-v0"], "NoSuchEnv"),
    (["--env-id", "CartPole-v1"], "Discrete"),
    (["--env-id", "nosuchmodule:Foo-v0"], "nosuchmodule"),
    (["--gamma", "1.5"], "--gamma"),
    (["--seed", "-1"], "--seed must be in [0, 2**32 - 1], got -1"),
    (["--learning-rate", "nan"], "--learning-rate must be finite and > 0, got nan"),
    (["--total-timesteps", "abc"], "--total-timesteps"),
    (["--resume", "/nonexistent/checkpoint.pt"], "does not exist"),
    (["--resume", "/"], "'/' is a folder, not a file"),
    (["--eval-only"], "--checkpoint"),
])
def test_user_errors_are_one_line_exit_2(tmp_path, argv, words, capsys, monkeypatch):
    """The entry point in process (a subprocess costs seconds of imports; one below checks the real thing)."""
    code, err = run_cli(capsys, monkeypatch, *argv, "--runs-dir", str(tmp_path / "runs"), "--no-cuda")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error:") and words in lines[0]
    assert not (tmp_path / "runs").exists()  # nothing written before the error


def test_a_user_error_from_the_command_line_is_one_line_exit_2(tmp_path):
    result = run_script("--env-id", "CartPole-v1", "--runs-dir", str(tmp_path / "runs"))
    assert result.returncode == 2 and result.stderr.startswith("error: 'CartPole-v1' has action space Discrete")
    assert result.stderr.count("\n") == 1 and not (tmp_path / "runs").exists()


def test_bad_values_raise_user_error_in_process(tmp_path):
    for bad in (dict(batch_size=0), dict(tau=0.0), dict(num_envs=3, total_timesteps=1000),
                dict(learning_rate=-1.0), dict(checkpoint="x.pt")):
        with pytest.raises(td3.UserError):
            td3.main(small_args(tmp_path, **bad))


@pytest.mark.parametrize("overrides, message", [
    (dict(seed=-1), "--seed must be in [0, 2**32 - 1], got -1"),
    (dict(seed=2**32), "--seed must be in [0, 2**32 - 1], got 4294967296"),
    (dict(learning_rate=math.nan), "--learning-rate must be finite and > 0, got nan"),
    (dict(exploration_noise=math.nan), "--exploration-noise must be finite and >= 0, got nan"),
    (dict(policy_noise=math.nan), "--policy-noise must be finite and >= 0, got nan"),
    (dict(noise_clip=math.nan), "--noise-clip must be finite and >= 0, got nan"),
    (dict(learning_rate=math.inf), "--learning-rate must be finite and > 0, got inf"),
    (dict(exploration_noise=math.inf), "--exploration-noise must be finite and >= 0, got inf"),
    (dict(batch_size=0), "--batch-size must be finite and > 0, got 0"),
    (dict(gamma=math.nan), "--gamma must be in [0, 1), got nan"),
    (dict(tau=math.nan), "--tau must be in (0, 1], got nan"),
    (dict(hidden_sizes=(0, 64)), "--hidden-sizes must be two widths > 0, got (0, 64)"),
    (dict(num_envs=3), "--num-envs must be > 0 and divide --total-timesteps (1000 env steps, not iterations), got 3"),
])
def test_check_args_refuses_out_of_range_and_nan_values_by_name(tmp_path, overrides, message):
    td3.check_args(small_args(tmp_path, seed=2**32 - 1))  # the last valid seed
    with pytest.raises(td3.UserError) as err:
        td3.check_args(small_args(tmp_path, **overrides))
    assert str(err.value) == message


def test_a_runs_dir_that_is_a_file_or_inside_one_or_not_writable_is_a_user_error(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    (tmp_path / "locked").mkdir()
    access = os.access
    monkeypatch.setattr(td3.os, "access", lambda p, mode: access(p, mode) and "locked" not in str(p))  # root can write
    for runs_dir in (tmp_path / "file", tmp_path / "file" / "runs" / "deeper", tmp_path / "locked",
                     tmp_path / "locked" / "runs", "/dev/null/runs"):
        with pytest.raises(td3.UserError) as err:
            td3.check_args(small_args(tmp_path, runs_dir=str(runs_dir)))
        assert str(err.value) == f"--runs-dir must be a folder you can write, got {runs_dir}"
    td3.check_args(small_args(tmp_path, runs_dir=str(tmp_path / "new" / "runs")))  # made later: fine
    td3.check_args(small_args(tmp_path, runs_dir="runs"))  # relative: the working folder is checked
    assert not (tmp_path / "new").exists()


def test_benchmark_mistakes_are_one_error_line_exit_2(tmp_path, capsys, monkeypatch):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmark_update.py"), "--env-id", "CartPole-v1",
                             "--threads", "1", "--no-compile"], capture_output=True, text=True, cwd=tmp_path,
                            timeout=600)
    assert result.returncode == 2 and result.stderr.startswith("error: 'CartPole-v1' has action space Discrete")
    assert result.stderr.count("\n") == 1 and os.listdir(tmp_path) == []
    monkeypatch.setattr(sys, "argv", ["benchmark_update.py", "--seed", "-1", "--no-compile", "--threads", "1"])
    with pytest.raises(SystemExit) as exit_:
        td3.run_command_line(benchmark_update.main, td3.Args)  # what its __main__ runs, in process
    assert exit_.value.code == 2 and capsys.readouterr().err == "error: --seed must be in [0, 2**32 - 1], got -1\n"
    # a flag of td3_continuous.py's run that its short run would silently replace: refused at once
    for flags in (["--total-timesteps", "50000"], ["--eval-only", "--checkpoint", "model.pt"], ["--resume", "c.pt"]):
        with pytest.raises(td3.UserError, match=f"^{flags[0]} is not read here: the benchmark times the update"):
            benchmark_update.main(td3.parse_cli(td3.Args, flags))


def test_compile_without_a_cxx_compiler_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setattr(td3.shutil, "which", lambda name: None)  # a machine without g++
    with pytest.raises(td3.UserError, match="--no-compile"):
        td3.main(small_args(tmp_path / "runs", compile=True))
    assert not (tmp_path / "runs").exists()


def test_a_checkpoint_of_the_previous_format_is_refused_by_name(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"format": "td3_continuous/2", "args": {}}, path)
    with pytest.raises(td3.UserError, match=r"of format td3_continuous/3 \(found: td3_continuous/2\)"):
        td3.main(td3.Args(eval_only=True, checkpoint=str(path), runs_dir=str(tmp_path), cuda=False))


def test_a_model_file_that_would_run_code_is_refused_and_nothing_runs(tmp_path, capsys, monkeypatch):
    assert_code_running_model_file_is_refused(td3, "td3_continuous/3", tmp_path, capsys, monkeypatch)


# --- whole runs ---------------------------------------------------------------------------------
@pytest.mark.xdist_group("compiled_td3")
def test_same_seed_gives_identical_numbers(tmp_path):
    a = td3.main(small_args(tmp_path / "a", seed=3, state_norm=True, compile=True))  # the default path
    b = td3.main(small_args(tmp_path / "b", seed=3, state_norm=True, compile=True))
    for key in ("eval_return_last", "eval_return_mean_last10", "episodes", "audit"):
        assert a[key] == b[key]
    c = td3.main(small_args(tmp_path / "c", seed=4, state_norm=True, compile=True))
    assert c["eval_return_last"] != a["eval_return_last"]


def test_resume_keeps_the_saved_settings_but_takes_runtime_flags_from_the_command_line(tmp_path, monkeypatch):
    summary = td3.main(small_args(tmp_path, total_timesteps=600, learning_starts=200, eval_frequency=300,
                                  checkpoint_frequency=300, batch_size=32))
    ckpt = os.path.join(summary["run_dir"], "checkpoint.pt")
    state = torch.load(ckpt, weights_only=True)
    state["args"].update(compile=True, total_timesteps=900)  # as if a compiled 900-step run had stopped at 600
    torch.save(state, ckpt)
    with pytest.raises(td3.UserError) as err:  # a setting given that is neither the default nor the saved one
        td3.load_saved(td3.Args(resume=ckpt, total_timesteps=4000))
    assert str(err.value) == "--total-timesteps 4000: --resume keeps the checkpoint's settings (900)"
    with pytest.raises(td3.UserError, match=r"^--hidden-sizes \(256, 128\): .* \(\(64, 64\)\)$"):
        td3.load_saved(td3.Args(resume=ckpt, hidden_sizes=(256, 128)))
    # the saved value given again, or a default (not told apart from "not given"), changes nothing
    args, _ = td3.load_saved(td3.Args(resume=ckpt, env_id="Pendulum-v1", batch_size=32, threads=1, compile=False,
                                       cuda=False))
    assert (args.total_timesteps, args.batch_size, args.learning_starts, args.hidden_sizes) == (900, 32, 200, (64, 64))
    assert (args.threads, args.compile, args.cuda, args.resume) == (1, False, False, ckpt)
    # the runtime flags are the command line's, its defaults too: --compile after a --no-compile run compiles
    state["args"].update(compile=False, threads=1)
    torch.save(state, ckpt)
    assert td3.load_saved(td3.Args(resume=ckpt, compile=True))[0].compile is True
    args, _ = td3.load_saved(td3.Args(resume=ckpt))
    assert (args.threads, args.compile, args.cuda) == (0, True, True)
    # --bf16 follows the command line, by default this CPU's, whatever the checkpoint's machine ran (a bf16 run
    # resumed on a CPU without bf16 matmuls would crawl; --no-bf16 must not be dropped as "the default")
    here = td3.Args().bf16
    state["args"]["bf16"] = not here  # saved on the other kind of CPU
    torch.save(state, ckpt)
    assert td3.load_saved(td3.Args(resume=ckpt))[0].bf16 is here
    assert td3.load_saved(td3.Args(resume=ckpt, bf16=not here))[0].bf16 is (not here)
    # a checkpoint of a compiled run resumes with --no-compile on a machine without a C++ compiler
    monkeypatch.setattr(td3.shutil, "which", lambda name: None)
    resumed = td3.main(td3.Args(resume=ckpt, compile=False, cuda=False))
    assert resumed["status"] == "completed" and resumed["global_step"] == 900 and resumed["updates"] == 700


def test_checkpoints_carry_the_cuda_generators(monkeypatch):
    """On a GPU the exploration and smoothing noise and the batches come from the CUDA generators: a resumed run
    must continue their streams, not restart them from --seed (no GPU here: the calls are stood in for)."""
    envs = gym.vector.SyncVectorEnv([lambda: gym.make("Pendulum-v1")])
    cuda_states, restored = [torch.tensor([1, 2, 3], dtype=torch.uint8)], []
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: cuda_states)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    state = td3.rng_state(envs)
    assert state["cuda"] is cuda_states
    td3.set_rng_state(state, envs)
    assert restored == [cuda_states]
    envs.close()


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A short eager run saved with --save-model (seed 2, --state-norm, 2 evaluation episodes): the eval-only
    tests share it. Returns (its summary, the model.pt path)."""
    summary = td3.main(small_args(tmp_path_factory.mktemp("saved"), seed=2, save_model=True, state_norm=True))
    return summary, os.path.join(summary["run_dir"], "model.pt")


@pytest.mark.xdist_group("saved_model")  # one worker trains the shared run once
def test_eval_only_takes_seed_and_episodes_from_the_checkpoint_unless_given(saved_model, tmp_path, monkeypatch):
    summary, model = saved_model
    seen, setup_torch = [], td3.setup_torch
    monkeypatch.setattr(td3, "setup_torch", lambda args: seen.append(args) or setup_torch(args))
    threads = torch.get_num_threads()  # the number already set: the test changes nothing for the next ones
    again = td3.main(td3.Args(eval_only=True, checkpoint=model, runs_dir=str(tmp_path), threads=threads))
    assert again["eval_return_mean"] == summary["eval_return_last"]  # the training run's own evaluation
    assert (again["seed"], again["eval_episodes"], again["from_command_line"]) == (2, 2, [])
    assert (seen[-1].threads, seen[-1].cuda) == (threads, True)  # as given; --cuda's default (saved: off)
    assert read_json(os.path.join(again["run_dir"], "summary.json")) == again
    given = td3.main(td3.Args(eval_only=True, checkpoint=model, runs_dir=str(tmp_path), cuda=False, eval_episodes=3))
    assert (given["seed"], given["eval_episodes"], len(given["eval_returns"])) == (2, 3, 3)
    assert given["from_command_line"] == ["eval_episodes"] and "__2__" in os.path.basename(given["run_dir"])
    bf16 = td3.main(td3.Args(eval_only=True, checkpoint=model, runs_dir=str(tmp_path), cuda=False, bf16=True))
    assert bf16["eval_return_mean"] == summary["eval_return_last"]  # acting has no autocast: not refused, same
    # a setting that would change what is evaluated is refused, not silently replaced by the saved one
    for flag, value, saved in (("env_id", "Walker2d-v5", "Pendulum-v1"), ("gamma", 0.9, 0.99)):
        with pytest.raises(td3.UserError) as err:
            td3.main(td3.Args(eval_only=True, checkpoint=model, runs_dir=str(tmp_path), **{flag: value}))
        assert str(err.value) == f"--{flag.replace('_', '-')} {value}: --eval-only keeps the checkpoint's settings " \
                                 f"({saved})"


@pytest.mark.xdist_group("saved_model")
def test_resume_from_a_model_file_names_what_it_lacks(saved_model):
    _, model = saved_model  # model.pt holds the networks but no replay buffer
    with pytest.raises(td3.UserError) as err:
        td3.main(td3.Args(resume=model, cuda=False))
    assert str(err.value) == f"'{model}' has no replay buffer: resume from a checkpoint.pt (--checkpoint-frequency N)"


@pytest.mark.xdist_group("saved_model")  # one worker trains the shared run once
def test_eval_only_reproduces_the_final_evaluation(saved_model, tmp_path):
    summary, model = saved_model
    again = td3.main(td3.Args(eval_only=True, checkpoint=model, eval_episodes=2, seed=2, runs_dir=str(tmp_path),
                              cuda=False))
    # same seed + 100 eval env, same frozen normalizer and actor: the very same episodes
    assert again["eval_return_mean"] == summary["eval_return_last"]
    assert read_json(os.path.join(again["run_dir"], "summary.json")) == again
    # the training run completed and says so, with the keys the README documents
    assert summary["status"] == "completed" and summary["exit_code"] == 0 and summary["global_step"] == 1000
    assert summary["updates"] == 600 and summary["episodes"] == 5 and summary["checkpoint_step"] is None
    assert summary["bf16"] is False and summary["exp_name"] == "td3_continuous"  # small_args: fp32; the default name
    with open(os.path.join(summary["run_dir"], "evaluations.csv")) as f:
        evals = [float(row["eval_return_mean"]) for row in csv.DictReader(f)]
    assert len(evals) == 2 and summary["eval_return_mean_last10"] == pytest.approx(np.mean(evals))
    assert read_json(os.path.join(summary["run_dir"], "summary.json")) == summary


def interrupted_run_argv(tmp_path):
    """A short eager Pendulum run with a checkpoint every 250 steps, to be stopped and resumed."""
    return ["--env-id", "Pendulum-v1", "--total-timesteps", "1000", "--learning-starts", "200",
            "--eval-frequency", "250", "--eval-episodes", "1", "--checkpoint-frequency", "250",
            "--runs-dir", str(tmp_path), "--no-cuda", "--batch-size", "32", "--hidden-sizes", "16", "16",
            "--no-compile"]


def resume_to_the_end_counting_every_step_once(ckpt, capsys, monkeypatch) -> dict:
    """`--resume ckpt` of an interrupted_run_argv run, through the command line: it must end at step 1000
    with every learning step updated once and every evaluation written once. Returns its summary."""
    code, err = run_cli(capsys, monkeypatch, "--resume", ckpt)  # the run's own settings, --no-compile included
    assert code == 0, err
    run_dir = os.path.dirname(ckpt)
    summary = read_json(os.path.join(run_dir, "summary.json"))
    assert summary["global_step"] == 1000
    assert summary["updates"] == 1000 - 200  # every learning step updated exactly once
    with open(os.path.join(run_dir, "evaluations.csv")) as f:
        assert [int(r["global_step"]) for r in csv.DictReader(f)] == [250, 500, 750, 1000]
    return summary


def test_resume_after_interruption_counts_every_step_once(tmp_path, capsys, monkeypatch):
    argv = interrupted_run_argv(tmp_path)
    proc = subprocess.Popen([sys.executable, SCRIPT, *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt = wait_for_file(tmp_path, "checkpoint.pt", proc)
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)  # a hard stop, mid-run
    proc.wait()
    saved = torch.load(ckpt, weights_only=True)
    step_at_ckpt = saved["global_step"]
    assert step_at_ckpt < 1000
    with open(os.path.join(os.path.dirname(ckpt), "evaluations.csv")) as f:
        evals_at_ckpt = [row for row in csv.DictReader(f) if int(row["global_step"]) <= step_at_ckpt]

    resume_to_the_end_counting_every_step_once(ckpt, capsys, monkeypatch)
    final = torch.load(ckpt, weights_only=True)
    assert final["global_step"] == 1000 and final["buffer"]["size"] == 1000
    # what the checkpoint held is kept as it was: its transitions (the buffer holds 1000: nothing overwritten) and
    # its evaluations
    assert torch.equal(final["buffer"]["storage"][:step_at_ckpt], saved["buffer"]["storage"][:step_at_ckpt])
    with open(os.path.join(os.path.dirname(ckpt), "evaluations.csv")) as f:
        assert list(csv.DictReader(f))[:len(evals_at_ckpt)] == evals_at_ckpt


def files_under(path) -> set:
    return {f for _, _, fs in os.walk(path) for f in fs}


def wait_for_file(root, name, proc, seconds=300):
    """Path of the first `name` under root once it exists (the subprocess must still run)."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        found = [os.path.join(r, name) for r, _, fs in os.walk(root) if name in fs]
        if found:
            return found[0]
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    raise AssertionError(f"no {name} under {root}")


def test_diverging_run_is_one_error_line_a_status_and_the_last_finite_checkpoint(tmp_path, capsys, monkeypatch):
    # The command (lr 1e8 on Pendulum) with checkpoints every 500 steps and --save-model.
    code, stderr = run_cli(capsys, monkeypatch, "--env-id", "Pendulum-v1", "--learning-rate", "1e8",
                           "--total-timesteps", "2000", "--learning-starts", "500", "--eval-frequency", "1000",
                           "--checkpoint-frequency", "500", "--save-model", "--no-compile", "--runs-dir", str(tmp_path),
                           "--no-cuda")
    assert code == 1
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    [run_dir] = [os.path.join(tmp_path, d) for d in os.listdir(tmp_path)]
    summary = read_json(os.path.join(run_dir, "summary.json"))
    assert summary["status"] == "diverged" and summary["exit_code"] == 1
    # detected within one logging interval of the first update (learning starts after step 500)
    assert 500 < summary["global_step"] <= 500 + td3.LOG_EVERY_UPDATES
    assert stderr.startswith(f"error: training diverged at step {summary['global_step']}: ")
    assert "= nan" in stderr and "--learning-rate 1e+08" in stderr
    assert "--state-norm" not in stderr  # |obs| <= 8, |r| <= 16.3: the learning rate alone is named
    assert summary["error"] == stderr.strip()[len("error: "):]
    ckpt = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)
    assert ckpt["global_step"] == 500 == summary["checkpoint_step"]  # the last finite one, kept
    assert all(torch.isfinite(t).all() for t in ckpt["agent"]["actor"].values())
    assert "model.pt" not in files_under(run_dir)  # no model of a diverged network
    assert not [f for f in files_under(run_dir) if f.endswith(".tmp")]


def test_divergence_advice_names_only_what_the_run_can_change(tmp_path):
    agent = make_agent(state_norm=True)
    rb = td3.ReplayBuffer(10, 3, 1, torch.device("cpu"))
    rb.add(np.full((4, 3), 500.0), np.zeros((4, 3)), np.zeros((4, 1)), np.array([1.0, -250.0, 3.0, np.nan]),
           np.zeros(4))
    run = td3.RunFolder(small_args(tmp_path, state_norm=True), None)
    run.last_losses = {"qf1_loss": math.inf}
    with pytest.raises(td3.Diverged) as err:
        run.check_finite(agent, rb, 7)
    message = str(err.value)
    assert message.startswith("training diverged at step 7: qf1_loss = inf. Likely cause: the reward scale "
                              "(|reward| up to 250)")  # lr 3e-4 is usual; the NaN reward is skipped
    assert "--state-norm" not in message and "learning rate" not in message
    run.args = small_args(tmp_path, state_norm=False, learning_rate=1e-4)
    with pytest.raises(td3.Diverged, match=r"unnormalized inputs \(\|observation\| up to 500; try --state-norm\)"):
        run.check_finite(agent, rb, 7)
    run.last_losses = {"qf1_loss": 1.0}
    run.check_finite(agent, rb, 7)  # finite losses and weights: no error
    agent.actor.fc2.weight[3, 5] = math.nan  # finite losses, one weight gone: still caught, by what it is
    with pytest.raises(td3.Diverged, match=r"^training diverged at step 8: a network weight = nan\. Likely cause: "):
        run.check_finite(agent, rb, 8)
    run.writer.close()


def test_spaces_td3_cannot_handle_are_one_user_error_each():
    class CraftedEnv(gym.Env):
        def __init__(self, observation_space, action_space):
            self.observation_space, self.action_space, self.closed = observation_space, action_space, False

        def close(self):
            self.closed = True
    box = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    cases = [(box, gym.spaces.Box(-np.inf, np.inf, (1,), np.float32), "has unbounded actions Box(-inf, inf, (1,), "
              "float32); TD3's tanh actor needs finite bounds"),
             (gym.spaces.Dict({"pos": box}), box, "wrap it in gymnasium.wrappers.FlattenObservation"),
             (box, gym.spaces.Box(-1.0, 1.0, (2, 2), np.float32), "TD3 needs a 1-D continuous Box"),
             (box, gym.spaces.Discrete(3), "TD3 needs a 1-D continuous Box (for discrete actions use DQN)")]
    for observation_space, action_space, words in cases:
        env = CraftedEnv(observation_space, action_space)
        with pytest.raises(td3.UserError) as err:
            td3.checked_env("Crafted-v0", lambda: env)
        assert str(err.value).startswith("'Crafted-v0' has ") and words in str(err.value) and env.closed
    assert td3.checked_env("Crafted-v0", lambda: CraftedEnv(box, box)).action_space == box


def test_atomic_json_leaves_nothing_behind_on_error(tmp_path):
    path = str(tmp_path / "a.json")
    td3.write_json_atomic(path, {"x": 1})
    with pytest.raises(ValueError):
        td3.write_json_atomic(path, {"x": float("nan")})
    assert os.listdir(tmp_path) == ["a.json"] and read_json(path) == {"x": 1}  # old file intact


def test_sigint_stops_at_a_step_boundary_and_resume_counts_every_step_once(tmp_path, capsys, monkeypatch):
    argv = interrupted_run_argv(tmp_path)
    proc = subprocess.Popen([sys.executable, SCRIPT, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ckpt = wait_for_file(tmp_path, "checkpoint.pt", proc)  # step 250: training is under way
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "interrupted by SIGINT at step" in stderr
    run_dir = os.path.dirname(ckpt)
    summary = read_json(os.path.join(run_dir, "summary.json"))
    assert summary["status"] == "interrupted" and summary["signal"] == "SIGINT" and summary["exit_code"] == 130
    stopped_at = summary["global_step"]
    assert 250 <= stopped_at < 1000
    assert torch.load(ckpt, weights_only=True)["global_step"] == stopped_at == summary["checkpoint_step"]
    assert summary["updates"] == stopped_at - 200

    summary = resume_to_the_end_counting_every_step_once(ckpt, capsys, monkeypatch)
    assert summary["status"] == "completed" and summary["exit_code"] == 0
    assert not [f for f in files_under(run_dir) if f.endswith(".tmp")]


def test_a_signal_at_the_last_step_or_while_the_files_are_written_still_completes_the_run(tmp_path, monkeypatch,
                                                                                          capsys):
    evaluate, write_json_atomic = td3.evaluate, td3.write_json_atomic

    def evaluate_then_signal(agent, *args):  # Ctrl-C during the last evaluation: every step is done
        result = evaluate(agent, *args)
        if agent.n_updates == 600:
            os.kill(os.getpid(), signal.SIGINT)
        return result
    monkeypatch.setattr(td3, "evaluate", evaluate_then_signal)
    last = td3.main(small_args(tmp_path / "last", checkpoint_frequency=500))
    assert (last["status"], last["exit_code"], last["global_step"], "signal" in last) == ("completed", 0, 1000, False)
    assert "done: 1000 steps" in capsys.readouterr().out
    monkeypatch.setattr(td3, "evaluate", evaluate)

    def signal_then_write(path, obj):  # Ctrl-C while summary.json is written (it was the default handler's)
        if os.path.basename(path) == "summary.json":
            os.kill(os.getpid(), signal.SIGINT)
        write_json_atomic(path, obj)
    monkeypatch.setattr(td3, "write_json_atomic", signal_then_write)
    writing = td3.main(small_args(tmp_path / "writing"))
    assert (writing["status"], writing["exit_code"]) == ("completed", 0)
    assert read_json(os.path.join(writing["run_dir"], "summary.json")) == writing
    assert not [f for f in files_under(str(tmp_path)) if f.endswith(".tmp")]


def test_sigterm_without_checkpoints_exits_143_with_a_summary(tmp_path):
    proc = subprocess.Popen([sys.executable, SCRIPT, "--env-id", "Pendulum-v1", "--total-timesteps", "100000",
                             "--learning-starts", "500", "--eval-frequency", "1000", "--eval-episodes", "1",
                             "--runs-dir", str(tmp_path), "--no-cuda", "--no-compile"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_file(tmp_path, "evaluations.csv", proc)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert "no checkpoint (--checkpoint-frequency N makes a run resumable)" in stderr
    [run_dir] = [os.path.join(tmp_path, d) for d in os.listdir(tmp_path)]
    summary = read_json(os.path.join(run_dir, "summary.json"))
    assert summary["status"] == "interrupted" and summary["signal"] == "SIGTERM" and summary["exit_code"] == 143
    assert 0 < summary["global_step"] < 100000 and summary["checkpoint_step"] is None
    assert "checkpoint.pt" not in files_under(run_dir)


# --- forks: what a researcher changes, with the default (compiled) flags ----------------------------
class LayerNormQNetwork(td3.QNetwork):
    """The fork of the issue: nn.LayerNorm after each hidden layer of the critic (QNetwork is the one place),
    and dropout before the output (DroQ's critic)."""

    def __init__(self, obs_dim, action_dim, hidden_sizes):
        super().__init__(obs_dim, action_dim, hidden_sizes)
        self.ln1, self.ln2 = torch.nn.LayerNorm(hidden_sizes[0]), torch.nn.LayerNorm(hidden_sizes[1])
        self.dropout = torch.nn.Dropout(0.5)

    def forward(self, obs, actions):
        x = torch.cat([obs, actions], dim=-1)
        x = torch.relu(self.ln2(self.fc2(torch.relu(self.ln1(self.fc1(x))))))
        return self.fc3(self.dropout(x)).squeeze(-1)


@pytest.mark.xdist_group("compiled_td3")
def test_forks_layernorm_critic_adamw_and_a_scheduler_run_compiled(monkeypatch):
    monkeypatch.setattr(td3, "QNetwork", LayerNormQNetwork)
    agent = make_agent(compile=True)
    names = dict(zip(agent.qf.names, agent.qf.stacked))
    assert "ln1.weight" in names and names["ln1.weight"].shape == (2, 64)  # both critics got their LayerNorms
    obs, actions = torch.randn(8, 3), torch.zeros(8, 1)
    assert not torch.equal(agent.qf(obs, actions), agent.qf(obs, actions))  # dropout draws new masks each call
    agent.qf.eval()
    assert torch.equal(agent.qf(obs, actions), agent.qf(obs, actions))  # ... in training mode only
    agent.qf.train()
    # the optimizer fork: one line, any torch.optim optimizer, stepping the gradients torch.func put in p.grad
    agent.q_optimizer = torch.optim.AdamW(agent.qf.parameters(), lr=1e-3, weight_decay=0.5)
    before = [p.detach().clone() for p in agent.qf.parameters()]
    agent.update(random_batch(seed=0))
    replay = [b.clone().requires_grad_(True) for b in before]
    for r, p in zip(replay, agent.qf.parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all()
        r.grad = p.grad.clone()
    torch.optim.AdamW(replay, lr=1e-3, weight_decay=0.5).step()  # the same step, done independently
    assert all(torch.allclose(r, p, atol=1e-6) for r, p in zip(replay, agent.qf.parameters()))
    scheduler = torch.optim.lr_scheduler.StepLR(agent.q_optimizer, step_size=1, gamma=0.5)  # drives param_groups
    ln_before = names["ln1.weight"].clone()
    for seed in range(1, 4):
        metrics = agent.update(random_batch(seed=seed))
        scheduler.step()
    assert agent.q_optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 / 8)
    assert torch.isfinite(metrics["qf_losses"]).all()
    assert not torch.equal(names["ln1.weight"], ln_before)  # the new layer learns


def test_what_torch_func_cannot_honour_fails_loudly():
    """Gradients come from torch.func, so autograd hooks and backward() on the weights cannot work:
    they raise instead of silently doing nothing."""
    agent = make_agent()
    with pytest.raises(RuntimeError, match="doesn't require gradient"):
        agent.actor.fc1.weight.register_hook(lambda grad: grad * 0)
    obs = random_batch()[0]
    with pytest.raises(RuntimeError, match="does not require grad"):
        agent.actor(obs).sum().backward()


def test_learning_curve_png_holds_both_panels(tmp_path):
    history = [{"global_step": s, "eval_return_mean": -1000.0 + s / 10, "eval_return_std": 50.0,
                "value_bias": None if s < 2000 else 3.0} for s in (1000, 2000, 3000)]
    path = str(tmp_path / "learning_curve.png")
    td3.save_learning_curve(path, history, "TD3 test")
    import matplotlib.image
    image = matplotlib.image.imread(path)
    assert image.shape[:2] == (600, 700)  # figsize 7 x 6 at 100 dpi
    top, bottom = image[:350, :, :3], image[380:, :, :3]  # the panels (height ratios 2:1)
    # the return curve is drawn in matplotlib's first colour (blue), the value-bias points in tab:red
    blue = lambda x: (x[..., 2] > 0.6) & (x[..., 0] < 0.3)  # noqa: E731
    red = lambda x: (x[..., 0] > 0.7) & (x[..., 1] < 0.4) & (x[..., 2] < 0.4)  # noqa: E731
    assert blue(top).sum() > 100 and red(top).sum() == 0
    assert red(bottom).sum() > 5 and blue(bottom).sum() == 0


PENDULUM_BAR = -700.0


def pendulum_learning_score(tmp_path, seeds=(1, 2, 3)) -> float:
    """Mean over seeds of the final evaluation, at 6k steps (5 deterministic episodes each)."""
    scores = []
    for seed in seeds:
        summary = td3.main(td3.Args(env_id="Pendulum-v1", seed=seed, total_timesteps=6000, learning_starts=1000,
                                    learning_rate=1e-3, eval_frequency=2000, eval_episodes=5,
                                    runs_dir=str(tmp_path / str(seed)), cuda=False, **SHAPE))
        with open(os.path.join(summary["run_dir"], "evaluations.csv")) as f:
            evals = {int(r["global_step"]): float(r["eval_return_mean"]) for r in csv.DictReader(f)}
        print(f"seed {seed}: evaluations {evals}")
        scores.append(evals[6000])
    return float(np.mean(scores))


@pytest.mark.xdist_group("compiled_td3")
def test_pendulum_learns(tmp_path):
    """TD3 learns Pendulum-v1: over seeds 1-3, the mean of the final evaluations (6k steps) is >= -700.

    Why this criterion: one evaluation of one seed is a coin flip on float rounding (TD3 on
    Pendulum dips now and then: one start state in a swinging limit cycle costs ~-900; an earlier
    one-seed test read -158.9 on one build and -400.7 on another against a bar of -250). Here three
    seeds of 5 episodes are averaged and the bar sits between learning and not learning. Measured
    (64-wide, lr 1e-3, compiled, one thread): -514, -268, -272 (mean -351; docs/tests.md); a run that
    does not learn scores -1200 to -1800, and one seed failing outright (-1500) leaves the mean at -680.
    Broken on purpose, the same test fails (the actor loss's sign flipped, below). It cannot catch a
    missing clipped min or missing target smoothing: those tricks fight overestimation on harder tasks,
    and plain DDPG learns Pendulum too; the MuJoCo runs in docs/mujoco.md are their evidence.
    """
    assert pendulum_learning_score(tmp_path) >= PENDULUM_BAR


def test_pendulum_learning_test_fails_when_the_actor_climbs_the_wrong_way(tmp_path, monkeypatch):
    """The learning test's power: with the actor loss's sign flipped (gradient descent on Q instead
    of ascent) one seed already scores far below the bar (measured -1554 for seed 1)."""
    correct = td3.TD3.actor_loss
    monkeypatch.setattr(td3.TD3, "actor_loss", lambda self, actor_params, obs: -correct(self, actor_params, obs))
    # compiled graphs inline actor_loss and do not guard on a patched method: this test builds its own (so
    # it is not in the compiled_td3 group, and the two workers share the work)
    torch._dynamo.reset()
    try:
        assert pendulum_learning_score(tmp_path, seeds=(1,)) < PENDULUM_BAR - 500
    finally:
        torch._dynamo.reset()
