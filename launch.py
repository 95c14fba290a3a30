"""Train, prune, evaluate and report one config, or a sweep of them.

  python launch.py --workdir=/tmp/w                  # experiments/configs/shakespeare_gru.py
  python launch.py --config=experiments/configs/ptb_word.py:lstm --workdir=/tmp/ptb
  python launch.py --workdir=/tmp/w --config.method=glp --config.num_steps=500
  python launch.py --sweep=experiments/sweeps/block_sizes.py --workdir=/tmp/sweep
  python launch.py --workdir=/shared/w --coordinator_address=host0:1234 --num_processes=2 \
      --process_id=0    # and --process_id=1 on the second host
"""

from absl import app, flags
from ml_collections import config_flags

from bsrnn import launcher

config_flags.DEFINE_config_file("config", None, f"Config file; default {launcher.DEFAULT_CONFIG}.")
flags.DEFINE_string("workdir", None, "Checkpoints, logs and report.json go here.", required=True)
flags.DEFINE_list("allow_changes", [], "Resume with these config keys changed (e.g. "
                  "optimizer.learning_rate); see bsrnn/workdir.py.")
flags.DEFINE_string("sweep", None, "Sweep file (experiments/sweeps): one sub-workdir per member.")
flags.DEFINE_integer("sweep_workers", 1, "Sweep members run at once, one process each.")
flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0.")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's id, 0 to N-1.")

if __name__ == "__main__":
    app.run(lambda argv: launcher.main(flags.FLAGS), flags_parser=launcher.parse_flags)
