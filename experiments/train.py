"""Train a jaxcluster model.

    python experiments/train.py --config=configs/clusternet.py --workdir=runs/clusternet \
        [--config.train.num_steps=2000 ...]

Rerunning the same command resumes from the latest checkpoint in --workdir. See
jaxcluster/train/parallel.py for multi-host launches.
"""

import pathlib
import sys

# Running this file directly puts experiments/ (not the repository) on sys.path.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from jaxcluster.config import (apply_overrides, load_config_file,  # noqa: E402
                               validate_config)
from jaxcluster.train.checkpoint import CheckpointMismatchError  # noqa: E402
from jaxcluster.train.loop import train_and_evaluate  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Configuration file (configs/*.py); override keys with --config.a.b=value.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, logs, resolved config.")
flags.mark_flags_as_required(["config", "workdir"])


def check_command_line(argv: list[str]) -> str | None:
    """Return a one-paragraph error for a bad --config file, key or value, else None.

    absl parses --config.a.b overrides inside ml_collections, whose errors arrive as long
    tracebacks. Checking the same overrides here first gives a short message that names
    the key, the closest valid key and configs/base.py.
    """
    config_path = None
    overrides = []
    for argument in argv[1:]:
        name, _, value = argument.partition("=")
        if name == "--config":
            config_path = value
        elif name.startswith("--config."):
            overrides.append(argument[len("--"):])
    if config_path is None:
        return None
    try:
        config = load_config_file(config_path)
        with config.unlocked():
            apply_overrides(config, overrides, source="command line")
        validate_config(config, source=f"--config={config_path}")
    except (KeyError, TypeError, ValueError, FileNotFoundError) as error:
        return str(error.args[0]) if error.args else str(error)
    return None


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; pass settings as --config.a.b=value")
    config = _CONFIG.value
    validate_config(config, source=f"--config={config_flags.get_config_filename(flags.FLAGS['config'])}")
    logging.info("configuration:\n%s", config)
    try:
        train_and_evaluate(config, _WORKDIR.value, command_line=sys.argv)
    except CheckpointMismatchError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    problem = check_command_line(sys.argv)
    if problem is not None:
        sys.exit(f"error: {problem}")
    app.run(main)
