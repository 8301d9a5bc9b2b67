"""pytest runs the suite on every core (pytest-xdist, see pytest.ini); each worker, and every script it
starts as a subprocess, gets one torch thread: more would only contend for the cores."""

import os

import torch


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"  # inherited by subprocesses
        torch.set_num_threads(1)

