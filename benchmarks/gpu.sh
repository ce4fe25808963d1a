#!/usr/bin/env bash
# One-call GPU benchmark of mmtrain's kernels and training step; results in DIR.
#
#   benchmarks/gpu.sh DIR              # one GPU (torch + Triton only), < 7 minutes on an H200
#   benchmarks/gpu.sh --dry-run DIR    # CPU, Triton interpreter, tiny sizes (~1 minute)
#
# Each stage writes DIR/<stage>.json when it finishes; DIR/summary.md is written and printed last.
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
# mmtrain is imported from the checkout, without installing it.
export PYTHONPATH="${repo_root}${PYTHONPATH:+:${PYTHONPATH}}"
if [[ ${#dry_run[@]} -gt 0 ]]; then
    # Triton reads this when kernels are defined, so it must be set before Python starts.
    export TRITON_INTERPRET=1
fi

mkdir -p "$out_dir"
exec "${PYTHON:-python3}" "${repo_root}/benchmarks/gpu_bench.py" "${dry_run[@]}" "$out_dir" "$@"
