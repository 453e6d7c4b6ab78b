#!/usr/bin/env bash
# Everything a lent GPU machine (H100 / H200, no package registry) should do, in one call
# of under 8 minutes (machine start not counted):
#
#   bash scripts/gpu_check.sh OUT_DIR
#   bash scripts/gpu_check.sh --quick OUT_DIR   # any machine, no GPU needed: every stage
#                                              # starts, at smoke sizes (~3 min)
#
# Nothing is installed: the package and the benchmarks run from this tree (PYTHONPATH, the
# benchmarks as `python -m benchmarks.<script>`) with the machine's torch / triton /
# transformers.
# Stages, each time-boxed so a slow one cannot eat the others (seconds, overridable as
# GPU_CHECK_<STAGE>=N; GPU_CHECK_BUDGET, default 440, caps the stages together; `timeout`
# kills a stage's whole process group):
#
#   env       GPU, driver, versions
#   build     (background, CPU) the C++/CUDA extensions in place, for this GPU's arch only;
#             cmake, ninja and pybind11 come with the image. If it fails, the cuda backend's
#             tests skip and its benchmark column is missing; the Triton path needs nothing.
#   compile   (background, CPU) scripts/gpu_compile_check.py with this machine's Triton
#             and nvcc: the compile matrix again, with the versions the GPU really runs
#   autotune  benchmarks.bench_autotune: the tuner's choices, fixed vs tuned time,
#             the forward's teacher-read bandwidth against the device copy bandwidth
#   tests     the `gpu` tests (pytest -m gpu, 8 processes; among them the Triton
#             linear_logits_kl against its oracle at a Llama vocabulary, 3 dtypes)
#   attn      bench_attention_kl --gpu: fused fwd+bwd vs the published eager path and vs
#             plain SDPA fwd+bwd, bf16, L = 1024 / 4096, all rows
#   llama     bench_llama_step --gpu: patched replay step vs a plain SDPA step, Llama-2-7B
#             layer shapes (4 layers), L = 1024 / 4096
#   logits    bench_logits_kl --gpu: fused linear_logits_kl vs materialised logits +
#             logits_kl, forward + backward, bf16, T = 8192, Hd = 4096, V = 32000 / 128256
#             (last: it gets what the budget has left)
#
# Every benchmark writes into OUT_DIR (--out), nothing reads or writes benchmarks/results.
# OUT_DIR keeps at most 8 files (what the device tool brings back): gpu_check.log (every
# stage's output), summary.txt (the table printed last), attention_kl_cuda.csv,
# llama_step_cuda.csv, linear_logits_kl_cuda.csv, autotune_cuda.csv,
# autotune_candidates_cuda.csv, extra.tar.gz (per-stage logs, the compile tables, test
# report, plots and any other file a stage left in OUT_DIR).
#
# --quick: a dry run of the same stages on CPU (no build; compile matrix for 4 specs on
# sm_90; the gpu tests collected, not run; autotune and each benchmark --quick).
set -uo pipefail
shopt -s nullglob
cd "$(dirname "$0")/.."
quick=0
if [[ ${1:-} == --quick ]]; then quick=1; shift; fi
out=${1:?usage: gpu_check.sh [--quick] OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d)
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 MPLBACKEND=Agg
export TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1}
unset TRITON_INTERPRET
start=$(date +%s)
budget=${GPU_CHECK_BUDGET:-440}
log=$out/gpu_check.log
: > "$log"
summary=()

note() { echo "$*" | tee -a "$log"; }

