"""Speech corpora for CTC: CMU AN4 (Sphinx `.mfc` cepstra) and wav folders such as FSDD.

Every loader returns a `SpeechCorpus` of `Utterance`s, each with a (T, F) float32 feature
matrix and its transcript as text. `normalize_corpus` standardises features with train
statistics, `ctc_vocabulary` maps transcripts to character ids with the CTC blank at 0, and
`batching.ctc_batches` pads and buckets them.
"""

import dataclasses
import re
import struct
import wave
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from bsrnn.data._files import existing_dir, existing_file
from bsrnn.data.vocab import Vocabulary, build_vocabulary

BLANK = "<blank>"
MFC_DIM = 13
# |value| above which a .mfc file holds no cepstra (AN4's lie within ±20): such a file would
# dominate the normalisation statistics and leave every other utterance flat.
MFC_LIMIT = 1e4
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclasses.dataclass(frozen=True)
class Utterance:
    """One spoken utterance.

    Attributes:
      id: utterance id (AN4: `an251-fash-b`; FSDD: the file name without `.wav`).
      speaker: speaker id.
      features: (T, F) float32, T frames of F features.
      transcript: what was said, as text (AN4: upper-case words; FSDD: the digit as a word).
    """

    id: str
    speaker: str
    features: np.ndarray
    transcript: str


@dataclasses.dataclass(frozen=True)
class SpeechCorpus:
    """Train and test utterances (neither data set has an official validation split)."""

    train: tuple[Utterance, ...]
    test: tuple[Utterance, ...]


@dataclasses.dataclass(frozen=True)
class FeatureStats:
    """Per-feature mean and standard deviation, each of shape (F,) float32."""

    mean: np.ndarray
    std: np.ndarray


def read_mfc(path: str | Path) -> np.ndarray:
    """Reads a Sphinx `.mfc` file: big-endian int32 N, then N big-endian float32.

    Returns:
      (N / 13, 13) float32: frames of cepstra c0..c12.

    Raises:
      ValueError: naming the file, if its size does not fit its header, it has no frames,
        or it holds a non-finite value or one beyond :data:`MFC_LIMIT`.
    """
    path = existing_file(path, "a Sphinx .mfc feature file")
    data = path.read_bytes()
    expected = "Sphinx .mfc: a big-endian int32 count N, then N big-endian float32 (N/13 frames)"
    if len(data) < 4:
        raise ValueError(f"{path}: {len(data)} bytes, too short for a header; expected {expected}.")
    (count,) = struct.unpack(">i", data[:4])
    if count < 0 or len(data) != 4 + 4 * count or count % MFC_DIM:
        raise ValueError(
            f"{path}: header says N={count} floats ({4 + 4 * count} bytes) but the file has "
            f"{len(data)} bytes; expected {expected}, N a multiple of {MFC_DIM}. The file is "
            "truncated, corrupt or little-endian; copy it again from the AN4 distribution."
        )
    if count == 0:
        raise ValueError(f"{path}: header says N=0 floats, an utterance of no frames; expected "
                         f"{expected}. Copy it again from the AN4 distribution or drop it.")
    frames = np.frombuffer(data, ">f4", offset=4).astype(np.float32).reshape(-1, MFC_DIM)
    bad = ~np.isfinite(frames) | (np.abs(frames) > MFC_LIMIT)
    if bad.any():
        frame, dim = np.argwhere(bad)[0]
        raise ValueError(
            f"{path}: {int(bad.sum())} of {frames.size} values are not cepstra (non-finite or "
            f"beyond ±{MFC_LIMIT:g}; first: {float(frames[frame, dim]):.4g} at frame {frame}, "
            f"c{dim}). "
            "AN4's cepstra lie within ±20. The file is corrupt or not Sphinx features; copy it "
            "again from the AN4 distribution."
        )
    return frames


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


_TRANSCRIPT = re.compile(r"^(.*)\s+\((\S+)\)\s*$")


