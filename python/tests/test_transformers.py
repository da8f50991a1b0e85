"""The Hugging Face transformers plug-in (``maskattn.transformers``).

Small random-init models built from configs (no download). A model's logits and every
parameter gradient are held to docs/design.md's accuracy rule at model scale:

    |maskattn_f32 − golden_f64|max ≤ 2 · |sdpa_f32 − golden_f64|max + ε

where the golden run is the same model with transformers' SDPA attention in float64 and
the naive run the same in float32 (eager attention where SDPA cannot run the model:
soft-capping, sinks), and ε = 1e-5 · max(1, |golden|max) per tensor (the
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


def _eager_f64(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None, **kwargs):
    """A golden for Gemma 2: transformers' Gemma 2 eager attention (scale, soft-cap, add the
    mask, softmax) with the softmax in the model's dtype — transformers' own computes it in
    float32 even in a float64 model (and then turns a row that sees nothing into NaN)."""
    assert not dropout and kwargs.get("s_aux") is None and kwargs.get("position_bias") is None
    rep = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    scores = query @ key.transpose(2, 3) * scaling
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if attention_mask is not None:
        scores = scores + attention_mask[..., : key.shape[2]]
    weights = scores.softmax(dim=-1)
    return (weights @ value).transpose(1, 2).contiguous(), weights


transformers.AttentionInterface.register("eager_f64", _eager_f64)
transformers.AttentionMaskInterface.register("eager_f64", mu.eager_mask)


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


def _model(cfg, cls=transformers.AutoModelForCausalLM, seed=0, **kw):
    torch.manual_seed(seed)
    return cls.from_config(cfg, attn_implementation="maskattn", **kw)


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
    assert set(go) == set(gg), "maskattn's run gave gradients to other parameters than the reference's"
    assert len(go) > 5
    for name in gg:
        _assert_rule(f"grad {name}", go[name], gn[name], gg[name])


def _check_against_sdpa(model, inputs, select, logits_of=lambda out: out.logits, reference=("sdpa", "sdpa")):
    """maskattn in float32 against ``reference`` = (the naive float32 run's attention, the
    golden float64 run's attention)."""
    torch.manual_seed(1)
    shape = logits_of(model(**inputs)).shape
    weight = torch.randn(shape, dtype=torch.float64)
    naive, golden = reference
    runs = [
        _run(model, impl, dtype, inputs, weight, select, logits_of)
        for impl, dtype in (("maskattn", torch.float32), (naive, torch.float32), (golden, torch.float64))
    ]
    _assert_model_rule(*runs)
    return runs


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


@pytest.mark.parametrize("pad", [None, "left", "holes", "empty_row"])
@pytest.mark.parametrize("lengths", [(200, 200, 0, 0), (7, 47, 40, 0), (1, 30, 50, 20)], ids=["square", "chunk", "offsets"])
def test_mask_unrecognised_function_is_compiled_tile_by_tile(pad, lengths):
    # Without use_vmap: from_mask_mod's tile-by-tile compilation, never an L_q x L_k tensor.
    def image_tokens(b, h, q, kv):
        return (kv >= 10) & (kv < 20) & (q >= 10) & (q < 20)

    L_q, L_k, q_off, kv_off = lengths
    function = mu.and_masks(mu.or_masks(mu.causal_mask_function, image_tokens), mu.chunked_overlay(16, torch.zeros(2, dtype=torch.long)))
    padding = _pad(pad, 2, kv_off + L_k)
    args = dict(batch_size=2, q_length=L_q, kv_length=L_k, q_offset=q_off, kv_offset=kv_off)
    ours = mt.mask_interface(mask_function=function, attention_mask=padding, **args)
    assert not ours.analytic and ours.mask_mod is not None, ours.description
    allowed = mu.sdpa_mask(mask_function=function, attention_mask=padding, allow_is_causal_skip=False, **args)
    _assert_same_attention(ours, allowed, 2, 2, L_q, L_k)
    block = ours.block(2)
    assert torch.equal(maskattn.ops._allowed(block._id, [], (2, 2, L_q, L_k)), allowed.expand(2, 2, L_q, L_k))
    if L_q == 200:
        # The interval pass followed transformers' functions: not every tile was evaluated.
        assert block._tiles_evaluated < 2 * 4 * 4


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


GENERATE = {
    # name: (model, the reference's (naive float32, golden float64) attention)
    "llama": (lambda: _model(_llama()), ("sdpa", "sdpa")),
    "mistral": (lambda: _model(_mistral()), ("sdpa", "sdpa")),
    "gemma2": (lambda: _model(_gemma2()), ("eager", "eager_f64")),
    "gpt_oss": (lambda: _gpt_oss_model(), ("eager", "eager")),
    "t5": (lambda: _model(_t5(), cls=transformers.AutoModelForSeq2SeqLM), ("sdpa", "sdpa")),
}


@pytest.mark.parametrize("cfg", sorted(GENERATE))
def test_greedy_generate_left_padding_token_for_token(cfg):
    """Greedy tokens equal the reference's, and every step's logits hold to the rule. Windows
    (7, 8) shorter than the prompt and its continuation exercise the sliding cache's offsets;
    Gemma 2 and GPT-OSS decode with soft-capping / sinks, T5 with its position bias."""
    make, (naive, golden) = GENERATE[cfg]
    model = make().eval()
    ids, am = _tokens(2, 12, seed=3), _pad("left", 2, 12).long()
    ids = ids * am
    runs = []
    for impl, dtype in (("maskattn", torch.float32), (naive, torch.float32), (golden, torch.float64)):
        m = copy.deepcopy(model).to(dtype)
        m.set_attn_implementation(impl)
        with torch.no_grad():
            out = m.generate(
                input_ids=ids,
                attention_mask=am,
                max_new_tokens=16,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
            )
        runs.append((out.sequences, torch.stack(out.logits)))
    (ours, ours_logits), (ref, naive_logits), (ref64, golden_logits) = runs
    assert ours.shape[1] == (1 if model.config.is_encoder_decoder else 12) + 16
    assert torch.equal(ours, ref) and torch.equal(ours, ref64)
    _assert_rule("generated logits", ours_logits, naive_logits, golden_logits)


# ---- what is not supported yet: a clear error naming the argument ----


@pytest.fixture
def mods(monkeypatch):
    """The score modifiers each maskattn.attention call received, so a test can say which
    path ran."""
    seen = []
    real = mt._attention

    def attention(q, k, v, mask=None, **kw):
        seen.append({n: kw.get(n) for n in ("softcap", "sinks", "bias")})
        return real(q, k, v, mask, **kw)

    monkeypatch.setattr(mt, "_attention", attention)
    return seen


def _gemma2():
    # A small cap and larger weights, so that tanh is far from linear on these scores.
    return transformers.Gemma2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=8,
        attn_logit_softcapping=2.0,
        initializer_range=0.1,
        attention_dropout=0.0,
        pad_token_id=0,
    )