# stage NAME SECONDS CMD...: run CMD time-boxed (never past the overall budget), output in
# $work/NAME.log and, shortened, in gpu_check.log; one line in the summary.
stage() {
  local name=$1 want=$2; shift 2
  local var="GPU_CHECK_${name^^}"
  want=${!var:-$want}
  local left=$(( budget - ($(date +%s) - start) ))
  local t=$(( want < left ? want : left ))
  if (( t < 15 )); then
    summary+=("$(printf '%-9s %-8s %5s s  %s' "$name" SKIPPED 0 "overall budget of ${budget} s spent")")
    note "== $name: skipped (budget spent)"
    return 0
  fi
  note "== $name (at most $t s): $*"
  local t0=$(date +%s)
  timeout -k 10 "$t" "$@" > "$work/$name.log" 2>&1
  local rc=$? dt=$(( $(date +%s) - t0 )) st=ok
  (( rc == 124 || rc == 137 )) && st=TIMEOUT
  (( rc != 0 && rc != 124 && rc != 137 )) && st="FAIL($rc)"
  if (( $(wc -l < "$work/$name.log") > 400 )); then
    head -n 100 "$work/$name.log" >> "$log"; echo "[... see extra.tar.gz: $name.log ...]" >> "$log"
    tail -n 250 "$work/$name.log" >> "$log"
  else
    cat "$work/$name.log" >> "$log"
  fi
  summary+=("$(printf '%-9s %-8s %5d s  %s' "$name" "$st" "$dt" "$(stage_note "$name")")")
  note "== $name: $st after $dt s"
  return 0
}

# The line of a stage's output that says how it went.
stage_note() {
  local f=$work/$1.log
  case $1 in
    tests) grep -E '[0-9]+ (passed|failed)|tests collected' "$f" | tail -n 1 ;;
    compile) grep -E '^RESULT|^FAIL|SKIP' "$f" | head -n 3 | tr '\n' ' ' ;;
    build) grep -E "CUDA extension|error" "$f" | tail -n 1 ;;
    autotune) grep -c ' tuned ' "$f" | sed 's/$/ points measured/' ;;
    attn) grep -E 'vs (eager|sdpa).*L= *4096' "$f" | head -n 2 | tr -s ' ' | tr '\n' ';' ;;
    llama) grep -E '^target|patched/plain' "$f" | tail -n 2 | tr -s ' ' | tr '\n' ';' ;;
    logits) grep -E 'fused-dense: .*than materialised' "$f" | tr -s ' ' | tr '\n' ';' ;;
    *) tail -n 1 "$f" ;;
  esac
}

