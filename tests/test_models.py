"""Models against independent computations, what the trainer asks of each model module
(its evaluation), greedy CTC decoding and CER/WER on hand-made examples."""

import math
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from bsrnn import blocks, ctc, data
from bsrnn.models import ds2, lm, model_module


def paths(tree):
    return {"/".join(p) for p in traverse_util.flatten_dict(tree)}


# Language model.


def test_lm_masks_exactly_the_prunable_kernels():
    tokens = jnp.zeros((2, 5), jnp.int32)
    model = lm.Model(11, cell="lstm", features=8, num_layers=2, embed_dim=6)
    variables = model.init(jax.random.key(0), tokens)
    gates = "ifgo"
    expected = {f"layer_{i}/{kind}_{g}/kernel" for i in range(2) for kind in ("input", "recurrent")
                for g in gates} | {"output/kernel"}
    assert paths(variables["masks"]) == expected
    assert "embed/embedding" in paths(variables["params"])
    dense_softmax = lm.Model(11, features=8, embed_dim=6, mask_output=False)
    variables = dense_softmax.init(jax.random.key(0), tokens)
    assert "output/kernel" in paths(variables["params"])
    assert "output/kernel" not in paths(variables["masks"])


def test_lm_carry_makes_windows_equal_one_long_sequence():
    model = lm.Model(13, cell="gru", features=8, num_layers=2, embed_dim=5)
    tokens = jax.random.randint(jax.random.key(1), (3, 10), 0, 13)
    variables = model.init(jax.random.key(2), tokens)
    whole, _ = model.apply(variables, tokens)
    first, carry = model.apply(variables, tokens[:, :4])
    second, _ = model.apply(variables, tokens[:, 4:], carry)
    np.testing.assert_allclose(jnp.concatenate([first, second], 1), whole, rtol=1e-5, atol=1e-6)


def test_lm_tied_embeddings_use_the_embedding_as_softmax_weights():
    model = lm.Model(7, cell="rnn", features=4, embed_dim=4, tie_embeddings=True)
    tokens = jnp.array([[1, 2, 3]])
    variables = model.init(jax.random.key(3), tokens)
    assert "output" not in variables["params"]
    logits, (h,) = model.apply(variables, tokens)
    embedding = variables["params"]["embed"]["embedding"]
    np.testing.assert_allclose(logits[0, -1], embedding @ h[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="embed_dim == features"):
        lm.Model(7, features=4, embed_dim=3, tie_embeddings=True).init(jax.random.key(0), tokens)


def test_lm_structural_modules_make_block_diagonal_recurrent_masks():
    model = lm.Model(5, cell="gru", features=8, embed_dim=3, recurrent_modules=4)
    masks = model.init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))["masks"]
    diagonal = np.asarray(blocks.block_diagonal(4)((8, 8)))
    assert diagonal.sum() == 16
    for gate in "rzn":
        np.testing.assert_array_equal(masks["layer_0"][f"recurrent_{gate}"]["kernel"], diagonal)
        assert masks["layer_0"][f"input_{gate}"]["kernel"].all()


def test_lm_evaluate_is_the_mean_nats_of_the_whole_stream_read_in_windows():
    # Windows of 4 tokens, the last one shorter, the carry passed between them (as
    # TextData.eval_batches gives them) against one pass over the stream, in float64.
    model = lm.Model(13, cell="gru", features=8, embed_dim=5)
    rows = np.asarray(jax.random.randint(jax.random.key(6), (2, 11), 0, 13))
    variables = model.init(jax.random.key(7), jnp.asarray(rows[:, :4]))
    batches = [{"inputs": rows[:, i:min(i + 4, 10)], "targets": rows[:, i + 1:min(i + 5, 11)]}
               for i in (0, 4, 8)]
    logits = np.asarray(model.apply(variables, jnp.asarray(rows[:, :-1]))[0], np.float64)
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nats = -np.take_along_axis(log_p, rows[:, 1:, None], -1).mean()
    for unit, name, value in (("char", "bpc", nats / math.log(2)), ("word", "perplexity",
                                                                    math.exp(nats))):
        metrics = lm.evaluate(model, variables, iter(batches), SimpleNamespace(unit=unit), 2,
                              place=lambda tree: tree)
        assert set(metrics) == {"loss", name}
        np.testing.assert_allclose([metrics["loss"], metrics[name]], [nats, value], rtol=1e-5)


