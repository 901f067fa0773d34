#!/bin/bash
# Collects what results/gpu_run.sh returned into results/<task>/gpu/ and rebuilds the
# table (mean ± std over seeds) from everything collected so far; an xla_cache.tar.gz
# beside the archive becomes .xla_cache/ (carry it to the next device command).
#
#   bash results/gpu_collect.sh /work/.device/.../gpu_polyp.tar.gz
set -euo pipefail
archive=$(cd "$(dirname "${1:?usage: bash results/gpu_collect.sh gpu_<task>.tar.gz}")" && pwd)/$(basename "$1")
cd "$(dirname "$0")/.."
"${PYTHON:-python}" -m lcfed_jax.run.gpu_collect "$archive" "${@:2}"
