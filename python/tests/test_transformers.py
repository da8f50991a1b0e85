"""The Hugging Face transformers plug-in (``maskattn.transformers``).

Small random-init models built from configs (no download). A model's logits and every
parameter gradient are held to docs/design.md's accuracy rule at model scale:

    |maskattn_f32 − golden_f64|max ≤ 2 · |sdpa_f32 − golden_f64|max + ε

where the golden run is the same model with transformers' SDPA attention in float64 and
the naive run the same in float32, and ε = 1e-5 · max(1, |golden|max) per tensor (the
design's ε for parameter gradients, which sum over many pairs). Everything but attention is
shared by the f32 runs, so the rule measures what attention adds.
"""

import copy
import subprocess
import sys

import pytest
import torch

import maskattn
from reference import attend, max_err

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install 'maskattn[transformers]')")

import maskattn.transformers as mt  # noqa: E402
from transformers import masking_utils as mu  # noqa: E402

mt.register()

VOCAB = 61


def _llama(**kw):
    cfg = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        pad_token_id=0,
    )
    cfg.update(kw)
    return transformers.LlamaConfig(**cfg)


def _mistral(**kw):
    cfg = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=256,
        sliding_window=7,
        pad_token_id=0,
    )
    cfg.update(kw)
    return transformers.MistralConfig(**cfg)


def _bert():
    return transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=0,
    )


def _model(cfg, cls=transformers.AutoModelForCausalLM, seed=0):
    torch.manual_seed(seed)
    return cls.from_config(cfg, attn_implementation="maskattn")


def _run(model, impl, dtype, inputs, weight, select, logits_of=lambda out: out.logits):
    """Logits at ``select`` and every parameter's gradient of ``Σ (logits · weight)[select]``."""
    m = copy.deepcopy(model).to(dtype)
    m.set_attn_implementation(impl)
    m.zero_grad(set_to_none=True)
    logits = logits_of(m(**inputs))
    (logits.double() * weight)[select].sum().backward()
    grads = {n: p.grad.detach() for n, p in m.named_parameters() if p.grad is not None}
    return logits.detach()[select], grads


def _assert_rule(name, ours, naive, golden):
    assert not torch.isnan(ours).any(), f"{name}: NaN"
    eps = 1e-5 * max(1.0, golden.abs().max().item())
    err, bound = max_err(ours, golden), 2 * max_err(naive, golden) + eps
    assert err <= bound, f"{name}: error {err:.3e} exceeds the bound {bound:.3e}"


def _assert_model_rule(ours, naive, golden):
    (lo, go), (ln, gn), (lg, gg) = ours, naive, golden
    _assert_rule("logits", lo, ln, lg)
    assert set(go) == set(gg), "maskattn's run gave gradients to other parameters than SDPA's"
    assert len(go) > 5
    for name in gg:
        _assert_rule(f"grad {name}", go[name], gn[name], gg[name])


def _check_against_sdpa(model, inputs, select, logits_of=lambda out: out.logits):
    torch.manual_seed(1)
    shape = logits_of(model(**inputs)).shape
    weight = torch.randn(shape, dtype=torch.float64)
    runs = [
        _run(model, impl, dtype, inputs, weight, select, logits_of)
        for impl, dtype in (("maskattn", torch.float32), ("sdpa", torch.float32), ("sdpa", torch.float64))
    ]
    _assert_model_rule(*runs)


@pytest.fixture
def spy(monkeypatch):
    """Counts mask-interface calls and block-mask compilations, and keeps the masks built."""
    seen = {"masks": [], "compiles": 0}
    real_interface, real_compile = mt.mask_interface, mt._compile

    def interface(*args, **kwargs):
        m = real_interface(*args, **kwargs)
        seen["masks"].append(m)
        return m

    def compile_(*args):
        seen["compiles"] += 1
        return real_compile(*args)

    monkeypatch.setattr(mt, "_compile", compile_)
    transformers.AttentionMaskInterface.register(mt.NAME, interface)
    yield seen
    transformers.AttentionMaskInterface.register(mt.NAME, real_interface)


def _tokens(B, L, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (B, L), generator=g)


