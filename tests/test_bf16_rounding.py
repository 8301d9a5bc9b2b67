"""bf16_rounding.py computes `--bf16`'s rounding in float32: checked against autocast's real bfloat16."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bf16_rounding
import td3_continuous as td3


def linear_and_gradients(linear, x, w, b, grad_out):
    """Under autocast(bf16): the output of linear(x, w, b) and the gradients of <output, grad_out>."""
    with torch.autocast("cpu", torch.bfloat16):
        y, vjp = torch.func.vjp(lambda x, w, b: linear(x, w, b).float(), x, w, b)
    return (y, *vjp(grad_out))


def test_rounding_matches_autocast_bf16_forward_and_gradients():
    torch.manual_seed(0)
    x, w, b, grad_out = torch.randn(64, 40), torch.randn(30, 40) / 6, torch.randn(30), torch.randn(64, 30)
    real = linear_and_gradients(F.linear, x, w, b, grad_out)  # autocast's own bf16 matmuls
    rounded = linear_and_gradients(bf16_rounding.linear_as_bf16, x, w, b, grad_out)
    fp32 = (F.linear(x, w, b), grad_out @ w, grad_out.T @ x, grad_out.sum(0))
    for name, r, e, f in zip(("output", "input grad", "weight grad", "bias grad"), real, rounded, fp32):
        assert r.dtype == e.dtype == torch.float32
        gap, bf16_error = (e - r).abs().mean(), (f - r).abs().mean()
        assert bf16_error > 1e-4, name  # bf16 rounding is visible against fp32 ...
        assert gap < 0.1 * bf16_error, name  # ... and the float32 computation of it lands on it
    assert torch.equal(bf16_rounding.linear_as_bf16(x, w, b), F.linear(x, w, b))  # fp32 outside autocast


def test_a_td3_update_with_the_rounding_is_the_bf16_update(monkeypatch):
    """The critic's and the actor's gradients under --bf16: real bf16 (slow on CPUs without it, tiny here)
    against the rounding in float32, eager and compiled, and all against fp32."""
    torch.manual_seed(0)
    obs, actions = torch.randn(32, 3), torch.rand(32, 1) * 4 - 2
    rewards, terminations, next_obs = torch.randn(32), torch.zeros(32), torch.randn(32, 3)
    noise = (torch.randn(32, 1) * 0.4).clamp(-1.0, 1.0)  # smoothing noise, added to the target actor's tanh

    def gradients(bf16: bool, compile: bool = False) -> tuple[np.ndarray, np.ndarray]:
        torch.manual_seed(1)
        args = td3.Args(hidden_sizes=(16, 16), bf16=bf16, cuda=False, compile=compile)
        agent = td3.TD3(3, td3.gym.spaces.Box(-2.0, 2.0, (1,), np.float32), args, torch.device("cpu"))
        if compile:
            td3.compile_update(agent)
        critic, _ = agent.critic_gradients(obs, actions, rewards, terminations, next_obs, noise)
        actor, _ = agent.actor_gradients(obs)
        return tuple(torch.cat([g.reshape(-1) for g in grads.values()]).numpy() for grads in (critic, actor))
    fp32, real = gradients(False), gradients(True)
    monkeypatch.setattr(F, "linear", F.linear)  # so that undo() puts them back
    monkeypatch.setattr(torch, "tanh", torch.tanh)
    monkeypatch.setattr(torch._inductor.config, "emulate_precision_casts", False)
    bf16_rounding.round_as_bf16()
    for compiled, rounded in ((False, gradients(True)), (True, gradients(True, compile=True))):
        # the critic's: bit for bit eager; compiled, fp32's summation order moves a last bit here and there. Without
        # the rounded tanh (the noise is added to its output) 17% differ, by 6% of fp32's gap
        assert np.mean(rounded[0] == real[0]) > 0.99 if compiled else np.array_equal(rounded[0], real[0])
        assert np.abs(rounded[0] - real[0]).mean() < 1e-4 * np.abs(fp32[0] - real[0]).mean()
        assert np.mean(rounded[1] == real[1]) > 0.85  # the actor's: mostly bit for bit (tanh's backward aside)
        assert np.abs(rounded[1] - real[1]).mean() < 0.1 * np.abs(fp32[1] - real[1]).mean()
    for part in range(2):  # fp32 lands on almost none of those values (a dead ReLU's 0 aside)
        moved = real[part] != 0
        assert np.mean(fp32[part][moved] == real[part][moved]) < 0.05
    # outside autocast (--no-bf16) the replaced F.linear is fp32, bit for bit
    assert all(np.array_equal(a, b) for a, b in zip(gradients(False), fp32))


def test_resume_keeps_the_checkpoints_exp_name_unless_another_is_given(tmp_path):
    """This script's own --exp-name default is not a flag the user gave: --resume keeps the checkpoint's."""
    path = str(tmp_path / "checkpoint.pt")
    saved = td3.Args(exp_name="td3_paper_bf16r", seed=3, bf16=False)
    torch.save({"format": td3.CHECKPOINT_FORMAT, "args": dataclasses.asdict(saved), "buffer": {}}, path)
    args, _ = td3.load_saved(bf16_rounding.Args(resume=path))
    assert (args.exp_name, args.seed, args.bf16) == ("td3_paper_bf16r", 3, True)  # --bf16: this script's default
    with pytest.raises(td3.UserError, match=r"^--exp-name other: --resume keeps the checkpoint's settings"):
        td3.load_saved(bf16_rounding.Args(resume=path, exp_name="other"))
