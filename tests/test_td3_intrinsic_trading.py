"""Tests of td3_intrinsic_trading.py: env, data, metrics and normalizer by hand; the freeze by a real run."""

import contextlib
import copy
import datetime
import functools
import gzip
import io
import json
import math
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
import warnings

import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import td3_intrinsic_trading as tr
from unsafe_model import assert_code_running_model_file_is_refused

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "td3_intrinsic_trading.py")


# --- environment and data -------------------------------------------------------------------------
RAW_NAMES = tr.prepare_data(tr.Args(), tr.synthetic_market(300, 0), "m").names  # the observation layouts
STATIONARY_NAMES = tr.prepare_data(tr.Args(state_norm=True), tr.synthetic_market(300, 0), "m").names


def zero_features(n, realized_vol=None):
    """market_features' layout, all zero but the realized vol the risk term reads."""
    features = {name: np.zeros(n) for name in tr.market_features(np.ones(30), np.ones(30))}
    if realized_vol is not None:
        features["realized_vol_10"] = np.asarray(realized_vol, dtype=float)
    return features


def test_observation_layouts_come_from_the_feature_names():
    assert RAW_NAMES[0] == "close" and RAW_NAMES[-2:] == ["position", "equity"]
    assert STATIONARY_NAMES[0] == "log_close_over_max20" and STATIONARY_NAMES[-1] == "equity_drawdown"
    assert RAW_NAMES[1:-1] == STATIONARY_NAMES[1:-1] and "realized_vol_10" in RAW_NAMES