def test_gemma2_softcap_sliding_logits_and_gradients(mods):
    cfg = _gemma2()
    assert cfg.layer_types == ["sliding_attention", "full_attention"]
    model = _model(cfg).train()
    ids, am = _tokens(2, 21), _pad("left", 2, 21).long()
    _check_against_sdpa(model, {"input_ids": ids, "attention_mask": am}, am.bool(), reference=("eager", "eager_f64"))
    assert mods and all(c["softcap"] == 2.0 and c["sinks"] is None and c["bias"] is None for c in mods)


def _gpt_oss(**kw):
    cfg = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=2,
        num_experts_per_tok=1,
        sliding_window=8,
        attention_dropout=0.0,
        pad_token_id=0,
    )
    cfg.update(kw)
    return transformers.GptOssConfig(**cfg)


def _gpt_oss_model():
    model = _model(_gpt_oss(), experts_implementation="eager")
    with torch.no_grad():  # sinks large enough to take a real share of each row's softmax
        for layer in model.model.layers:
            layer.self_attn.sinks.copy_(torch.linspace(-1.0, 2.0, 4))
    return model


def test_gpt_oss_sinks_logits_and_gradients(mods):
    model = _gpt_oss_model().train()
    assert model.config.layer_types == ["sliding_attention", "full_attention"]
    ids, am = _tokens(2, 19), _pad("right", 2, 19).long()
    inputs = {"input_ids": ids, "attention_mask": am}
    _, _, golden = _check_against_sdpa(model, inputs, am.bool(), reference=("eager", "eager"))
    sinks = [n for n in golden[1] if n.endswith("self_attn.sinks")]
    assert len(sinks) == 2 and all(golden[1][n].abs().max() > 1e-3 for n in sinks), "the sinks got no gradient"
    assert mods and all(c["sinks"] is not None and c["sinks"].requires_grad for c in mods)


