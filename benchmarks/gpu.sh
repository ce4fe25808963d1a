#!/usr/bin/env bash
# One-call GPU benchmark of mmtrain's kernels and training; results in DIR.
#
#   benchmarks/gpu.sh DIR                  # one GPU, < 10 minutes on an H200 (planned; see docs)
#   benchmarks/gpu.sh --dry-run DIR        # CPU, Triton interpreter, toy sizes, same code
#   benchmarks/gpu.sh DIR --stages a,b     # a subset: env correctness attention doc_attention
#                                          # dispatch rmsnorm cross_entropy train e2e tokenizers
#   benchmarks/gpu.sh DIR --stages e2e --e2e-runs 125m-zero2,125m-zero2-compile   # some e2e runs
#
# Each stage writes DIR/<stage>.json when it finishes; DIR/summary.md is written and printed last.
# Exit status 1 when a stage failed (an error, or outputs outside the stated tolerance), 2 when
# something a chosen stage needs is missing (checked before any stage starts; that stage is not
# run, the others are).
# If REPO/.whl/ holds wheels, a GPU run installs them first with `pip install --no-index --no-deps`
# (the GPU machine has no network; benchmarks/gpu_wheels.sh fills the folder).
# PYTHON selects the interpreter (default python3). See docs/benchmarks.md.
set -euo pipefail

usage() { echo "usage: $0 [--dry-run] DIR [--stages a,b,...]" >&2; exit 2; }

dry_run=()
if [[ "${1:-}" == "--dry-run" ]]; then
    dry_run=(--dry-run)
    shift
fi
[[ $# -ge 1 ]] || usage
out_dir=$1
shift

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python3}

shopt -s nullglob
wheels=("${repo_root}"/.whl/*.whl)
shopt -u nullglob
if [[ ${#wheels[@]} -gt 0 && ${#dry_run[@]} -eq 0 ]]; then  # the dry run uses this machine's packages
    echo "[gpu.sh] installing ${#wheels[@]} wheels from ${repo_root}/.whl (no index)" >&2
    if ! "$python" -m pip install --quiet --no-index --no-deps "${wheels[@]}" \
        && ! "$python" -m pip install --quiet --user --no-index --no-deps "${wheels[@]}"; then
        echo "[gpu.sh] pip could not install the wheels in ${repo_root}/.whl (see its message above)" >&2
        exit 2
    fi
fi

# Console scripts of the interpreter (ninja, for DeepSpeed's JIT builds) and of --user installs.
scripts=$("$python" -c 'import site, sysconfig; print(sysconfig.get_path("scripts") + ":" + site.getuserbase() + "/bin")')
export PATH="${scripts}:${PATH}"

# mmtrain is imported from the checkout, without installing it.
export PYTHONPATH="${repo_root}${PYTHONPATH:+:${PYTHONPATH}}"
if [[ ${#dry_run[@]} -gt 0 ]]; then
    # Triton reads this when kernels are defined, so it must be set before Python starts.
    export TRITON_INTERPRET=1
fi

mkdir -p "$out_dir"
exec "$python" "${repo_root}/benchmarks/gpu_bench.py" "${dry_run[@]}" "$out_dir" "$@"
