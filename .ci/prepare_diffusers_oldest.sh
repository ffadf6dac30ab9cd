#!/usr/bin/env bash
# Installs the oldest diffusers that datosd supports (datosd/diffusers_version.py), with the transformers,
# huggingface_hub and tokenizers of its time, into .ci/diffusers-oldest (ignored by git), leaving the environment
# as it is: tests/test_diffusers_versions.py runs the diffusers tests with that folder first on PYTHONPATH.
# Needs PyPI once; a rerun with the folder in place does nothing. --no-deps: the packages' other requirements
# (numpy, requests, safetensors, regex, ...) are those the test extra installed.
set -euo pipefail
cd "$(dirname "$0")/.."
target=.ci/diffusers-oldest
# diffusers 0.27 imports huggingface_hub.cached_download (removed in hub 0.26) and transformers 4 names (FLAX_*)
packages="diffusers==0.27.0 transformers==4.38.2 huggingface_hub==0.20.3 tokenizers==0.15.2"
if [ "$(cat "$target/PACKAGES" 2>/dev/null)" = "$packages" ]; then
    exit 0
fi
rm -rf "$target" "$target.partial"
# shellcheck disable=SC2086  # one word per package
python -m pip install --quiet --no-deps --target "$target.partial" $packages
echo "$packages" > "$target.partial/PACKAGES"
mv "$target.partial" "$target"