def _an4_split(root: Path, name: str) -> tuple[Utterance, ...]:
    ids_path = existing_file(root / "etc" / f"{name}.fileids", f"AN4's list of {name} files")
    text_path = existing_file(
        root / "etc" / f"{name}.transcription", f"AN4's {name} transcripts, 'WORDS (utt-id)'"
    )
    file_ids, transcripts = _lines(ids_path), _lines(text_path)
    if len(file_ids) != len(transcripts):
        raise ValueError(
            f"{ids_path} has {len(file_ids)} lines but {text_path} has {len(transcripts)}; "
            "expected one transcript per file id, line by line."
        )
    utterances = []
    for i, (file_id, line) in enumerate(zip(file_ids, transcripts, strict=True), start=1):
        match = _TRANSCRIPT.match(line)
        utt_id = Path(file_id).name
        if not match or match.group(2) != utt_id:
            raise ValueError(
                f"{text_path}, line {i}: {line!r}; expected 'WORDS ({utt_id})' to match line "
                f"{i} of {ids_path}."
            )
        utterances.append(
            Utterance(
                id=utt_id,
                speaker=Path(file_id).parent.name,
                features=read_mfc(root / "feat" / f"{file_id}.mfc"),
                transcript=" ".join(match.group(1).split()),
            )
        )
    return tuple(utterances)


def load_an4(root: str | Path) -> SpeechCorpus:
    """CMU AN4 as CMU ships its features: `root/etc/an4_{train,test}.{fileids,transcription}`
    and `root/feat/<file id>.mfc`.

    Returns:
      948 train and 130 test utterances, features (T, 13) float32 at 100 frames/s.
    """
    root = existing_dir(root, "the AN4 folder holding etc/ and feat/")
    return SpeechCorpus(train=_an4_split(root, "an4_train"), test=_an4_split(root, "an4_test"))


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """Reads an uncompressed PCM wav file with the standard library.

    Returns:
      samples, shape (N,) float32 in [-1, 1) (channels averaged), and the sample rate in Hz.
    """
    path = existing_file(path, "a PCM .wav file")
    try:
        with wave.open(str(path), "rb") as w:
            width, channels, rate = w.getsampwidth(), w.getnchannels(), w.getframerate()
            raw = w.readframes(w.getnframes())
    except (wave.Error, EOFError) as e:
        raise ValueError(
            f"{path}: not a readable PCM wav file ({e}); expected RIFF WAVE PCM."
        ) from e
    if width == 1:
        samples = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128) / 128
    elif width in (2, 4):
        dtype = np.dtype(f"<i{width}")
        samples = np.frombuffer(raw, dtype).astype(np.float32) / 2 ** (8 * width - 1)
    else:
        raise ValueError(f"{path}: {8 * width}-bit samples; expected 8, 16 or 32-bit PCM.")
    return samples.reshape(-1, channels).mean(axis=1), rate


def mel_filterbank(
    num_mels: int, fft_size: int, sample_rate: int, f_min: float = 0.0, f_max: float | None = None
) -> np.ndarray:
    """Triangular filters equally spaced on the HTK mel scale, mel(f) = 2595 log10(1 + f/700).

    Filter m rises linearly from centre m-1 to 1 at centre m and falls to 0 at centre m+1,
    the num_mels + 2 centres spanning [f_min, f_max] (default f_max: sample_rate / 2).

    Returns:
      (num_mels, fft_size // 2 + 1) float32 weights on the rfft bins.
    """
    f_max = sample_rate / 2 if f_max is None else f_max
    mel_min, mel_max = (2595 * np.log10(1 + f / 700) for f in (f_min, f_max))
    centres = 700 * (10 ** (np.linspace(mel_min, mel_max, num_mels + 2) / 2595) - 1)
    freqs = np.fft.rfftfreq(fft_size, 1 / sample_rate)
    left, centre, right = centres[:-2, None], centres[1:-1, None], centres[2:, None]
    rising = (freqs - left) / (centre - left)
    falling = (right - freqs) / (right - centre)
    return np.maximum(0, np.minimum(rising, falling)).astype(np.float32)


def log_mel_spectrogram(
    samples: np.ndarray,
    sample_rate: int,
    *,
    num_mels: int = 40,
    window_ms: float = 25.0,
    hop_ms: float = 10.0,
    eps: float = 1e-6,
) -> np.ndarray:
    """Log mel power spectrogram in NumPy.

    Frames of window_ms with a periodic Hann window, every hop_ms; power spectrum from an FFT
    of the next power of two >= the window; `mel_filterbank` over [0, sample_rate/2];
    natural log of (energy + eps). A signal shorter than one window is zero-padded to one.

    Args:
      samples: (N,) waveform.
      sample_rate: in Hz.

    Returns:
      (1 + (max(N, W) - W) // H, num_mels) float32, W and H the window and hop in samples.
    """
    window = round(sample_rate * window_ms / 1000)
    hop = round(sample_rate * hop_ms / 1000)
    fft_size = 1 << (window - 1).bit_length()
    samples = np.asarray(samples, np.float32)
    if len(samples) < window:
        samples = np.pad(samples, (0, window - len(samples)))
    frames = np.lib.stride_tricks.sliding_window_view(samples, window)[::hop]
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(window) / window)
    power = np.abs(np.fft.rfft(frames * hann, fft_size)) ** 2
    mel = power @ mel_filterbank(num_mels, fft_size, sample_rate).T
    return np.log(mel + eps).astype(np.float32)


