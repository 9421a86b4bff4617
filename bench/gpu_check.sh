#!/usr/bin/env bash
# Everything only a GPU can show, in at most ~5 minutes on one GPU (docs/performance.md, "On a GPU").
#
#   bench/gpu_check.sh                                  # OUT defaults to ./gpu_check_out
#   OUT=/some/dir bench/gpu_check.sh
#   GPU_CHECK_SECTIONS="compile" bench/gpu_check.sh     # rerun some sections; the others' files stay
#   GPU_CHECK_BUDGET_S=290  GPU_CHECK_DRY=1  PYTHON=/path/to/python
#
# Sections, in this order, each under its own `timeout` (seconds), capped by what is left of the
# budget (GPU_CHECK_BUDGET_S, default 290, less 15 s for `timeout -k`); one that would get under
# 20 s is skipped:
#   env 60 (always first), step 110, data 60, eval 75, sweep 120, compile 150, ddp 90.
# What each measures: bench/gpu_check.py's docstring. GPU_CHECK_DRY=1 runs them on the CPU at toy
# sizes (checks the script; measures nothing). Written as each section ends, so a run killed at its
# time limit keeps what it measured:
#   $OUT/gpu_check.log    everything printed
#   $OUT/sections.csv     section,status,rc,seconds,timeout_s   (status: ok failed timeout skipped)
#   $OUT/<section>.json   the section's measurements (+ step.csv, compile.csv)
# Exit: 0 every section ok; 1 a section failed, timed out or was skipped, or the environment
# check itself failed; 3 no CUDA device (one line on stderr, within seconds; nothing else runs).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-./gpu_check_out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || { echo "gpu_check: cannot create OUT=$OUT" >&2; exit 2; }
PY=${PYTHON:-}
if [[ -z $PY ]]; then
    if [[ -x $ROOT/.venv/bin/python ]]; then PY=$ROOT/.venv/bin/python; else PY=$(command -v python3); fi
fi
BUDGET=${GPU_CHECK_BUDGET_S:-290}
SECTIONS=${GPU_CHECK_SECTIONS:-step data eval sweep compile ddp}
MIN_S=20
KILL_S=15  # `timeout -k`: a section that ignores SIGTERM is killed this much later
DRY_FLAG=""
[[ ${GPU_CHECK_DRY:-0} == 1 ]] && DRY_FLAG=--dry-run
LOG=$OUT/gpu_check.log
CSV=$OUT/sections.csv
export PYTHONUNBUFFERED=1 PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
cd "$ROOT" || exit 2

limit_of() {  # section -> its own timeout (s)
    case $1 in
        env) echo 60 ;; step) echo 110 ;; data) echo 60 ;; eval) echo 75 ;;
        sweep) echo 120 ;; compile) echo 150 ;; ddp) echo 90 ;; *) echo 0 ;;
    esac
}
for s in $SECTIONS; do
    [[ $(limit_of "$s") -gt 0 ]] || { echo "gpu_check: unknown section '$s' in GPU_CHECK_SECTIONS (known: step data eval sweep compile ddp)" >&2; exit 2; }
done

# -- no CUDA device: one line, non-zero, before anything else ---------------------------------------
START=$SECONDS
timeout -k 5 "$(limit_of env)" "$PY" bench/gpu_check.py env --out "$OUT" $DRY_FLAG >"$OUT/env.log" 2>&1
rc=$?
if (( rc == 2 )); then  # a one-line UserError: no CUDA device
    echo "gpu_check: $(tail -n 1 "$OUT/env.log"); log $OUT/env.log" >&2
    exit 3
elif (( rc != 0 )); then  # the environment itself is broken (an import, a hang)
    msg=$(tail -n 1 "$OUT/env.log")
    (( rc == 124 || rc == 137 )) && msg="it did not finish within $(limit_of env) s"
    echo "gpu_check: the environment check failed (rc $rc): ${msg:-no output}; log $OUT/env.log" >&2
    exit 1
fi

exec > >(tee -a "$LOG") 2>&1
echo "gpu_check $(date -u +%FT%TZ) on ${HOSTNAME:-?}: budget ${BUDGET}s, sections: env $SECTIONS${DRY_FLAG:+ (dry run)}"
echo "python $PY; code $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')" \
     "($(git -C "$ROOT" status --porcelain 2>/dev/null | wc -l) changed files); OUT $OUT"
command -v nvidia-smi >/dev/null && timeout 15 nvidia-smi
cat "$OUT/env.log"
[[ -s $CSV ]] || echo "section,status,rc,seconds,timeout_s" >"$CSV"
echo "env,ok,0,$((SECONDS - START)),$(limit_of env)" >>"$CSV"

failed=0
for name in $SECTIONS; do
    left=$(( BUDGET - (SECONDS - START) ))
    limit=$(limit_of "$name")
    (( limit > left - KILL_S )) && limit=$(( left - KILL_S ))
    if (( limit < MIN_S )); then
        echo "== $name: skipped (${left}s of the ${BUDGET}s budget left; rerun with GPU_CHECK_SECTIONS=\"$name\")"
        echo "$name,skipped,,0,$limit" >>"$CSV"
        failed=1
        continue
    fi
    echo
    echo "== $name (timeout ${limit}s, $(date +%T))"
    t0=$SECONDS
    timeout -k "$KILL_S" "$limit" "$PY" bench/gpu_check.py "$name" --out "$OUT" $DRY_FLAG
    rc=$?
    case $rc in 0) status=ok ;; 124 | 137) status=timeout ;; *) status=failed ;; esac
    (( rc == 0 )) || failed=1
    echo "$name,$status,$rc,$((SECONDS - t0)),$limit" >>"$CSV"
    echo "== $name: $status (rc $rc) in $((SECONDS - t0))s"
done

echo
echo "gpu_check: done in $((SECONDS - START))s; results in $OUT"
column -s, -t <"$CSV" 2>/dev/null || cat "$CSV"
exit $failed