# ---- registration ----


def test_import_maskattn_never_imports_transformers():
    code = "import sys, maskattn, maskattn.transformers; assert 'transformers' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_register_adds_both_interfaces():
    assert transformers.AttentionInterface._global_mapping[mt.NAME] is mt.attention_forward
    assert transformers.AttentionMaskInterface._global_mapping[mt.NAME] is mt.mask_interface
    model = transformers.LlamaForCausalLM(_llama())
    model.set_attn_implementation("maskattn")
    assert model.config._attn_implementation == "maskattn"


# ---- the mask function, against transformers' own dense masks ----


def _pad(kind, B, L):
    if kind is None:
        return None
    m = torch.ones(B, L, dtype=torch.bool)
    if kind == "left":
        m[0, :5], m[1, :2] = False, False
    elif kind == "right":
        m[0, -4:] = False
    elif kind == "holes":
        m[0, 3], m[1, 7:9] = False, False
    elif kind == "empty_row":
        m[1, :] = False
    return m


FUNCTIONS = {
    "causal": lambda: mu.causal_mask_function,
    "sliding5": lambda: mu.sliding_window_causal_mask_function(5),
    "bidirectional": lambda: mu.bidirectional_mask_function,
    "bidirectional_sliding3": lambda: mu.sliding_window_bidirectional_mask_function(3),
}


@pytest.mark.parametrize("fn", sorted(FUNCTIONS))
@pytest.mark.parametrize(
    "lengths",
    [(70, 70, 0, 0), (1, 90, 89, 0), (9, 90, 81, 0), (1, 8, 40, 37), (4, 11, 40, 33), (6, 40, 0, 0)],
    ids=["square", "decode", "chunk", "sliding_cache", "sliding_cache_chunk", "static_prefill"],
)
@pytest.mark.parametrize("pad", [None, "left", "right", "holes", "empty_row"])
def test_mask_matches_transformers_dense_mask(fn, lengths, pad):
    L_q, L_k, q_off, kv_off = lengths
    B, H = 2, 2
    padding = _pad(pad, B, kv_off + L_k)
    args = dict(batch_size=B, q_length=L_q, kv_length=L_k, q_offset=q_off, kv_offset=kv_off)
    function = FUNCTIONS[fn]()
    ours = mt.mask_interface(mask_function=function, attention_mask=padding, **args)
    assert ours.analytic, f"{fn} was not recognised: {ours.description}"
    allowed = mu.sdpa_mask(
        mask_function=function, attention_mask=padding, allow_is_causal_skip=False, use_vmap=False, **args
    )
    _assert_same_attention(ours, allowed, B, H, L_q, L_k)


def _assert_same_attention(ours, allowed, B, H, L_q, L_k):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, n, 16, generator=g, dtype=torch.float64) for n in (L_q, L_k, L_k))
    out = maskattn.attention(q.float(), k.float(), v.float(), ours.block(H))
    golden, _ = attend(q, k, v, allowed)
    naive, _ = attend(q.float(), k.float(), v.float(), allowed)
    err, bound = max_err(out, golden), 2 * max_err(naive, golden) + 1e-5
    assert err <= bound, f"error {err:.3e} exceeds {bound:.3e}: the masks differ"


def test_mask_recognises_packed_documents():
    pos = torch.cat([torch.arange(30), torch.arange(25), torch.arange(15)]).unsqueeze(0).expand(2, -1)
    ids = mu.find_packed_sequence_indices(pos)
    function = mu.and_masks(
        mu.remap_positions_for_packed_sequence(mu.sliding_window_causal_mask_function(9), pos),
        mu.packed_sequence_mask_function(ids),
    )
    ours = mt.mask_interface(2, 70, 70, mask_function=function)
    assert ours.analytic and ours.has_documents, ours.description
    allowed = mu.sdpa_mask(2, 70, 70, mask_function=function, allow_is_causal_skip=False)
    _assert_same_attention(ours, allowed, 2, 2, 70, 70)


