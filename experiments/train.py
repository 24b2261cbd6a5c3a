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

from jaxcluster.config import validate_config  # noqa: E402
from jaxcluster.train.loop import train_and_evaluate  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Configuration file (configs/*.py); override keys with --config.a.b=value.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, logs, resolved config.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; pass settings as --config.a.b=value")
    config = _CONFIG.value
    validate_config(config, source=f"--config={config_flags.get_config_filename(flags.FLAGS['config'])}")
    logging.info("configuration:\n%s", config)
    train_and_evaluate(config, _WORKDIR.value, command_line=sys.argv)


if __name__ == "__main__":
    app.run(main)
