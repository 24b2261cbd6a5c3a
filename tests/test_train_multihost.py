"""Two processes on 127.0.0.1 train like one process on the same global batch."""

import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

# Each worker: 2 simulated CPU devices, gloo collectives, 3 toy steps on a global batch of
# 4 events (2 per process), then the final parameters saved as .npz.
_WORKER = """
import sys
import jax
import numpy as np
from flax import traverse_util
sys.path.insert(0, {repo!r})
from jaxcluster.train import testing
state, _ = testing.run_toy_training(sys.argv[1], ["train.num_steps=3", "data.batch_size=4"])
flat = traverse_util.flatten_dict(jax.device_get(state.params), sep="/")
np.savez(sys.argv[2], **flat)
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker_env(**extra) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    env["JAX_PLATFORMS"] = "cpu"
    env.update(extra)
    return env


def _run_workers(envs, workdir, outputs):
    script = _WORKER.format(repo=str(REPO_ROOT))
    processes = [subprocess.Popen([sys.executable, "-c", script, str(workdir), str(output)],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True)
                 for env, output in zip(envs, outputs)]
    logs = []
    for process in processes:
        try:
            logs.append(process.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            process.kill()
            logs.append(process.communicate()[0])
    for process, log in zip(processes, logs):
        assert process.returncode == 0, log[-3000:]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_match_one_process(tmp_path):
    port = _free_port()
    envs = [_worker_env(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                        JAX_PROCESS_ID=str(index)) for index in range(2)]
    outputs = [tmp_path / f"process{index}.npz" for index in range(2)]
    _run_workers(envs, tmp_path / "multi", outputs)

    single_output = tmp_path / "single.npz"
    _run_workers([_worker_env()], tmp_path / "single", [single_output])

    single = np.load(single_output)
    for output in outputs:
        multi = np.load(output)
        assert sorted(multi.files) == sorted(single.files)
        for name in single.files:
            np.testing.assert_allclose(multi[name], single[name], rtol=2e-5, atol=2e-6,
                                       err_msg=name)