def test_mask_remap_without_its_documents_is_evaluated_densely():
    # Remapped positions are exact as a band only inside documents of the same positions.
    pos = torch.cat([torch.arange(30), torch.arange(40)]).unsqueeze(0)
    function = mu.remap_positions_for_packed_sequence(mu.causal_mask_function, pos)
    ours = mt.mask_interface(1, 70, 70, mask_function=function)
    assert not ours.analytic
    allowed = mu.sdpa_mask(1, 70, 70, mask_function=function, allow_is_causal_skip=False)
    _assert_same_attention(ours, allowed, 1, 2, 70, 70)


def test_mask_unrecognised_function_is_evaluated_densely():
    def image_tokens(b, h, q, kv):  # a custom overlay, as vision-language models add
        return (kv >= 10) & (kv < 20) & (q >= 10) & (q < 20)

    function = mu.or_masks(mu.causal_mask_function, image_tokens)
    ours = mt.mask_interface(2, 40, 40, mask_function=function, attention_mask=_pad("right", 2, 40), use_vmap=True)
    assert not ours.analytic
    allowed = mu.sdpa_mask(
        2, 40, 40, mask_function=function, attention_mask=_pad("right", 2, 40), allow_is_causal_skip=False, use_vmap=True
    )
    _assert_same_attention(ours, allowed, 2, 2, 40, 40)


# ---- models ----


@pytest.mark.parametrize("pad", ["right", "left"])
def test_llama_gqa_padding_logits_and_gradients(pad, spy):
    model = _model(_llama()).train()
    ids = _tokens(2, 45)
    am = _pad(pad, 2, 45).long()
    _check_against_sdpa(model, {"input_ids": ids, "attention_mask": am}, am.bool())
    assert spy["masks"] and all(m.analytic for m in spy["masks"])


def test_llama_mask_built_once_per_forward(spy):
    model = _model(_llama(num_hidden_layers=4)).eval()
    with torch.no_grad():
        model(_tokens(2, 33), attention_mask=_pad("left", 2, 33).long())
    assert len(spy["masks"]) == 1 and spy["compiles"] == 1


def test_qwen2_mask_built_once_per_layer_type(spy):
    cfg = transformers.Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_sliding_window=True,
        sliding_window=6,
        layer_types=["full_attention", "sliding_attention"] * 2,
    )
    model = _model(cfg).train()
    ids, am = _tokens(2, 30), _pad("right", 2, 30).long()
    _check_against_sdpa(model, {"input_ids": ids, "attention_mask": am}, am.bool())
    spy["masks"].clear()
    spy["compiles"] = 0
    with torch.no_grad():
        model(ids, attention_mask=am)
    assert len(spy["masks"]) == 2 and spy["compiles"] == 2
    assert all(m.analytic for m in spy["masks"])


def _packed_positions(lengths):
    return torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)


def test_packed_documents_by_position_ids_in_training_mode(spy, monkeypatch):
    """Default settings (use_cache=True in the config, so a cache object exists and
    transformers does not read packing from position_ids): documents stay apart."""
    lengths = [11, 17, 9, 13]
    model = _model(_llama()).train()
    assert model.config.use_cache
    ids, pos = _tokens(1, sum(lengths)), _packed_positions(lengths)
    late = []
    real_late = mt._late_documents
    monkeypatch.setattr(mt, "_late_documents", lambda *a: late.append(real_late(*a)) or late[-1])

    torch.manual_seed(1)
    weight = torch.randn(1, sum(lengths), VOCAB, dtype=torch.float64)
    everything = torch.ones(1, sum(lengths), dtype=torch.bool)
    ours = _run(model, "maskattn", torch.float32, {"input_ids": ids, "position_ids": pos}, weight, everything)
    assert late and late[0] is not None, "the documents were not read from position_ids"
    assert not spy["masks"][0].has_documents  # transformers did not see the packing here

    # Each document's logits equal the document run alone (SDPA, no packing involved).
    start = 0
    for n in lengths:
        alone = {"input_ids": ids[:, start : start + n], "position_ids": pos[:, start : start + n]}
        w = weight[:, start : start + n]
        sel = everything[:, :n]
        naive = _run(model, "sdpa", torch.float32, alone, w, sel)[0]
        golden = _run(model, "sdpa", torch.float64, alone, w, sel)[0]
        _assert_rule(f"logits of the document at {start}", ours[0].view(-1, VOCAB)[start : start + n], naive, golden)
        start += n

    # Gradients: SDPA with use_cache=False, where transformers builds the documents itself.
    inputs = {"input_ids": ids, "position_ids": pos, "use_cache": False}
    naive = _run(model, "sdpa", torch.float32, inputs, weight, everything)
    golden = _run(model, "sdpa", torch.float64, inputs, weight, everything)
    _assert_model_rule(ours, naive, golden)


