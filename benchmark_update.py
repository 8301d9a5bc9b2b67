"""How fast td3_continuous.py's update is on this machine, and how fast it could be.

Prints the matmul throughput at the update's size (fp32 and bf16, said to be emulated on a CPU
without AVX512-BF16 or AMX), the bare
update's rate (no env) with the given flags in alternating blocks against the eager fp32 update
in the same process (a shared machine drifts by 10-30% within minutes, so only same-process
alternation compares), its share of the fp32 matmul rate, and a short run's learning-phase SPS.
Writes nothing: the flags that only shape a run of td3_continuous.py (its length, evaluations, files, --resume,
--eval-only) are refused, since the short run here sets them.

Run:     python benchmark_update.py --env-id Hopper-v4            (add --no-compile, --bf16 or --no-bf16, --threads N)
"""

import contextlib
import dataclasses
import io
import statistics
import tempfile
import time

import numpy as np
import torch

import td3_continuous as td3


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


def matmul_gflops(batch_size: int, hidden: int, dtype: torch.dtype, device: torch.device,
                  seconds: float = 1.0) -> float:
    """Throughput of the update's dominant matmul, [batch, hidden] @ [hidden, hidden], in GFLOP/s."""
    a = torch.randn(batch_size, hidden, device=device).to(dtype)
    b = torch.randn(hidden, hidden, device=device).to(dtype)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(50):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        count += 50
    return 2.0 * batch_size * hidden * hidden * count / (time.perf_counter() - start) / 1e9


# what the short run below sets: given, they would be silently ignored
RUN_FLAGS = ("total_timesteps", "learning_starts", "eval_frequency", "eval_episodes", "checkpoint_frequency",
             "save_model", "runs_dir", "resume", "eval_only", "checkpoint")


def main(args: td3.Args) -> dict:
    given = [name for name in RUN_FLAGS if getattr(args, name) != getattr(td3.Args(), name)]
    if given:
        raise td3.UserError(f"--{given[0].replace('_', '-')} is not read here: the benchmark times the update and "
                            "a short run of its own (4000 steps, learning from step 1000, in a temporary folder)")
    td3.check_args(args)  # a bad value is one error line (run_command_line below), not a traceback
    device = td3.setup_torch(args)
    env = td3.checked_env(args.env_id, td3.make_env(args.env_id))
    obs_dim, action_space = env.observation_space.shape[0], env.action_space
    env.close()
    agents = {}
    for name, flags in (("these flags", args), ("eager fp32", dataclasses.replace(args, compile=False, bf16=False))):
        agents[name] = td3.TD3(obs_dim, action_space, flags, device)
        if flags.compile:
            td3.compile_update(agents[name])
    hidden = max(args.hidden_sizes)  # the ceiling: a square matmul as wide as the widest layer
    result = {"env_id": args.env_id, "threads": torch.get_num_threads(),
              "fp32_matmul_gflops": matmul_gflops(args.batch_size, hidden, torch.float32, device)}
    try:
        result["bf16_matmul_gflops"] = matmul_gflops(args.batch_size, hidden, torch.bfloat16, device)
    except RuntimeError:  # no bf16 matmul on this device
        result["bf16_matmul_gflops"] = None
    rb = td3.ReplayBuffer(10_000, obs_dim, action_space.shape[0], device)
    rb.add(np.random.randn(10_000, obs_dim), np.random.randn(10_000, obs_dim),
           np.random.uniform(action_space.low, action_space.high, (10_000, action_space.shape[0])),
           np.random.randn(10_000), np.zeros(10_000))
    start = time.perf_counter()
    for agent in agents.values():
        for _ in range(args.policy_frequency):  # the first updates build the compiled graphs
            agent.update(rb.sample(args.batch_size))
    result["compile_seconds"] = time.perf_counter() - start
    rates = {name: [] for name in agents}
    for _ in range(7):
        for name, agent in agents.items():
            start = time.perf_counter()
            for _ in range(200):
                agent.update(rb.sample(args.batch_size))
            if device.type == "cuda":
                torch.cuda.synchronize()
            rates[name].append(200 / (time.perf_counter() - start))
    result["updates_per_second"] = statistics.median(rates["these flags"])
    result["eager_fp32_updates_per_second"] = statistics.median(rates["eager fp32"])
    flops = update_flops(obs_dim, action_space.shape[0], args.hidden_sizes, args.batch_size, args.policy_frequency)
    result["update_gflop"], result["update_gflops"] = flops / 1e9, flops * result["updates_per_second"] / 1e9
    # its progress and closing lines would name a folder deleted right after
    with tempfile.TemporaryDirectory() as runs_dir, contextlib.redirect_stdout(io.StringIO()):
        run = td3.main(dataclasses.replace(args, runs_dir=runs_dir, learning_starts=1000, total_timesteps=4000,
                                           eval_frequency=4000, eval_episodes=1, checkpoint_frequency=0,
                                           save_model=False))
    result["sps_learning_phase"] = run["sps_learning_phase"]
    bf16 = result["bf16_matmul_gflops"]
    native = device.type == "cuda" or torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    print(f"matmul [{args.batch_size}x{hidden}]@[{hidden}x{hidden}]: fp32 {result['fp32_matmul_gflops']:.0f} GFLOP/s, "
          f"bf16 {f'{bf16:.0f} GFLOP/s' if bf16 else 'n/a'}{'' if native else ' (emulated: no AVX512-BF16/AMX)'} "
          f"({result['threads']} threads)")
    print(f"bare update (compile {args.compile}, bf16 {args.bf16}): {result['updates_per_second']:.0f} updates/s x "
          f"{result['update_gflop']:.3f} GFLOP = {result['update_gflops']:.0f} GFLOP/s, "
          f"{100 * result['update_gflops'] / result['fp32_matmul_gflops']:.0f}% of the fp32 matmul rate")
    print(f"bare update, eager fp32, in alternating blocks with the above: "
          f"{result['eager_fp32_updates_per_second']:.0f} updates/s "
          f"(x{result['updates_per_second'] / result['eager_fp32_updates_per_second']:.2f})")
    print(f"learning-phase SPS of a 4000-step run (learning from step 1000): {result['sps_learning_phase']:.0f}")
    return result


if __name__ == "__main__":
    td3.run_command_line(main, td3.Args)  # a mistake is one `error:` line and exit code 2, as in td3_continuous.py