_FSDD_NAME = re.compile(r"^(\d)_([A-Za-z0-9]+)_(\d+)\.wav$")


def load_fsdd(
    recordings_dir: str | Path, *, test_indices: Iterable[int] = range(5), num_mels: int = 40
) -> SpeechCorpus:
    """Free Spoken Digit Dataset: `{digit}_{speaker}_{index}.wav` files in `recordings_dir`.

    Features are `log_mel_spectrogram(num_mels)` of each file; transcripts are the digit spelled
    as a word ("seven"). Split as the data set's README says: indices 0-4 test, the rest train.

    Returns:
      2,700 train and 300 test utterances (for the full data set), features (T, num_mels).
    """
    folder = existing_dir(
        recordings_dir, "the FSDD recordings folder of {digit}_{speaker}_{index}.wav"
    )
    paths = sorted(folder.glob("*.wav"))
    if not paths:
        raise ValueError(
            f"{folder}: no .wav files; expected FSDD's {{digit}}_{{speaker}}_{{index}}.wav "
            "recordings (the recordings/ folder of free-spoken-digit-dataset)."
        )
    test_indices = set(test_indices)
    train, test = [], []
    for path in paths:
        match = _FSDD_NAME.match(path.name)
        if not match:
            raise ValueError(
                f"{path}: name not of the form {{digit}}_{{speaker}}_{{index}}.wav; move other "
                "files out of the FSDD recordings folder."
            )
        digit, speaker, index = match.groups()
        samples, rate = read_wav(path)
        utterance = Utterance(
            id=path.stem,
            speaker=speaker,
            features=log_mel_spectrogram(samples, rate, num_mels=num_mels),
            transcript=DIGIT_WORDS[int(digit)],
        )
        (test if int(index) in test_indices else train).append(utterance)
    return SpeechCorpus(train=tuple(train), test=tuple(test))


def feature_stats(features: Sequence[np.ndarray]) -> FeatureStats:
    """Mean and standard deviation of each feature over all frames of `features` (each (T, F)).

    Pass training features only. A feature with zero variance gets std 1.
    """
    frames = np.concatenate([np.asarray(f, np.float64) for f in features])
    std = frames.std(axis=0)
    return FeatureStats(
        mean=frames.mean(axis=0).astype(np.float32),
        std=np.where(std > 0, std, 1).astype(np.float32),
    )


def normalize(features: np.ndarray, stats: FeatureStats) -> np.ndarray:
    """(features - mean) / std per feature; (T, F) -> (T, F) float32."""
    return ((features - stats.mean) / stats.std).astype(np.float32)


def normalize_corpus(corpus: SpeechCorpus) -> tuple[SpeechCorpus, FeatureStats]:
    """Normalises every utterance with statistics of the train utterances only.

    Returns:
      the normalised corpus, and the statistics (keep them to normalise new audio).
    """
    stats = feature_stats([u.features for u in corpus.train])

    def apply(utterances: tuple[Utterance, ...]) -> tuple[Utterance, ...]:
        return tuple(
            dataclasses.replace(u, features=normalize(u.features, stats)) for u in utterances
        )

    return SpeechCorpus(train=apply(corpus.train), test=apply(corpus.test)), stats


def ctc_vocabulary(transcripts: Iterable[str]) -> Vocabulary:
    """Character vocabulary for CTC from the train transcripts: id 0 is the blank `<blank>`,
    then the characters (space included) by decreasing count.

    The vocabulary is closed: `encode` raises `ValueError` on a character train never had.
    `vocab.encode(transcript)` gives the (L,) int32 label sequence.
    """
    return build_vocabulary((c for t in transcripts for c in t), reserved=(BLANK,))