def test_packed_documents_by_cu_seq_lens():
    lengths = [20, 7, 18]
    model = _model(_llama()).train()
    L = sum(lengths)
    ids, cu = _tokens(1, L), torch.tensor([0, 20, 27, 45], dtype=torch.int32)
    inputs = {"input_ids": ids, "position_ids": _packed_positions(lengths), "cu_seq_lens_q": cu, "cu_seq_lens_k": cu}
    # Positions that do not restart: the documents come from cu_seq_lens alone.
    inputs_flat = dict(inputs, position_ids=torch.arange(L).unsqueeze(0))
    with torch.no_grad():
        packed = model(**inputs_flat).logits
        model.set_attn_implementation("sdpa")
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
            alone = model(ids[:, a:b], position_ids=torch.arange(a, b).unsqueeze(0)).logits
            assert (packed[:, a:b] - alone).abs().max().item() < 1e-5
        model.set_attn_implementation("maskattn")
    with pytest.raises(ValueError, match="cu_seq_lens_q"):
        bad = torch.tensor([0, 20, 44], dtype=torch.int32)
        model(**dict(inputs, cu_seq_lens_q=bad, cu_seq_lens_k=bad))


def test_mistral_sliding_window_mqa_padding():
    model = _model(_mistral()).train()
    assert model.config.num_key_value_heads == 1
    ids, am = _tokens(2, 40), _pad("left", 2, 40).long()
    _check_against_sdpa(model, {"input_ids": ids, "attention_mask": am}, am.bool())


def test_bert_padding_bidirectional(spy):
    model = _model(_bert(), cls=transformers.AutoModel).train()
    ids, am = _tokens(2, 37), _pad("right", 2, 37).long()
    _check_against_sdpa(
        model, {"input_ids": ids, "attention_mask": am}, am.bool(), logits_of=lambda out: out.last_hidden_state
    )
    assert "causal" not in spy["masks"][0].description and spy["masks"][0].analytic


@pytest.mark.parametrize("cfg", ["llama", "mistral"])
def test_greedy_generate_left_padding_token_for_token(cfg):
    # Mistral's window (7) is shorter than the prompt: the sliding cache's offsets are exercised.
    model = _model(_llama() if cfg == "llama" else _mistral()).eval()
    ids, am = _tokens(2, 12, seed=3), _pad("left", 2, 12).long()
    ids = ids * am
    out = {}
    for impl in ("sdpa", "maskattn"):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            out[impl] = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=16, do_sample=False)
    assert out["maskattn"].shape[1] == 12 + 16
    assert torch.equal(out["maskattn"], out["sdpa"])


# ---- what is not supported yet: a clear error naming the argument ----


def test_gemma2_softcap_is_refused():
    cfg = transformers.Gemma2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=8,
        attn_logit_softcapping=50.0,
    )
    model = _model(cfg).eval()
    with pytest.raises(NotImplementedError, match="softcap"):
        model(_tokens(1, 10))


def test_gpt_oss_sinks_are_refused():
    cfg = transformers.GptOssConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=2,
        num_experts_per_tok=1,
        sliding_window=8,
    )
    model = _model(cfg).eval()
    with pytest.raises(NotImplementedError, match="s_aux"):
        model(_tokens(1, 10))


def test_dropout_and_output_attentions_are_refused():
    model = _model(_llama(attention_dropout=0.1)).train()
    with pytest.raises(NotImplementedError, match="dropout"):
        model(_tokens(1, 10))
    model.eval()
    model(_tokens(1, 10))  # no dropout in eval mode
    with pytest.raises(NotImplementedError, match="output_attentions"):
        model(_tokens(1, 10), output_attentions=True)


