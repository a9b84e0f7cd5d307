"""Tests for bpe.py, prepare_fineweb.py and gpt.py. Run: python -m pytest -q test_gpt.py"""
from pathlib import Path

REPO = Path(__file__).resolve().parent
DATA = REPO.parent / "shared" / "data"


def test_shared_data_is_present():
    # Every other test reads these files; fail loudly if the checkout is not beside ../shared.
    assert (DATA / "gpt2" / "vocab.bpe").stat().st_size == 456_318
    assert (DATA / "tinyshakespeare.txt").stat().st_size == 1_115_394


# ==========================================================================================================
# gpt.py: the model, generation, GPT-2 interop

import math

import pytest
import torch

import gpt
from gpt import GPT, GPTConfig


def tiny_config(**overrides) -> GPTConfig:
    settings = dict(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=16)
    settings.update(overrides)
    return GPTConfig(**settings)


def tiny_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(tiny_config(**overrides)).eval()


POSITIONS = ["learned", "sinusoidal", "rope"]


@pytest.mark.parametrize("pos_emb", POSITIONS)
@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_shapes_and_initial_loss_is_near_uniform(pos_emb, activation):
    model = tiny_model(pos_emb=pos_emb, activation=activation, vocab_size=512, n_embd=32)
    idx, targets = torch.randint(0, 512, (2, 3, 16))
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 16, 512)
    # Small initial weights give nearly uniform predictions: loss close to ln(V).
    assert abs(loss.item() - math.log(512)) < 0.1
    assert model(idx)[1] is None


@pytest.mark.parametrize("pos_emb", POSITIONS)
def test_manual_attention_equals_fused_attention(pos_emb):
    fused = tiny_model(pos_emb=pos_emb)
    manual = GPT(tiny_config(pos_emb=pos_emb, attention="manual")).eval()
    manual.load_state_dict(fused.state_dict())
    idx = torch.randint(0, 64, (4, 16))
    torch.testing.assert_close(manual(idx)[0], fused(idx)[0], atol=1e-5, rtol=1e-5)
    # The cached paths (queries after cached keys) go through the same two attention functions.
    torch.testing.assert_close(manual.generate(idx[:, :4], 20, temperature=0),
                               fused.generate(idx[:, :4], 20, temperature=0))


@pytest.mark.parametrize("attention", ["sdpa", "manual"])
@pytest.mark.parametrize("pos_emb", POSITIONS)
def test_future_tokens_never_change_past_logits(pos_emb, attention):
    model = tiny_model(pos_emb=pos_emb, attention=attention)
    idx = torch.randint(0, 64, (2, 16))
    for t in (0, 5, 15):
        changed = idx.clone()
        changed[:, t + 1:] = torch.randint(0, 64, changed[:, t + 1:].shape)
        changed[:, t] = idx[:, t]
        with torch.no_grad():
            torch.testing.assert_close(model(changed)[0][:, :t + 1], model(idx)[0][:, :t + 1])
        if t < 15:  # and changing the token at t+1 does change the logits at t+1
            changed[:, t + 1] = (idx[:, t + 1] + 1) % 64
            with torch.no_grad():
                assert not torch.allclose(model(changed)[0][:, t + 1], model(idx)[0][:, t + 1])


def test_config_errors_are_one_line():
    with pytest.raises(ValueError, match="n_embd=30 is not divisible by n_head=4"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="pos_emb='alibi' is not one of learned, sinusoidal, rope"):
        GPTConfig(pos_emb="alibi")
    with pytest.raises(ValueError, match="longer than block_size=16"):
        tiny_model()(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("pos_emb", POSITIONS)
def test_kv_cache_greedy_equals_no_cache_up_to_twice_block_size(pos_emb):
    model = tiny_model(pos_emb=pos_emb)
    prompt = torch.randint(0, 64, (3, 5))
    for new_tokens in (1, 7, 11, 12, 20, 27):  # 5 + 11 = block_size; 27 reaches 2x block_size
        cached = model.generate(prompt, new_tokens, temperature=0)
        uncached = model.generate(prompt, new_tokens, temperature=0, use_cache=False)
        assert cached.shape == (3, 5 + new_tokens)
        assert torch.equal(cached, uncached)
    # A prompt already longer than the context: only its last block_size tokens are seen.
    long_prompt = torch.randint(0, 64, (1, 40))
    assert torch.equal(model.generate(long_prompt, 6, temperature=0),
                       model.generate(long_prompt, 6, temperature=0, use_cache=False))


def test_no_cache_path_is_the_plain_recomputation():
    # The reference for the cache test above: crop to block_size, run the whole window, take the argmax.
    model = tiny_model()
    idx = torch.randint(0, 64, (2, 3))
    expected = idx
    for _ in range(25):
        with torch.no_grad():
            logits = model(expected[:, -16:])[0][:, -1]
        expected = torch.cat((expected, logits.argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(model.generate(idx, 25, temperature=0), expected)


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0], [0.0, -1.0, 2.0, 2.5, -3.0]])
    kept = gpt.filter_top_k(logits, 2).isfinite()
    assert kept.tolist() == [[False, True, False, True, False], [False, False, True, True, False]]
    assert gpt.filter_top_k(logits, 10).isfinite().all()  # k beyond the vocabulary keeps everything


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.05, 0.3, 0.15]])
    logits = probs.log()
    kept = lambda p: gpt.filter_top_p(logits, p).isfinite().tolist()[0]
    assert kept(0.5) == [True, False, False, False]   # 0.5 alone reaches 0.5
    assert kept(0.6) == [True, False, True, False]    # 0.5 + 0.3
    assert kept(0.8) == [True, False, True, False]    # exactly 0.8
    assert kept(0.81) == [True, False, True, True]    # 0.5 + 0.3 + 0.15
    assert kept(1.0) == [True, True, True, True]
    assert kept(0.01) == [True, False, False, False]  # the most likely token always stays


