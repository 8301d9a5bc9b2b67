"""Does TD3 learn as well with `--bf16`? A question for CPUs that lack bf16 matmuls, where `--bf16` runs
the update 10-26x slower than fp32 (its matmuls ~40x: Zen 3, 2 GFLOP/s against 81): too slow for full runs.

This runs td3_continuous.py with `--bf16`'s arithmetic at fp32 speed: inside the update's autocast
regions (and only there, as `--bf16`), nn.Linear and the actor's tanh round what autocast rounds (see
linear_as_bf16), and through the same casts their gradients. One update's critic gradients come out
bit for bit those of eager autocast's real bfloat16, the actor's 93% so and the rest a few bfloat16 steps
apart (tanh's backward uses its unrounded output here): tests/test_bf16_rounding.py.

Run:     python bf16_rounding.py --env-id Hopper-v5 --seed 1 ...   (td3_continuous.py's flags; --bf16 is on)
"""

import dataclasses

import torch
import torch._inductor.config
import torch.nn.functional as F

import td3_continuous

fp32_linear, fp32_tanh = F.linear, torch.tanh


def to_bf16_and_back(x: torch.Tensor) -> torch.Tensor:
    """x rounded to bfloat16 (8 bits of mantissa), kept in float32; its gradient is rounded the same way."""
    return x.bfloat16().float()


def tanh_as_bf16(x: torch.Tensor) -> torch.Tensor:
    """torch.tanh; where autocast asks for bfloat16 (the actor's tanh then gets a bfloat16 input), rounded."""
    if not torch.is_autocast_enabled("cpu"):
        return fp32_tanh(x)
    return to_bf16_and_back(fp32_tanh(to_bf16_and_back(x)))


def linear_as_bf16(x: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    """F.linear; where autocast asks for bfloat16, its rounding computed in float32: the inputs and the product
    (accumulated in fp32, as oneDNN's bf16 matmul) rounded to bfloat16, and the bias, except under torch.vmap
    (the twin critics): there autocast sees a matmul, then an add, and the bias and the sum stay fp32."""
    if not torch.is_autocast_enabled("cpu"):
        return fp32_linear(x, weight, bias)
    with torch.autocast("cpu", enabled=False):
        if torch._C._functorch.is_batchedtensor(weight):  # the twin critics: vmapped over their weights
            product = to_bf16_and_back(fp32_linear(to_bf16_and_back(x), to_bf16_and_back(weight)))
            return product if bias is None else product + bias
        bias = None if bias is None else to_bf16_and_back(bias)
        return to_bf16_and_back(fp32_linear(to_bf16_and_back(x), to_bf16_and_back(weight), bias))


def round_as_bf16() -> None:
    """What nn.Linear and the actor call, replaced for this process. Inductor drops an fp32 -> bf16 -> fp32
    round trip inside a fused kernel unless told to keep it: the compiled update would be plain fp32."""
    F.linear, torch.tanh = linear_as_bf16, tanh_as_bf16
    torch._inductor.config.emulate_precision_casts = True


@dataclasses.dataclass
class Args(td3_continuous.Args):
    exp_name: str = "bf16_rounding"
    """the name of this experiment (part of the run folder name): these runs are not td3_continuous.py's"""
    bf16: bool = True
    """--bf16's autocast regions, their rounding computed in float32 (--no-bf16: plain fp32)"""


if __name__ == "__main__":
    round_as_bf16()
    td3_continuous.run_command_line(td3_continuous.main, Args)
