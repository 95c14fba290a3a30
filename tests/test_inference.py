"""Tests of bsrnn.inference: an exported model gives the masked dense Flax model's logits.

Each model is initialised at a tiny size, its prunable kernels get random block masks (edge
blocks partial where the sizes allow), it is exported through `bsrnn.export`, loaded back and
run on fresh random inputs; the reference is the Flax model applied with the same params and
masks (`model.apply({"params", "masks"})`), i.e. the dense computation with pruned weights
zeroed.
"""

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from bsrnn import cells, export, inference, kernels
from bsrnn.kernels.bsc import BlockSparseMatrix
from bsrnn.models import ds2, lm

BLOCK = (4, 4)


def _random_block_masks(rng, masks, density=0.4, block_shape=BLOCK):
    """Every mask replaced by a random block pattern (at least one block kept per kernel)."""
    flat = traverse_util.flatten_dict(masks)
    out = {}
    for path, mask in flat.items():
        rows, cols = mask.shape
        grid = (-(-rows // block_shape[0]), -(-cols // block_shape[1]))
        keep = rng.random(grid) < density
        keep.flat[rng.integers(keep.size)] = True
        out[path] = np.kron(keep, np.ones(block_shape, bool))[:rows, :cols]
    return traverse_util.unflatten_dict(out)


def _export(tmp_path, params, masks, info, name="model.npz", dtype=None):
    exported = export.export_params(jax.device_get(params), masks, BLOCK, dtype=dtype,
                                    dense_dtype=dtype)
    path = tmp_path / name
    export.save_npz(path, exported, model=info)
    return path


def _randomised(rng, params):
    """Biases and every other leaf random too (init leaves biases at zero)."""
    return jax.tree_util.tree_map(
        lambda p: rng.normal(0, 0.5, p.shape).astype(np.float32), jax.device_get(params))


LM_INFO = dict(name="lm", unit="char", data="test", step=0, metrics={})
TINY_TOKENS = ["\n", "a", "b", "c", "d", "e", "f"]


def _tiny_lm(tmp_path, seed, **overrides):
    """A tiny character GRU LM (7 tokens, H = 8 unless ``overrides`` say otherwise) with
    random params and block masks, exported: (rng, model, params, masks, path)."""
    rng = np.random.default_rng(seed)
    kwargs = {**dict(vocab_size=7, cell="gru", features=8, num_layers=1, embed_dim=4),
              **overrides}
    model = lm.Model(**kwargs)
    variables = model.init(jax.random.key(seed), jnp.zeros((1, 3), jnp.int32))
    params = _randomised(rng, variables["params"])
    masks = _random_block_masks(rng, variables["masks"])
    path = _export(tmp_path, params, masks, dict(LM_INFO, kwargs=kwargs, vocab={
        "tokens": TINY_TOKENS, "unk": None}))
    return rng, model, params, masks, path


@pytest.mark.parametrize("cell, num_layers, mask_output, tie", [
    ("gru", 2, True, False), ("lstm", 1, True, False), ("rnn", 2, False, False),
    ("gru", 1, False, True),
])
def test_lm_logits_equal_the_masked_dense_model(tmp_path, cell, num_layers, mask_output, tie):
    rng = np.random.default_rng(0)
    vocab, features = 11, 10 if not tie else 12
    kwargs = dict(vocab_size=vocab, cell=cell, features=features, num_layers=num_layers,
                  embed_dim=12, mask_output=mask_output, tie_embeddings=tie)
    model = lm.Model(**kwargs)
    tokens = jnp.asarray(rng.integers(0, vocab, (3, 9)), jnp.int32)
    variables = model.init(jax.random.key(0), tokens)
    params = _randomised(rng, variables["params"])
    masks = _random_block_masks(rng, variables["masks"])
    info = dict(LM_INFO, kwargs=kwargs,
                vocab={"tokens": [chr(97 + i) for i in range(vocab)], "unk": None})
    path = _export(tmp_path, params, masks, info)
    want, want_carry = model.apply({"params": params, "masks": masks}, tokens)
    for impl in ("auto", "dense"):
        loaded = inference.load(path, impl=impl)
        got, carry = loaded(tokens)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
        jax.tree_util.tree_map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
            carry, want_carry)
        # Carrying the state window to window equals one pass over the whole sequence.
        first, c = loaded(tokens[:, :4])
        second, _ = loaded(tokens[:, 4:], c)
        np.testing.assert_allclose(jnp.concatenate([first, second], 1), want, rtol=1e-4,
                                   atol=1e-4)
    rebuilt, rebuilt_variables = inference.masked_dense(path)  # the benchmarks' baseline
    np.testing.assert_allclose(rebuilt.apply(rebuilt_variables, tokens)[0], want, rtol=1e-5,
                               atol=1e-5)
    sparse = inference.load(path)
    assert all(layer.sparse is not None for layer in sparse.weights.layers)
    assert sparse.weights.input_table is not None  # the first layer's projection is folded
    unfolded = dataclasses.replace(sparse.weights, input_table=None)
    np.testing.assert_allclose(inference.lm_forward(unfolded, tokens)[0], want, rtol=1e-4,
                               atol=1e-4)
    if mask_output:
        assert isinstance(sparse.weights.output.kernel, BlockSparseMatrix)


def test_sampling_carries_the_state_like_a_step_by_step_loop(tmp_path):
    _, model, params, masks, path = _tiny_lm(tmp_path, 1)
    tokens = TINY_TOKENS
    loaded = inference.load(path)
    ids = loaded.sample_ids(20, temperature=0.7, prompt="ab", seed=3)
    # Reference: the Flax model fed one token at a time, Gumbel-max with the same noise.
    noise = np.asarray(jax.random.gumbel(jax.random.key(3), (20, 1, 7)))
    logits, carry = model.apply({"params": params, "masks": masks}, jnp.asarray([[1, 2]]))
    want = []
    for t in range(20):
        token = int(np.argmax(np.asarray(logits[0, -1]) / 0.7 + noise[t, 0]))
        want.append(token)
        logits, carry = model.apply({"params": params, "masks": masks},
                                    jnp.asarray([[token]]), carry)
    np.testing.assert_array_equal(ids[0], want)
    text = loaded.sample(20, temperature=0.7, prompt="ab", seed=3)
    assert text == "".join(tokens[i] for i in want)
    greedy = loaded.sample_ids(5, temperature=0.0, prompt="ab")
    first = int(np.argmax(model.apply({"params": params, "masks": masks},
                                      jnp.asarray([[1, 2]]))[0][0, -1]))
    assert greedy[0, 0] == first


def test_the_folded_input_projection_is_the_embedding_times_the_input_kernel(tmp_path):
    # load() folds the first layer's input projection into a (V, 3H) table: row t must be
    # E[t] @ W_i + b (by hand in float64 from the file's arrays), and the model without the
    # table gives the same logits and, with the same seed, the same samples.
    rng, model, params, masks, path = _tiny_lm(tmp_path, 4, features=10, embed_dim=6)
    folded = inference.load(path, impl="xla")  # forced: no measuring (auto is tested above)
    table = np.asarray(folded.weights.input_table)
    layer, embedding = params["layer_0"], np.asarray(params["embed"]["embedding"], np.float64)
    m = masks["layer_0"]
    gates = []
    for g in ("r", "z", "n"):
        kernel = np.asarray(layer[f"input_{g}"]["kernel"], np.float64) * np.asarray(
            m[f"input_{g}"]["kernel"])
        bias = np.asarray(layer[f"input_{g}"]["bias"], np.float64)
        if g != "n":  # the r and z gates' recurrent biases are folded into the input's
            bias = bias + np.asarray(layer[f"recurrent_{g}"]["bias"], np.float64)
        gates.append(embedding @ kernel + bias)
    np.testing.assert_allclose(table, np.concatenate(gates, 1), rtol=1e-5, atol=1e-5)
    unfolded = inference.LanguageModel(
        dataclasses.replace(folded.weights, input_table=None), folded.info)
    tokens = jnp.asarray(rng.integers(0, 7, (2, 6)), jnp.int32)
    want = model.apply({"params": params, "masks": masks}, tokens)[0]
    np.testing.assert_allclose(folded(tokens)[0], unfolded(tokens)[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(folded(tokens)[0], want, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(folded.sample_ids(30, temperature=0.9, seed=5),
                                  unfolded.sample_ids(30, temperature=0.9, seed=5))
    # A table larger than max_ratio times the arrays it replaces is not built.
    assert inference.fold_input_projection(unfolded.weights, max_ratio=0.1) is \
        unfolded.weights


@pytest.mark.parametrize("winner", ["dense", "xla"])
def test_auto_layers_get_the_measured_choice_before_jit(tmp_path, winner):
    # The models pass their weights to jit as arguments, where `auto` cannot measure: each
    # shape's choices are resolved first, on the concrete weights (timings injected here).
    from bsrnn import kernels

    rng, model, params, masks, path = _tiny_lm(tmp_path, 2)
    loaded = inference.load(path)
    seconds = {"dense": 1.0, "xla": 2.0} if winner == "dense" else {"dense": 2.0, "xla": 1.0}
    timed = []

    def timer(thunks):
        timed.append(sorted(thunks))
        return {name: seconds.get(name, 3.0) for name in thunks}

    tokens = jnp.asarray(rng.integers(0, 7, (2, 5)), jnp.int32)
    with kernels.autotune.using_timer(timer):
        logits, _ = loaded(tokens)
        resolved = loaded.weights_for(2, 5)
        assert loaded.weights_for(2, 5) is resolved  # cached per shape
        impls = [layer.impl for layer in resolved.layers] + [resolved.output.impl]
    assert impls == [winner, winner]  # the GRU layer and the block-sparse softmax
    assert len(timed) == 2 and all({"dense", "xla"} <= set(t) for t in timed)
    ref, _ = model.apply({"params": params, "masks": masks}, tokens)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref), rtol=2e-5, atol=2e-5)


def _depth_layers(depth):
    if isinstance(depth, inference.Wavefront):
        return depth.layers
    return (depth.forward, depth.backward) if isinstance(depth, inference.Bidirectional) \
        else depth


@pytest.mark.parametrize("cell, bidirectional, row_conv, hidden", [
    ("gru", False, 2, 10), ("rnn_clipped_relu", True, 0, 10),  # H = 10: no 4x4 pair
    ("lstm", True, 1, 8),  # the directions' block-diagonal pair exists
])
def test_ds2_logits_equal_the_masked_dense_model_with_lengths(tmp_path, cell, bidirectional,
                                                              row_conv, hidden):
    rng = np.random.default_rng(2)
    kwargs = dict(num_classes=6, conv_features=(3, 2), conv_kernels=((3, 3), (2, 3)),
                  conv_strides=((2, 2), (1, 1)), cell=cell, features=hidden, num_layers=2,
                  bidirectional=bidirectional, row_conv_context=row_conv, fc_features=9)
    model = ds2.Model(**kwargs)
    lengths = jnp.asarray([13, 5, 0, 9], jnp.int32)
    features = rng.normal(0, 1, (4, 13, 5)).astype(np.float32)
    features *= (np.arange(13)[None, :, None] < np.asarray(lengths)[:, None, None])
    variables = model.init(jax.random.key(2), jnp.asarray(features), lengths)
    params = _randomised(rng, variables["params"])
    masks = _random_block_masks(rng, variables["masks"])
    info = dict(name="ds2", kwargs=kwargs, data="test", step=0, metrics={},
                vocab={"tokens": ["<blank>", " ", "A", "B", "C", "D"], "unk": None},
                features={"kind": "mfc", "num_mels": 5, "mean": [0.0] * 5, "std": [1.0] * 5})
    path = _export(tmp_path, params, masks, info)
    want, want_lengths = model.apply({"params": params, "masks": masks}, features, lengths)
    loaded = inference.load(path)
    got, got_lengths = loaded(features, lengths)
    np.testing.assert_array_equal(got_lengths, want_lengths)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    kernels_used = [layer.sparse is not None for depth in loaded.weights.layers
                    for layer in _depth_layers(depth)]
    assert all(kernels_used)  # every cell, the LSTM included, runs on the kernels
    assert isinstance(loaded.weights.fc.kernel, BlockSparseMatrix)
    if not bidirectional:  # the two forward depths: one wavefront-ordered recurrence
        (stack,) = loaded.weights.layers
        assert isinstance(stack, inference.Wavefront) and len(stack.layers) == 2
        forced = dataclasses.replace(loaded.weights, layers=(
            dataclasses.replace(stack, impl="wavefront"),))
        waved, _ = jax.jit(inference.ds2_forward)(forced, features, lengths)
        np.testing.assert_allclose(waved, want, rtol=1e-4, atol=1e-4)
        layered = inference.load(path, wavefront=False)
        assert all(isinstance(d, tuple) for d in layered.weights.layers)
    fused = [isinstance(depth, inference.Bidirectional) for depth in loaded.weights.layers]
    assert fused == [bidirectional] * (2 if bidirectional else 1)
    if bidirectional:
        assert all((d.pair is None) == (hidden % 4 != 0) for d in loaded.weights.layers)
    if cell == "lstm":  # both directions in one recurrence: the numbers of the two scans
        unfused = inference.load(path, fuse_directions=False)
        assert all(isinstance(d, tuple) for d in unfused.weights.layers)
        separate, _ = unfused(features, lengths)
        np.testing.assert_allclose(got, separate, rtol=1e-5, atol=1e-6)
    if cell != "gru":
        return
    # Transcripts: greedy CTC of the reference logits.
    valid = [features[b, : int(lengths[b])] for b in (0, 1, 3)]
    texts = loaded.transcribe_features(valid)
    best = np.asarray(jnp.argmax(want, -1))
    for text, b in zip(texts, (0, 1, 3), strict=True):
        path_ids = [int(i) for i in best[b, : int(want_lengths[b])]]
        collapsed = [i for j, i in enumerate(path_ids) if i and (j == 0 or path_ids[j - 1] != i)]
        assert text == "".join(info["vocab"]["tokens"][i] for i in collapsed)


def test_recurrent_layer_with_lengths_and_reverse_on_the_kernels(tmp_path):
    """The kernels' path of `inference.recurrent` against `RecurrentLayer`: lengths,
    reverse, a given initial state, partial edge blocks (H = 10, 4x4 blocks)."""
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(0, 1, (3, 7, 6)), jnp.float32)
    lengths = jnp.asarray([7, 3, 0])
    h0 = jnp.asarray(rng.normal(0, 1, (3, 10)), jnp.float32)
    for cell in ("gru", "rnn"):
        for reverse in (False, True):
            layer = cells.RecurrentLayer(cell, 10, reverse=reverse)
            variables = layer.init(jax.random.key(0), x, lengths)
            params = _randomised(rng, variables["params"])
            masks = _random_block_masks(rng, variables["masks"])
            want, want_h = layer.apply({"params": params, "masks": masks}, x, lengths,
                                       initial_carry=h0)
            stored = export.export_params(params, masks, BLOCK)
            weights = inference._recurrent(stored, cell, "auto", np.float32, reverse)
            assert weights.sparse is not None
            got, got_h = inference.recurrent(weights, x, h0, lengths)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(got_h, want_h, rtol=1e-5, atol=1e-5)


def _write(path, data):
    path.write_bytes(data)
    return path


def test_bad_files_get_a_clear_error_naming_the_file(tmp_path):
    rng = np.random.default_rng(5)
    kwargs = dict(vocab_size=5, cell="gru", features=8, num_layers=1, embed_dim=4)
    variables = lm.Model(**kwargs).init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))
    info = dict(LM_INFO, kwargs=kwargs, vocab={"tokens": list("abcde"), "unk": None})
    good = _export(tmp_path, variables["params"],
                   _random_block_masks(rng, variables["masks"]), info)
    raw = good.read_bytes()
    np.save(tmp_path / "array.npy", np.ones(3))
    np.savez(tmp_path / "other.npz", a=np.zeros(2))
    cases = {
        _write(tmp_path / "truncated.npz", raw[: len(raw) // 2]): "truncated",
        _write(tmp_path / "text.npz", b"not a model\n"): "text file",
        _write(tmp_path / "empty.npz", b""): "empty",
        tmp_path / "array.npy": ".npy array",
        tmp_path / "other.npz": "not a bsrnn export",
    }
    for path, words in cases.items():
        with pytest.raises(ValueError, match=str(path)) as e:
            inference.load(path)
        assert words.split()[0] in str(e.value), (path, str(e.value))
        with pytest.raises(ValueError, match=str(path)):
            export.load_npz(path)

    def rewrite(name, change):
        with np.load(good) as f:
            arrays = {k: f[k] for k in f.files}
        header = json.loads(arrays["__bsrnn_export__"].item())
        change(header)
        arrays["__bsrnn_export__"] = np.array(json.dumps(header).encode())
        np.savez(tmp_path / name, **arrays)
        return tmp_path / name

    future = rewrite("future.npz", lambda h: h.update(version=99))
    with pytest.raises(ValueError, match=r"future.npz.*version 99.*upgrade bsrnn"):
        inference.load(future)
    kind = rewrite("kind.npz", lambda h: h["model"].update(name="transformer"))
    with pytest.raises(ValueError, match=r"kind.npz.*'transformer'.*does not know"):
        inference.load(kind)
    new_cell = rewrite("cell.npz", lambda h: h["model"]["kwargs"].update(cell="mingru"))
    with pytest.raises(ValueError, match=r"cell.npz.*'mingru'.*does not know"):
        inference.load(new_cell)
    weights_only = rewrite("weights.npz", lambda h: h.pop("model"))
    with pytest.raises(ValueError, match=r"weights.npz.*weights only"):
        inference.load(weights_only)
    assert isinstance(export.load_npz(weights_only), dict)  # weights still readable
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        inference.load(tmp_path / "nope.npz")
    with pytest.raises(ValueError, match=r"dtype='float8'.*bfloat16.*float16.*float32"):
        inference.load(good, dtype="float8")


def test_a_run_exports_its_model_and_the_command_line_uses_it(tiny_text, tmp_path, capsys):
    from conftest import tiny_lm_config

    from bsrnn import train
    from bsrnn.inference import __main__ as cli

    config = tiny_lm_config(tiny_text, steps=8)
    config.export_timing = True  # the one LM run that times sampling
    state = train.train_and_evaluate(config, tmp_path / "run")
    path = tmp_path / "run" / "model.npz"
    loaded = inference.load(path)
    tokens = jnp.asarray(np.random.default_rng(6).integers(0, 12, (2, 10)), jnp.int32)
    model = lm.Model(**loaded.info["kwargs"])
    want, _ = model.apply({"params": state.params, "masks": state.masks}, tokens)
    np.testing.assert_allclose(loaded(tokens)[0], want, rtol=1e-4, atol=1e-4)
    assert isinstance(loaded.weights.layers[0].sparse.w_h, BlockSparseMatrix)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    entry = report["export"]
    assert entry["file_bytes"] == path.stat().st_size and entry["dtype"] == "float32"
    assert entry["inference_speedup"] > 0 and entry["samples"]
    assert "the speed of the masked dense model" in capsys.readouterr().out

    # The export command on the same workdir writes the same weights (newest checkpoint).
    out = tmp_path / "again.npz"
    export.main([f"--workdir={tmp_path / 'run'}", f"--out={out}"])
    jax.tree_util.tree_map(np.testing.assert_array_equal, export.load_npz(path),
                           export.load_npz(out))

    capsys.readouterr()
    cli.main(["sample", f"--model={path}", "--length=30", "--prompt=abc ", "--seed=1"])
    assert capsys.readouterr().out == "abc " + loaded.sample(30, prompt="abc ", seed=1) + "\n"
    cli.main(["evaluate", f"--model={path}", f"--config={tmp_path / 'run' / 'config.json'}"])
    printed = dict(line.split(" (")[0].rsplit(" ", 1)
                   for line in capsys.readouterr().out.splitlines())
    for split in ("valid", "test"):
        assert float(printed[f"{split} bpc"]) == pytest.approx(
            report["metrics"][split]["bpc"], abs=1e-5)
    with pytest.raises(SystemExit, match="is a language model"):
        cli.main(["transcribe", f"--model={path}", "x.mfc"])


@pytest.mark.parametrize("cell, bidirectional", [("rnn_clipped_relu", True), ("gru", False)])
def test_input_norm_layers_run_their_layer_norm_on_the_kernels(tmp_path, cell, bidirectional):
    # input_norm=True (the clipped-ReLU RNN recipe) adds a projection_norm to each recurrent
    # layer. On the kernels the layer normalises its projections before the recurrence
    # (`inference.projections`): the logits equal the masked dense model's, on the kernels
    # (bidirectional: both directions fused, from their projections) and on the dense path;
    # such layers are not run as a wavefront (it projects inside its steps).
    rng = np.random.default_rng(5)
    kwargs = dict(num_classes=5, conv_features=(2,), conv_kernels=((3, 3),),
                  conv_strides=((2, 2),), cell=cell, features=8, num_layers=2,
                  bidirectional=bidirectional, row_conv_context=0, fc_features=8,
                  input_norm=True)
    model = ds2.Model(**kwargs)
    lengths = jnp.asarray([9, 4], jnp.int32)
    features = rng.normal(0, 1, (2, 9, 5)).astype(np.float32)
    variables = model.init(jax.random.key(0), jnp.asarray(features), lengths)
    params = _randomised(rng, variables["params"])
    masks = _random_block_masks(rng, variables["masks"])
    info = dict(name="ds2", kwargs=kwargs, data="test", step=0, metrics={},
                vocab={"tokens": ["<blank>", " ", "A", "B", "C"], "unk": None},
                features={"kind": "mfc", "num_mels": 5, "mean": [0.0] * 5, "std": [1.0] * 5})
    path = _export(tmp_path, params, masks, info)
    want, _ = model.apply({"params": params, "masks": masks}, features, lengths)
    loaded = inference.load(path, impl="xla")  # forced: no measuring
    np.testing.assert_allclose(loaded(features, lengths)[0], want, rtol=1e-4, atol=1e-4)
    dense = inference.load(path, impl="dense")
    np.testing.assert_allclose(dense(features, lengths)[0], want, rtol=1e-4, atol=1e-4)
    depths = loaded.weights.layers
    assert all(isinstance(d, inference.Bidirectional if bidirectional else tuple)
               for d in depths)
    layers = [layer for d in depths
              for layer in ((d.forward, d.backward) if bidirectional else d)]
    assert len(layers) == 2 * (1 + bidirectional)
    assert all(layer.sparse is not None and layer.norm is not None for layer in layers)
    assert all(layer.sparse is None and layer.input_norm
               for depth in dense.weights.layers for layer in depth)
    # Without its layer norm the same layers give other logits: the test can fail.
    def without_norm(depth):
        if bidirectional:
            return dataclasses.replace(depth, forward=dataclasses.replace(depth.forward, norm=None),
                                       backward=dataclasses.replace(depth.backward, norm=None))
        return tuple(dataclasses.replace(layer, norm=None) for layer in depth)

    plain = dataclasses.replace(loaded.weights, layers=tuple(map(without_norm, depths)))
    assert np.abs(np.asarray(inference.ds2_forward(plain, jnp.asarray(features), lengths)[0])
                  - np.asarray(want)).max() > 1e-2


def test_a_layer_whose_auto_chose_dense_carries_its_dense_kernel(tmp_path):
    # measured() gives such a layer its masked dense recurrent kernel once, so a jitted loop
    # that takes the weights as arguments reads it; the jaxpr has no scatter rebuilding it
    # from the blocks, and the logits are unchanged.
    rng, model, params, masks, path = _tiny_lm(tmp_path, 6)
    loaded = inference.load(path)
    seconds = dict(dense=1.0, xla=9.0, pallas=9.0, persistent=9.0, mosaic=9.0)
    with kernels.autotune.using_timer(lambda thunks: {n: seconds[n] for n in thunks}):
        chosen = loaded.weights_for(1, 5)
    (layer,) = chosen.layers
    assert layer.impl == "dense" and layer.sparse.w_h_dense is not None
    assert not isinstance(chosen.output.kernel, BlockSparseMatrix)
    kernel = np.concatenate([params["layer_0"][f"recurrent_{g}"]["kernel"]
                             * masks["layer_0"][f"recurrent_{g}"]["kernel"]
                             for g in ("r", "z", "n")], axis=1)
    np.testing.assert_allclose(layer.sparse.w_h_dense, kernel, rtol=1e-6, atol=1e-6)
    tokens = jnp.asarray(rng.integers(0, 7, (1, 5)), jnp.int32)
    jaxpr = str(jax.make_jaxpr(inference.lm_forward)(chosen, tokens))
    # The one scatter left puts b_hn into its (3H,) slot; none rebuilds a kernel from its
    # blocks (the output layer's dense choice is its dense kernel too).
    assert re.findall(r"(\w+\[[\d,]*\]) = scatter", jaxpr) == ["f32[24]"]
    got, _ = inference.lm_forward(chosen, tokens)
    want, _ = model.apply({"params": params, "masks": masks}, tokens)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