def test_filters_apply_in_order_temperature_top_k_top_p():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    # top_k=3 leaves 3 tokens; top_p=0.7 of their renormalised probabilities (0.665, 0.245, 0.090) keeps 2.
    draws = {gpt.sample_from_logits(logits, 1.0, 3, 0.7, torch.Generator().manual_seed(s)).item()
             for s in range(200)}
    assert draws == {0, 1}
    assert gpt.sample_from_logits(logits, 0.0).item() == 0  # temperature 0 is greedy


def test_sampling_is_reproducible_with_a_seed():
    model = tiny_model()
    prompt = torch.randint(0, 64, (2, 4))
    sample = lambda seed: model.generate(prompt, 20, temperature=1.0, top_k=20, top_p=0.95,
                                         generator=torch.Generator().manual_seed(seed))
    assert torch.equal(sample(1), sample(1))
    assert not torch.equal(sample(1), sample(2))


def test_generation_stops_at_the_stop_token():
    model = tiny_model()
    prompt = torch.tensor([[0], [1]])
    free = model.generate(prompt, 30, temperature=0)
    stop = free[0, 3].item()
    first = [row.tolist().index(stop, 1) if stop in row[1:] else None for row in free]  # where each row stops
    stopped = model.generate(prompt, 30, temperature=0, stop_token=stop)
    # Each row is the free text up to its stop token, then stop tokens; the batch ends once all rows stopped.
    ends = [f for f in first if f is not None]
    assert stopped.size(1) == (max(ends) + 1 if len(ends) == 2 else 31)
    for row, f in enumerate(first):
        if f is not None:
            assert torch.equal(stopped[row, :f + 1], free[row, :f + 1])
            assert (stopped[row, f:] == stop).all()


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-0.5), "temperature=-0.5 must be >= 0"),
    (dict(top_k=0), "top_k=0 must be at least 1"),
    (dict(top_p=0.0), r"top_p=0.0 must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p=1.5 must be in \(0, 1\]"),
])
def test_bad_sampling_options_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_model().generate(torch.zeros(1, 1, dtype=torch.long), 5, **kwargs)


