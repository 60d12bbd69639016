#!/usr/bin/env bash
# Creates .venv with CPU torch and hf-moe (editable, with the dev extra). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
# transformers' own generic model tests (tests/conformance) come from the source distribution of the installed
# transformers, unpacked into an ignored cache folder once per version; the tests themselves never download.
version=$(.venv/bin/python -c "import transformers; print(transformers.__version__)")
cache=".cache/transformers-tests/$version"
if [ ! -f "$cache/tests/test_modeling_common.py" ]; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    .venv/bin/python -m pip download --quiet --disable-pip-version-check --no-binary :all: --no-deps \
        "transformers==$version" -d "$tmp"
    mkdir -p "$tmp/unpacked"
    tar -xzf "$tmp/transformers-$version.tar.gz" -C "$tmp/unpacked" "transformers-$version/tests"
    mkdir -p "$(dirname "$cache")"
    rm -rf "$cache"
    mv "$tmp/unpacked/transformers-$version" "$cache"
fi
