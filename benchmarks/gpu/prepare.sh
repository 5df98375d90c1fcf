#!/usr/bin/env bash
# Prepare what benchmarks/gpu/suite.sh needs on the lent H200, in the ignored folder .gpu/ (the one
# `carry` path of the device call), then print that call. Runs here (needs PyPI, not a GPU):
#
#   bash benchmarks/gpu/prepare.sh
#
# .gpu/whl/   the wheels the H200 image lacks (KINDS.md lists what it has): deepspeed (built here as a
#             pure-Python wheel; its sdist is all PyPI has) and what it needs beyond the image (hjson,
#             pydantic and its pieces), fla 0.6.0 (the op-speed baseline). The image's torch, triton,
#             transformers, tokenizers, safetensors, numpy, pyyaml, einops, msgpack, ninja, py-cpuinfo,
#             psutil are used as they are. lmstack itself is not a wheel: the working tree travels with
#             every call and the suite imports it from there, so an edit can never run stale.
# .gpu/data/  the embedded Shakespeare corpus tokenized by `lmstack prepare-data` (tiny.yaml's BPE),
#             for the engine step (the tokenizer is trained here: nothing can be fetched there).
# Python: $PYTHON (default python3) with lmstack importable (e.g. the project's venv).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
CARRY=.gpu
LIMIT=$((64 * 1024 * 1024))  # the device's limit on the tree that travels, carried paths included

if ! git check-ignore -q "$CARRY/x"; then
  echo "prepare.sh: $CARRY/ is not ignored by git (add '/$CARRY/' to .gitignore)" >&2
  exit 2
fi
rm -rf "$CARRY/whl" "$CARRY/data"
mkdir -p "$CARRY/whl"

# One version of each (two stop the install there). Pure-Python wheels but pydantic-core (cp312).
# typing-extensions: pydantic 2.14.4 requires >= 4.16.0 (its METADATA); the carried copy comes first
# on PYTHONPATH, so it must satisfy that (4.15.0 did not), and being newer it serves the image too.
"$PY" -m pip wheel -q --no-deps -w "$CARRY/whl" deepspeed==0.19.8
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$CARRY/whl" \
  fla-core==0.6.0 flash-linear-attention==0.6.0 \
  hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  typing-extensions==4.16.0
dupes=$(ls "$CARRY/whl" | sed 's/-[0-9].*//' | tr 'A-Z-' 'a-z_' | sort | uniq -d)
if [[ -n "$dupes" ]]; then
  echo "prepare.sh: more than one wheel of: $dupes" >&2
  exit 1
fi

"$PY" -m lmstack.cli prepare-data configs/tiny.yaml data.path="$CARRY/data" -q

# What travels: tracked files, untracked files git does not ignore, and the carried folder.
tree=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } | xargs -0 -r stat -c %s 2>/dev/null \
  | awk '{s += $1} END {print s + 0}')
carried=$(du -sb "$CARRY" | cut -f1)
total=$((tree + carried))
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
echo "wheels: $(ls "$CARRY/whl" | tr '\n' ' ')"
echo "size: tree $(mib "$tree") + $CARRY $(mib "$carried") = $(mib "$total") of $(mib "$LIMIT")"
if ((total > LIMIT)); then
  echo "prepare.sh: what would travel is over the device's 64 MiB limit" >&2
  exit 1
fi
cat <<CALL

The device call (tool run), verbatim:
  command:   bash benchmarks/gpu/suite.sh
  carry:     ["$CARRY"]
  timeout_s: 570
CALL
