"""Aggregate learning curves of td3_continuous.py runs against the TD3 paper's published curves.

Reads evaluations.csv and summary.json of each run folder given, groups the runs by
environment and experiment name (summary.json's; older runs': the run folder's middle, as in
{env_id}__{exp_name}__{seed}__{time}; a renamed folder is an experiment of its own), and
writes one figure per environment: every seed's eval return, their mean, and the published
mean +- std band of the authors' 10 seeds. Prints a table of the last common evaluation step:
each seed, the mean, the published mean and std there, and whether the mean is within one
published std below the published mean (the reproduction target of this kit); and, for runs that
reach 100k, the same for each seed's mean of its evaluations from 55k to 100k (one evaluation is
a noisy score: Hopper's published std at 100k is 752). The seeds of one experiment are averaged step
by step: a seed given twice, or runs evaluated at other steps (another --eval-frequency), is an error.

Run:     python plot_learning_curves.py runs/Hopper-v5__td3_paper__* runs/Hopper-v5__td3_continuous__*
Writes:  figures/learning_curves_{env_id}.png (--out-dir)
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from typing import Optional

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt
import numpy as np
import tyro

# The authors' learning curves (github.com/sfujim/TD3, learning_curves/, v1 envs, the paper's
# setup: 400-300 networks, learning rate 1e-3, batch 100; random start steps per task, as their
# run_experiments.sh: 1 000 for Hopper and Walker2d, 10 000 for HalfCheetah), mean and std over
# their 10 seeds (numpy's population std) of 10 deterministic episodes, at steps 0, 5000, ..., 100 000
# (HalfCheetah to 300 000, for the 300k runs).
PUBLISHED_STEP = 5000
PUBLISHED = {
    "Hopper": (
        [45, 97, 133, 129, 150, 178, 302, 313, 276, 283, 285, 309, 344, 405, 378, 505, 457, 827, 737, 754, 659],
        [38, 67, 95, 92, 86, 98, 253, 261, 74, 62, 69, 105, 125, 187, 152, 258, 195, 621, 506, 524, 752]),
    "HalfCheetah": (
        [-2, -493, -508, -394, 476, 1327, 1979, 2610, 3160, 3428, 3352, 3988, 4332, 4586, 4763, 5071, 4821, 5168,
         5373, 5322, 5514, 5722, 5629, 5917, 5937, 5911, 6049, 6154, 6227, 6133, 6239, 6428, 6448, 6487, 6588, 6414,
         6682, 6650, 6810, 6774, 6833, 6954, 6835, 6972, 7031, 7082, 7246, 7082, 7116, 7258, 7017, 7329, 7354, 7474,
         7342, 7522, 7469, 7586, 7472, 7609, 7697],
        [1, 113, 141, 230, 597, 388, 299, 434, 412, 309, 851, 252, 352, 422, 497, 582, 438, 448, 377, 598, 554, 376,
         685, 438, 486, 670, 533, 560, 527, 583, 513, 514, 616, 517, 601, 715, 635, 739, 734, 720, 683, 702, 818, 868,
         752, 734, 788, 723, 845, 720, 890, 668, 690, 827, 491, 697, 775, 713, 676, 674, 727]),
    "Walker2d": (
        [42, 91, 185, 218, 249, 293, 311, 377, 327, 322, 368, 377, 450, 456, 602, 565, 754, 764, 655, 860, 770],
        [82, 137, 95, 142, 79, 80, 84, 276, 140, 126, 145, 131, 145, 207, 398, 227, 542, 506, 638, 671, 586]),
}


# The same files, each seed's mean of its ten evaluations at 55 000, 60 000, ..., 100 000 (seeds 0-9).
LATE_STEPS = (55_000, 100_000)
PUBLISHED_LATE = {
    "Hopper": [309, 832, 600, 538, 690, 319, 1169, 391, 338, 190],  # mean 538, std 282
    "HalfCheetah": [4367, 4791, 4740, 5317, 5023, 5098, 5134, 4416, 4652, 5399],  # mean 4894, std 339
    "Walker2d": [546, 419, 1398, 703, 1215, 443, 433, 368, 347, 381],  # mean 625, std 357
}


@dataclass
class Args:
    run_dirs: tyro.conf.Positional[tuple[str, ...]]
    """run folders written by td3_continuous.py (each with evaluations.csv and summary.json)"""
    out_dir: str = "figures"
    """where the figures are written"""


class UserError(Exception):
    """A mistake in the command line or inputs: reported as one line on stderr, exit code 2."""


def read_run(run_dir: str) -> dict:
    """One run: env id, experiment name, seed, and its evaluations as arrays. The experiment name is in
    summary.json; in older runs' only in the folder name {env_id}__{exp_name}__{seed}__{time} (a renamed folder is
    an experiment of its own: runs are never averaged on a guess)."""
    csv_path, summary_path = os.path.join(run_dir, "evaluations.csv"), os.path.join(run_dir, "summary.json")
    if not (os.path.isfile(csv_path) and os.path.isfile(summary_path)):
        raise UserError(f"'{run_dir}' is not a td3_continuous.py run folder (needs evaluations.csv and summary.json)")
    folder = os.path.basename(os.path.normpath(run_dir))
    parts = folder.split("__")
    try:
        with open(summary_path) as f:
            summary = json.load(f)
        run = {"dir": run_dir, "env_id": summary["env_id"], "seed": summary["seed"],
               "exp_name": summary.get("exp_name", "__".join(parts[1:-2]) if len(parts) >= 4 else folder),
               "bf16": summary.get("bf16")}  # None: written before summary.json said
        with open(csv_path, newline="") as f:
            rows = list(csv.DictReader(f))
        cut = [i + 2 for i, row in enumerate(rows) if None in row.values() or None in row]  # + 2: the file's line
        if cut:
            raise ValueError(f"line {cut[0]} has another number of fields than the header")
        run["steps"] = np.array([int(row["global_step"]) for row in rows])
        run["returns"] = np.array([float(row["eval_return_mean"]) for row in rows])
    except (OSError, ValueError, KeyError, TypeError) as err:  # a damaged file; json's errors are ValueErrors
        raise UserError(f"'{run_dir}': cannot read its summary.json or evaluations.csv ({type(err).__name__}: "
                        f"{err})") from None
    if not rows:
        raise UserError(f"'{csv_path}' has no evaluation yet")
    return run


def check_runs(env_id: str, exp_name: str, runs: list[dict]) -> None:
    """The runs of one experiment are averaged step by step: each seed once, in one precision (--bf16's default
    follows the CPU), all evaluated at the same steps (a run stopped early has fewer: the first ones of the longest
    run's)."""
    longest = max(runs, key=lambda run: len(run["steps"]))
    for i, run in enumerate(runs):
        for other in runs[:i]:
            if other["seed"] == run["seed"]:
                raise UserError(f"{env_id} {exp_name}: seed {run['seed']} twice, '{other['dir']}' and '{run['dir']}'")
            if None not in (run["bf16"], other["bf16"]) and run["bf16"] != other["bf16"]:
                raise UserError(f"{env_id} {exp_name}: '{other['dir']}' ran with bf16 {other['bf16']} and "
                                f"'{run['dir']}' with {run['bf16']}: give each precision its own --exp-name")
        if not np.array_equal(run["steps"], longest["steps"][: len(run["steps"])]):
            raise UserError(f"{env_id} {exp_name}: '{run['dir']}' and '{longest['dir']}' were evaluated at different "
                            "steps (another --eval-frequency?); their mean would mix steps: plot them separately")


def published_curve(env_id: str):
    """(steps, mean, std) of the paper's curve for this task, or None (matched on the name before '-v')."""
    task = env_id.split("-v")[0]
    if task not in PUBLISHED:
        return None
    mean, std = (np.array(x, dtype=float) for x in PUBLISHED[task])
    return np.arange(len(mean)) * PUBLISHED_STEP, mean, std


def compare(runs: list[dict], published, env_id: str) -> dict:
    """Returns at the last step every run evaluated, their mean, and the published numbers there; with
    every run at 100k, also each seed's mean over 55k-100k against the published seeds' (late_*)."""
    step = min(int(run["steps"][-1]) for run in runs)
    at_step = [float(run["returns"][run["steps"] == step][0]) for run in runs]  # check_runs: every run has `step`
    row = {"step": step, "seeds": [run["seed"] for run in runs], "returns": at_step, "mean": float(np.mean(at_step))}
    if published is not None and step in published[0]:
        i = int(np.flatnonzero(published[0] == step)[0])
        row.update(published_mean=published[1][i], published_std=published[2][i],
                   within_one_std=bool(row["mean"] >= published[1][i] - published[2][i]))
    lo, hi = LATE_STEPS
    if step >= hi:
        row["late"] = [float(run["returns"][(run["steps"] >= lo) & (run["steps"] <= hi)].mean()) for run in runs]
        row["late_mean"] = float(np.mean(row["late"]))
        late = PUBLISHED_LATE.get(env_id.split("-v")[0])
        if late is not None:
            row.update(published_late_mean=float(np.mean(late)), published_late_std=float(np.std(late)),
                       late_within_one_std=bool(row["late_mean"] >= np.mean(late) - np.std(late)))
    return row


def save_figure(fig, path: str) -> None:
    """Write through a temp file, so a crash never leaves a half-written png."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".tmp")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=100, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)


def plot_env(env_id: str, groups: dict, published, path: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if published is not None:
        steps, mean, std = published
        ax.fill_between(steps, mean - std, mean + std, color="grey", alpha=0.25)
        ax.plot(steps, mean, color="black", linestyle="--", label="paper (10 seeds, v1): mean ± std")
    for color, (exp_name, runs) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], sorted(groups.items())):
        for run in runs:
            ax.plot(run["steps"], run["returns"], color=color, alpha=0.35, linewidth=0.8)
        n = min(len(run["steps"]) for run in runs)  # seeds share the evaluation steps (check_runs)
        ax.plot(runs[0]["steps"][:n], np.mean([run["returns"][:n] for run in runs], axis=0), color=color,
                linewidth=2, label=f"{exp_name}: mean of {len(runs)} seeds (thin: each seed)")
    ax.set(title=f"TD3 on {env_id}", xlabel="environment steps", ylabel="eval return (10 deterministic episodes)")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def main(args: Args) -> list[dict]:
    """Write one figure per environment; return (and print) one comparison row per env and experiment."""
    if not args.run_dirs:
        raise UserError("give at least one run folder")
    by_env = defaultdict(lambda: defaultdict(list))
    for run_dir in args.run_dirs:
        run = read_run(run_dir)
        by_env[run["env_id"]][run["exp_name"]].append(run)
    for env_id, groups in by_env.items():  # before any figure is written
        for exp_name, runs in groups.items():
            check_runs(env_id, exp_name, runs)
    table = []
    for env_id, groups in sorted(by_env.items()):
        published = published_curve(env_id)
        path = os.path.join(args.out_dir, f"learning_curves_{env_id}.png")
        try:
            os.makedirs(args.out_dir, exist_ok=True)
            plot_env(env_id, groups, published, path)
        except OSError as err:
            raise UserError(f"cannot write '{path}' (--out-dir): {err}") from None
        for exp_name, runs in sorted(groups.items()):
            runs.sort(key=lambda run: run["seed"])
            table.append({"env_id": env_id, "exp_name": exp_name, **compare(runs, published, env_id)})
    for row in table:
        seeds = ", ".join(f"seed {s}: {r:.1f}" for s, r in zip(row["seeds"], row["returns"]))
        paper = (f" | paper {row['published_mean']:.0f} ± {row['published_std']:.0f} -> "
                 f"{'within' if row['within_one_std'] else 'BELOW'} one std" if "published_mean" in row else "")
        print(f"{row['env_id']} {row['exp_name']} at {row['step']}: {seeds} | mean {row['mean']:.1f}{paper}")
        if "late" in row:
            paper = (f" | paper {row['published_late_mean']:.0f} ± {row['published_late_std']:.0f} -> "
                     f"{'within' if row['late_within_one_std'] else 'BELOW'} one std"
                     if "published_late_mean" in row else "")
            print(f"    mean of 55k-100k: {', '.join(f'{x:.1f}' for x in row['late'])} | mean "
                  f"{row['late_mean']:.1f}{paper}")
    return table


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


if __name__ == "__main__":
    try:
        main(parse_cli(Args))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
