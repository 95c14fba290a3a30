r"""Deep Speech 2 style acoustic models on CMU AN4, CTC, greedy decoding, CER and WER.

P1's two speech models (SPEC §2.5) at a size AN4 (948 training utterances) supports:

* ``rnn``: 2 convolutions, 3 bidirectional vanilla RNN layers of 256 with clipped ReLU,
  a fully connected layer, softmax (P1: 7 layers of 1760-3072).
* ``gru``: 2 convolutions, 3 forward GRU layers of 256, row convolution with 10 frames
  of lookahead (100 ms after the stride), fully connected layer, softmax (P1: 3 of 2560).

Both block-pruned in 4x4 blocks to 90% between 10% and 40% of training (P1 stops pruning
at about 40%). Reproduces claim (a) in test CER: P1 reports a 3-17% relative CER loss at
about 90% block sparsity. 50 epochs of 16 utterances a step (2,950 steps); meant for a
GPU:

  python launch.py --config=experiments/configs/an4_ds2.py:rnn --workdir=/tmp/an4_rnn
  python launch.py --config=experiments/configs/an4_ds2.py:gru --workdir=/tmp/an4_gru
  python launch.py --config=experiments/configs/an4_ds2.py:model=rnn,method=glp \
      --workdir=/tmp/an4_rnn_glp

Arg (key=value, comma-separated; a bare word is the model): model (rnn, gru), method
(dense, structural, wp, bp, gl, glp), features, layers, steps. The data is CMU's AN4
feature distribution (13 MFCCs, 100 frames/s) in `$BSRNN_DATA/an4` (default
`../shared/data/an4`); point elsewhere with --config.data.path=...
"""

import ml_collections

from bsrnn import configs


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The config for ``arg`` (see the module docstring)."""
    arg = configs.parse_arg(arg, model="rnn", method="bp", features=256, layers=3, steps=2950)
    if arg.model not in ("rnn", "gru"):
        raise ValueError(f"an4_ds2.py: model={arg.model!r}; choose rnn or gru.")
    rnn = arg.model == "rnn"
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.method = arg.method

    config.data = ml_collections.ConfigDict(dict(
        # Frames (69-639) and labels padded to multiples of 128: 5 shapes to compile.
        name="an4", path=configs.data_path("an4"), pad_multiple=128, bucket_size=10,
    ))
    config.model_name = "ds2"
    config.model = ml_collections.ConfigDict(dict(
        conv_features=(32, 32),
        conv_kernels=((11, 5), (11, 5)),
        conv_strides=((2, 2), (1, 2)),
        cell="rnn_clipped_relu" if rnn else "gru",
        features=arg.features,
        num_layers=arg.layers,
        bidirectional=rnn,
        row_conv_context=0 if rnn else 10,
        fc_features=arg.features,
        mask_fc=True,
        mask_output=True,
        unroll=4,
        # Layer norm on the recurrent layers' input projections (as DS2 normalised them):
        # with it and Adam 5e-4 the clipped-ReLU RNN trains reliably (3 seeds of the dense
        # 512 within 0.8 CER points; at Adam 1e-3 without it seeds disagreed by up to 64).
        input_norm=rnn,
    ))
    config.batch_size = 16
    config.eval_batch_size = 32
    config.num_steps = arg.steps
    config.log_every = 50
    config.eval_every = 500
    config.checkpoint_every = 500
    config.max_checkpoints = 2
    # The end of training samples/transcribes with the exported model and times it against
    # the masked dense model (report.json's export entry); False: model.npz only.
    config.export_timing = True
    config.mesh = configs.mesh(data=-1)  # data parallel over all devices

    if rnn:  # the recipe above (experiments/reproduce/grid.py RECIPES["lnlr5e4"])
        config.optimizer = configs.optimizer("adam", learning_rate=5e-4, schedule="cosine",
                                             warmup_steps=300, grad_clip=1.0)
    else:
        config.optimizer = configs.optimizer("adam", learning_rate=1e-3, schedule="cosine",
                                             warmup_steps=200, grad_clip=5.0)
    config.update(configs.pruning(sparsity=0.9, block_shape=(4, 4), begin_fraction=0.1,
                                  ramp_fraction=0.2, end_fraction=0.4, freq=50,
                                  glp_strength=1e-5, gl_strength=3e-4, num_modules=8))
    return config