def test_score_modifier_arguments_are_checked():
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(NotImplementedError, match="sinks"):  # per-token sinks (Inkling 2)
        mt.attention_forward(torch.nn.Module(), q, q, q, None, sinks=torch.zeros(1, 2, 5, 1))
    with pytest.raises(NotImplementedError, match="s_aux"):
        mt.attention_forward(torch.nn.Module(), q, q, q, None, s_aux=torch.zeros(2, 1))
    with pytest.raises(ValueError, match="softcap"):
        mt.attention_forward(torch.nn.Module(), q, q, q, None, softcap=-1.0)
    with pytest.raises(ValueError, match="position_bias"):
        mt.attention_forward(torch.nn.Module(), q, q, q, None, position_bias=torch.zeros(1, 3, 5, 5))


def test_attention_dropout_runs_while_training():
    model = _model(_llama(attention_dropout=0.3)).train()
    ids = _tokens(2, 30)
    torch.manual_seed(5)
    a = model(ids).logits
    torch.manual_seed(5)
    b = model(ids).logits
    torch.manual_seed(6)
    c = model(ids).logits
    assert torch.equal(a, b) and not torch.equal(a, c), "dropout is not applied, or not from torch's generator"
    a.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    # Eval mode: transformers passes dropout 0, the logits equal a model without dropout.
    plain = _model(_llama(attention_dropout=0.0)).eval()
    assert torch.equal(model.eval()(ids).logits, plain(ids).logits)


def test_attention_dropout_is_the_kernels_dropout_with_its_weights():
    # One call as transformers makes it: the same seed draw as maskattn.attention's, and the
    # weights returned with output_attentions are the dropped ones that produced the output.
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 20, 8, generator=g) for h in (4, 2, 2))
    module = torch.nn.Module()
    module.is_causal = False
    torch.manual_seed(3)
    ours, weights = mt.attention_forward(module, q, k, v, None, dropout=0.4, output_attentions=True)
    torch.manual_seed(3)
    direct = maskattn.attention(q, k, v, dropout_p=0.4)
    assert torch.equal(ours, direct.transpose(1, 2).contiguous())
    assert (weights == 0).float().mean() > 0.3  # about p of the pairs dropped
    again = (weights.double() @ v.double().repeat_interleave(2, dim=1)).transpose(1, 2)
    assert max_err(ours, again) < 1e-5


def _attentions(model, impl, dtype, inputs):
    m = copy.deepcopy(model).to(dtype)
    m.set_attn_implementation(impl)
    with torch.no_grad():
        out = m(**inputs, output_attentions=True)
    return out.attentions


@pytest.mark.parametrize("kind", ["llama_left_padding", "gpt_oss_sinks", "gemma2_softcap"])
def test_output_attentions_equal_eager(kind):
    if kind == "llama_left_padding":
        model, pad = _model(_llama()), "left"
    elif kind == "gpt_oss_sinks":
        model, pad = _gpt_oss_model(), "right"
    else:
        model, pad = _model(_gemma2()), "left"
    ids, am = _tokens(2, 21), _pad(pad, 2, 21).long()
    inputs = {"input_ids": ids, "attention_mask": am}
    ours = _attentions(model, "maskattn", torch.float32, inputs)
    naive = _attentions(model, "eager", torch.float32, inputs)
    # Left padding leaves query rows that see nothing: transformers' eager attention turns
    # them into NaN in float64 (which then reaches the next layer), eager_f64 does not.
    golden = _attentions(model, "eager" if kind == "gpt_oss_sinks" else "eager_f64", torch.float64, inputs)
    assert len(ours) == model.config.num_hidden_layers and ours[0].shape == (2, 4, 21, 21)
    # Rows of padding queries are compared nowhere: a left-padded one sees nothing, which eager
    # spreads evenly over the masked keys (or turns into NaN in float64) and maskattn gives 0.
    real = am.bool()[:, None, :, None]
    for n, (o, nv, gd) in enumerate(zip(ours, naive, golden)):
        assert torch.isfinite(o).all()
        _assert_rule(f"attentions[{n}]", *(torch.where(real, t, torch.zeros((), dtype=t.dtype)) for t in (o, nv, gd)))
        assert (o.sum(-1) <= 1 + 1e-5).all()


