"""Generate a PILArNet-M HDF5 dataset of simulated LArTPC events.

Example:
  python experiments/make_dataset.py --output=data/train_192.h5 --num_events=2000 \
      --spatial_size=192 --seed=0
"""

from absl import app, flags

from jaxcluster.data import generator

FLAGS = flags.FLAGS
flags.DEFINE_string("output", None, "Output HDF5 file.", required=True)
flags.DEFINE_integer("num_events", None, "Number of events to generate.", required=True)
flags.DEFINE_integer("spatial_size", 768, "Grid size per axis in 3 mm voxels.")
flags.DEFINE_integer("seed", 0, "Dataset seed; event i uses the seed pair (seed, i).")
flags.DEFINE_enum("dimension", "3", ["3", "2"], "3 for voxels, 2 for the (x, y) projection.")
flags.DEFINE_integer("workers", None, "Worker processes; default: the usable CPU count.")
flags.DEFINE_bool("overwrite", False, "Replace the output file if it exists.")


def main(argv):
    del argv
    try:
        summary = generator.make_dataset(
            FLAGS.output, FLAGS.num_events, FLAGS.spatial_size, FLAGS.seed,
            dimension=int(FLAGS.dimension), workers=FLAGS.workers, overwrite=FLAGS.overwrite)
    except FileExistsError as error:
        raise app.UsageError(str(error)) from error
    print(f"summary of {FLAGS.output}:\n{generator.format_summary(summary)}")


if __name__ == "__main__":
    app.run(main)