def bigram_model(next_token_probs: list[list[float]]) -> GPT:
    """A GPT whose next-token distribution depends only on the current token, as the table says.

    Attention and MLP write nothing (their output projections are zero), positions are zero, so the last
    hidden state is the layer-normed embedding of the current token; the untied output layer is solved so
    those map to the table's log-probabilities."""
    vocab = len(next_token_probs)
    model = GPT(GPTConfig(block_size=8, vocab_size=vocab, n_layer=1, n_head=1, n_embd=2 * vocab,
                          tie_weights=False)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.transformer.ln_f.weight.fill_(1.0)
        model.transformer.wte.weight[:, :vocab] = torch.eye(vocab)
        hidden = model.hidden_states(torch.arange(vocab)[None])[0].double()  # (V, C), linearly independent rows
        targets = torch.tensor(next_token_probs, dtype=torch.float64).log()
        model.lm_head.weight.copy_(torch.linalg.lstsq(hidden, targets).solution.t())
    return model


def test_beam_search_finds_the_best_sequence_where_greedy_does_not():
    probs = [[0.01, 0.59, 0.39, 0.01],   # from 0: 1 looks best ...
             [0.30, 0.20, 0.26, 0.24],   # ... but leads nowhere in particular
             [0.01, 0.01, 0.01, 0.97],   # while 2 is followed by 3 almost surely
             [0.97, 0.01, 0.01, 0.01]]
    model = bigram_model(probs)
    prompt = torch.tensor([[0]])
    greedy = model.generate(prompt, 2, temperature=0)[0, 1:].tolist()
    beam = model.beam_search(prompt, 2, beam_size=2)[0, 1:].tolist()
    # Exhaustive search over all 16 continuations for the most likely one.
    best = max(((a, b) for a in range(4) for b in range(4)), key=lambda s: probs[0][s[0]] * probs[s[0]][s[1]])
    assert greedy[0] == 1
    assert tuple(beam) == best == (2, 3)
    assert model.beam_search(prompt, 2, beam_size=1)[0, 1:].tolist() == greedy  # one beam is greedy


def test_beam_search_with_a_stop_token_and_past_block_size():
    model = tiny_model()
    out = model.beam_search(torch.randint(0, 64, (1, 10)), 12, beam_size=3)
    assert out.shape == (1, 22)
    with pytest.raises(ValueError, match="beam search continues one prompt"):
        model.beam_search(torch.zeros(2, 1, dtype=torch.long), 3, beam_size=2)


# -- GPT-2 interop against HF transformers --------------------------------------------------------------------

def hf_gpt2(tmp_path, seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=97, n_positions=24, n_embd=32, n_layer=3, n_head=4,
                                     bos_token_id=96, eos_token_id=96)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # HF zero-initialises biases and LayerNorm shifts: make every tensor matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(tmp_path / "hf")
    return model, tmp_path / "hf"


def test_gpt2_import_gives_hf_logits(tmp_path):
    hf, hf_dir = hf_gpt2(tmp_path)
    ours = GPT.from_gpt2(gpt2_dir=hf_dir).eval()
    assert (ours.config.n_layer, ours.config.n_head, ours.config.n_embd, ours.config.block_size,
            ours.config.vocab_size) == (3, 4, 32, 24, 97)
    idx = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], hf(idx).logits, atol=1e-5, rtol=0)
    # Greedy generation agrees too (HF has its own KV cache).
    hf_tokens = hf.generate(idx[:, :4], attention_mask=torch.ones_like(idx[:, :4]), max_new_tokens=12,
                            do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(idx[:, :4], 12, temperature=0), hf_tokens)


def test_export_then_hf_import_round_trips_exactly(tmp_path):
    transformers = pytest.importorskip("transformers")
    ours = tiny_model(vocab_size=97, block_size=24, n_embd=32, n_head=4)
    ours.export_hf(tmp_path / "export")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "export").eval()
    hf_state = hf.state_dict()
    for key, tensor in ours.state_dict().items():
        theirs = hf_state[key]
        assert torch.equal(theirs.t() if key.endswith(GPT.HF_TRANSPOSED) else theirs, tensor), key
    idx = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ours(idx)[0], atol=1e-5, rtol=0)
    # ... and back again: our own import of the export is bit-identical.
    again = GPT.from_gpt2(gpt2_dir=tmp_path / "export")
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), ours.state_dict().values()))


def test_gpt2_import_names_missing_and_mismatched_tensors(tmp_path):
    from safetensors.torch import load_file, save_file
    _, hf_dir = hf_gpt2(tmp_path)
    state = load_file(hf_dir / "model.safetensors")
    del state["transformer.h.1.mlp.c_fc.bias"]
    state["transformer.h.0.ln_1.weight"] = torch.ones(31)
    save_file(state, hf_dir / "model.safetensors")
    with pytest.raises(ValueError, match=r"h\.0\.ln_1\.weight has shape \(31,\), expected \(32,\).*"
                                         r"missing transformer\.h\.1\.mlp\.c_fc\.bias"):
        GPT.from_gpt2(gpt2_dir=hf_dir)
    (hf_dir / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="is not a readable safetensors file"):
        GPT.from_gpt2(gpt2_dir=hf_dir)
    with pytest.raises(FileNotFoundError, match="must hold HF's model.safetensors"):
        GPT.from_gpt2(gpt2_dir=tmp_path / "nowhere")


def test_export_refuses_models_that_are_not_gpt2_shaped(tmp_path):
    model = tiny_model(pos_emb="rope", activation="relu")
    with pytest.raises(ValueError, match=r"cannot export to HF GPT-2: pos_emb='rope' \(GPT-2 has 'learned'\), "
                                         r"activation='relu'"):
        model.export_hf(tmp_path / "export")
    assert not (tmp_path / "export" / "model.safetensors").exists()
