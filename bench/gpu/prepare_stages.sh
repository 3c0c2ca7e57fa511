#!/usr/bin/env bash
# Stage everything the H100 benchmark needs into folders of at most ~61 MB each, for a GPU machine with
# Python 3.12 and torch 2.11.0+cu130 but no vLLM and no network (see bench/gpu/README.md).
#
# usage: bench/gpu/prepare_stages.sh STAGE_DIR    (then copy STAGE_DIR/sN to .whlN in the repo root)
set -euo pipefail
out=${1:?usage: $0 STAGE_DIR}
shared=$(cd "$(dirname "$0")/../../.." && pwd)/shared/gpu/prepare-vllm-wheels.sh
bash "$shared" "$out"                                   # s0-s3: vLLM 0.24.0 in parts; s4: its dependencies
plat=(--only-binary=:all: --python-version 3.12 --implementation cp
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
      --platform manylinux_2_27_x86_64 --platform manylinux_2_31_x86_64)
tmp=$(mktemp -d)
python3 -m pip download -q "${plat[@]}" -d "$tmp" "dagster==1.13.27" pyarrow "pydantic-settings>=2.2" pyyaml click \
  "sqlalchemy>=2,<2.1" psutil "dagster-postgres==0.29.27" "psycopg2-binary>=2.9"
# what vllm's run_batch entry point imports beyond the stage-4 dependencies
python3 -m pip download -q "${plat[@]}" --no-deps -d "$tmp" model-hosting-container-standards==0.1.16 jmespath \
  supervisor annotated-doc
norm() { basename "$1" | sed -E 's/-[0-9].*//; s/_/-/g' | tr 'A-Z' 'a-z'; }
for f in "$out"/s4/deps/*.whl; do n=$(norm "$f"); for g in "$tmp"/*.whl; do [ "$(norm "$g")" = "$n" ] && rm -f "$g"; done; done
mkdir -p "$out/s5/dag" "$out/s6/dag"
mv "$tmp"/pyarrow-*.whl "$tmp"/grpcio-1*.whl "$out/s5/dag/"
mv "$tmp"/*.whl "$out/s6/dag/"
du -sh "$out"/s*