def test_models_are_picked_by_name():
    assert model_module("lm").Model is lm.Model and model_module("ds2").Model is ds2.Model
    with pytest.raises(ValueError, match="'transformer'.*'lm', 'ds2'"):
        model_module("transformer")


# Deep Speech 2.


@pytest.mark.parametrize("stride,n", [(2, 7), (2, 8), (3, 10), (1, 5)])
def test_ds2_output_lengths_are_ceil_of_the_stride(stride, n):
    assert int(ds2.output_lengths(jnp.array([n]), [stride])[0]) == math.ceil(n / stride)


@pytest.mark.parametrize("variant", [
    dict(cell="rnn_clipped_relu", bidirectional=True, row_conv_context=0),
    dict(cell="gru", bidirectional=False, row_conv_context=3),
])
def test_ds2_padded_batch_equals_each_example_alone(variant):
    model = ds2.Model(6, conv_features=(3, 4), conv_kernels=((5, 3), (4, 3)),
                      conv_strides=((2, 2), (1, 2)), features=8, num_layers=2,
                      fc_features=7, **variant)
    x = jax.random.normal(jax.random.key(4), (3, 17, 9))
    lengths = jnp.array([17, 11, 6])
    x = jnp.where((jnp.arange(17)[None, :] < lengths[:, None])[..., None], x, 0.0)
    variables = model.init(jax.random.key(5), x, lengths)
    logits, out_lengths = model.apply(variables, x, lengths)
    assert logits.shape == (3, 9, 6)
    np.testing.assert_array_equal(out_lengths, [9, 6, 3])
    for b in range(3):
        n, m = int(lengths[b]), int(out_lengths[b])
        alone, _ = model.apply(variables, x[b:b + 1, :n], lengths[b:b + 1])
        np.testing.assert_allclose(logits[b, :m], alone[0], rtol=1e-4, atol=1e-5)
        assert np.all(np.asarray(logits[b, m:]) == 0)


def test_ds2_evaluate_ignores_the_empty_rows_that_pad_the_last_batch():
    # Two utterances and one empty row (length 0, as SpeechData.eval_batches pads): the loss
    # is the mean over the two of each one's CTC loss alone, the references are theirs.
    model = ds2.Model(4, conv_features=(2,), conv_kernels=((3, 3),), conv_strides=((1, 2),),
                      features=4, num_layers=1, fc_features=5, bidirectional=False, cell="gru")
    x = np.array(jax.random.normal(jax.random.key(8), (3, 6, 5)), np.float32)
    lengths = np.array([6, 4, 0], np.int32)
    x[1, 4:] = x[2] = 0
    labels = np.array([[1, 2, 3], [3, 0, 0], [0, 0, 0]], np.int32)
    label_lengths = np.array([3, 1, 0], np.int32)
    paddings = (np.arange(3)[None, :] >= label_lengths[:, None]).astype(np.float32)
    batch = {"inputs": x, "lengths": lengths, "labels": labels, "label_paddings": paddings,
             "label_lengths": label_lengths}
    variables = model.init(jax.random.key(9), x, lengths)
    alone = []
    for b in range(2):
        one = {k: v[b:b + 1, :lengths[b]] if k == "inputs" else v[b:b + 1]
               for k, v in batch.items()}
        logits, out = model.apply(variables, one["inputs"], one["lengths"])
        alone.append(float(ds2.utterance_losses(logits, out, one)[0]))
    vocab = data.Vocabulary(("<blank>", "A", "B", "C"))
    metrics = ds2.evaluate(model, variables, iter([batch]), SimpleNamespace(vocab=vocab), 3,
                           place=lambda tree: tree)
    assert set(metrics) == {"loss", "cer", "wer"}
    np.testing.assert_allclose(metrics["loss"], np.mean(alone), rtol=1e-5)
    assert 0 <= metrics["cer"] <= 1.5 and np.isfinite(metrics["wer"])