def test_additive_float_mask_is_a_bias_with_its_gradient():
    """A 4-d float mask a model or user builds: finite values are added to the scores (with
    their gradient), the dtype's minimum masks; a row that sees nothing gives 0."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, n, 8, generator=g, dtype=torch.float64) for n in (6, 9, 9))
    k, v = k[:, :2], v[:, :2]  # grouped-query heads, as a model passes them
    values = torch.randn(2, 1, 6, 9, generator=g, dtype=torch.float64)
    allowed = torch.rand(2, 1, 6, 9, generator=g) > 0.3
    allowed[0, 0, 2] = False  # a row that sees nothing
    module = torch.nn.Module()
    module.num_key_value_groups = 2
    dout = torch.randn(2, 6, 4, 8, generator=g, dtype=torch.float64)

    def run(fn, dtype):
        q_, k_, v_, b_ = (t.to(dtype).requires_grad_() for t in (q, k, v, values))
        mask = b_.masked_fill(~allowed, torch.finfo(dtype).min)
        out = fn(module, q_, k_, v_, mask)
        (out.double() * dout).sum().backward()
        return [out.detach()] + [t.grad for t in (q_, k_, v_, b_)]

    def eager(module, q_, k_, v_, mask):  # transformers' eager attention, rows that see nothing → 0
        k_, v_ = k_.repeat_interleave(2, dim=1), v_.repeat_interleave(2, dim=1)
        scores = (q_ @ k_.transpose(2, 3) / 8**0.5 + mask).softmax(dim=-1) * allowed
        return (scores @ v_).transpose(1, 2)

    ours = run(lambda *a: mt.attention_forward(*a)[0], torch.float32)
    naive, golden = run(eager, torch.float32), run(eager, torch.float64)
    assert ours[0].is_contiguous() and ours[0][0, 2].abs().max() == 0
    for name, o, n, gold in zip(["out", "dq", "dk", "dv", "dmask"], ours, naive, golden):
        _assert_rule(name, o, n, gold)
    assert golden[4].abs().max() > 1e-3
    # A 0 / min float mask is a boolean one: no bias reaches maskattn.
    zero_one = torch.zeros(2, 1, 6, 9).masked_fill(~allowed, -float("inf"))
    assert mt._tensor_mask(zero_one, 9)[1] is None
    with pytest.raises(ValueError, match="attention_mask"):
        mt.attention_forward(module, q.float(), k.float(), v.float(), zero_one.abs())


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


def _t5():
    return transformers.T5Config(
        vocab_size=VOCAB,
        d_model=64,
        d_kv=16,
        d_ff=96,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        dropout_rate=0.0,
        pad_token_id=0,
        decoder_start_token_id=0,
    )


def test_t5_position_bias_and_its_gradient(mods):
    """T5 passes its relative position bias as `position_bias` ([1, H, L_q, L_k], computed by
    the first layer's relative_attention_bias and reused by the others): maskattn's bias."""
    cfg = _t5()
    model = _model(cfg, cls=transformers.AutoModelForSeq2SeqLM).train()
    src, am = _tokens(2, 23), _pad("right", 2, 23).long()
    tgt, dam = _tokens(2, 13, seed=1), _pad("right", 2, 13).long()
    inputs = {"input_ids": src, "attention_mask": am, "decoder_input_ids": tgt, "decoder_attention_mask": dam}
    _, _, golden = _check_against_sdpa(model, inputs, dam.bool())
    tables = [n for n in golden[1] if n.endswith("relative_attention_bias.weight")]
    assert len(tables) == 2 and all(golden[1][n].abs().max() > 1e-3 for n in tables)
    # Self attention gets the bias (with its gradient); cross attention's zeros are left out.
    assert any(c["bias"] is not None and c["bias"].requires_grad for c in mods)
    assert any(c["bias"] is None for c in mods)


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