# ---- env -----------------------------------------------------------------------------------
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv || true
  "$PY" -c "import sys, torch, triton, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__); print('gpu', torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
  nvcc --version | tail -n 1 || true
  nproc
} > "$work/env.log" 2>&1
cat "$work/env.log" >> "$log"
cap=$("$PY" -c "import torch; print('%d%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo 90)
summary+=("$(printf '%-9s %-8s %5d s  %s' env ok 0 "$(grep -m1 '^gpu' "$work/env.log")")")

# ---- background: extension build and compile matrix (CPU only) -------------------------
# Each writes NAME.rc and NAME.time (its own run time) when it ends.
background() {   # name seconds cmd...
  local name=$1 t=$2; shift 2
  ( t0=$(date +%s); timeout -k 10 "$t" "$@" > "$work/$name.log" 2>&1 & tp=$!
    echo "$tp" > "$work/$name.pid"; wait "$tp"; echo $? > "$work/$name.rc"
    echo $(( $(date +%s) - t0 )) > "$work/$name.time" ) &
}
build_ext() {
  SEEKR_BUILD_CUDA=1 SEEKR_CUDA_ARCHS=$cap CMAKE_BUILD_PARALLEL_LEVEL=8 "$PY" setup.py -q build_ext --inplace
  local rc=$?
  "$PY" -c "from seekr_kernels import _backend as b; print('CUDA extension', 'built' if b.native_cuda() else 'NOT built', '| C++ extension', 'built' if b.native_cpu() else 'NOT built')"
  return $rc
}
export -f build_ext
export cap PY
if (( quick )); then    # no extension build: it would compile CUDA code into the tree
  mkdir -p "$work"; echo "skipped (--quick)" > "$work/build.log"; echo 0 > "$work/build.rc"
  echo 0 > "$work/build.time"; build_pid=
else
  background build "${GPU_CHECK_BUILD:-150}" bash -c build_ext
  build_pid=$!
fi
mkdir -p "$work/compile"
compile_args=(--jobs 4)
(( quick )) && compile_args=(--jobs 2 --parts triton --archs 90 --only linear_logits_kl_rows)
background compile "${GPU_CHECK_COMPILE:-360}" "$PY" scripts/gpu_compile_check.py "${compile_args[@]}" \
  --out "$work/compile"
compile_pid=$!

# Summary line of a background job once it has ended.
background_done() {
  local name=$1 rc st
  rc=$(cat "$work/$name.rc" 2>/dev/null || echo 143)
  st=ok; (( rc != 0 )) && st="FAIL($rc)"; (( rc == 124 || rc == 137 || rc == 143 )) && st=TIMEOUT
  cat "$work/$name.log" >> "$log"
  summary+=("$(printf '%-9s %-8s %5s s  %s' "$name" "$st" "$(cat "$work/$name.time" 2>/dev/null || echo '?')" \
    "(background) $(stage_note "$name")")")
}

# ---- GPU stages ------------------------------------------------------------------------------
# Each stage's arguments on the GPU, and (--quick) at smoke sizes on whatever machine this is.
if (( quick )); then
  autotune_args=(--quick); tests_args=(--collect-only); bench_args=(--quick)
  attn_args=(); llama_args=(); logits_args=()
else
  autotune_args=(--dtypes bfloat16 --head-dims 128 64 --lengths 1024 4096); tests_args=(); bench_args=(--gpu)
  attn_args=(--lengths 1024 4096 --queries 0 --reps 5); llama_args=(--lengths 1024 4096 --reps 3)
  logits_args=(--reps 3)
fi

stage autotune 75 "$PY" -m benchmarks.bench_autotune --out "$out" "${autotune_args[@]}"

[ -n "$build_pid" ] && wait "$build_pid"
background_done build

xdist=(); "$PY" -c "import xdist" 2>/dev/null && (( ! quick )) && xdist=(-n 8)
ptime=(); "$PY" -c "import pytest_timeout" 2>/dev/null && ptime=(--timeout 120)
stage tests 130 env SEEKR_TEST_GPU=1 "$PY" -m pytest -q -m gpu "${xdist[@]}" "${ptime[@]}" -p no:cacheprovider \
  --junitxml="$work/gpu_tests.xml" "${tests_args[@]}" tests

stage attn 90 "$PY" -m benchmarks.bench_attention_kl "${bench_args[@]}" "${attn_args[@]}" --out "$out"
stage llama 110 "$PY" -m benchmarks.bench_llama_step "${bench_args[@]}" --methods plain patched \
  "${llama_args[@]}" --out "$out"
stage logits 75 "$PY" -m benchmarks.bench_logits_kl "${bench_args[@]}" --section linear \
  --impls materialised fused-dense "${logits_args[@]}" --out "$out"

# The compile matrix has had the whole run; give it what is left of the budget, then stop it.
left=$(( budget + 15 - ($(date +%s) - start) ))
( sleep $(( left > 1 ? left : 1 )); kill "$(cat "$work/compile.pid")" 2>/dev/null ) & watchdog=$!
wait "$compile_pid"
kill "$watchdog" 2>/dev/null
background_done compile

# ---- collect ---------------------------------------------------------------------------------
# OUT_DIR keeps the log and the benchmark CSVs; whatever else the stages wrote there (plots)
# goes into extra.tar.gz, so that at most 8 files come back.
mkdir -p "$work/files"
for f in "$out"/*; do
  case $(basename "$f") in gpu_check.log|*.csv) ;; *) mv "$f" "$work/files/" ;; esac
done
(cd "$work" && tar czf "$out/extra.tar.gz" --exclude='*.csv.tmp' ./*.log ./*.xml ./files ./compile 2>/dev/null)
{
  echo
  echo "gpu_check summary ($(( $(date +%s) - start )) s; budget ${budget} s)"
  printf '%-9s %-8s %7s  %s\n' stage status time note
  printf '%s\n' "${summary[@]}"
} | tee "$out/summary.txt" | tee -a "$log"
rm -rf "$work"
ls -la "$out"
