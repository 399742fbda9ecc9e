#!/usr/bin/env bash
# The wheels benchmarks/device_check.py needs on the lent GPU machine, gathered here into .whl/
# (git-ignored, in the repository root), to be carried there with the working tree.
#
#   bash benchmarks/device_wheels.sh          # here, with network access to PyPI; idempotent
#
# That machine has Python 3.12, torch (CUDA), transformers, peft, accelerate, safetensors, numpy,
# pyyaml, tokenizers and Pillow, but no network and none of: pydantic (docrl's config sections),
# DeepSpeed (the learner's engine) and its small pure dependencies, colpali-engine (ColQwen2.5).
# Every wheel is pinned to the version docrl's .venv runs (uv.lock); the binary ones are the
# CPython 3.12 manylinux x86_64 builds. DeepSpeed publishes only a source distribution: it is
# built here as a pure-Python wheel without prebuilt ops (DS_BUILD_OPS=0; the learner uses
# torch.optim.AdamW, so no op is ever compiled). On the machine:
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#
# A call to that machine carries at most 64 MiB (working tree included): this script fails when
# the wheels reach 48 MiB. Not needed by CI (the dry run uses .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
WHL=.whl
mkdir -p "$WHL"

# name==version, as `.venv` has them installed (DeepSpeed's own requirements: einops, hjson,
# msgpack, ninja, psutil, py-cpuinfo, pydantic; pydantic's: pydantic-core, annotated-types,
# typing-inspection, typing-extensions >= 4.16, newer than torch's wheels may bring)
BINARY=(pydantic-core==2.50.5 msgpack==1.2.4 psutil==7.2.2 ninja==1.13.2)
PURE=(pydantic==2.14.4 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
      hjson==3.1.0 py-cpuinfo==9.0.0 einops==0.8.2 colpali-engine==0.3.18)
DEEPSPEED=deepspeed==0.19.8
LIMIT_MIB=48

# The wheel of name==version already in .whl/ (wheel names spell "-" as "_"), or nothing.
wheel_of() {
  local name=${1%%==*} version=${1##*==}
  ls "$WHL" | grep -i -E "^${name//-/_}-${version}-.*\.whl$" | head -n 1 || true
}

for spec in "${BINARY[@]}" "${PURE[@]}"; do
  if [[ -n "$(wheel_of "$spec")" ]]; then continue; fi
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$WHL" "$spec"
done

if [[ -z "$(wheel_of "$DEEPSPEED")" ]]; then
  # No build isolation tricks needed: without torch in the build environment DeepSpeed's setup.py
  # compiles nothing and writes a py3-none-any wheel.
  DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps --no-cache-dir -w "$WHL" "$DEEPSPEED"
fi
ds_wheel=$(wheel_of "$DEEPSPEED")
if [[ "$ds_wheel" != *-py3-none-any.whl ]]; then
  echo "device_wheels: $ds_wheel is not a pure-Python wheel (built with ops?)" >&2
  exit 1
fi

# Check that the built DeepSpeed imports from the wheel alone (with .venv's torch), as it will there.
if [[ -x .venv/bin/python && ! -f "$WHL/.deepspeed-checked" ]]; then
  tmp=$(mktemp -d)
  .venv/bin/python -m pip --version >/dev/null 2>&1 && pip_cmd=(.venv/bin/python -m pip) || pip_cmd=(python3 -m pip)
  "${pip_cmd[@]}" install -q --no-index --no-deps --no-compile --target "$tmp" "$WHL/$ds_wheel"
  PYTHONPATH="$tmp" .venv/bin/python -c "
import deepspeed, sys
assert deepspeed.__file__.startswith('$tmp'), deepspeed.__file__
from deepspeed.git_version_info import installed_ops
assert not any(installed_ops.values()), installed_ops
print('device_wheels: deepspeed', deepspeed.__version__, 'imports from the wheel, no prebuilt ops')"
  rm -rf "$tmp"
  touch "$WHL/.deepspeed-checked"
fi

# Sizes: every wheel, then the total against the limit.
total=0
for f in "$WHL"/*.whl; do
  size=$(stat -c %s "$f")
  total=$((total + size))
  awk -v s="$size" -v n="$(basename "$f")" 'BEGIN { printf "%8.2f MiB  %s\n", s / 1048576, n }'
done
awk -v s="$total" 'BEGIN { printf "%8.2f MiB  total\n", s / 1048576 }'
if (( total >= LIMIT_MIB * 1048576 )); then
  echo "device_wheels: the wheels total ${total} bytes, over the ${LIMIT_MIB} MiB limit (a call carries 64 MiB)" >&2
  exit 1
fi