def test_ds2_masks_cover_recurrent_and_fc_but_not_convolutions():
    model = ds2.Model(5, features=4, num_layers=1, fc_features=6, conv_features=(2, 2),
                      row_conv_context=2, bidirectional=False, cell="gru")
    variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 13)), jnp.array([8]))
    masked = paths(variables["masks"])
    assert {"fc/kernel", "output/kernel", "rnn/layer_0/recurrent_z/kernel"} <= masked
    assert not any(p.startswith(("conv_", "row_conv")) for p in masked)


def test_row_convolution_against_a_loop():
    h = jax.random.normal(jax.random.key(6), (2, 6, 3))
    conv = ds2.RowConv(context=2)
    variables = conv.init(jax.random.key(7), h)
    w = np.asarray(variables["params"]["kernel"])
    hn = np.asarray(h)
    expected = np.zeros_like(hn)
    for t in range(6):
        for j in range(3):
            if t + j < 6:
                expected[:, t] += w[j] * hn[:, t + j]
    np.testing.assert_allclose(conv.apply(variables, h), expected, rtol=1e-5, atol=1e-6)


# CTC decoding and error rates.


def one_hot_logits(frames, num_classes=5):
    return jnp.asarray(np.eye(num_classes)[frames] * 5.0)[None]


def test_greedy_decode_collapses_repeats_then_drops_blanks():
    # Frames: 1 1 0 1 2 2 0 0 3 -> collapse repeats: 1 0 1 2 0 3 -> drop blanks: 1 1 2 3.
    logits = one_hot_logits([1, 1, 0, 1, 2, 2, 0, 0, 3])
    labels, n = ctc.greedy_decode(logits, jnp.array([9]))
    assert ctc.decoded_sequences(labels, n) == [[1, 1, 2, 3]]
    # Only the first 5 frames are valid: 1 1 0 1 2 -> 1 1 2.
    labels, n = ctc.greedy_decode(logits, jnp.array([5]))
    assert ctc.decoded_sequences(labels, n) == [[1, 1, 2]]
    labels, n = ctc.greedy_decode(one_hot_logits([0, 0, 0]), jnp.array([3]))
    assert ctc.decoded_sequences(labels, n) == [[]]


def test_greedy_decode_batch_under_jit():
    logits = jnp.concatenate([one_hot_logits([2, 2, 2, 4]), one_hot_logits([3, 0, 3, 3])])
    labels, n = jax.jit(ctc.greedy_decode)(logits, jnp.array([4, 4]))
    assert ctc.decoded_sequences(labels, n) == [[2, 4], [3, 3]]
    assert labels.shape == (2, 4) and labels[0, 2] == 0  # padded with the blank


def test_edit_distance_known_values():
    assert ctc.edit_distance("kitten", "sitting") == 3
    assert ctc.edit_distance("", "abc") == 3 and ctc.edit_distance("abc", "") == 3
    assert ctc.edit_distance("flaw", "lawn") == 2
    assert ctc.edit_distance("the cat sat".split(), "the sat".split()) == 1


def test_error_rates_on_hand_made_transcripts():
    references = ["THE CAT SAT", "HELLO"]
    hypotheses = ["THE BAT SAT", "HELP"]
    rates = ctc.error_rates(references, hypotheses)
    # Characters: C->B (1); HELLO -> HELP: L->P and drop O (2); 3 errors in 11 + 5.
    assert rates["cer"] == pytest.approx(3 / 16)
    # Words: CAT->BAT (1), HELLO->HELP (1); 2 errors in 3 + 1 words.
    assert rates["wer"] == pytest.approx(2 / 4)
    assert ctc.error_rates(["A B"], ["A B"]) == {"cer": 0.0, "wer": 0.0}
    with pytest.raises(ValueError, match="2 references but 1"):
        ctc.error_rates(["A", "B"], ["A"])
