#!/usr/bin/env bash
# Fill REPO/.whl/ with the wheels a GPU machine without network lacks, for benchmarks/gpu.sh
# (which installs them with `pip install --no-index --no-deps` before anything runs).
#
#   benchmarks/gpu_wheels.sh            # target: CPython 3.12, manylinux x86_64 (the GPU image)
#   PY_VERSION=3.11 benchmarks/gpu_wheels.sh
#   EXTRA_PACKAGES="tensorboard tokenizers" benchmarks/gpu_wheels.sh   # more, with their dependencies
#
# The image is assumed to have torch, Triton, numpy, PyYAML and the rest of a torch install; this
# fetches DeepSpeed (built here into a pure-Python wheel: PyPI has only its sdist; no ops are
# prebuilt, so FusedAdam is JIT-compiled on the GPU machine, which needs nvcc and ninja there) and
# what DeepSpeed, webdataset and soundfile need beyond that. numpy and torch are never fetched: a
# wheel here replaces the image's copy. Needs pip with network access and a local deepspeed-
# compatible torch (the build imports it). gpu.sh's import check names anything still missing.
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dest=${repo_root}/.whl
py_version=${PY_VERSION:-3.12}
abi=cp${py_version/./}
python=${PYTHON:-python3}
platform=(--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64
          --platform manylinux_2_5_x86_64 --platform linux_x86_64)
target=(--only-binary=:all: --python-version "$py_version" --implementation cp --abi "$abi" --abi abi3 --abi none
        "${platform[@]}")
mkdir -p "$dest"

# small packages, with their own dependencies
"$python" -m pip download --quiet "${target[@]}" -d "$dest" \
    pydantic hjson msgpack py-cpuinfo ninja einops psutil nvidia-ml-py braceexpand cffi pycparser \
    aiohttp loguru frozendict safetensors
if [[ -n "${EXTRA_PACKAGES:-}" ]]; then
    # shellcheck disable=SC2086  # a list of names
    "$python" -m pip download --quiet "${target[@]}" -d "$dest" ${EXTRA_PACKAGES}
fi
# these depend on numpy (and webdataset on PyYAML), which the image has: no dependencies
"$python" -m pip download --quiet "${target[@]}" --no-deps -d "$dest" webdataset soundfile
# these depend on torch (which the image has): no dependencies
"$python" -m pip download --quiet "${target[@]}" --no-deps -d "$dest" vector-quantize-pytorch \
    torch-einops-utils einx
# DeepSpeed: the version installed here, built without ops
ds_version=$("$python" -c "import importlib.metadata as m; print(m.version('deepspeed'))" 2>/dev/null || echo "")
DS_BUILD_OPS=0 "$python" -m pip wheel --quiet --no-deps --no-build-isolation -w "$dest" "deepspeed${ds_version:+==$ds_version}"
rm -f "$dest"/numpy-*.whl "$dest"/torch-*.whl
ls -l "$dest"
du -sh "$dest"
