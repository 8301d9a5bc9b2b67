"""The helpers that several scripts carry are the same text in each: a fix cannot reach one copy only.

Each script is self-contained by design (it imports no other file of the project), so a helper
two scripts need is written in both. This test reads their source and compares it.
"""

import ast
import functools
import os
import shutil

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TD3_SCRIPTS = ("td3_continuous.py", "td3_intrinsic_trading.py")
# what both TD3 scripts carry: the TD3 pieces, the audit's statistics, files, faults and the command line
TD3_SHARED = ("Actor", "QNetwork", "TwinQ", "ReplayBuffer", "RunningMeanStd", "smoothing_noise", "td3_target",
              "soft_update_", "optimizer_step", "kappa", "scale_stats", "p99_abs_spread", "replace_atomic",
              "write_json_atomic", "UserError", "StopOnSignal", "parse_cli", "run_command_line",
              "require_cxx_compiler")
# ... and what the toy carries too
ALL_SHARED = ("kappa", "replace_atomic", "write_json_atomic", "UserError", "parse_cli")


def top_level_sources(script: str) -> dict:
    """name -> source text of every top-level function and class of a script."""
    with open(os.path.join(ROOT, script)) as f:
        return sources_of(f.read())


@functools.lru_cache
def sources_of(text: str) -> dict:
    lines = text.splitlines(keepends=True)
    return {node.name: "".join(lines[node.lineno - 1 - len(node.decorator_list):node.end_lineno])
            for node in ast.parse(text).body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}


@pytest.mark.parametrize("name", TD3_SHARED)
def test_the_td3_scripts_share_these_helpers_word_for_word(name):
    continuous, trading = (top_level_sources(script) for script in TD3_SCRIPTS)
    assert name in continuous and name in trading, name
    assert continuous[name] == trading[name], f"{name} differs between the two TD3 scripts"


@pytest.mark.parametrize("name", ALL_SHARED)
def test_the_toy_shares_these_helpers_word_for_word(name):
    toy = top_level_sources("toy_td3_intrinsic_experiments.py")
    assert toy[name] == top_level_sources("td3_continuous.py")[name], f"{name} differs in the toy"


@pytest.mark.parametrize("name", ("UserError", "parse_cli"))
def test_the_plot_script_shares_these_helpers_word_for_word(name):
    plot = top_level_sources("plot_learning_curves.py")
    assert plot[name] == top_level_sources("td3_continuous.py")[name], f"{name} differs in plot_learning_curves.py"


def test_no_script_imports_another():
    scripts = ("td3_continuous", "td3_intrinsic_trading", "toy_td3_intrinsic_experiments")
    for script in scripts:
        with open(os.path.join(ROOT, f"{script}.py")) as f:
            tree = ast.parse(f.read())
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.module}
        assert not imported & set(scripts), f"{script} imports {imported & set(scripts)}"


def test_a_changed_copy_is_caught(tmp_path, monkeypatch):
    """The comparison has teeth: one character added to one copy fails it, for that helper only."""
    for script in TD3_SCRIPTS:
        shutil.copy(os.path.join(ROOT, script), tmp_path / script)
    path = tmp_path / "td3_continuous.py"
    text = path.read_text()
    lerp = "torch._foreach_lerp_(targets, sources, tau)"
    changed = text.replace(lerp, lerp[:-1] + " )")
    assert len(changed) == len(text) + 1
    path.write_text(changed)
    monkeypatch.setattr(__import__(__name__), "ROOT", str(tmp_path))
    test_the_td3_scripts_share_these_helpers_word_for_word("td3_target")  # the other copies still agree
    with pytest.raises(AssertionError, match="soft_update_ differs between the two TD3 scripts"):
        test_the_td3_scripts_share_these_helpers_word_for_word("soft_update_")
