r"""Word-level Penn Treebank language model, GRU or LSTM, 2 layers of 650 (Zaremba et al.'s
"medium" size), pruned to 90% in 4x4 blocks.

Reproduces, on PTB, P1's claim that block-sparse recurrent models keep most of the
accuracy of the dense model (SPEC §2.5 (a)), in validation and test perplexity. About
40 epochs (53,000 steps of 20 x 35 words); meant for a GPU:

  python launch.py --config=experiments/configs/ptb_word.py:lstm --workdir=/tmp/ptb_lstm
  python launch.py --config=experiments/configs/ptb_word.py:gru --workdir=/tmp/ptb_gru
  python launch.py --config=experiments/configs/ptb_word.py:cell=lstm,method=dense \
      --workdir=/tmp/ptb_lstm_dense

Arg (key=value, comma-separated; a bare word is the cell): cell (gru, lstm), method
(dense, structural, wp, bp, gl, glp), features, steps. The data is Mikolov's
`ptb.{train,valid,test}.txt` in `$BSRNN_DATA/ptb` (default `../shared/data/ptb`); point
elsewhere with --config.data.path=...

Any other word corpus: a folder of `train.txt`, `valid.txt`, `test.txt` (or `NAME.train.txt`
etc.), one sentence a line, read with PTB's conventions (`<eos>` at each line end, words
outside the train vocabulary as `<unk>`; `bsrnn.data.load_words`). `max_vocab` caps the
vocabulary to the most frequent words (optional; `prefix` picks `NAME` when a folder holds
several corpora):

  python launch.py --config=experiments/configs/ptb_word.py:lstm --workdir=/tmp/wt2 \
      --config.data.name=words --config.data.path=/path/to/corpus --config.data.max_vocab=30000

Perplexity is exp of the mean cross-entropy per predicted token over the split. Memory: a
vocabulary of 37,858 words trained and evaluated in a peak of 2.1 GiB on CPU (batch 20 x 35,
eval batch 10; the logits are B x T x V floats, 106 MB per train batch).
"""

import ml_collections
from ml_collections import config_dict

from bsrnn import configs


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The config for ``arg`` (see the module docstring)."""
    arg = configs.parse_arg(arg, cell="lstm", method="bp", features=650, steps=53_000)
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.method = arg.method

    config.data = ml_collections.ConfigDict(dict(
        name="ptb_words", path=configs.data_path("ptb"),
        max_vocab=config_dict.placeholder(int), prefix=config_dict.placeholder(str),
    ))
    config.model_name = "lm"
    config.model = ml_collections.ConfigDict(dict(
        cell=arg.cell, features=arg.features, num_layers=2, embed_dim=arg.features,
        dropout=0.5, tie_embeddings=False, mask_output=True, unroll=8,
    ))
    config.batch_size = 20
    config.seq_len = 35
    config.eval_batch_size = 10
    config.num_steps = arg.steps
    config.log_every = 200
    config.eval_every = 2000
    config.checkpoint_every = 2000
    config.max_checkpoints = 2
    # The end of training samples/transcribes with the exported model and times it against
    # the masked dense model (report.json's export entry); False: model.npz only.
    config.export_timing = True
    config.mesh = configs.mesh(data=-1)  # data parallel over all devices

    # Plain SGD at 20 with clipping at 0.25, as PyTorch's word_language_model example: our
    # loss is the mean over tokens. Zaremba et al.'s lr 1 was for a loss summed over the 35
    # steps; with a mean it is 35x too small (a first grid run ended 2-3x above the usual
    # perplexities).
    config.optimizer = configs.optimizer("sgd", learning_rate=20.0, schedule="cosine",
                                         warmup_steps=0, grad_clip=0.25, momentum=0.0,
                                         nesterov=False)
    config.update(configs.pruning(sparsity=0.9, block_shape=(4, 4), begin_fraction=0.05,
                                  end_fraction=0.5, freq=200, glp_strength=1e-6,
                                  gl_strength=1e-4, num_modules=10))
    return config
