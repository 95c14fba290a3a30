"""Train, prune, evaluate and report one config, or a sweep of them.

  python -m bsrnn --workdir=/tmp/w                  # the default config, shakespeare_gru
  python -m bsrnn --config=experiments/configs/ptb_word.py:lstm --workdir=/tmp/ptb
  python -m bsrnn --workdir=/tmp/w --config.method=glp --config.num_steps=500
  python -m bsrnn --sweep=experiments/sweeps/block_sizes.py --workdir=/tmp/sweep
  python -m bsrnn --sweep=seeds.py --vmap --workdir=/tmp/seeds   # members as one program
  python -m bsrnn --workdir=/shared/w --coordinator_address=host0:1234 --num_processes=2 \\
      --process_id=0    # and --process_id=1 on the second host

``launch.py`` in the repository runs this module. ``--config`` is a config file's path
(relative to the current directory) or the name of a config shipped in ``bsrnn/configs``
(``shakespeare_gru``), with ``:arg`` after it; data sets are found under ``--data_root``
(default ``$BSRNN_DATA``).
"""

from absl import app, flags
from ml_collections import config_flags

from bsrnn import launcher

config_flags.DEFINE_config_file("config", None, f"Config file; default {launcher.DEFAULT_CONFIG}.")
flags.DEFINE_string("workdir", None, "Checkpoints, logs and report.json go here.", required=True)
flags.DEFINE_string("data_root", None, "Folder of the data sets (sets $BSRNN_DATA); configs "
                    "read e.g. <data_root>/ptb. The default config needs none.")
flags.DEFINE_list("allow_changes", [], "Resume with these config keys changed (e.g. "
                  "optimizer.learning_rate); see bsrnn/workdir.py.")
flags.DEFINE_string("sweep", None, "Sweep file (experiments/sweeps): one sub-workdir per member.")
flags.DEFINE_integer("sweep_workers", 1, "Sweep members run at once, one process each.")
flags.DEFINE_bool("vmap", False, "Sweep members that differ only in values (seed, learning "
                  "rate, ...; bsrnn/vmap_sweep.py) train as one vmapped program.")
flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0.")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's id, 0 to N-1.")


def main() -> None:
    """Parse the command line and run it (:func:`bsrnn.launcher.main`)."""
    app.run(lambda argv: launcher.main(flags.FLAGS), flags_parser=launcher.parse_flags)


if __name__ == "__main__":
    main()
