"""Test-wide set-up: two simulated CPU devices and the path of the real sample files."""

import os
import pathlib

# Two host devices let the multi-device tests run on a CPU-only machine. The flags must be
# set before jax is first imported, which is why they live at the top of conftest.
# Compiling with LLVM optimisations off cut a UResNet test from 113 s to 16 s on 2 CPU
# cores. The tests run small inputs, so the slower generated code costs little.
_TEST_FLAGS = ("--xla_force_host_platform_device_count=2",
               "--xla_backend_optimization_level=0",
               "--xla_llvm_disable_expensive_passes=true")
for _flag in _TEST_FLAGS:
    if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import gc  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
REAL_DATA_DIR = REPO_ROOT.parent / "shared" / "data" / "real"


def real_file(name: str) -> pathlib.Path:
    """Path of a real sample file; skip the test when it is absent, fail under CI."""
    path = REAL_DATA_DIR / name
    if path.is_file():
        return path
    message = (f"real sample file {path} is missing; it ships beside the repository in "
               "../shared/data/real, not inside it")
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def larcv_root_path() -> pathlib.Path:
    return real_file("example_larcv.root")


@pytest.fixture
def larcv3_h5_path() -> pathlib.Path:
    return real_file("cosmic_tagging_light.h5")


@pytest.fixture(autouse=True)
def release_compiled_programs():
    """Drop JAX's compiled programs after each test.

    Each compiled XLA program keeps about three memory mappings (measured: 300 small jits
    added 960), and the kernel allows 65,530 per process (vm.max_map_count). Workers
    that ran several hundred tests were twice aborted inside an XLA compile, which fits
    running out of mappings; clearing the caches keeps a worker far from the limit.
    """
    yield
    jax.clear_caches()


@pytest.fixture(scope="module", autouse=True)
def collect_garbage_per_module():
    """Free compiled programs that only reference cycles still keep alive."""
    yield
    gc.collect()