def test_env_passes_gymnasium_check_env():
    for args in (tr.Args(), tr.Args(state_norm=True)):  # raw and stationary layouts
        data = tr.prepare_data(args, tr.synthetic_market(2000, 0), "synthetic0")
        env = tr.trading_env(data, "train", args, training=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # check_env warns about unbounded Box limits; it must not raise
            check_env(env, skip_render_check=True)


def test_rewards_cost_and_risk_by_hand_on_5_steps():
    close = np.array([100.0, 102.0, 99.0, 99.0, 103.95])
    features = zero_features(5, [0.01, 0.02, 0.01, 0.03, 0.0])  # sigma_t of the risk term
    env = tr.TradingEnv(close, features, 0, 5, episode_length=None, cost=0.001, risk_penalty=10.0,
                        reward_scale=1.0, initial_equity=1e5)
    position, equity_col = env.names.index("position"), env.names.index("equity")
    obs, _ = env.reset(seed=0)
    assert obs[position] == 0.0 and obs[equity_col] == 1e5
    expected = [
        # p=0.5: 0.5*0.02 - 0.001*0.5 - 10*0.25*0.01^2 = 0.01 - 0.0005 - 0.00025
        (0.5, 0.00925, 0.0095),
        # p=-0.5: 0.5 held drifted to 0.5*1.02/1.01 = 0.51/1.01 of equity; selling to -0.5 trades 0.5 + 0.51/1.01:
        # -0.5*(99/102 - 1) - 0.001*(0.5 + 0.51/1.01) - 10*0.25*0.02^2
        (-0.5, 0.5 * 3 / 102 - 0.001 * (0.5 + 0.51 / 1.01) - 0.001, 0.5 * 3 / 102 - 0.001 * (0.5 + 0.51 / 1.01)),
        # p=-0.5 again: the short drifted to -0.5*(99/102)/(1 + 0.5*3/102) = -49.5/103.5; back to -0.5 trades
        # 2.25/103.5; the flat price adds nothing; the risk term 10*0.25*0.01^2
        (-0.5, -0.001 * 2.25 / 103.5 - 0.00025, -0.001 * 2.25 / 103.5),
        # p=1: 0.05 - 0.001*1.5 - 10*1*0.03^2 = 0.05 - 0.0015 - 0.009
        (1.0, 0.0395, 0.0485),
    ]
    equity = 1e5
    for i, (p, reward, pnl) in enumerate(expected):
        obs, r, terminated, truncated, info = env.step(np.array([p], dtype=np.float32))
        equity *= 1 + pnl
        assert r == pytest.approx(reward, abs=1e-12)
        assert info["step_return"] == pytest.approx(pnl, abs=1e-12)
        assert obs[position] == pytest.approx(p) and obs[equity_col] == pytest.approx(equity, rel=1e-6)
        assert not terminated and truncated == (i == 3)  # the split ends after 4 steps


def test_a_held_fraction_drifts_with_the_price_and_keeping_it_is_a_trade():
    close = np.array([100.0, 110.0, 99.0, 99.0])
    env = tr.TradingEnv(close, zero_features(4), 0, 4, episode_length=None, cost=0.01, risk_penalty=0.0,
                        reward_scale=1.0, initial_equity=1e5)
    env.reset(seed=0)
    _, _, _, _, info = env.step(np.array([0.5], dtype=np.float32))
    assert info["traded"] == 0.5  # from flat
    # 50 of 100 in the asset grow to 55 of 105: a weight of 55/105; back to 0.5 sells 55/105 - 0.5 of equity
    _, _, _, _, info = env.step(np.array([0.5], dtype=np.float32))
    assert info["traded"] == pytest.approx(55 / 105 - 0.5)
    assert info["step_return"] == pytest.approx(0.5 * (99 / 110 - 1) - 0.01 * (55 / 105 - 0.5))
    # then the price falls 10%: 45 of 95 are in the asset; to 1.0 buys 1 - 45/95 of equity
    _, _, _, _, info = env.step(np.array([1.0], dtype=np.float32))
    assert info["traded"] == pytest.approx(1.0 - 45 / 95)


def test_ruin_terminates():
    close = np.array([100.0, 5.0, 5.0, 5.0])
    env = tr.TradingEnv(close, zero_features(4), 0, 4, episode_length=None, cost=0.0,
                        risk_penalty=0.0, reward_scale=1.0, initial_equity=1e5)
    env.reset(seed=0)
    _, _, terminated, truncated, _ = env.step(np.array([1.0], dtype=np.float32))
    assert terminated and not truncated  # equity fell 95%: below 10% of the start


@pytest.mark.parametrize("stationary", [False, True])
def test_no_feature_at_t_depends_on_data_after_t(stationary):
    market = tr.synthetic_market(400, 3)
    base = tr.market_features(market.close, market.volume, stationary)
    t = 250
    close, volume = market.close.copy(), market.volume.copy()
    close[t + 1:] *= np.linspace(0.3, 3.0, len(close) - t - 1)  # rewrite the future
    volume[t + 1:] = 1.0
    changed = tr.market_features(close, volume, stationary)
    for name in base:
        np.testing.assert_array_equal(changed[name][: t + 1], base[name][: t + 1])
    first = next(iter(base))  # the price level, or its stationary form
    assert not np.allclose(changed[first][t + 1:], base[first][t + 1:])
    # the env's observation at t (same position and equity so far) is unchanged as well
    env_a = tr.TradingEnv(market.close, base, t - 5, 400, episode_length=None, relative_equity=stationary)
    env_b = tr.TradingEnv(close, changed, t - 5, 400, episode_length=None, relative_equity=stationary)
    oa, _ = env_a.reset(seed=0)
    ob, _ = env_b.reset(seed=0)
    for _ in range(5):
        np.testing.assert_array_equal(oa, ob)
        oa, *_ = env_a.step(np.array([0.3], dtype=np.float32))
        ob, *_ = env_b.step(np.array([0.3], dtype=np.float32))
    np.testing.assert_array_equal(oa, ob)  # observation at t itself


def test_features_by_hand():
    close = 100.0 * np.exp(np.cumsum(np.r_[0.0, np.full(29, 0.01)]))  # constant 1% log-returns
    feats = tr.market_features(close, np.full(30, 5.0))
    t = 25
    assert feats["close"][t] == close[t] and feats["volume"][t] == 5.0
    assert feats["log_return"][t] == pytest.approx(0.01)
    assert feats["realized_vol_10"][t] == pytest.approx(0.0, abs=1e-12)  # no variation, no realized vol
    assert feats["momentum_10"][t] == pytest.approx(0.10)  # 10 steps of 1%
    # MA20 of a geometric series: close_t * mean_k e^{-0.01 k}, k = 0..19, summed in closed form
    ma_ratio = (1 - math.exp(-0.2)) / (20 * (1 - math.exp(-0.01)))
    assert feats["close_over_ma20_minus_1"][t] == pytest.approx(1 / ma_ratio - 1)
    assert feats["close_over_ma20_minus_1"][t] == pytest.approx(0.09783, abs=1e-5)
    assert np.isnan(feats["realized_vol_10"][tr.WARMUP - 1]) and not np.isnan(feats["realized_vol_10"][tr.WARMUP])
    # realized vol against a hand loop over crafted returns (population std of the last 10 log-returns)
    rng = np.random.default_rng(0)
    rough = 100 * np.exp(np.cumsum(rng.normal(0, 0.02, 40)))
    vol = tr.market_features(rough, np.ones(40))["realized_vol_10"]
    log_ret = np.diff(np.log(rough))
    for t in (20, 27, 39):
        assert vol[t] == pytest.approx(np.std(log_ret[t - 10:t]), rel=1e-12)
    # mean log volume: log(1 + V) of the bars t-9..t, a hand loop over a volume that grows by one a bar
    volume = np.arange(1.0, 41.0)
    mean_log_volume = tr.market_features(rough, volume)["log_volume_mean_10"]
    for t in (20, 27, 39):
        assert mean_log_volume[t] == pytest.approx(sum(math.log(2.0 + k) for k in range(t - 9, t + 1)) / 10, rel=1e-12)
    assert np.isnan(mean_log_volume[tr.WARMUP - 1])


def test_stationary_features_by_hand():
    # close rises 1% a step for 25 steps, then falls 2% a step: log(C_t / max C_{t-19..t})
    log_close = np.r_[np.arange(26) * 0.01, 0.25 - np.arange(1, 10) * 0.02]
    feats = tr.market_features(100.0 * np.exp(log_close), np.full(35, 5.0), stationary=True)
    level = feats["log_close_over_max20"]
    assert level[25] == pytest.approx(0.0, abs=1e-12)  # at its 20-step high
    assert level[30] == pytest.approx(-0.10)  # five 2% falls below the high at step 25
    assert np.isnan(level[tr.WARMUP - 1]) and "close" not in feats
    raw = tr.market_features(100.0 * np.exp(log_close), np.full(35, 5.0))
    for name in list(feats)[1:]:
        np.testing.assert_array_equal(feats[name], raw[name])


def test_relative_equity_is_the_drawdown_from_the_running_peak():
    close = np.array([100.0, 110.0, 99.0, 108.9, 108.9])
    env = tr.TradingEnv(close, zero_features(5), 0, 5, episode_length=None, cost=0.0,
                        risk_penalty=0.0, reward_scale=1.0, initial_equity=1e5, relative_equity=True)
    drawdown = env.names.index("equity_drawdown")
    obs, _ = env.reset(seed=0)
    assert obs[drawdown] == 0.0
    # long: equity 1.1e5 (the peak), 0.99e5, 1.089e5; then flat: 1.089e5 stays 1% under the peak
    for position, drawdown in ((1.0, 0.0), (1.0, -0.1), (1.0, -0.01), (0.0, -0.01)):
        obs, *_ = env.step(np.array([position], np.float32))
        assert obs[env.names.index("equity_drawdown")] == pytest.approx(drawdown, abs=1e-6)


def fitted_inputs(market, args, split):
    """Network inputs of a split's reference rollout and of the train-split fit sample."""
    data = tr.prepare_data(args, market, "m")
    ref = tr.reference_states(tr.trading_env(data, "train", args, training=False), seed=3)
    normalizer = tr.StateNormalizer(data.names, "zscore", log_volume=True).fit(ref)
    states = tr.reference_states(tr.trading_env(data, split, args, training=False), seed=5)
    return tr.network_inputs(states, normalizer), tr.network_inputs(ref, normalizer)


def test_stationary_inputs_are_the_same_for_a_price_series_scaled_by_k():
    market = tr.synthetic_market(1200, 4)
    k = 37.5  # another currency or a split-adjusted history; the capital is scaled with it
    scaled = tr.Market(close=market.close * k, volume=market.volume)
    base, _ = fitted_inputs(market, tr.Args(state_norm=True, market_steps=1200), "test")
    moved, _ = fitted_inputs(scaled, tr.Args(state_norm=True, market_steps=1200, initial_equity=1e5 * k), "test")
    np.testing.assert_allclose(moved, base, atol=1e-4)


def test_a_trend_takes_raw_levels_out_of_the_fitted_range_but_not_stationary_inputs():
    market = tr.synthetic_market(1200, 4)
    trend = np.exp(np.linspace(0.0, 3.0, 1200))  # x20 over the series, as a stock over a decade
    trending = tr.Market(close=market.close * trend, volume=market.volume)
    for stationary in (False, True):
        args = tr.Args(state_norm=True, stationary=stationary, market_steps=1200)
        test, fit = fitted_inputs(trending, args, "test")
        names = tr.prepare_data(args, trending, "m").names
        shift = tr.shift_stats(test, fit.min(0), fit.max(0), 10.0, names)
        close = shift["per_dim"][0]["outside_fit_range"]  # the level: the first feature in both layouts
        if stationary:  # the price against its 20-step high: inside the fitted range
            assert close == 0.0 and shift["outside_fit_range_max"] < 0.01
        else:  # the z-scored level: every test step above anything the train split showed
            assert close == 1.0 and test[:, 0].min() > fit[:, 0].max()


def test_synthetic_market_regimes():
    m = tr.synthetic_market(10000, 0)
    r = np.diff(np.log(m.close))
    bull, bear = m.regime[1:] == 0, m.regime[1:] == 1
    assert m.close[0] == 100.0
    assert r[bull].std() == pytest.approx(0.010, rel=0.1) and r[bear].std() == pytest.approx(0.018, rel=0.1)
    assert np.median(m.volume) == pytest.approx(3e6 * math.exp(0.1), rel=0.15)  # 8|r| adds ~0.06, bear 0.4 * share


# --- CSV ------------------------------------------------------------------------------------------
def write_csv(path, header, rows):
    with open(path, "w") as f:
        f.write(",".join(header) + "\n")
        for row in rows:
            f.write(",".join(str(c) for c in row) + "\n")
    return str(path)


def ohlcv_rows(n, start_day=1):
    rows = []
    for i in range(n):
        day = (start_day + i) % 28 + 1
        month = (start_day + i) // 28 % 12 + 1
        year = 2000 + (start_day + i) // 336
        c = 100 + i * 0.1
        rows.append([f"{day:02d}.{month:02d}.{year} 00:00:00.000", c, c + 1, c - 1, c, c * 2, 1000 + i])
    return rows


def test_csv_is_read_sorted_and_adjusted(tmp_path):
    rows = ohlcv_rows(250)
    path = write_csv(tmp_path / "d.csv", ["Gmt time", "OPEN", "High", "low", "Close", "Adj Close", "Volume"],
                     list(reversed(rows)))  # newest first, as many exports are
    m = tr.load_csv(path)
    assert len(m.close) == 250
    assert m.dates == sorted(m.dates)
    assert m.close[0] == pytest.approx(200.0)  # the adjusted close: Close 100 scaled by Adj Close / Close = 2
    assert m.volume[0] == 1000


def test_iso_dates(tmp_path):
    rows = [[f"2001-{1 + i // 28:02d}-{1 + i % 28:02d}", 10, 11, 9, 10 + i * 0.01, 5] for i in range(240)]
    m = tr.load_csv(write_csv(tmp_path / "iso.csv", ["Date", "Open", "High", "Low", "Close", "Volume"], rows))
    assert m.close[-1] == pytest.approx(10 + 239 * 0.01)


@pytest.mark.parametrize("mutate, words", [
    (lambda h, r: (h[:4] + h[5:], r), "no close column"),
    (lambda h, r: (h, r[:3] + [r[3][:4] + ["abc"] + r[3][5:]] + r[4:]), "row 5: close 'abc' is not a number"),
    (lambda h, r: (h, r[:3] + [r[3][:4] + ["-1"] + r[3][5:]] + r[4:]), "row 5: close -1 must be positive"),
    (lambda h, r: (h, r[:3] + [r[3][:4] + ["nan"] + r[3][5:]] + r[4:]), "row 5: close is nan"),
    (lambda h, r: (h, r[:50]), "50 data rows"),
    (lambda h, r: (h, r[:3] + [["31.02.2001 00:00:00.000"] + r[3][1:]] + r[4:]), "row 5: date"),
    # a close beyond float32 (~3.4e38) passed as finite, then crashed the run's JSON with inf
    (lambda h, r: (h, r[:3] + [r[3][:4] + ["1e39"] + r[3][5:]] + r[4:]), "row 5: close is 1e39; every value must "
                                                                        "be a finite number up to 1e"),
    (lambda h, r: (h + ["Close"], [row + ["x"] for row in r]), r"has 2 close columns \(Close, Close\)"),
    (lambda h, r: (h[:5] + ["adj_close"] + h[5:], [row[:5] + [1] + row[5:] for row in r]),
     r"has 2 adj close columns \(adj_close, Adj Close\)"),
])
def test_bad_csv_is_a_clear_error(tmp_path, mutate, words):
    header = ["Time", "Open", "High", "Low", "Close", "Adj Close", "Volume"]
    header, rows = mutate(header, ohlcv_rows(250))
    path = write_csv(tmp_path / "bad.csv", header, rows)
    with pytest.raises(tr.UserError, match=words):
        tr.load_csv(path)


def test_the_first_date_in_another_format_is_named_by_its_row(tmp_path):
    rows = [[f"2001-{1 + i // 28:02d}-{1 + i % 28:02d}", 10 + i * 0.01, 5] for i in range(240)]
    rows[150][0] = "06/15/2001"  # a date every row could be in, written another way
    path = write_csv(tmp_path / "mixed.csv", ["Date", "Close", "Volume"], rows)
    with pytest.raises(tr.UserError) as err:
        tr.load_csv(path)
    assert str(err.value) == ("row 152: date '06/15/2001' is not in the format of the rows before it (ISO "
                              "(2024-01-31 or 2024-01-31T09:30)); use one")
    (tmp_path / "blank.csv").write_text("\n \r\n\t\n")
    with pytest.raises(tr.UserError, match=r"^--data-csv '.*blank\.csv' is empty$"):
        tr.load_csv(str(tmp_path / "blank.csv"))


def run_cli(capsys, *argv):
    """The command line in process (a subprocess costs seconds of imports): (exit code, stderr)."""
    saved, sys.argv = sys.argv, [SCRIPT, *argv]
    try:
        with pytest.raises(SystemExit) as exit_:
            tr.run_command_line(tr.main, tr.Args)
    finally:
        sys.argv = saved
    return exit_.value.code, capsys.readouterr().err


def test_bad_inputs_from_the_command_line_are_one_line_exit_2(tmp_path, capsys):
    result = subprocess.run([sys.executable, SCRIPT, "--data-csv", str(tmp_path / "missing.csv"), "--runs-dir",
                             str(tmp_path / "runs")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: cannot read --data-csv")
    code, err = run_cli(capsys, "--train-frac", "0.9", "--val-frac", "0.2", "--runs-dir", str(tmp_path / "runs"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: --train-frac (0.9)")
    code, err = run_cli(capsys, "--rnd-hidden", "0", "--runs-dir", str(tmp_path / "runs"))
    assert (code, err) == (2, "error: --rnd-hidden must be finite and > 0, got 0\n")
    for argv, message in [(["--learning-rate", "nan"], "error: --learning-rate must be finite and > 0, got nan\n"),
                          (["--reward-scale", "inf"], "error: --reward-scale must be finite and > 0, got inf\n"),
                          (["--exploration-noise", "nan"], "error: --exploration-noise must be finite and >= 0, "
                                                           "got nan\n"),
                          (["--seed", "-1"], "error: --seed must be in [0, 2**32), got -1\n"),
                          (["--total-timesteps", "1500"], "error: --learning-starts (5000) must be below "
                                                          "--total-timesteps (1500): else no update runs"),
                          (["--checkpoint", "m.pt"], "error: --eval-only needs --checkpoint"),
                          (["--eval-only", "--checkpoint", "m.pt", "--save-model"], "which writes no model\n"),
                          (["--eval-split", "val"], "error: --eval-only needs --checkpoint"),
                          (["--initial-equity", "1e300"], "error: --initial-equity must be <= 1e12"),
                          (["--cost-bp", "1e5"], "and --cost-bp < 10000 (100%), got 100000 and 100000\n"),
                          (["--gamma", "1"], "error: --gamma must be in [0, 1) and --tau in (0, 1], got 1.0 and "
                                             "0.005\n"),
                          (["--no-paired", "--intrinsic-kind", "none"], "error: --no-paired trains only the "
                           "intrinsic agent, so it needs --intrinsic-kind rnd or sa-rnd\n"),
                          (["--market-steps", "199"], f"error: --market-steps must be >= {tr.MIN_ROWS}, got 199\n")]:
        code, err = run_cli(capsys, *argv, "--runs-dir", str(tmp_path / "runs"))
        assert code == 2 and err.count("\n") == 1 and (err == message or err.startswith(message)
                                                        or err.endswith(message)), (argv, err)
    assert not (tmp_path / "runs").exists()
    (tmp_path / "a_file").write_text("")
    code, err = run_cli(capsys, "--total-timesteps", "300", "--learning-starts", "100", "--market-steps", "600",
                        "--episode-length", "64", "--no-compile", "--runs-dir", str(tmp_path / "a_file"))
    assert code == 2 and err.startswith(f"error: cannot make the run folder under --runs-dir '{tmp_path / 'a_file'}'")


def test_runs_started_in_the_same_second_get_folders_of_their_own(tmp_path, monkeypatch):
    monkeypatch.setattr(tr.time, "time", lambda: 1700000000.7)  # three runs of one name in one second
    base = str(tmp_path / "synthetic0__td3_intrinsic_trading__1__1700000000")
    assert [tr.make_run_dir(str(tmp_path), "synthetic0__td3_intrinsic_trading__1") for _ in range(3)] == \
        [base, f"{base}-2", f"{base}-3"]
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(p) for p in (base, f"{base}-2", f"{base}-3")]


@pytest.mark.parametrize("encoding", ["utf-8", "ascii"])
def test_a_flag_tyro_rejects_is_one_line_with_its_guess(capsys, monkeypatch, encoding):
    """tyro's boxed message as one line: its title once, and the flags it guesses for a typo. tyro draws the box
    with other characters where stdout is not UTF-8 (a pipe on Windows): the same line either way."""
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(io.BytesIO(), encoding=encoding))
    for argv, message in [(["--seeds", "3"], "error: Unrecognized options: --seeds, 3 (did you mean --seed?) "
                                             "(see --help)\n"),
                          (["--bogus"], "error: Unrecognized options: --bogus (see --help)\n"),
                          (["--state-norm-kin", "x"], "error: Unrecognized options: --state-norm-kin, x (did you mean "
                                                      "--state-norm-kind or --state-norm or --no-state-norm?) (see "
                                                      "--help)\n"),
                          (["--seed", "x"], "error: Value error: Error parsing --seed: invalid literal for int() with "
                                            "base 10: 'x' (see --help)\n")]:
        assert run_cli(capsys, *argv) == (2, message)


def write_rows(path, header, rows, delimiter=",", encoding="utf-8"):
    with open(path, "w", encoding=encoding) as f:
        for row in [header, *rows]:
            f.write(delimiter.join(str(c) for c in row) + "\n")
    return str(path)


def iso_rows(n):
    """n daily rows, close 100 + 0.1 i: every one-step move is small."""
    day = np.datetime64("2001-01-01")
    return [[str(day + i), 100 + i * 0.1, 101 + i * 0.1, 99 + i * 0.1, 100 + i * 0.1, 1000 + i] for i in range(n)]


OHLCV = ["Date", "Open", "High", "Low", "Close", "Volume"]


@pytest.mark.parametrize("delimiter, encoding",
                         [(",", "utf-8-sig"), (";", "utf-8"), ("\t", "utf-8"), (";", "utf-8-sig")])
def test_csv_with_a_bom_or_another_delimiter_reads_the_same(tmp_path, delimiter, encoding):
    path = write_rows(tmp_path / "d.csv", OHLCV, iso_rows(250), delimiter, encoding)
    if encoding == "utf-8-sig":
        assert open(path, "rb").read(3) == b"\xef\xbb\xbf"  # what "CSV UTF-8" exports start with
    m = tr.load_csv(path)
    assert len(m.close) == 250 and m.close[0] == 100.0 and m.close[-1] == pytest.approx(124.9)
    assert m.volume[3] == 1003 and m.dates[0] == "2001-01-01T00:00:00"


def test_semicolon_csv_with_decimal_commas(tmp_path):
    rows = [[c if i == 0 else str(c).replace(".", ",") for i, c in enumerate(r)] for r in iso_rows(250)]
    rows[5][4] = "abc"
    with pytest.raises(tr.UserError, match="row 7: close 'abc' is not a number"):
        tr.load_csv(write_rows(tmp_path / "eu.csv", OHLCV, rows, ";"))
    rows[5][4], rows[5][2] = "100,5", "abc"  # High is not used, so not read
    m = tr.load_csv(write_rows(tmp_path / "eu.csv", OHLCV, rows, ";"))
    assert m.close[5] == pytest.approx(100.5) and m.close[7] == pytest.approx(100.7) and m.volume[5] == 1005


def test_decimal_commas_in_a_comma_file_and_digit_grouping_are_errors_not_misreadings(tmp_path):
    rows = [[*r[:4], str(r[4]).replace(".", ","), r[5]] for r in iso_rows(250)]  # Close 100,0 splits in two fields
    with pytest.raises(tr.UserError, match=r"^row 2: 7 fields, the header has 6 \(decimal commas in a comma-separated"):
        tr.load_csv(write_rows(tmp_path / "c.csv", OHLCV, rows))
    m = tr.load_csv(write_rows(tmp_path / "t.csv", OHLCV, [[*r, ""] for r in iso_rows(250)]))  # a trailing delimiter
    assert m.close[1] == pytest.approx(100.1) and m.volume[1] == 1001
    grouped = [[*r[:5], f"1,{r[5] % 1000:03d}"] for r in iso_rows(250)]  # a volume of 1,001 beside a close of 100.1
    with pytest.raises(tr.UserError, match="hold both ',' and '.' \\(thousands separators\\?\\)"):
        tr.load_csv(write_rows(tmp_path / "g.csv", OHLCV, grouped, "\t"))
    eu = [[*r[:4], str(r[4]).replace(".", ","), f"1.{r[5] % 1000:03d}"] for r in iso_rows(250)]  # 100,1 and 1.001
    with pytest.raises(tr.UserError, match="hold both ',' and '.'"):
        tr.load_csv(write_rows(tmp_path / "e.csv", OHLCV, eu, ";"))


def test_null_and_empty_rows_are_skipped_with_one_counted_warning(tmp_path, capsys):
    rows = iso_rows(250)
    rows[4] = [rows[4][0], "null", "null", "null", "null", "null"]  # Yahoo's holiday rows
    rows[9] = [rows[9][0], "", "", "", "", ""]
    rows[20][4] = "NULL"
    m = tr.load_csv(write_rows(tmp_path / "y.csv", OHLCV, rows))
    assert len(m.close) == 247 and "2001-01-05T00:00:00" not in m.dates
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "adjusted close" not in line]
    assert len(err) == 1 and err[0].startswith("warning:") and "skipped 3 rows" in err[0] and "rows 6, 11, 22" in err[0]
    # too few left: an error that counts both
    few = iso_rows(203)
    for i in (1, 2, 3, 4):
        few[i][4] = "null"
    with pytest.raises(tr.UserError, match="199 data rows once 4 with empty or null values are skipped; at least 200"):
        tr.load_csv(write_rows(tmp_path / "few.csv", OHLCV, few))


def test_repeated_timestamps_are_an_error_naming_the_rows_unless_accepted(tmp_path):
    rows = iso_rows(250)
    rows.insert(8, list(rows[7]))  # file rows 9 and 10 hold the same date
    path = write_rows(tmp_path / "dup.csv", OHLCV, rows)
    repeated = r"^row 10: timestamp 2001-01-08T00:00:00 repeats row 9; .*--accept-suspect-rows"
    with pytest.raises(tr.UserError, match=repeated):
        tr.load_csv(path)
    assert len(tr.load_csv(path, accept_suspect_rows=True).close) == 251


def test_implausible_one_step_moves_are_an_error_naming_the_rows_unless_accepted(tmp_path):
    rows = iso_rows(250)
    rows[30][4] = 103.0e6  # a close 10^6 x its neighbours: up at file row 32, back down at row 33
    path = write_rows(tmp_path / "spike.csv", OHLCV, rows)
    with pytest.raises(tr.UserError, match=r"^row 32: close 1.03e\+08 is a one-step move of x1e\+06 from row 31 "
                                           r"\(102.9\) \(1 more such moves\)"):  # 103e6 / 102.9 - 1
        tr.load_csv(path)
    assert tr.load_csv(path, accept_suspect_rows=True).close[30] == 103.0e6
    rows = iso_rows(250)
    rows[100][4] = 10.0  # -90.9% from 109.9: below the -90% bound
    with pytest.raises(tr.UserError, match="row 102: close 10 is a one-step move of -91%"):
        tr.load_csv(write_rows(tmp_path / "crash.csv", OHLCV, rows))
    rows = iso_rows(250)
    for row in rows[100:]:  # a lasting crash by 11 / 109.9 - 1 = -89.99%: inside the bound, but a split's ratio
        row[4] *= 0.1
    with pytest.raises(tr.UserError, match="row 102: .* likely an unadjusted 10:1 split"):
        tr.load_csv(write_rows(tmp_path / "tenth.csv", OHLCV, rows))
    rows = iso_rows(250)
    for row in rows[100:]:  # a lasting crash to 0.7 x: -30%, no split ratio within 15%
        row[4] *= 0.7
    assert len(tr.load_csv(write_rows(tmp_path / "ok.csv", OHLCV, rows)).close) == 250
    rows = iso_rows(250)
    rows[100][4] *= 0.52  # -48% for one day (a 2:1 ratio within 15%), then back: a rebound is not a split
    assert len(tr.load_csv(write_rows(tmp_path / "rebound.csv", OHLCV, rows)).close) == 250


@pytest.mark.parametrize("ratio, words", [(1 / 2, "2:1 split"), (1 / 3, "3:1 split"), (1 / 4, "4:1 split"),
                                          (1 / 5, "5:1 split"), (1 / 7, "7:1 split"), (1 / 10, "10:1 split"),
                                          (2, "1:2 reverse split"), (5, "1:5 reverse split"),
                                          (10, "1:10 reverse split")])
def test_unadjusted_splits_are_named_by_row_with_the_fix(tmp_path, ratio, words):
    rows = iso_rows(250)
    for row in rows[120:]:  # from file row 122 on (2001-05-01), every price divided (or multiplied) by the ratio
        row[4] = round(row[4] * ratio * 1.01, 6)  # and the day's own +1% move
    fix = f"{'divide' if ratio < 1 else 'multiply'} the closes dated before 2001-05-01T00:00:00 by"
    with pytest.raises(tr.UserError, match=rf"^row 122: close .* likely an unadjusted {words}: use adjusted prices "
                                           rf"\(an Adj Close column\) or {fix}"):
        tr.load_csv(write_rows(tmp_path / "split.csv", OHLCV, rows))
    with pytest.raises(tr.UserError, match=rf"^row 131: .* {fix}"):  # newest first: the fix still names the date
        tr.load_csv(write_rows(tmp_path / "newest_first.csv", OHLCV, rows[::-1]))  # 2001-05-01 on file row 131
    adjusted = [[*row[:5], 100 + i * 0.1, row[5]] for i, row in enumerate(rows)]  # an adjusted column: no split
    m = tr.load_csv(write_rows(tmp_path / "adj.csv", [*OHLCV[:5], "Adj Close", "Volume"], adjusted))
    assert m.close[121] == pytest.approx(112.1)


def test_csv_line_ends_blank_lines_quotes_and_a_truncated_gz(tmp_path):
    rows = iso_rows(250)
    text = "\n".join(",".join(map(str, row)) for row in [OHLCV, *rows]) + "\n"
    (tmp_path / "mac.csv").write_bytes(text.replace("\n", "\r").encode())  # old Mac exports end lines in CR only
    assert np.array_equal(tr.load_csv(str(tmp_path / "mac.csv")).close, tr.load_csv(write_rows(tmp_path / "unix.csv",
                                                                                               OHLCV, rows)).close)
    for row in rows[120:]:
        row[4] /= 2
    (tmp_path / "blank.csv").write_text("\n \n" + text.split("\n", 1)[0] + "\n"
                                        + "\n".join(",".join(map(str, row)) for row in rows))
    with pytest.raises(tr.UserError, match="^row 124: .* 2:1 split"):  # row 122 of the data, after 2 blank lines
        tr.load_csv(str(tmp_path / "blank.csv"))
    notes = [[*row, '"two\nlines"' if i == 5 else "a\u2028b"] for i, row in enumerate(rows)]  # a note column
    (tmp_path / "notes.csv").write_text("\n".join(",".join(map(str, row)) for row in [[*OHLCV, "Note"], *notes]))
    with pytest.raises(tr.UserError, match="^row 123: .* 2:1 split"):  # a quoted field over two lines is read,
        tr.load_csv(str(tmp_path / "notes.csv"))  # and the rows after it are named by their line in the file
    (tmp_path / "quote.csv").write_text(text.replace("100.9,", '"100.9,', 1))  # on file line 11, never closed
    with pytest.raises(tr.UserError, match=r"line 11: a quote \(\"\) opens a field that never closes"):
        tr.load_csv(str(tmp_path / "quote.csv"))
    long = text + "".join(f"2002-{1 + i // 28 % 12:02d}-{1 + i % 28:02d},1,1,1,1,1\n" for i in range(6000))
    (tmp_path / "long.csv").write_text(long.replace("100.9,", '"100.9,', 1))  # the field outgrows csv's limit
    with pytest.raises(tr.UserError, match=r"line 11: field larger than field limit .* never closed"):
        tr.load_csv(str(tmp_path / "long.csv"))
    (tmp_path / "cut.csv.gz").write_bytes(gzip.compress(text.encode())[:500])  # a download cut short
    with pytest.raises(tr.UserError, match="cannot read --data-csv .*cut.csv.gz'"):
        tr.load_csv(str(tmp_path / "cut.csv.gz"))


@pytest.mark.parametrize("name", ["Adj Close", "adj_close", "adjusted_close", "Adjusted Close", "AdjClose",
                                  "Adj. Close"])
def test_adjusted_close_header_variants_and_a_close_volume_file(tmp_path, name, capsys):
    rows = [[r[0], r[4], 2 * r[4], r[5]] for r in iso_rows(250)]
    m = tr.load_csv(write_rows(tmp_path / "adj.csv", ["Date", "Close", name, "Volume"], rows))
    assert m.close[0] == pytest.approx(200.0) and "no adjusted close" not in capsys.readouterr().err
    m = tr.load_csv(write_rows(tmp_path / "cv.csv", ["Date", "Close", "Volume"], [[r[0], r[1], r[3]] for r in rows]))
    assert m.close[3] == pytest.approx(100.3) and m.volume[3] == 1003  # Open/High/Low are not needed
    assert "has no adjusted close column (Adj Close): the close is used as it is" in capsys.readouterr().err


def hourly_rows(weeks, bars_per_day=24, weekend=False, sunday_evening=False, seed=0, step="h"):
    """Bars from Monday 2001-01-01 (hourly, or each minute with step="m"): bars_per_day a day (from 00:00, or
    from 09:00 if fewer), Monday to Friday (every day with weekend=True; FX's two Sunday-evening bars with
    sunday_evening=True); a random walk."""
    rng, rows, close = np.random.default_rng(seed), [], 100.0
    for day in range(7 * weeks):
        if day % 7 == 6 and sunday_evening:
            for hour in (22, 23):
                stamp = np.datetime64("2001-01-01T00:00") + np.timedelta64(day * 24 + hour, "h")
                rows.append([str(stamp).replace("T", " "), round(close, 6), 1000])
            continue
        if day % 7 >= 5 and not weekend:
            continue
        for hour in range(bars_per_day):
            close *= 1 + 0.002 * rng.standard_normal()
            start = np.timedelta64(day * 24 + (9 if bars_per_day < 24 else 0), "h")
            stamp = np.datetime64("2001-01-01T00:00") + start + np.timedelta64(hour, step)
            rows.append([str(stamp).replace("T", " "), round(close, 6), 1000 + hour])
    return rows


def daily_rows(keep, years=2):
    """One bar on each day from 2001-01-01 for which keep(date) holds."""
    days = np.arange(np.datetime64("2001-01-01"), np.datetime64(f"{2001 + years}-01-01"))
    return [[str(d), 100 + i % 7, 1000] for i, d in enumerate(d for d in days if keep(d.astype(object)))]


@pytest.mark.parametrize("rows, periods", [
    (lambda: hourly_rows(10), 24 * 260),  # FX: 24 bars on each of 260 weekdays a year
    (lambda: hourly_rows(10, sunday_evening=True), 24 * 260),  # FX's Sunday-evening bars are not a trading day
    (lambda: hourly_rows(1, bars_per_day=390, step="m"), 390 * 260),  # one week of an exchange's minute bars
    (lambda: hourly_rows(1, bars_per_day=390, step="m")[300:-270], 390 * 260),  # the same, first and last day cut
    (lambda: hourly_rows(10, bars_per_day=7), 7 * 260),  # a stock exchange's hourly bars
    (lambda: hourly_rows(3, weekend=True), 24 * 365),  # crypto: every hour of every day
    (lambda: [[str(np.datetime64("2001-01-01") + i), 100 + i % 7, 1000] for i in range(400)], 365),  # daily, 7/7
    (lambda: daily_rows(lambda d: d.weekday() < 5), 260),  # weekdays
    (lambda: daily_rows(lambda d: d.weekday() < 5 and d.year != 2002, years=4), 260),  # a year missing in the file
    (lambda: daily_rows(lambda d: not (d.year == 2001 and 3 <= d.month <= 5)), 365),  # crypto, a 3-month outage
    (lambda: daily_rows(lambda d: d.weekday() < 5 and d.toordinal() % 29), 252),  # 9 holidays a year: stocks
    (lambda: daily_rows(lambda d: d.weekday() != 5), 313),  # six days a week: 260.9 + 52.2
    (lambda: daily_rows(lambda d: d.day in (1, 15), years=9), 24),  # twice a month: median gap 15 days
    (lambda: daily_rows(lambda d: d.day == 1, years=20), 12),  # monthly
])
def test_periods_per_year_from_the_timestamps_sets_sharpe(tmp_path, rows, periods):
    m = tr.load_csv(write_rows(tmp_path / "f.csv", ["Date", "Close", "Volume"], rows()), accept_suspect_rows=True)
    assert m.periods_per_year == periods
    data = tr.prepare_data(tr.Args(), m, "f")
    assert data.periods_per_year == periods and data.frequency == m.frequency
    lo, hi = data.splits["test"]
    b = tr.benchmark_metrics(data.close, data.features["realized_vol_10"], (lo, hi), 0.0, 0.0, data.periods_per_year)
    r = m.close[lo + 1:hi] / m.close[lo:hi - 1] - 1  # buy-and-hold's step returns, cost 0
    assert b["metrics"]["buy_and_hold"]["sharpe"] == pytest.approx(math.sqrt(periods) * r.mean() / r.std())
    assert tr.prepare_data(tr.Args(periods_per_year=12), m, "f").periods_per_year == 12  # the flag wins


def test_a_gap_of_over_a_month_and_10_bars_is_an_error_naming_the_rows_unless_accepted(tmp_path):
    header = ["Date", "Close", "Volume"]
    outage = daily_rows(lambda d: not (d.year == 2001 and 3 <= d.month <= 5))  # 2001-03-01 .. 2001-05-31 missing
    path = write_rows(tmp_path / "gap.csv", header, outage)
    # 2001-02-28 is the 59th day, file row 60 (the header is row 1); 2001-06-01 comes 93 days after it
    with pytest.raises(tr.UserError, match=r"^row 61: timestamp 2001-06-01T00:00:00 is 93 days after row 60's "
                                           r"\(bars are a median 1 day apart\): rows missing\? .*accept-suspect"):
        tr.load_csv(path)
    assert len(tr.load_csv(path, accept_suspect_rows=True).close) == len(outage)
    # the month bound: March missing but for the 31st is a gap of 31 days (kept), one more day is 32 (named)
    tr.load_csv(write_rows(tmp_path / "31.csv", header, daily_rows(lambda d: not (d.month == 3 and d.day < 31))))
    with pytest.raises(tr.UserError, match="row 61: timestamp 2001-04-01T00:00:00 is 32 days after row 60's"):
        tr.load_csv(write_rows(tmp_path / "32.csv", header, daily_rows(lambda d: d.month != 3)))
    # the 10-bar bound: weekly bars (median 7 days) keep a 63-day gap and name a 77-day one
    weekly = lambda hole: daily_rows(lambda d: d.weekday() == 0 and not 0 < (d - datetime.date(2002, 1, 7)).days < hole,
                                     years=6)  # noqa: E731
    tr.load_csv(write_rows(tmp_path / "w63.csv", header, weekly(63)))
    with pytest.raises(tr.UserError, match=r"is 77 days after .* \(bars are a median 7 days apart\)"):
        tr.load_csv(write_rows(tmp_path / "w77.csv", header, weekly(77)))


def test_no_split_starts_inside_the_warm_up():
    assert tr.split_bounds(250, 0.05, 0.15) == {"train": (20, 20), "val": (20, 50), "test": (50, 250), "all": (20, 250)}
    assert tr.split_bounds(1000, 0.7, 0.15) == {"train": (20, 700), "val": (700, 850), "test": (850, 1000),
                                                "all": (20, 1000)}


def test_an_unnamed_first_column_is_the_date(tmp_path):
    """pandas' DataFrame.to_csv writes its date index under an empty header."""
    rows = [[r[0], r[1], r[2]] for r in hourly_rows(3)]
    m = tr.load_csv(write_rows(tmp_path / "pd.csv", ["", "Close", "Volume"], rows))
    assert m.dates[:2] == ["2001-01-01T00:00:00", "2001-01-01T01:00:00"] and m.periods_per_year == 24 * 260
    assert m.close[1] == rows[1][1]
    tsv = tr.load_csv(write_rows(tmp_path / "pd.tsv", ["", "Close", "Volume"], rows, "\t"))  # to_csv(sep="\t")
    assert tsv.dates == m.dates and np.array_equal(tsv.close, m.close)
    with pytest.raises(tr.UserError, match="has no date column"):  # an unnamed column elsewhere is not a date
        tr.load_csv(write_rows(tmp_path / "no.csv", ["Close", "", "Volume"], [[r[1], r[0], r[2]] for r in rows]))


def test_date_and_time_columns_are_one_timestamp(tmp_path):
    rows = [[*r[0].split(" "), r[1], r[2]] for r in hourly_rows(8, bars_per_day=7)]
    m = tr.load_csv(write_rows(tmp_path / "dt.csv", ["Date", "Time", "Close", "Volume"], rows))
    assert m.dates[:2] == ["2001-01-01T09:00:00", "2001-01-01T10:00:00"] and m.periods_per_year == 7 * 260
    us = [[f"{d[5:7]}/{d[8:10]}/{d[:4]}", *rest] for d, *rest in rows]  # 01/31/2001 and 09:00 in two columns
    assert tr.load_csv(write_rows(tmp_path / "us.csv", ["Date", "Time", "Close", "Volume"], us)).dates == m.dates
    local = [[f"{d[8:10]}.{d[5:7]}.{d[:4]} {t}:00.000 GMT+0100", c, v] for d, t, c, v in rows]  # Dukascopy's
    m = tr.load_csv(write_rows(tmp_path / "local.csv", ["Local time", "Close", "Volume"], local))
    assert m.dates[:2] == ["2001-01-01T09:00:00+01:00", "2001-01-01T10:00:00+01:00"]


def test_mixed_time_zones_and_ambiguous_slash_dates_are_one_error_line(tmp_path):
    rows = [[str(np.datetime64("2001-01-01") + i) + ("T00:00:00+00:00" if i >= 3 else ""), 100 + i % 5, 10]
            for i in range(250)]
    with pytest.raises(tr.UserError, match=r"^row 5: timestamp '2001-01-04T00:00:00\+00:00' has a time zone, row 2's "
                                           r"\('2001-01-01'\) has none"):
        tr.load_csv(write_rows(tmp_path / "tz.csv", ["Date", "Close", "Volume"], rows))
    us = [[f"{1 + i // 28 % 12}/{1 + i % 28}/{2001 + i // 336}", 100 + i % 5, 10] for i in range(250)]
    assert tr.load_csv(write_rows(tmp_path / "us.csv", ["Date", "Close", "Volume"], us)).dates[29] == \
        "2001-02-02T00:00:00"  # month/day: a day above 12 rules out day/month
    early = [[f"{1 + i // 12 % 12}/{1 + i % 12}/{2001 + i // 144}", 100 + i % 5, 10] for i in range(250)]
    with pytest.raises(tr.UserError, match="read both as MM/DD/YYYY and as DD/MM/YYYY"):
        tr.load_csv(write_rows(tmp_path / "either.csv", ["Date", "Close", "Volume"], early))


def test_constant_price_is_an_error(tmp_path):
    rows = [[r[0], 100, 100, 100, 100, r[5]] for r in iso_rows(250)]
    with pytest.raises(tr.UserError, match="the close is 100 on every row"):
        tr.load_csv(write_rows(tmp_path / "flat.csv", OHLCV, rows))


def test_csv_quirk_from_the_command_line_is_one_line_exit_2(tmp_path, capsys):
    rows = iso_rows(250)
    rows.insert(8, list(rows[7]))
    path = write_rows(tmp_path / "dup.csv", OHLCV, rows)
    code, err = run_cli(capsys, "--data-csv", path, "--runs-dir", str(tmp_path / "runs"))
    assert code == 2
    assert err.strip().splitlines() == [err.strip()] and err.startswith("error: row 10:")
    assert not (tmp_path / "runs").exists()


def test_advice_never_names_an_option_the_run_already_uses():
    assert tr.input_fix(tr.Args()) == "use --state-norm"
    assert "--no-stationary" in tr.input_fix(tr.Args(state_norm=True, stationary=False))
    assert tr.input_fix(tr.Args(state_norm=True)) is None  # the main command: nothing left to switch on
    frozen = dict(action_equal_ratio=1.0, eval_value_mae=0.0, intrinsic_mean_delta=0.3, q1_delta_mean=2.0)
    advice = tr.diagnose(frozen, 1.0, 1e5, fix=None)["advice"]
    assert "--state-norm" not in advice and "--no-stationary" not in advice and "bound" in advice
    assert "use --state-norm" in tr.diagnose(frozen, 1.0, 1e5, fix=tr.input_fix(tr.Args()))["advice"]
    split = {"per_dim": [{"name": "close", "clip_ratio": 0.2}]}
    calm = {"per_dim": [{"name": "close", "clip_ratio": 0.0}]}
    sat = {"a": {"val": {"near_bound_ratio": 0.0}, "test": {"near_bound_ratio": 0.0}}}
    text = tr.distribution_shift({"a": {"val": calm, "test": split}}, sat, fix=None)
    assert "'close' is at the clip on 20%" in text and "--no-stationary" not in text and "more recent data" in text


# --- faults: divergence and signals ----------------------------------------------------------------
SHORT = ["--total-timesteps", "1500", "--learning-starts", "500", "--market-steps", "2000", "--episode-length", "64",
         "--eval-frequency", "500", "--no-compile", "--no-cuda"]


def test_diverging_run_is_one_error_line_and_status_diverged(tmp_path, capsys):
    # --threads 1: the agents one after the other (with a thread each they would train side by side)
    code, err = run_cli(capsys, *SHORT, "--learning-rate", "1e6", "--threads", "1", "--runs-dir", str(tmp_path))
    assert code == 1
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    [run_dir] = [os.path.join(tmp_path, d) for d in os.listdir(tmp_path)]
    summary = read_json(run_dir, "summary.json")
    assert summary["status"] == "diverged" and summary["exit_code"] == 1
    step = summary["steps"]["baseline"]
    assert 500 < step <= 500 + tr.LOG_EVERY_UPDATES  # within one logging interval of the first update
    assert err.startswith(f"error: [baseline] training diverged at step {step}: ")
    assert "--learning-rate 1e+06" in err and "use --state-norm" in err  # raw inputs here
    assert "intrinsic" not in summary["steps"]  # the second agent never started
    files = {f for _, _, fs in os.walk(run_dir) for f in fs}
    assert "eval_test.json" not in files and not [f for f in files if ".tmp" in f]


def test_the_divergence_message_names_the_intrinsic_coef_only_where_there_is_an_intrinsic_reward(tmp_path):
    args = tr.Args(compile=False, cuda=False, reward_scale=1e4)
    for intrinsic, expected in ((None, "--reward-scale 10000)"),
                                (tr.RND("rnd", 8, 0, 16), "--reward-scale 10000, --intrinsic-coef 0.5)")):
        log = tr.TrainingLog("agent", args, str(tmp_path), np.zeros((4, 8)))
        log.last_values = {"qf_loss": math.nan, "reward_abs_max": 500.0}  # |r_tot| 500: the reward is the suspect
        with pytest.raises(tr.Diverged) as err:
            log.check_finite(tr.TD3(8, args, torch.device("cpu"), None, seed=0, intrinsic=intrinsic), 7)
        log.writer.close()
        assert f"Likely cause: the reward scale (|r_tot| up to 500; {expected}" in str(err.value)
        assert ("--intrinsic-coef" in str(err.value)) == (intrinsic is not None)


def test_sigterm_stops_training_with_status_interrupted_and_exit_143(tmp_path):
    proc = subprocess.Popen([sys.executable, SCRIPT, *SHORT[:1], "1000000", *SHORT[2:], "--threads", "1",  # in turn
                             "--runs-dir", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.time() + 120
    while not any("events.out" in f for _, _, fs in os.walk(tmp_path) for f in fs):  # training has started
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    time.sleep(2.0)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert "Traceback" not in stderr and "interrupted by SIGTERM" in stderr
    [run_dir] = [os.path.join(tmp_path, d) for d in os.listdir(tmp_path)]
    summary = read_json(run_dir, "summary.json")
    assert summary["status"] == "interrupted" and summary["signal"] == "SIGTERM" and summary["exit_code"] == 143
    assert 0 < summary["steps"]["baseline"] < 1_000_000 and "intrinsic" not in summary["steps"]


# --- two agents side by side (--threads 2 or more): a process each ------------------------------------
SIDE_BY_SIDE = {"total_timesteps": 600, "learning_starts": 400, "eval_frequency": 300, "market_steps": 1000,
                "episode_length": 64, "state_norm": True, "compile": False, "cuda": False}


def writer_pids(run_dir):
    """The process that wrote each agent's TensorBoard file (named events.out.tfevents.time.host.pid.n)."""
    return {name: int(os.listdir(os.path.join(run_dir, name))[0].split(".")[-2]) for name in ("baseline", "intrinsic")}


@pytest.fixture
def threads_restored():
    """A run with --threads sets this worker's torch threads: put them back for the tests after."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_agents_side_by_side_give_the_numbers_of_one_after_the_other(tmp_path, threads_restored):
    side = tr.main(tr.Args(threads=2, runs_dir=str(tmp_path / "side"), **SIDE_BY_SIDE))
    one = tr.main(tr.Args(threads=1, runs_dir=str(tmp_path / "one"), **SIDE_BY_SIDE))
    pids = writer_pids(side["run_dir"])
    assert os.getpid() not in pids.values() and len(set(pids.values())) == 2  # a process for each agent
    assert set(writer_pids(one["run_dir"]).values()) == {os.getpid()}  # one after the other, in this process
    timing = ("run_dir", "wall_time_s", "sps_learning_phase", "compile_seconds")
    assert {k: v for k, v in side.items() if k not in timing} == {k: v for k, v in one.items() if k not in timing}
    for name in ("td3_action_saturation.json", "eval_test.json"):
        assert read_json(side["run_dir"], name) == read_json(one["run_dir"], name)


def start_agents_side_by_side(tmp_path, output):
    """The script (1 000 000 steps, two agents side by side) in a process group of its own, once both agents
    train; output: where its stdout and stderr go."""
    proc = subprocess.Popen([sys.executable, SCRIPT, *SHORT[:1], "1000000", *SHORT[2:], "--threads", "2",
                             "--runs-dir", str(tmp_path)], stdout=output, stderr=output, text=True, cwd=ROOT,
                            start_new_session=True)
    deadline = time.time() + 120
    while sum("events.out" in f for _, _, fs in os.walk(tmp_path) for f in fs) < 2:  # both agents are training
        if time.time() > deadline or proc.poll() is not None:  # fail, and leave no process running
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"the agents did not start training: {proc.communicate()}")
        time.sleep(0.2)
    return proc


def test_ctrl_c_stops_agents_side_by_side_with_status_interrupted(tmp_path):
    """Ctrl-C in a terminal signals every process of its group: the agents' processes leave it to the parent."""
    proc = start_agents_side_by_side(tmp_path, subprocess.PIPE)
    time.sleep(2.0)
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and stderr.count("SIGINT: stopping after this step") == 1, stderr
    deadline = time.time() + 10  # no process of the run is left (multiprocessing's resource tracker ends last)
    with pytest.raises(ProcessLookupError):
        while time.time() < deadline:
            os.killpg(proc.pid, 0)
            time.sleep(0.1)
    [run_dir] = [os.path.join(tmp_path, d) for d in os.listdir(tmp_path)]
    summary = read_json(run_dir, "summary.json")
    assert summary["status"] == "interrupted" and summary["signal"] == "SIGINT" and summary["exit_code"] == 130
    assert all(0 < summary["steps"][name] < 1_000_000 for name in ("baseline", "intrinsic")), summary


def running(pid):
    """Whether a process exists and has not ended (a zombie waiting to be reaped has ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads process states from /proc")
def test_agents_side_by_side_end_when_their_parent_is_killed(tmp_path):
    """SIGKILL (the OOM killer, kill -9) gives the parent no chance to stop its agents: they must notice."""
    proc = start_agents_side_by_side(tmp_path, subprocess.DEVNULL)
    try:
        [run_dir] = [os.path.join(tmp_path, d) for d in os.listdir(tmp_path)]
        agents = writer_pids(run_dir).values()
        assert all(running(pid) for pid in agents)
        proc.kill()
        proc.wait()
        deadline = time.time() + 30
        while any(running(pid) for pid in agents) and time.time() < deadline:
            time.sleep(0.2)
        assert not any(running(pid) for pid in agents)  # else they would train their 1 000 000 steps for nobody
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def test_an_agent_process_whose_parent_died_before_handing_out_work_ends(threads_restored):
    ctx = multiprocessing.get_context("spawn")
    work, done = ctx.Queue(), ctx.Queue()  # no work will ever come
    args = (work, done, ctx.RawValue("i", 0), 1, os.getpid())  # this process is not its own parent: "gone"
    agent = threading.Thread(target=tr.train_in_process, args=args, daemon=True)
    agent.start()
    agent.join(timeout=10)
    assert not agent.is_alive() and done.empty()  # ended without waiting for work, reported nothing


def test_a_diverging_agent_side_by_side_stops_the_other(tmp_path, capsys, threads_restored):
    code, err = run_cli(capsys, *SHORT[:1], "20000", *SHORT[2:], "--intrinsic-coef", "1e30", "--threads", "2",
                        "--runs-dir", str(tmp_path))  # 20 000 steps: an agent left running ends, and fails below
    [run_dir] = [os.path.join(tmp_path, d) for d in os.listdir(tmp_path)]
    summary = read_json(run_dir, "summary.json")
    assert code == 1 and summary["status"] == "diverged", err
    step = summary["steps"]["intrinsic"]
    assert 500 < step <= 500 + tr.LOG_EVERY_UPDATES  # |r_tot| ~ 1e30: the first logged loss is inf
    assert err.startswith(f"error: [intrinsic] training diverged at step {step}: ") and "--intrinsic-coef 1e+30" in err
    assert 0 < summary["steps"]["baseline"] < 20000  # stopped, not left to run its steps
    # its TensorBoard curves reach the divergence: the value that stopped it is logged at the step it stopped
    events = EventAccumulator(os.path.join(run_dir, "intrinsic")).Reload()
    assert [e.step for e in events.Scalars("losses/qf_loss")] == [step]
    name, value = err.split(": ")[2].split(". ")[0].split(" = ")  # what diverged, as the message names it
    assert name in {"qf1_values", "qf2_values", "qf1_loss", "qf2_loss", "qf_loss", "actor_loss"}
    assert str(events.Scalars(f"losses/{name}")[-1].value) == str(float(value))  # inf or nan


def test_an_agent_process_that_dies_is_an_error_not_a_hang(tmp_path):
    """A script calling main() without the `if __name__ == "__main__":` guard: each spawned process runs it
    again, which Python refuses, so the processes die before training; the run must end with that said."""
    script = tmp_path / "unguarded.py"
    script.write_text("import td3_intrinsic_trading as tr\n"
                      f"tr.main(tr.Args(threads=2, market_steps=1000, compile=False, runs_dir={str(tmp_path)!r}))\n")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=ROOT, timeout=120,
                            env={**os.environ, "PYTHONPATH": ROOT})
    assert result.returncode == 1
    assert "RuntimeError: an agent's process ended (exit code 1) without a result" in result.stderr
    assert "if __name__ == '__main__':" in result.stderr  # Python's own explanation, from the processes


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_second_signal_stops_at_once_with_that_signal_s_exit_code(sig, monkeypatch, capsys):
    """The first signal asks for a stop after the step; a second one stops at once: 128 + its number, as a
    shell reports a process the signal killed (130 Ctrl-C, 143 a scheduler's SIGTERM)."""
    def main(args):
        with tr.StopOnSignal() as stop:
            os.kill(os.getpid(), sig)
            assert stop.signum == sig
            os.kill(os.getpid(), sig)
            time.sleep(5)  # never reached: the handler raises
    monkeypatch.setattr(sys, "argv", ["td3_intrinsic_trading.py"])
    with pytest.raises(SystemExit) as exit_:
        tr.run_command_line(main, tr.Args)
    assert exit_.value.code == 128 + sig
    assert capsys.readouterr().err.endswith("error: interrupted; stopped at once, without a summary (files already "
                                             "written are complete)\n")


def test_a_signal_once_training_is_over_lets_the_report_finish(tmp_path, monkeypatch, capsys):
    """Ctrl-C while the final test split is evaluated: training is done, so the report (seconds) completes."""
    final_paired = tr.final_paired

    def interrupted(*args):
        os.kill(os.getpid(), signal.SIGINT)  # Python's own handler would raise KeyboardInterrupt here
        return final_paired(*args)
    monkeypatch.setattr(tr, "final_paired", interrupted)
    try:
        summary = tr.main(tr.Args(total_timesteps=300, learning_starts=100, eval_frequency=150, market_steps=600,
                                  episode_length=64, compile=False, cuda=False, runs_dir=str(tmp_path)))
    except KeyboardInterrupt:  # (not left to abort the test session)
        pytest.fail("the signal stopped the run after training, before summary.json")
    assert summary["status"] == "completed" and read_json(summary["run_dir"], "summary.json") == summary
    assert "SIGINT: stopping after this step" in capsys.readouterr().err


@pytest.mark.parametrize("signalled_evaluation, status", [(2, "interrupted"), (4, "completed")])
def test_a_signal_at_the_last_step_s_evaluation_ends_training_as_it_stands(tmp_path, monkeypatch, capsys,
                                                                           signalled_evaluation, status):
    """Two agents one after the other, two validation evaluations each (steps 150, 300): Ctrl-C during the
    baseline's last one leaves the intrinsic agent untrained (the run stops there); during the intrinsic
    agent's last one, both are fully trained and the report goes on."""
    evaluate_split, calls = tr.evaluate_split, []

    def signalled(*args):
        calls.append(1)
        if len(calls) == signalled_evaluation:
            os.kill(os.getpid(), signal.SIGINT)
        return evaluate_split(*args)
    monkeypatch.setattr(tr, "evaluate_split", signalled)
    monkeypatch.setattr(tr, "side_by_side", lambda names, device: False)
    summary = tr.main(tr.Args(total_timesteps=300, learning_starts=100, eval_frequency=150, market_steps=600,
                              episode_length=64, compile=False, cuda=False, runs_dir=str(tmp_path)))
    assert summary["status"] == status and read_json(summary["run_dir"], "summary.json") == summary
    assert summary["exit_code"] == (0 if status == "completed" else 130)
    if status == "interrupted":
        assert summary["steps"] == {"baseline": 300}  # the intrinsic agent never started
    assert "SIGINT: stopping after this step" in capsys.readouterr().err


# --- metrics --------------------------------------------------------------------------------------
def test_performance_metrics_by_hand():
    r = np.array([0.1, -0.05, 0.02, -0.01])
    m = tr.performance_metrics(r, np.array([1.0, 0.5, 1.0, 0.0]), 252)
    # mean 0.015; population std sqrt(0.0121/4) = 0.055; Sharpe sqrt(252)*0.015/0.055
    assert m["sharpe"] == pytest.approx(math.sqrt(252) * 0.015 / 0.055)
    assert m["sharpe"] == pytest.approx(4.32940, abs=1e-4)
    # downside deviation sqrt((0.05^2 + 0.01^2)/4) = sqrt(0.00065)
    assert m["sortino"] == pytest.approx(math.sqrt(252) * 0.015 / math.sqrt(0.00065))
    # equity 1, 1.1, 1.045, 1.0659, 1.055241: worst fall from the 1.1 peak is to 1.045 -> 5%
    assert m["max_drawdown"] == pytest.approx(0.05)
    assert m["total_return"] == pytest.approx(0.055241)
    assert m["annualized_return"] == pytest.approx(1.055241 ** (252 / 4) - 1)
    assert m["turnover"] == pytest.approx(2.5)  # the fractions of equity traded, summed
    assert m["volatility"] == pytest.approx(0.055 * math.sqrt(252))
    # four hourly crypto bars (8760 a year) that gain half each: 5.0625 ** 2190 is beyond a float, not a crash
    assert tr.performance_metrics(np.full(4, 0.5), np.ones(4), 8760)["annualized_return"] is None
    assert tr.performance_metrics(np.array([-1.0, 0.0]), np.ones(2), 252)["annualized_return"] == -1.0  # ruin


def test_flat_and_buy_and_hold_benchmarks():
    close = np.array([100.0, 110.0, 99.0, 108.9])
    b = tr.benchmark_metrics(close, np.zeros(4), (0, 4), 1.0, 10e-4, 252)["metrics"]
    # buy and hold: +10% less 10 bp entry, -10%, +10%
    assert b["buy_and_hold"]["total_return"] == pytest.approx((1 + 0.1 - 0.001) * 0.9 * 1.1 - 1)
    assert b["buy_and_hold"]["turnover"] == 1.0
    assert b["flat"]["sharpe"] == 0.0 and b["flat"]["total_return"] == 0.0


def test_saturation_stats_by_hand():
    s = tr.action_saturation_stats(np.array([1.0, -0.9995, 0.5, 0.0]))
    assert s["near_bound_ratio"] == 0.5
    assert not s["actor_collapse_detected"]
    # kappa = [0, 1 - 0.9995^2, 0.75, 1]
    assert s["kappa_mean"] == pytest.approx((0 + (1 - 0.9995**2) + 0.75 + 1) / 4)
    assert tr.action_saturation_stats(np.full(20, -1.0))["actor_collapse_detected"]


# --- normalizer -----------------------------------------------------------------------------------
def test_state_normalizer_zscore_and_robust_against_numpy():
    rng = np.random.default_rng(0)
    columns = {"close": rng.normal(100, 5, 500), "volume": np.exp(rng.normal(15, 0.3, 500)),
               "equity": rng.normal(1e5, 1e3, 500)}  # every other feature ~1e-2: one column per name, any number
    x = np.column_stack([columns.get(name, rng.normal(0, 0.02, 500)) for name in RAW_NAMES])
    z = tr.StateNormalizer(RAW_NAMES, "zscore", log_volume=True).fit(x)
    logged = x.copy()
    logged[:, RAW_NAMES.index("volume")] = np.log1p(logged[:, RAW_NAMES.index("volume")])
    np.testing.assert_allclose(z.center.numpy(), logged.mean(0))
    np.testing.assert_allclose(z.scale.numpy(), logged.std(0))
    with torch.no_grad():
        out = z(torch.as_tensor(x, dtype=torch.float32)).numpy()
    np.testing.assert_allclose(out, np.clip((logged - logged.mean(0)) / logged.std(0), -10, 10), atol=2e-3)
    r = tr.StateNormalizer(RAW_NAMES, "robust", log_volume=False).fit(x)
    np.testing.assert_allclose(r.center.numpy(), np.median(x, 0))
    np.testing.assert_allclose(r.scale.numpy(), np.percentile(x, 75, 0) - np.percentile(x, 25, 0))
    far = torch.as_tensor(x[:1] + 1e9, dtype=torch.float32)
    with torch.no_grad():
        assert torch.all(r(far) <= 10.0) and r.fit_count.item() == 500


# --- the freeze, reproduced and lifted ------------------------------------------------------------
def read_json(run_dir, name):
    with open(os.path.join(run_dir, name)) as f:
        return json.load(f)


# Every test that runs the compiled trading update is marked xdist_group("compiled_trading"): one worker
# then builds its graphs once (on a fresh machine each costs ~10 s) and the fixtures run once. The state
# normalizer and the penalty are inside the graphs, so raw and --state-norm runs build their own; the parity
# test and the fork test use the main command's layout (--state-norm), so they share its actor graph.
@pytest.fixture(scope="session")
def freeze_runs(tmp_path_factory):
    """The issues' two commands: the note's puzzle (raw features, rnd) and the fix (--state-norm, sa-rnd).
    Both are paired runs, so each also holds a plain TD3 baseline trained on the same seeds."""
    out = tmp_path_factory.mktemp("freeze")
    common = dict(seed=1, total_timesteps=2000, learning_starts=1000, eval_frequency=500, market_steps=5000,
                  runs_dir=str(out), cuda=False)
    return {"raw": tr.main(tr.Args(state_norm=False, intrinsic_kind="rnd", intrinsic_coef=0.5, **common)),
            "norm": tr.main(tr.Args(state_norm=True, intrinsic_kind="sa-rnd", **common))}


@pytest.mark.xdist_group("compiled_trading")
def test_freeze_reproduces_without_normalization_and_lifts_with_it(freeze_runs):
    raw, norm = freeze_runs["raw"], freeze_runs["norm"]
    # on the eval trajectory (validation split, last evaluation) ...
    assert raw["saturation"]["baseline"]["near_bound_ratio"] >= 0.95
    assert raw["saturation"]["baseline"]["actor_collapse_detected"]
    assert norm["saturation"]["baseline"]["near_bound_ratio"] < 0.5
    # ... and the raw-feature freeze holds on the test split too
    assert raw["saturation_test"]["baseline"]["near_bound_ratio"] >= 0.95
    raw_scale = read_json(raw["run_dir"], "state_scale_summary.json")
    norm_scale = read_json(norm["run_dir"], "state_scale_summary.json")
    assert raw_scale["p99_abs_spread"]["pre"] >= 1e6 and raw_scale["mode"] == "none"
    assert norm_scale["p99_abs_spread"]["post"] <= 10 and norm_scale["mode"] == "zscore" and norm_scale["log_volume"]


@pytest.mark.xdist_group("compiled_trading")
def test_run_folder_files_and_schemas(freeze_runs):
    run_dir = freeze_runs["norm"]["run_dir"]
    files = set(os.listdir(run_dir))
    assert {"summary.json", "state_scale_summary.json", "td3_action_saturation.json", "eval_test.json",
            "eval_equity.png", "action_saturation.png"} <= files
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(run_dir, "baseline")))
    ev = read_json(run_dir, "eval_test.json")
    for section in (ev["agents"]["baseline"], ev["buy_and_hold"], ev["flat"]):
        assert {"sharpe", "sortino", "total_return", "annualized_return", "max_drawdown", "turnover"} <= set(section)
    # the benchmarks by hand on market 0's test split [4250, 5000): flat earns and pays nothing; buy and hold pays
    # one entry cost of 10 bp and holds
    assert ev["steps"] == 749 and all(value == 0 for key, value in ev["flat"].items() if key != "steps")
    close = tr.synthetic_market(5000, 0).close[4250:]
    assert ev["buy_and_hold"]["total_return"] == pytest.approx(
        (close[1] / close[0] - 1e-3) * np.prod(close[2:] / close[1:-1]) - 1)
    assert ev["buy_and_hold"]["turnover"] == 1.0
    sat = read_json(run_dir, "td3_action_saturation.json")["agents"]["baseline"]
    for part in ("summary", "test"):
        assert {"near_bound_ratio", "actor_collapse_detected", "kappa_mean", "kappa_p10"} <= set(sat[part])
    assert sat["summary"] == sat["history"][-1]
    assert [h["global_step"] for h in sat["history"]] == [500, 1000, 1500, 2000]
    # --keep-best: the kept checkpoint is the first evaluation with the best validation Sharpe once learning
    # started (steps 500 and 1000 score the untrained initial weights)
    learned = [h for h in sat["history"] if h["global_step"] > 1000]
    best = max(learned, key=lambda h: h["val_sharpe"])  # max returns the first of equal maxima
    assert sat["selected_step"] == best["global_step"]
    assert sat["selected_val"]["near_bound_ratio"] == best["near_bound_ratio"]
    scale = read_json(run_dir, "state_scale_summary.json")
    assert scale["feature_names"] == STATIONARY_NAMES and scale["stationary"]
    assert scale["feature_transforms"]["log_close_over_max20"].startswith("log(close_t / max(close_t-19..t)), zscore")
    assert scale["feature_transforms"]["volume"].startswith("log1p, zscore")
    assert scale["feature_transforms"]["equity_drawdown"].startswith("equity_t / running peak")
    assert scale["fit_sample_count"] == 3499 - tr.WARMUP  # one state per step of the train split [20, 3500)
    n = len(STATIONARY_NAMES)
    for key in ("pre_stats", "post_stats"):
        assert len(scale[key]["per_dim"]) == n and set(scale[key]["global"]) == {"min", "max", "p95_abs", "p99_abs"}
    for split in ("val", "test"):  # the shift audit: the states seen in evaluation against the fit range
        stats = scale["shift"]["agents"]["baseline"][split]
        assert stats["shape"] == [749, n] and {"clip_ratio", "outside_fit_range"} <= set(stats["per_dim"][0])
        assert stats["clip_ratio_max"] < 0.01  # stationary inputs: nothing at the clip out of sample
    raw_scale = read_json(freeze_runs["raw"]["run_dir"], "state_scale_summary.json")
    assert raw_scale["feature_names"] == RAW_NAMES and set(raw_scale["feature_transforms"].values()) == {"raw"}


# --- intrinsic rewards and the paired audit ------------------------------------------------------
def test_rnd_error_falls_on_repeated_inputs_and_stays_higher_on_new_ones():
    torch.manual_seed(0)
    rnd = tr.RND("rnd", 8, seed=0, hidden=tr.Args.rnd_hidden, lr=1e-3)
    seen = torch.randn(256, 8) * 3 + 1
    before = rnd.prediction_error(seen).mean().item()
    for _ in range(600):
        rnd(None, None, seen)  # kind rnd reads s' only
    after = rnd.prediction_error(seen).mean().item()
    new = rnd.prediction_error(torch.randn(256, 8) * 3 + 1).mean().item()
    assert after < 0.5 * before  # the predictor learned what it saw
    assert new > 2 * after  # and novel states keep a higher error


def test_compile_without_a_cxx_compiler_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setattr(tr.shutil, "which", lambda name: None)  # a machine without g++
    with pytest.raises(tr.UserError, match="--no-compile"):
        tr.main(tr.Args(runs_dir=str(tmp_path / "runs"), cuda=False))
    assert not (tmp_path / "runs").exists()


@functools.lru_cache
def main_command_layout():
    """The main command's (--state-norm) raw states and normalizer, fitted as main fits it: compiled tests
    built at this layout reuse the main command's graphs instead of building their own."""
    args = tr.Args(state_norm=True)
    data = tr.prepare_data(args, *tr.load_market(args))
    states = tr.reference_states(tr.trading_env(data, "train", args, training=False), args.seed)
    return torch.as_tensor(states, dtype=torch.float32), \
        tr.StateNormalizer(data.names, args.state_norm_kind, args.log_volume).fit(states)


def random_batch(gen, states):
    """A replay batch (obs, actions, rewards, terminations, next_obs) of random rows of real raw states."""
    rows = lambda: states[torch.randint(len(states), (256,), generator=gen)]  # noqa: E731
    actions = torch.rand(256, 1, generator=gen) * 2 - 1
    return rows(), actions, torch.randn(256, generator=gen), torch.zeros(256), rows()


def eager_and_compiled_agents(args, make_intrinsic):
    """Two agents at the main command's layout, same seed and weights: eager, and with the default compiled
    update; make_intrinsic(obs_dim) gives each its own reward hook. Returns (states, eager, compiled)."""
    states, normalizer = main_command_layout()
    agents = []
    for compile_ in (False, True):
        agent = tr.TD3(states.shape[1], tr.dataclasses.replace(args, compile=compile_), torch.device("cpu"),
                       normalizer, seed=0, intrinsic=make_intrinsic(states.shape[1]))
        if compile_:
            tr.compile_update(agent)
        agents.append(agent)
    return states, *agents


@pytest.mark.xdist_group("compiled_trading")
def test_compiled_update_matches_eager_update():
    """The one compiled-vs-eager parity test: the intrinsic agent's update (critic, actor, RND predictor) at
    the main command's layout, which the other compiled tests reuse."""
    args = tr.Args(state_norm=True, intrinsic_kind="rnd", cuda=False)
    states, eager, compiled = eager_and_compiled_agents(args, lambda dim: tr.RND("rnd", dim, 0, args.rnd_hidden))
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        batch = random_batch(gen, states)
        m_eager, m_compiled = eager.update(batch), compiled.update(batch)
        assert torch.allclose(m_eager["qf_losses"], m_compiled["qf_losses"], rtol=1e-4)
        assert torch.allclose(m_eager["rewards"], m_compiled["rewards"], rtol=1e-4, atol=1e-6)  # r_tot: RND inside
    for name in ("actor", "qf", "actor_target", "qf_target"):
        for p, q in zip(getattr(eager, name).parameters(), getattr(compiled, name).parameters()):
            assert torch.allclose(p, q, atol=1e-5), name
    for p, q in zip(eager.intrinsic.predictor.parameters(), compiled.intrinsic.predictor.parameters()):
        assert torch.allclose(p, q, atol=1e-5)
    assert eager.intrinsic.input_stats.count.item() == compiled.intrinsic.input_stats.count.item() == 1024
    assert eager.intrinsic_mean_delta() == pytest.approx(compiled.intrinsic_mean_delta(), rel=1e-5)


class VisitCountBonus(torch.nn.Module):
    """A fork's intrinsic reward in ordinary Python: 1/sqrt(visits) of the action rounded to 0.25, in a dict."""

    def __init__(self):
        super().__init__()
        self.counts = {}

    def forward(self, obs, actions, next_obs):
        keys = [round(4 * float(a)) / 4 for a in actions[:, 0]]
        for key in keys:
            self.counts[key] = self.counts.get(key, 0) + 1
        return torch.tensor([self.counts[key] ** -0.5 for key in keys])


@pytest.mark.xdist_group("compiled_trading")
def test_an_intrinsic_reward_in_ordinary_python_runs_compiled():
    """The RND fork place takes plain Python: with the default (compiled) update the agent trains exactly as
    the eager agent does; r_tot = r_env + w / sqrt(visits), checked against the counts."""
    states, eager, compiled = eager_and_compiled_agents(tr.Args(state_norm=True, intrinsic_coef=0.5, cuda=False),
                                                        lambda obs_dim: VisitCountBonus())
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        batch = random_batch(gen, states)
        before = dict(eager.intrinsic.counts)
        m_eager, m_compiled = eager.update(batch), compiled.update(batch)
        keys = [round(4 * float(a)) / 4 for a in batch[1][:, 0]]
        visits = [before.get(key, 0) + keys.count(key) for key in keys]  # the counts after this batch
        expected = batch[2] + 0.5 * torch.tensor([v ** -0.5 for v in visits])
        assert torch.allclose(m_eager["rewards"], expected) and torch.allclose(m_compiled["rewards"], expected)
        assert torch.allclose(m_eager["qf_losses"], m_compiled["qf_losses"], rtol=1e-4)
    assert eager.intrinsic.counts == compiled.intrinsic.counts
    assert sum(compiled.intrinsic.counts.values()) == 3 * 256
    for p, q in zip(eager.qf.parameters(), compiled.qf.parameters()):
        assert torch.allclose(p, q, atol=1e-5)


def test_an_intrinsic_reward_in_ordinary_python_trains_side_by_side(tmp_path, monkeypatch, threads_restored):
    """The fork through main, as a user runs it: the bonus built in main travels to its agent's process."""
    monkeypatch.setattr(tr, "RND", lambda *args: VisitCountBonus())
    summary = tr.main(tr.Args(threads=2, runs_dir=str(tmp_path), **SIDE_BY_SIDE))
    pids = writer_pids(summary["run_dir"])
    assert os.getpid() not in pids.values() and len(set(pids.values())) == 2  # side by side
    # w / sqrt(visits) over 9 rounded actions replayed 200 x 256 times: far below RND's mean bonus here (0.43)
    assert 0 < summary["paired"]["intrinsic_mean_delta"] < 0.05


def test_sa_rnd_bonus_varies_with_the_action_rnd_does_not():
    obs, next_obs = torch.randn(64, 8), torch.randn(64, 8)
    low, high = torch.full((64, 1), -0.8), torch.full((64, 1), 0.8)
    for kind, depends in (("rnd", False), ("sa-rnd", True)):
        rnd = tr.RND(kind, 8, seed=0, hidden=tr.Args.rnd_hidden)
        rnd(obs, torch.rand(64, 1, generator=torch.Generator().manual_seed(0)) * 2 - 1, next_obs)  # varied actions
        bonus_low = copy.deepcopy(rnd)(obs, low, next_obs)  # the same RND, scoring the same states
        bonus_high = copy.deepcopy(rnd)(obs, high, next_obs)  # with another action
        assert (not torch.equal(bonus_low, bonus_high)) == depends


@pytest.mark.xdist_group("compiled_trading")
def test_intrinsic_coef_zero_gives_bit_identical_agents(tmp_path):
    summary = tr.main(tr.Args(seed=2, total_timesteps=1500, learning_starts=500, eval_frequency=750,
                              intrinsic_kind="rnd", intrinsic_coef=0.0, runs_dir=str(tmp_path), cuda=False,
                              market_steps=3000))
    paired = summary["paired"]
    assert paired["action_equal_ratio"] == 1.0 and paired["eval_value_mae"] == 0.0
    assert paired["action_equal_ratio_mean"] == 1.0 and paired["q1_delta_mean"] == 0.0
    assert summary["diagnosis"]["code"] == "R4"
    assert summary["test"]["agents"]["baseline"] == summary["test"]["agents"]["intrinsic"]


@pytest.mark.xdist_group("compiled_trading")
def test_the_notes_puzzle_value_moved_policy_frozen(freeze_runs):
    raw = freeze_runs["raw"]
    paired = raw["paired"]
    assert abs(paired["intrinsic_mean_delta"]) > 0.05  # w * r_int clearly moved the targets
    assert paired["action_equal_ratio"] >= 0.999
    assert raw["diagnosis"]["code"] == "R1"
    assert "--state-norm" in raw["diagnosis"]["advice"]  # both actors sit at the bound
    sat = read_json(raw["run_dir"], "td3_action_saturation.json")
    assert set(sat["agents"]) == {"baseline", "intrinsic"}
    history = sat["paired"]["history"]
    assert [row["global_step"] for row in history] == [500, 1000, 1500, 2000]
    for row in history[:2]:  # before learning starts both agents hold their identical initial weights
        assert row["action_equal_ratio"] == 1.0 and row["eval_value_mae"] == 0.0 and row["q1_delta_mean"] == 0.0
    for key in ("action_equal_ratio", "eval_value_mae", "intrinsic_mean_delta", "q1_delta_mean"):
        # the _mean metrics average the evaluations after learning started only
        assert sat["paired"][f"{key}_mean"] == pytest.approx(np.mean([row[key] for row in history[2:]]))
    # the Q comparison scores both critics on the same states: the fit sample, each agent's value at that step
    base, intr = (sat["agents"][name]["history"] for name in ("baseline", "intrinsic"))
    assert history[3]["q1_delta_mean"] == intr[3]["q1_mean_fit_states"] - base[3]["q1_mean_fit_states"]
    assert sat["diagnosis"]["code"] == "R1" and sat["diagnosis"]["advice"]


def test_verdict_needs_a_lead_over_both_benchmarks_beyond_the_noise():
    bench = {"buy_and_hold": {"sharpe": 0.8}, "vol_filter": {"sharpe": 1.1}}
    noise = math.sqrt(252 / 1008)  # 0.5: one standard error of a Sharpe estimate over 1008 daily steps
    v = tr.verdict({"a": {"sharpe": 1.1 + noise + 0.01, "steps": 1008}, "b": {"sharpe": 1.5, "steps": 1008},
                    "c": {"sharpe": 0.9, "steps": 1008}, "d": {"sharpe": 0.5, "steps": 1008}}, bench, 252)
    assert v["a"]["edge"] and "beats both" in v["a"]["text"] and "not evidence" not in v["a"]["text"]
    assert not v["b"]["edge"] and "beats both by less than the noise" in v["b"]["text"]
    assert not v["c"]["edge"] and "beats only buy_and_hold" in v["c"]["text"]
    assert not v["d"]["edge"] and "no edge learned: its validation Sharpe 0.50 beats neither" in v["d"]["text"]
    assert v["d"]["text"].endswith("its test numbers are not evidence of skill")
    falling = {"buy_and_hold": {"sharpe": -1.0}, "vol_filter": {"sharpe": -0.8}}  # flat (0) beats both here
    v = tr.verdict({"flat-ish": {"sharpe": 0.1, "steps": 1008}, "e": {"sharpe": 0.6, "steps": 1008}}, falling, 252)
    assert not v["flat-ish"]["edge"] and "within the noise of flat" in v["flat-ish"]["text"]
    assert v["e"]["edge"]


def test_a_random_walk_gets_the_no_edge_verdict(tmp_path, capsys):
    rng = np.random.default_rng(5)
    close = 100 * np.exp(np.cumsum(0.01 * rng.standard_normal(900)))  # no drift, no regime: nothing to learn
    rows = [[str(np.datetime64("2001-01-01") + i), round(c, 4), int(1e6 * rng.uniform(0.5, 1.5))]
            for i, c in enumerate(close)]
    path = write_rows(tmp_path / "walk.csv", ["Date", "Close", "Volume"], rows)
    summary = tr.main(tr.Args(data_csv=path, intrinsic_kind="none", state_norm=True, total_timesteps=600,
                              learning_starts=300, eval_frequency=300, compile=False, cuda=False,
                              runs_dir=str(tmp_path / "runs")))
    assert summary["periods_per_year"] == 365 and summary["frequency"].startswith("daily bars")  # 7 days a week
    assert not summary["verdict"]["baseline"]["edge"]
    assert "no edge learned" in capsys.readouterr().out


@pytest.mark.xdist_group("compiled_trading")
def test_sa_rnd_with_state_norm_moves_the_actions(freeze_runs):
    norm = freeze_runs["norm"]
    assert norm["paired"]["action_equal_ratio"] < 0.999
    assert norm["diagnosis"]["code"] in ("R2", "R3")


def test_actor_loss_adds_the_preactivation_penalty():
    """actor_loss = -mean Q1(s, tanh(u)) + beta * mean(u^2), both terms computed here independently."""
    args = tr.Args(policy_frequency=1, preactivation_penalty=0.25, hidden_size=8, compile=False)
    agent = tr.TD3(8, args, torch.device("cpu"), None, seed=0)
    gen = torch.Generator().manual_seed(1)
    obs, next_obs = torch.randn(16, 8, generator=gen), torch.randn(16, 8, generator=gen)
    batch = (obs, torch.zeros(16, 1), torch.zeros(16), torch.zeros(16), next_obs)
    with torch.no_grad():
        h = torch.relu(agent.actor.fc2(torch.relu(agent.actor.fc1(obs))))
        u = h @ agent.actor.fc_mu.weight.T + agent.actor.fc_mu.bias
    qf_before = copy.deepcopy(agent.qf)
    loss = agent.update(batch)["actor_loss"].item()
    with torch.no_grad():  # the actor step uses the critic just updated in the same call
        q1 = agent.qf.q1(obs, torch.tanh(u))
    assert qf_before.q1(obs, torch.tanh(u)).sub(q1).abs().max() > 0  # (the critic did step)
    assert loss == pytest.approx((-q1.mean() + 0.25 * u.square().mean()).item(), rel=1e-5)


def test_preactivation_penalty_default_is_for_normalized_inputs_only():
    assert tr.preactivation_penalty(tr.Args()) == 0.0  # raw features: plain TD3, the freeze demo
    assert tr.preactivation_penalty(tr.Args(state_norm=True)) == 1e-3
    assert tr.preactivation_penalty(tr.Args(state_norm=True, preactivation_penalty=0.0)) == 0.0
    assert tr.preactivation_penalty(tr.Args(preactivation_penalty=0.01)) == 0.01


RAW_FIX = tr.input_fix(tr.Args())  # what diagnose advises a run on raw features
LEVELS_FIX = tr.input_fix(tr.Args(state_norm=True, stationary=False))  # ... on z-scored levels


def test_diagnosis_rules_on_crafted_numbers():
    base = dict(action_equal_ratio=1.0, eval_value_mae=0.0, intrinsic_mean_delta=0.3, q1_delta_mean=2.0)
    assert tr.diagnose(base, 1.0, 1e5, fix=RAW_FIX)["code"] == "R1"
    assert "--state-norm" in tr.diagnose(base, 1.0, 1e5, fix=RAW_FIX)["advice"]
    assert "sa-rnd" in tr.diagnose(base, 0.1, 1e5, fix=RAW_FIX)["advice"]  # free actor, frozen policy: redesign r_int
    assert tr.diagnose({**base, "action_equal_ratio": 0.5}, 0.1, 1e5, fix=RAW_FIX)["code"] == "R2"
    moved = {**base, "action_equal_ratio": 0.5, "eval_value_mae": 40.0}
    assert tr.diagnose(moved, 0.1, 1e5, fix=RAW_FIX)["code"] == "R3"
    still = tr.diagnose({**base, "intrinsic_mean_delta": 0.0}, 0.1, 1e5, fix=RAW_FIX)
    assert still["code"] == "R4" and still["advice"].endswith("raise --intrinsic-coef above 0")  # w = 0: nothing else


def test_split_bounds_floor_the_fractions_without_float_error():
    # 0.7 + 0.2 is 0.8999999999999999 in floats: int(1000 * it) was 899, one row short of validation's 200
    assert tr.split_bounds(1000, 0.7, 0.2) == {"train": (20, 700), "val": (700, 900), "test": (900, 1000),
                                               "all": (20, 1000)}
    assert tr.split_bounds(5031, 0.7, 0.15)["val"] == (3521, 4276)  # 3521.7 and 4276.35 still floor


def test_a_split_too_short_for_training_is_one_user_error(tmp_path):
    # 200 rows: train [20, 140) has 120 rows, 119 steps, fewer than half an episode, 256 / 2 = 128
    with pytest.raises(tr.UserError, match="the train split has 119 steps, under the 128 of half an episode"):
        tr.main(tr.Args(market_steps=200, runs_dir=str(tmp_path), cuda=False))
    assert not os.listdir(tmp_path)  # raised before the run folder exists


# --- rule baseline and the shift audit on crafted numbers ------------------------------------------
def test_volatility_filter_on_a_crafted_series():
    close = np.array([100.0, 101.0, 99.0, 102.0, 102.0, 96.9])
    realized_vol = np.array([0.01, 0.03, 0.01, 0.005, 0.02, 0.0])
    b = tr.benchmark_metrics(close, realized_vol, (0, 6), 0.02, 10e-4, 4)
    # vol < 0.02 at steps 0, 2, 3 -> long, long... positions [1, 0, 1, 1, 0] (0.02 itself is not below)
    expected = np.array([0.01 - 0.001, 0.0 - 0.001, 102 / 99 - 1 - 0.001, 0.0, 0.0 - 0.001])
    m = b["metrics"]["vol_filter"]
    assert m["turnover"] == 4.0
    assert m["total_return"] == pytest.approx(np.prod(1 + expected) - 1)
    assert m["sharpe"] == pytest.approx(2 * expected.mean() / expected.std())
    np.testing.assert_allclose(b["equity"]["vol_filter"], np.r_[1.0, np.cumprod(1 + expected)])


def test_clip_ratio_and_outside_fit_range_on_crafted_inputs():
    names = [f"f{i}" for i in range(3)]
    x = np.array([[10.0, 0.5, -10.0], [-10.0, 0.5, 0.0], [9.0, 2.5, 0.0], [0.0, -3.0, 0.0]])
    s = tr.shift_stats(x, np.array([-9.5, -1.0, -10.0]), np.array([9.5, 1.0, 10.0]), 10.0, names)
    assert [d["clip_ratio"] for d in s["per_dim"]] == [0.5, 0.0, 0.25]
    assert [d["outside_fit_range"] for d in s["per_dim"]] == [0.5, 0.5, 0.0]  # +-10 vs +-9.5; 2.5 and -3
    assert s["clip_ratio_max"] == 0.5 and s["outside_fit_range_max"] == 0.5
    assert tr.shift_stats(x, x.min(0), x.max(0), None, names)["clip_ratio_max"] is None  # raw: no clip


def test_distribution_shift_is_named_only_when_test_fails_and_validation_does_not():
    def split(close, equity):
        return {"per_dim": [{"name": "close", "clip_ratio": close}, {"name": "equity", "clip_ratio": equity}]}
    def sat(val_near, test_near):
        return {"a": {"val": {"near_bound_ratio": val_near}, "test": {"near_bound_ratio": test_near}}}
    text = tr.distribution_shift({"a": {"val": split(0.0, 0.016), "test": split(0.18, 0.0)}}, sat(0.0, 0.0),
                                 fix=LEVELS_FIX)
    assert "'close' is at the clip on 18% of test steps (validation 0%)" in text  # equity's 1.6% hides nothing
    assert "the actor" not in text and ": an input left the range fitted on the train split; " in text
    actor = tr.distribution_shift({"a": {"val": split(0.0, 0.0), "test": split(0.0, 0.0)}}, sat(0.1, 0.9),
                                  fix=LEVELS_FIX)
    assert "the actor is at its bound on 90% of test steps (validation 10%): the actor left" in actor
    assert "an input" not in actor
    for val, test in ((split(0.0, 0.0), split(0.005, 0.0)), (split(0.1, 0.0), split(0.18, 0.0))):
        assert tr.distribution_shift({"a": {"val": val, "test": test}}, sat(0.1, 0.2), fix=LEVELS_FIX) is None
    raw = {"val": split(None, None), "test": split(None, None)}  # no normalizer: nothing is clipped
    assert tr.distribution_shift({"a": raw}, sat(1.0, 1.0), fix=LEVELS_FIX) is None  # frozen everywhere is not a shift
    paired = dict(action_equal_ratio=0.5, eval_value_mae=40.0, intrinsic_mean_delta=0.3, q1_delta_mean=2.0)
    advice = tr.diagnose(paired, 0.1, 1e5, shift="distribution shift (x)", fix=RAW_FIX)["advice"]
    assert advice.startswith("distribution shift")


# --- eval-only: a saved agent on other data --------------------------------------------------------
@pytest.fixture(scope="session")
def saved_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("saved")
    summary = tr.main(tr.Args(seed=3, state_norm=True, total_timesteps=1500, learning_starts=500, eval_frequency=500,
                              market_steps=3000, save_model=True, runs_dir=str(out), cuda=False))
    return summary, out


@pytest.mark.xdist_group("compiled_trading")
def test_eval_only_reproduces_the_test_split_and_reads_another_csv(saved_run, tmp_path):
    summary, _ = saved_run
    model = os.path.join(summary["run_dir"], "model.pt")
    again = tr.main(tr.Args(eval_only=True, checkpoint=model, runs_dir=str(tmp_path), cuda=False))
    assert (again["status"], again["exit_code"]) == ("completed", 0)
    assert again["test"]["agents"] == summary["test"]["agents"]  # same agents, normalizer, split: same numbers
    assert again["test"]["vol_filter"] == summary["test"]["vol_filter"]
    assert again["selected_step"] == summary["selected_step"]  # which checkpoints these are: the kept ones
    assert set(summary["selected_step"].values()) <= {1000, 1500}  # kept after learning starts (500)
    assert {"eval_test.json", "eval_equity.png", "action_saturation.png", "td3_action_saturation.json",
            "shift_audit.json", "summary.json"} <= set(os.listdir(again["run_dir"]))
    # the shift audit of the same agents on the same split: what training wrote, to the last digit
    shift = read_json(again["run_dir"], "shift_audit.json")
    trained = read_json(summary["run_dir"], "state_scale_summary.json")["shift"]["agents"]
    assert shift["split"] == "test" and set(shift["agents"]) == {"baseline", "intrinsic"}
    assert shift["agents"]["baseline"]["test"] == trained["baseline"]["test"]
    # the same market written as a CSV, evaluated whole: as many steps as rows after the warm-up
    m = tr.synthetic_market(400, 9)
    path = write_csv(tmp_path / "other.csv", ["Date", "Open", "High", "Low", "Close", "Volume"],
                     [[str(np.datetime64("2001-01-01") + i), *[m.close[i]] * 4, m.volume[i]] for i in range(400)])
    other = tr.main(tr.Args(eval_only=True, checkpoint=model, data_csv=path, eval_split="all", runs_dir=str(tmp_path),
                            cuda=False))
    assert other["all"]["steps"] == 400 - tr.WARMUP - 1
    assert other["all"]["dates"] == ["2001-01-21T00:00:00", "2002-02-04T00:00:00"]  # rows 20 and 399, by hand
    assert summary["test"]["dates"] is None  # the synthetic market has no calendar
    assert set(other["all"]["agents"]) == {"baseline", "intrinsic"}
    close = m.close[tr.WARMUP:]  # buy and hold from the first usable row, one entry cost of 10 bp
    assert other["all"]["buy_and_hold"]["total_return"] == pytest.approx(
        (close[1] / close[0] - 1e-3) * np.prod(close[2:] / close[1:-1]) - 1)
    # a train split left empty (20 rows of warm-up, 5% of 400): the training run's threshold, said so
    short = tr.main(tr.Args(eval_only=True, checkpoint=model, data_csv=path, train_frac=0.05, runs_dir=str(tmp_path),
                            cuda=False))
    assert short["vol_filter_threshold"] == {"value": summary["test"]["vol_filter_threshold"],
                                             "from": "the training run's (this data's train split has no earlier "
                                                     "data to fit one on)"}
    assert short["test"]["dates"] == ["2001-03-22T00:00:00", "2002-02-04T00:00:00"]  # rows 80 (20% of 400) and 399


@pytest.mark.xdist_group("compiled_trading")
def test_eval_only_errors_are_one_line(saved_run, tmp_path, capsys):
    summary, _ = saved_run
    ckpt = torch.load(os.path.join(summary["run_dir"], "model.pt"), weights_only=True)
    ckpt["feature_names"] = RAW_NAMES  # as if saved with the raw-level layout
    torch.save(ckpt, tmp_path / "other_layout.pt")
    torch.save({"actor": {}}, tmp_path / "foreign.pt")
    (tmp_path / "broken.pt").write_bytes(b"not a zip")
    cases = {str(tmp_path / "missing.pt"): "does not exist", str(tmp_path / "foreign.pt"): "not a td3_intrinsic",
             str(tmp_path / "broken.pt"): "not a readable model.pt",
             str(tmp_path / "other_layout.pt"): "saved with features",
             summary["run_dir"]: "is a folder: give the model.pt in it"}
    for path, message in cases.items():
        code, err = run_cli(capsys, "--eval-only", "--checkpoint", path, "--runs-dir", str(tmp_path / "runs"))
        assert code == 2, err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1
    bad_csv = write_csv(tmp_path / "bad.csv", ["Date", "Close"], [["2001-01-01", 1.0]])
    code, err = run_cli(capsys, "--eval-only", "--checkpoint", os.path.join(summary["run_dir"], "model.pt"),
                        "--data-csv", bad_csv, "--runs-dir", str(tmp_path / "runs"))
    assert code == 2 and "has no volume column" in err
    assert not os.path.exists(tmp_path / "runs")  # nothing written before the error


@pytest.mark.xdist_group("compiled_trading")
def test_eval_only_applies_the_settings_it_is_given_and_records_them(saved_run, tmp_path, capsys):
    summary, _ = saved_run
    model = os.path.join(summary["run_dir"], "model.pt")
    monthly = tr.main(tr.Args(eval_only=True, checkpoint=model, periods_per_year=12, runs_dir=str(tmp_path),
                              cuda=False))
    assert monthly["settings"]["periods_per_year"] == {"value": 12, "from": "command line"}
    assert monthly["settings"]["train_frac"] == {"value": 0.7, "from": "checkpoint"}
    assert "periods_per_year 12 (command line)" in capsys.readouterr().out
    before = summary["test"]
    for name in ("baseline", "intrinsic"):  # every Sharpe and volatility scales by sqrt(12 / 252)
        for key in ("sharpe", "volatility"):
            assert monthly["test"]["agents"][name][key] == pytest.approx(
                before["agents"][name][key] * math.sqrt(12 / 252), rel=1e-9)
    assert monthly["test"]["buy_and_hold"]["sharpe"] == pytest.approx(
        before["buy_and_hold"]["sharpe"] * math.sqrt(12 / 252), rel=1e-9)
    costly = tr.main(tr.Args(eval_only=True, checkpoint=model, cost_bp=25.0, runs_dir=str(tmp_path), cuda=False))
    assert costly["settings"]["cost_bp"] == {"value": 25.0, "from": "command line"}
    data = tr.prepare_data(tr.Args(), tr.synthetic_market(3000, 0), "m")  # the saved run's market
    lo = data.splits["test"][0]
    first = data.close[lo + 1] / data.close[lo] - 1  # buy-and-hold pays the entry cost on its first step
    assert 1 + costly["test"]["buy_and_hold"]["total_return"] == pytest.approx(
        (1 + before["buy_and_hold"]["total_return"]) * (1 + first - 25e-4) / (1 + first - 10e-4), rel=1e-9)
    with pytest.raises(tr.UserError, match="--hidden-size 64: the checkpoint's networks were built with 32"):
        tr.main(tr.Args(eval_only=True, checkpoint=model, hidden_size=64, runs_dir=str(tmp_path), cuda=False))
    assert costly["settings"]["periods_per_year"] == {"value": 252, "from": "daily bars (the synthetic market)"}
    saved = torch.load(model, weights_only=True)
    saved["args"]["val_frac"] = 0.25  # as if trained with --val-frac 0.25: with --train-frac 0.8 no test split is left
    torch.save(saved, tmp_path / "val25.pt")
    with pytest.raises(tr.UserError, match=r"--train-frac \(0.8\) and --val-frac \(0.25\) must be positive and sum"):
        tr.main(tr.Args(eval_only=True, checkpoint=str(tmp_path / "val25.pt"), train_frac=0.8, runs_dir=str(tmp_path)))


@pytest.mark.xdist_group("compiled_trading")
def test_eval_only_of_a_csv_run_on_other_data_takes_that_data_s_bars_per_year(saved_run, tmp_path):
    summary, _ = saved_run
    m = tr.synthetic_market(3000, 0)  # the saved run's market, as an hourly CSV (every hour: 8760 bars a year)
    path = write_csv(tmp_path / "hourly.csv", ["Date", "Close", "Volume"],
                     [[str(np.datetime64("2001-01-01T00") + i), m.close[i], m.volume[i]] for i in range(3000)])
    saved = torch.load(os.path.join(summary["run_dir"], "model.pt"), weights_only=True)
    saved["args"].update(data_csv=path, periods_per_year=6240)  # as if trained on it with --periods-per-year 6240
    torch.save(saved, tmp_path / "csv_run.pt")
    common = dict(eval_only=True, checkpoint=str(tmp_path / "csv_run.pt"), runs_dir=str(tmp_path), cuda=False)
    sharpe = {name: agent["sharpe"] for name, agent in summary["test"]["agents"].items()}  # at 252 bars a year
    as_saved = tr.main(tr.Args(**common))
    assert as_saved["settings"]["periods_per_year"] == {"value": 6240, "from": "checkpoint"}
    assert as_saved["frequency"] == "--periods-per-year of the training run"
    other = tr.main(tr.Args(**common, data_csv=path))  # named on the command line: its own timestamps count
    assert other["settings"]["periods_per_year"]["value"] == other["periods_per_year"] == 8760
    synthetic = tr.main(tr.Args(**common, market_steps=3000))  # a synthetic-market setting: the synthetic market
    assert synthetic["settings"]["data_csv"] == {"value": None, "from": "command line"}
    assert synthetic["settings"]["periods_per_year"] == {"value": 252, "from": "daily bars (the synthetic market)"}
    for run, periods in ((as_saved, 6240), (other, 8760), (synthetic, 252)):  # the same steps, annualized apart
        for name, value in sharpe.items():
            assert run["test"]["agents"][name]["sharpe"] == pytest.approx(value * math.sqrt(periods / 252), rel=1e-9)
    with pytest.raises(tr.UserError, match="--market-seed and --market-steps shape the synthetic market"):
        tr.main(tr.Args(**common, data_csv=path, market_seed=4))
    saved["args"]["data_csv"] = str(tmp_path / "moved.csv")
    torch.save(saved, tmp_path / "csv_run.pt")
    with pytest.raises(tr.UserError, match=f"the checkpoint's --data-csv '{tmp_path / 'moved.csv'}' is not there"):
        tr.main(tr.Args(**common))
    # flags that act only with --state-norm are not held against a checkpoint trained without it; the width is
    tr.eval_settings(tr.Args(eval_only=True, checkpoint="m.pt", stationary=False), tr.Args())
    with pytest.raises(tr.UserError, match="--hidden-size 64: the checkpoint's networks were built with 32"):
        tr.eval_settings(tr.Args(eval_only=True, checkpoint="m.pt", hidden_size=64), tr.Args())
    with pytest.raises(tr.UserError, match="--stationary False: the checkpoint's networks were built with True"):
        tr.eval_settings(tr.Args(eval_only=True, checkpoint="m.pt", stationary=False), tr.Args(state_norm=True))


def test_early_stopping_keeps_the_best_trained_checkpoint_networks_and_targets(tmp_path, monkeypatch):
    args = tr.Args(total_timesteps=400, learning_starts=100, eval_frequency=100, episode_length=64, state_norm=True,
                   compile=False, cuda=False)
    data = tr.prepare_data(args, tr.synthetic_market(1000, 0), "m")
    data.fit_states = tr.reference_states(tr.trading_env(data, "train", args, training=False), args.seed)
    normalizer = tr.StateNormalizer(data.names, "zscore", log_volume=True).fit(data.fit_states)  # an actor that moves
    sharpe = {100: 5.0, 200: 1.0, 300: 0.5, 400: 1.0}  # 100: before learning, never kept; 400 ties 200: the earlier
    seen = {}
    evaluate_split = tr.evaluate_split

    def scripted(agent, env, periods_per_year):  # the real evaluation, with a scripted validation Sharpe
        result = evaluate_split(agent, env, periods_per_year)
        step = args.learning_starts + agent.n_updates  # one update per step after learning starts
        seen[step] = copy.deepcopy({part: getattr(agent, part).state_dict() for part in tr.NETWORKS})
        result["metrics"]["sharpe"] = sharpe[step]
        return result
    monkeypatch.setattr(tr, "evaluate_split", scripted)
    trained = tr.train_agent("baseline", args, data, normalizer, torch.device("cpu"), str(tmp_path),
                             type("NoSignal", (), {"signum": None})())
    assert sorted(seen) == [100, 200, 300, 400]
    assert trained["best"]["step"] == 200 and trained["best"]["sharpe"] == 1.0
    for part in tr.NETWORKS:  # the kept step's networks and targets, while training moved every one of them
        for name, value in trained["best"]["state"][part].items():
            assert torch.equal(value, seen[200][part][name]), (part, name)
        final = getattr(trained["agent"], part).state_dict()
        assert any(not torch.equal(final[name], seen[200][part][name]) for name in final), part
    trained["agent"].load_state_dicts(trained["best"]["state"])  # what main does under --keep-best
    for part in tr.NETWORKS:
        for name, value in getattr(trained["agent"], part).state_dict().items():
            assert torch.equal(value, seen[200][part][name]), (part, name)


def test_the_q_comparison_scores_both_critics_on_the_same_states(tmp_path):
    args = tr.Args(compile=False, cuda=False)
    base, intr = (tr.TD3(8, args, torch.device("cpu"), None, seed=s) for s in (0, 1))
    rng = np.random.default_rng(0)
    own = {"baseline": rng.normal(size=(5, 8)), "intrinsic": 3 + rng.normal(size=(7, 8))}  # two trajectories
    results = {name: {"observations": obs, "actions": np.zeros(len(obs)), "equity": np.ones(len(obs) + 1)}
               for name, obs in own.items()}

    def q1_by_hand(agent, obs):  # Q1(s, pi(s)) straight from the networks
        x = torch.as_tensor(obs, dtype=torch.float32)
        with torch.no_grad():
            return float(agent.qf.q1(x, agent.actor(x)).double().mean())
    both = np.concatenate([own["baseline"], own["intrinsic"]])
    paired = tr.final_paired({"baseline": base, "intrinsic": intr}, results)
    assert paired["q1_delta_mean"] == pytest.approx(q1_by_hand(intr, both) - q1_by_hand(base, both), rel=1e-5)
    each_on_its_own = q1_by_hand(intr, own["intrinsic"]) - q1_by_hand(base, own["baseline"])
    assert abs(paired["q1_delta_mean"] - each_on_its_own) > 1e-3  # what the old comparison measured differs
    log = tr.TrainingLog("baseline", args, str(tmp_path), both)  # the history: Q1 on the states it was given
    log.evaluation({"saturation": {"near_bound_ratio": 0.0, "kappa_mean": 1.0},
                    "metrics": {"sharpe": 0.0, "total_return": 0.0}}, base, 100)
    log.writer.close()
    assert log.history[0]["q1_mean_fit_states"] == pytest.approx(q1_by_hand(base, both), rel=1e-5)


def test_a_model_file_that_would_run_code_is_refused_and_nothing_runs(tmp_path, capsys, monkeypatch):
    assert_code_running_model_file_is_refused(tr, tr.MODEL_FORMAT, tmp_path, capsys, monkeypatch)
