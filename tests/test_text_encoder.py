"""T5 text encoder wrapper on a tiny random T5 + ByT5 tokenizer written to disk."""

import pytest
import torch

pytest.importorskip("transformers")

from mugv.text import T5TextEncoder, make_tiny_t5  # noqa: E402

PROMPTS = ["a cat", "a dog running on the beach at sunset"]


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    return make_tiny_t5(tmp_path_factory.mktemp("tiny_t5"), d_model=64)


@pytest.fixture(scope="module")
def encoder(t5_dir):
    return T5TextEncoder(t5_dir, device="cpu")


def test_shapes_mask_and_eos(encoder):
    y, mask = encoder.encode(PROMPTS, batch_size=1)
    assert y.shape == (2, 1, 300, 64) and y.dtype == torch.float32 and torch.isfinite(y).all()
    assert mask.shape == (2, 300) and mask.dtype == torch.bool
    lengths = [len(p.encode()) + 1 for p in PROMPTS]  # ByT5: one token per byte, plus EOS
    assert mask.sum(1).tolist() == lengths
    ids, _ = encoder.tokenize(PROMPTS)
    for b, n in enumerate(lengths):
        assert mask[b, :n].all() and not mask[b, n:].any()
        assert ids[b, n - 1] == encoder.tokenizer.eos_token_id
        assert (ids[b, n:] == encoder.tokenizer.pad_token_id).all()


def test_padding_is_masked_inside_the_model(t5_dir, encoder):
    y300, mask = encoder.encode(PROMPTS)
    y40, _ = T5TextEncoder(t5_dir, max_length=40, device="cpu").encode(PROMPTS)
    for b, n in enumerate(mask.sum(1).tolist()):
        torch.testing.assert_close(y300[b, :, :n], y40[b, :, :n], rtol=1e-4, atol=1e-5)
    assert (y300[0, 0, 0] - y300[1, 0, 0]).abs().max() > 1e-3  # different prompts differ


def test_truncation_keeps_eos(t5_dir):
    enc = T5TextEncoder(t5_dir, max_length=16, device="cpu")
    y, mask = enc.encode(["x" * 50, "short"])
    assert y.shape == (2, 1, 16, 64)
    assert mask[0].all() and mask[1].sum() == 6
    ids, _ = enc.tokenize(["x" * 50])
    assert ids[0, -1] == enc.tokenizer.eos_token_id


def test_deterministic_and_batch_size_independent(encoder):
    y1, m1 = encoder.encode(PROMPTS, batch_size=2)
    y2, m2 = encoder.encode(PROMPTS, batch_size=2)
    y3, _ = encoder.encode(PROMPTS, batch_size=1)
    assert torch.equal(y1, y2) and torch.equal(m1, m2)
    torch.testing.assert_close(y1, y3, rtol=1e-5, atol=1e-6)


def test_dtype_defaults_and_override(t5_dir, encoder):
    assert encoder.dtype == torch.float32 and encoder.hidden_size == 64
    y, _ = T5TextEncoder(t5_dir, max_length=8, device="cpu", dtype=torch.bfloat16).encode(["hi"])
    assert y.dtype == torch.bfloat16


def test_bad_inputs_name_the_problem(tmp_path, encoder):
    missing = tmp_path / "no_t5_here"
    with pytest.raises(FileNotFoundError, match="no_t5_here"):
        T5TextEncoder(missing)
    empty = tmp_path / "empty_t5"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="empty_t5 has no config.json"):
        T5TextEncoder(empty, device="cpu")
    broken = tmp_path / "broken_t5"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    with pytest.raises(OSError, match="broken_t5"):
        T5TextEncoder(broken, device="cpu")
    with pytest.raises(TypeError, match="list of str"):
        encoder.encode("not a list")