def test_additive_float_mask_is_refused():
    q = torch.randn(1, 2, 5, 8)
    bias = torch.randn(1, 1, 5, 5)
    with pytest.raises(NotImplementedError, match="additive float attention_mask"):
        mt.attention_forward(torch.nn.Module(), q, q, q, bias)
    with pytest.raises(NotImplementedError, match="position_bias"):
        mt.attention_forward(torch.nn.Module(), q, q, q, None, position_bias=bias)
    # A 0 / −inf float mask is a boolean one.
    allowed = torch.rand(1, 1, 5, 5) > 0.3
    allowed[..., 0] = True
    additive = torch.zeros(1, 1, 5, 5).masked_fill(~allowed, torch.finfo(torch.float32).min)
    out, weights = mt.attention_forward(torch.nn.Module(), q, q, q, additive)
    assert weights is None and out.shape == (1, 5, 2, 8) and out.is_contiguous()
    ref, _ = attend(q.double(), q.double(), q.double(), allowed)
    assert max_err(out.transpose(1, 2), ref) < 1e-5


def test_bart_encoder_padding_cross_attention():
    cfg = transformers.BartConfig(
        vocab_size=VOCAB,
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=96,
        decoder_ffn_dim=96,
        max_position_embeddings=128,
        dropout=0.0,
        attention_dropout=0.0,
        pad_token_id=0,
    )
    model = _model(cfg, cls=transformers.AutoModelForSeq2SeqLM).train()
    src, am = _tokens(2, 23), _pad("right", 2, 23).long()
    tgt, dam = _tokens(2, 13, seed=1), _pad("right", 2, 13).long()
    inputs = {"input_ids": src, "attention_mask": am, "decoder_input_ids": tgt, "decoder_attention_mask": dam}
    _check_against_sdpa(model, inputs, dam.bool())


def test_t5_position_bias_is_refused():
    cfg = transformers.T5Config(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4, dropout_rate=0.0)
    model = _model(cfg, cls=transformers.AutoModelForSeq2SeqLM).eval()
    with pytest.raises(NotImplementedError, match="position_bias"):
        model(input_ids=_tokens(1, 9), decoder_input_ids=_tokens(1, 5))


def test_vit_classifier():
    # transformers builds a vision encoder a bidirectional mask without padding: full attention.
    cfg = transformers.ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=5,
    )
    model = _model(cfg, cls=transformers.AutoModelForImageClassification).train()
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    _check_against_sdpa(model, {"pixel_values": pixels}, torch.ones(2, dtype=torch.bool))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("L_q, L_k", [(9, 9), (1, 9), (5, 12)])
@pytest.mark.parametrize("window", [None, 4])
def test_attention_without_a_mask_follows_sdpa(causal, L_q, L_k, window):
    """No mask from transformers: as SDPA's `is_causal` (top-left; a single query sees every
    key), within `sliding_window` as transformers' masks state it (kv > q − w)."""
    module = torch.nn.Module()
    module.is_causal = causal
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, n, 8, generator=g, dtype=torch.float64) for n in (L_q, L_k, L_k))
    if window is not None and not causal:
        with pytest.raises(NotImplementedError, match="sliding_window"):
            mt.attention_forward(module, q.float(), k.float(), v.float(), None, sliding_window=window)
        return
    out, _ = mt.attention_forward(module, q.float(), k.float(), v.float(), None, sliding_window=window)
    i = torch.arange(L_q).view(-1, 1) + (L_k - 1 if L_q == 1 else 0)  # the query's absolute position
    j = torch.arange(L_k).view(1, -1)
    allowed = (j <= i) if causal else torch.ones(L_q, L_k, dtype=torch.bool)
    if window is not None:
        allowed = allowed & (j > i - window)
    golden, _ = attend(q, k, v, allowed)
    naive, _ = attend(q.float(), k.float(), v.float(), allowed)
    assert max_err(out.transpose(1, 2), golden) <= 2 * max_err(naive, golden) + 1e-5
