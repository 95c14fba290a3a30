"""Train, prune, evaluate and report one config, or a sweep of them: ``python -m bsrnn``
(``bsrnn/__main__.py`` lists the flags) from the repository.

  python launch.py --workdir=/tmp/w                  # bsrnn/configs/shakespeare_gru.py
  python launch.py --config=experiments/configs/ptb_word.py:lstm --workdir=/tmp/ptb
  python launch.py --workdir=/tmp/w --config.method=glp --config.num_steps=500
  python launch.py --sweep=experiments/sweeps/block_sizes.py --workdir=/tmp/sweep
  python launch.py --workdir=/shared/w --coordinator_address=host0:1234 --num_processes=2 \\
      --process_id=0    # and --process_id=1 on the second host
"""

import runpy

if __name__ == "__main__":
    runpy.run_module("bsrnn", run_name="__main__", alter_sys=True)
