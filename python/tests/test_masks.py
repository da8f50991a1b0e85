"""Masks as values: one grammar with the Rust crate (repr prints it, ``maskattn.mask``
reads it), pickling across processes, copying block masks, ``from_mask_mod``'s return
value, and long chains."""

import copy
import io
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch

import maskattn
from maskattn import _maskattn as native
from reference import attend

B, H, L = 2, 2, 70


def qkv(seed=0, b=B, h=H, lq=L, lk=L, d=8):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g) for n in (lq, lk, lk)]


LENGTHS = torch.tensor([50, 13])
IDS = (torch.arange(L) // 23).view(1, L).repeat(B, 1)
DENSE = torch.rand(1, 1, L, L, generator=torch.Generator().manual_seed(3)) < 0.7
DATA = {"key_padding": LENGTHS, "documents": IDS, "dense": DENSE}


def structured_examples():
    """One mask per structured term of the kernel crate's list, built by the generated
    constructor with small numbers that fit (L, L) = (70, 70): the grid masks need
    height × width = L_k (and swin a window dividing both sides)."""
    numbers = {
        "neighbourhood": (7, 10, 1),
        "natten": (7, 10, 3, 2),
        "swin": (7, 10, 1, 0),
        "prefix": (5,),
    }
    out = []
    for name, params, repeats, is_data, _doc, _optional in native.terms():
        if is_data:
            continue
        args = numbers.get(name, tuple(range(3, 3 + len(params))))
        out.append((name, getattr(maskattn, name.replace("-", "_"))(*args)))
    return out


def examples():
    s = dict(structured_examples())
    kp, docs, dense = maskattn.key_padding(LENGTHS), maskattn.documents(IDS), maskattn.dense(DENSE)
    return list(s.items()) + [
        ("key-padding", kp),
        ("documents", docs),
        ("dense", dense),
        ("tree", maskattn.causal() & ~maskattn.window(3, 0) | (docs & kp)),
        ("not-or", ~(maskattn.chunks(16) | dense) & maskattn.prefix(2)),
    ]


def outputs(m, seed=0):
    q, k, v = qkv(seed)
    return maskattn.attention(q, k, v, m)


def test_every_structured_term_has_a_generated_constructor():
    terms = native.terms()
    structured = [t[0] for t in terms if not t[3]]
    assert "window" in structured and "block-causal" in structured
    for name in structured:
        f = getattr(maskattn, name.replace("-", "_"))
        assert f.__name__ == name.replace("-", "_") and name in f.__doc__
        assert name.replace("-", "_") in maskattn.__all__
    # The data terms the package binds by keyword; the rest are refused by name.
    data = {t[0] for t in terms if t[3]}
    assert data == {"key-padding", "documents", "dense", "query-padding", "fn", "per-head"}
    with pytest.raises(ValueError, match="`fn` cannot be bound"):
        maskattn.mask("causal & fn")


def test_repr_is_the_rust_grammar():
    w, c = maskattn.window(3, 0), maskattn.causal()
    assert repr(c & ~w) == "causal & !window(3,0)"
    assert str(c & ~w) == "causal & !window(3,0)"
    assert repr(maskattn.causal() & maskattn.key_padding(LENGTHS)) == "causal & key-padding"
    assert repr((c | w) & maskattn.block_causal(4)) == "(causal | window(3,0)) & block-causal(4)"
    assert repr(c | w & maskattn.full()) == "causal | window(3,0) & full"
    assert repr(~~c) == "causal"
    assert repr(~(c & w)) == "!(causal & window(3,0))"
    assert repr(maskattn.neighbourhood(2, 3, 1)) == "neighbourhood(2,3,1)"
    assert repr(maskattn.prefix(2, 5)) == "prefix(2,5)"
    # A chain prints flat however it associates, as Rust's `&` keeps it.
    assert repr(c & (w & maskattn.full())) == repr((c & w) & maskattn.full()) == "causal & window(3,0) & full"
    # And equals the Display of the Rust mask the kernels run, parsed by the Rust parser.
    for name, m in examples():
        rust = maskattn.masks._build(m._id, m._tensors)
        assert repr(m) == str(rust), name
        program = [("expr", repr(m), [])]
        stand_ins = [maskattn.masks._data_native(n, maskattn.masks._PLACEHOLDERS[n]) for n, _ in native.parse(repr(m))]
        assert str(native.build(program, stand_ins)) == repr(m), name


@pytest.mark.parametrize("name,m", examples(), ids=[n for n, _ in examples()])
def test_mask_of_repr_is_the_same_mask(name, m):
    kw = {k: v for k, v in DATA.items() if k.replace("_", "-") in repr(m)}
    back = maskattn.mask(repr(m), **kw)
    assert repr(back) == repr(m)
    a, b = m.compile(B, H, L, L), back.compile(B, H, L, L)
    assert (a.skipped_tile_fraction, a.hidden_pair_fraction) == (b.skipped_tile_fraction, b.hidden_pair_fraction)
    assert torch.equal(outputs(m), outputs(back)), name
    assert torch.equal(outputs(a), outputs(back)), name


def test_mask_binds_data_by_keyword_one_tensor_or_a_list_in_order():
    q, k, v = qkv()
    other = torch.tensor([7, 70])
    j = torch.arange(L).view(1, 1, 1, L)
    first = j < LENGTHS.view(B, 1, 1, 1)
    second = j < other.view(B, 1, 1, 1)
    causal = torch.arange(L).view(L, 1) >= torch.arange(L).view(1, L)
    # One tensor binds every occurrence.
    m = maskattn.mask("key-padding & (causal | !key-padding)", key_padding=LENGTHS)
    want = attend(q.double(), k.double(), v.double(), first & (causal | ~first))[0]
    assert (maskattn.attention(q, k, v, m).double() - want).abs().max() < 1e-5
    # A list binds them in the order they appear, which is the order repr writes them.
    m = maskattn.mask("key-padding & (causal | !key-padding)", key_padding=[LENGTHS, other])
    want = attend(q.double(), k.double(), v.double(), first & (causal | ~second))[0]
    assert (maskattn.attention(q, k, v, m).double() - want).abs().max() < 1e-5
    built = maskattn.key_padding(LENGTHS) & (maskattn.causal() | ~maskattn.key_padding(other))
    assert repr(built) == "key-padding & (causal | !key-padding)"
    again = maskattn.mask(repr(built), key_padding=list(built._tensors))
    assert torch.equal(maskattn.attention(q, k, v, again), maskattn.attention(q, k, v, built))


def test_mask_refuses_bad_text_and_keywords_by_name():
    with pytest.raises(ValueError, match="unknown mask term `casual`"):
        maskattn.mask("casual & window(3,0)")
    with pytest.raises(ValueError, match="two numbers"):
        maskattn.mask("window(3)")
    with pytest.raises(ValueError, match="at byte 9: unexpected `&`"):
        maskattn.mask("causal & & full")
    with pytest.raises(TypeError, match="unexpected keyword argument 'lengths'"):
        maskattn.mask("causal & key-padding", lengths=LENGTHS)
    with pytest.raises(TypeError, match="bind it with key_padding="):
        maskattn.mask("causal & key-padding")
    with pytest.raises(TypeError, match="documents= given"):
        maskattn.mask("causal", documents=IDS)
    with pytest.raises(ValueError, match="lists 1 tensors for the 2"):
        maskattn.mask("key-padding | key-padding", key_padding=[LENGTHS])
    with pytest.raises(TypeError, match="not a torch.bool"):
        maskattn.mask("key-padding", key_padding=torch.ones(2, dtype=torch.bool))
    with pytest.raises(TypeError, match="must be a str"):
        maskattn.mask(maskattn.causal())
    with pytest.raises(ValueError, match="chunk size must be at least 1"):
        maskattn.chunks(0)
    with pytest.raises(ValueError, match="left must be an int"):
        maskattn.window(-1, 0)
    with pytest.raises(TypeError, match="takes 2 numbers"):
        maskattn.window(1)


def test_key_padding_refuses_a_bool_tensor():
    # A bool tensor read as lengths would be 0s and 1s; the keep-vector form is dense.
    with pytest.raises(TypeError, match="torch.bool.*dense"):
        maskattn.key_padding(torch.tensor([True, False]))
    with pytest.raises(TypeError, match="float32"):
        maskattn.key_padding(torch.tensor([1.0, 2.0]))


# Run in a fresh interpreter: mask ids there are handed out in another order, so a pickled
# id would name another structure (or none).
CHILD = textwrap.dedent(
    """
    import sys, torch, maskattn
    # Intern some structures first, so this process's ids differ from the parent's.
    for n in range(50):
        maskattn.window(n, n + 1) & maskattn.chunks(n + 1)
    data = torch.load(sys.argv[1])  # weights_only, torch's default
    q, k, v = data["qkv"]
    outs = {name: (repr(m), maskattn.attention(q, k, v, m)) for name, m in data["masks"].items()}
    torch.save(outs, sys.argv[2])
    """
)


def test_masks_pickle_by_text_and_mean_the_same_in_a_fresh_process(tmp_path):
    q, k, v = qkv(5)
    masks = {
        "window": maskattn.window(3, 0),
        "documents": maskattn.documents(IDS),
        "key_padding": maskattn.key_padding(LENGTHS),
        "tree": maskattn.causal() & ~maskattn.window(3, 0) | (maskattn.documents(IDS) & maskattn.key_padding(LENGTHS)),
        "parsed": maskattn.mask("block-causal(8) & !dense", dense=DENSE),
    }
    src, dst = tmp_path / "in.pt", tmp_path / "out.pt"
    torch.save({"qkv": (q, k, v), "masks": masks}, src)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(src), str(dst)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    outs = torch.load(dst, weights_only=False)
    for name, m in masks.items():
        text, out = outs[name]
        assert text == repr(m), name
        assert torch.equal(out, maskattn.attention(q, k, v, m)), name
    # In this process too, and the pickle holds no id.
    for name, m in masks.items():
        back = pickle.loads(pickle.dumps(m))
        assert repr(back) == repr(m)
        assert torch.equal(maskattn.attention(q, k, v, back), maskattn.attention(q, k, v, m)), name
    state = m.__reduce__()[1]
    assert state[0] == repr(m) and all(isinstance(t, torch.Tensor) for t in state[1])


def test_block_mask_copies_outlive_the_original():
    import gc

    q, k, v = qkv(1)
    block = maskattn.window(5, 2).compile(B, H, L, L)
    want = maskattn.attention(q, k, v, block)
    shallow, deep = copy.copy(block), copy.deepcopy(block)
    del block
    gc.collect()
    assert torch.equal(maskattn.attention(q, k, v, shallow), want)
    assert torch.equal(maskattn.attention(q, k, v, deep), want)


class Layer(torch.nn.Module):
    """A layer that keeps its compiled mask, as models precompile one per shape."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)
        self.block = (maskattn.causal() & maskattn.key_padding(LENGTHS)).compile(B, H, L, L)

    def forward(self, q, k, v):
        return maskattn.attention(self.proj(q), k, v, self.block)


def test_a_module_holding_a_block_mask_deep_copies_and_pickles():
    q, k, v = qkv(2)
    layer = Layer()
    want = layer(q, k, v)
    teacher = copy.deepcopy(layer)  # as an EMA or teacher copy is made
    assert teacher.block._id != layer.block._id
    del layer
    assert torch.equal(teacher(q, k, v), want)
    buf = io.BytesIO()
    torch.save(teacher, buf)
    buf.seek(0)
    student = torch.load(buf, weights_only=False)  # a whole module needs its class
    assert student.block.shape == (B, H, L, L)
    assert torch.equal(student(q, k, v), want)
    buf = io.BytesIO()
    torch.save({"block": student.block}, buf)
    buf.seek(0)
    loaded = torch.load(buf)["block"]  # weights_only, torch's default
    assert torch.equal(maskattn.attention(q, k, v, loaded), maskattn.attention(q, k, v, student.block))
    again = pickle.loads(pickle.dumps(student.block))
    assert torch.equal(maskattn.attention(q, k, v, again), maskattn.attention(q, k, v, student.block))


@pytest.mark.parametrize(
    "returned,error,words",
    [
        (lambda b, h, q, kv: None, TypeError, "NoneType .a missing `return`"),
        (lambda b, h, q, kv: "yes", TypeError, "returned str"),
        (lambda b, h, q, kv: [True], TypeError, "returned list"),
        (lambda b, h, q, kv: (q >= kv).float() * float("nan"), TypeError, "torch.float32 tensor"),
        (lambda b, h, q, kv: q - kv, TypeError, "torch.int64 tensor"),
        (lambda b, h, q, kv: torch.ones(3, 5, dtype=torch.bool), ValueError, r"shape \(3, 5\)"),
    ],
    ids=["none", "str", "list", "nan", "int", "shape"],
)
def test_from_mask_mod_takes_only_a_bool_tensor(returned, error, words):
    with pytest.raises(error, match=f"mask_mod '<lambda>' .*{words}"):
        maskattn.from_mask_mod(returned, B, H, L, L)


def test_from_mask_mod_takes_bools_and_broadcast_shapes():
    q, k, v = qkv(3)
    full = maskattn.attention(q, k, v)
    assert torch.equal(maskattn.attention(q, k, v, maskattn.from_mask_mod(lambda b, h, i, j: True, B, H, L, L)), full)
    const = maskattn.from_mask_mod(lambda b, h, i, j: torch.tensor(True), B, H, L, L)
    assert torch.equal(maskattn.attention(q, k, v, const), full)
    causal = maskattn.from_mask_mod(lambda b, h, i, j: i >= j, B, H, L, L)
    assert torch.equal(maskattn.attention(q, k, v, causal), maskattn.attention(q, k, v, maskattn.causal()))


def test_a_long_chain_builds_in_linear_time_and_means_the_intersection():
    # 2,000 terms, every tenth one reading a tensor: once quadratic (and a recursion per
    # level when built), now each `&` is O(1) in the structure. The narrowest window is
    # window(51,0) (n = 1), the shortest key padding 54 (n % 7 == 6).
    q, k, v = qkv(4)
    m = maskattn.causal()
    for n in range(2000):
        m = m & (maskattn.key_padding(torch.tensor([60 - n % 7, 40])) if n % 10 == 0 else maskattn.window(50 + n, 0))
    assert len(m._tensors) == 200
    text = repr(m)
    assert text.count(" & ") == 2000 and "(" not in text.replace("window(", "")
    j = torch.arange(L)
    i = j.view(L, 1)
    allowed = (j <= i) & (i - j <= 51) & (j.view(1, 1, 1, L) < torch.tensor([54, 40]).view(B, 1, 1, 1))
    want = attend(q.double(), k.double(), v.double(), allowed)[0]
    assert (maskattn.attention(q, k, v, m).double() - want).abs().max() < 1e-5
    back = maskattn.mask(text, key_padding=list(m._tensors))
    assert torch.equal(maskattn.attention(q, k, v, back), maskattn.attention(q, k, v, m))


def test_domain_masks_take_their_optional_numbers_and_read_back():
    """natten's dilation and chunked's left context may be left out (or given as None);
    each prints in the Rust grammar and ``maskattn.mask`` reads it back. The definitions
    themselves are tested against their references in the kernel crate (domain_masks.rs)."""
    cases = [
        (maskattn.natten(7, 10, 3), "natten(7,10,3)"),
        (maskattn.natten(7, 10, 3, 2), "natten(7,10,3,2)"),
        (maskattn.natten(7, 10, 3, dilation=2), "natten(7,10,3,2)"),
        (maskattn.natten(7, 10, 3, None), "natten(7,10,3)"),
        (maskattn.swin(7, 10, 1, 0), "swin(7,10,1,0)"),
        (maskattn.chunked(8), "chunked(8)"),
        (maskattn.chunked(8, left=None), "chunked(8)"),
        (maskattn.chunked(8, 2), "chunked(8,2)"),
    ]
    for m, text in cases:
        assert repr(m) == text
        assert repr(maskattn.mask(repr(m))) == text
    import inspect

    assert str(inspect.signature(maskattn.chunked)) == "(c: int, left: int = None) -> maskattn.masks.Mask"
    assert "chunked(C[,LEFT])" in maskattn.chunked.__doc__
    assert "natten(HEIGHT,WIDTH,KERNEL[,DILATION])" in maskattn.natten.__doc__
    # The masks are what the kernels run: swin(.., 1, 0) is one patch alone, the identity.
    q, k, v = qkv(lq=70, lk=70)
    out = maskattn.attention(q, k, v, maskattn.swin(7, 10, 1, 0))
    torch.testing.assert_close(out, v)
    # chunked(c) is block-causal(c): the same pairs.
    a = maskattn.chunked(7).compile(B, H, L, L)
    b = maskattn.block_causal(7).compile(B, H, L, L)
    assert (a.skipped_tile_fraction, a.hidden_pair_fraction) == (b.skipped_tile_fraction, b.hidden_pair_fraction)
    with pytest.raises(TypeError, match="takes 1 to 2 numbers"):
        maskattn.chunked()
    for bad, want in [
        (lambda: maskattn.natten(7, 10, 4), "KERNEL must be odd"),
        (lambda: maskattn.natten(7, 10, 3, 3), "exceeds HEIGHT 7"),
        (lambda: maskattn.swin(7, 10, 2, 0), "WINDOW 2 must divide HEIGHT 7"),
        (lambda: maskattn.swin(8, 8, 4, 4), "SHIFT 4 must be less than WINDOW 4"),
        (lambda: maskattn.chunked(0, 1), "at least 1"),
        (lambda: maskattn.mask("natten(7,10,5,2)"), "exceeds HEIGHT 7"),
    ]:
        with pytest.raises(ValueError, match=want):
            bad()
    # A grid that is not L_k positions is refused when compiled, naming the shape.
    with pytest.raises(ValueError, match="a 7 x 9 natten grid needs L_k = 63, not 70"):
        maskattn.natten(7, 9, 3).compile(B, H, L, L)
