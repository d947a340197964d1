#!/usr/bin/env bash
# The device check for the first GPU: the GPU tests and the training throughput in one run, under
# 5 minutes on one GPU, ending with one markdown table.
#
#   bash benchmarks/device_check.sh                # on a machine with a CUDA GPU
#   bash benchmarks/device_check.sh --cpu-dry-run  # the same sequence on the CPU (tiny model, 2 timed
#                                                  # steps, aot_eager compile backend): checks the script
# Stages:
#   1. python -m pytest -m gpu, serially (tests/test_gpu.py; all skipped without a GPU)
#   2. benchmarks/throughput.py at bf16 (32 on a GPU without bf16), K fixed per run:
#        FusionMNIST, the paper's MNIST model, K=3, batch 64 and batch 800;
#        FusionCelebA size (model/size=celeba, 64x64 RGB stand-ins), batch 32, K=0 and K=3;
#      first eager, then the same runs with model.compile=true (inductor; the compile time falls
#      in the warm-up steps, which are not timed), and MNIST b64 with the whole step in CUDA graphs
#      (model.compile_mode=reduce-overhead; not in the dry run)
#   3. scripts/device_table.py: one markdown table of the results
# Each stage has a time limit and the whole run a budget (DEVICE_CHECK_BUDGET_S: 290 s, dry run 900 s);
# a stage that no longer fits is listed as skipped (raise the budget to run everything). Logs,
# results.jsonl and table.md go to $OUT when it is set (the device runner's output folder), else
# to a new folder under /tmp; generated data goes to another folder under /tmp.
#
# Dependencies: the GPU machine has Python 3.12 with torch, Lightning and torchmetrics, but no
# hydra-core, omegaconf, antlr4 runtime, lmdb, wandb or pytest. Whatever of these is missing is
# installed from the wheels in .whl/ (repository root) into /tmp/site (pip --target, or unzipped
# when there is no pip). Fetch the wheels once, on a machine with network access, from the
# repository root (the versions are those of the development machine):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl hydra-core==1.3.8 omegaconf==2.3.1 lmdb==3.0.0 wandb==0.31.0 PyYAML==6.0.3 \
#     pytest==9.0.3 pluggy==1.6.0 iniconfig==2.3.0 pytest-timeout==2.4.0 Pygments==2.20.0
#   python3 -m pip wheel --no-deps antlr4-python3-runtime==4.9.3 -w .whl   # an sdist only on PyPI
# .whl/ is git-ignored (.git/info/exclude), so it reaches the GPU machine only when carried
# explicitly (the device runner: carry [".whl"]; about 22 MB).
#
# Data: MNIST from $FUSIONVAE_DATA_DIR, ./data or ../shared/data (MNIST/raw); where none has it,
# an MNIST-shaped stand-in is generated (tests/standins.py make_mnist: the same shapes, so the same
# timings). CelebA: a generated stand-in with the real layout (make_celeba), in the work folder.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DRY=0
for arg in "$@"; do
  case "$arg" in
    --cpu-dry-run) DRY=1 ;;
    -h|--help) sed -n '2,37p' "$0"; exit 0 ;;
    *) echo "device_check.sh: unknown argument '$arg' (known: --cpu-dry-run, --help)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
START=$SECONDS
BUDGET=${DEVICE_CHECK_BUDGET_S:-$([ $DRY = 1 ] && echo 900 || echo 290)}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 WANDB_MODE=offline WANDB_SILENT=true

if [ $DRY = 0 ] && ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  echo "device_check.sh: no CUDA device (torch $("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null ||
    echo 'not importable'), CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset}): run it on a GPU machine," \
    "or add --cpu-dry-run to check the sequence on the CPU" >&2
  exit 3
fi

WORK=${OUT:-$(mktemp -d /tmp/device_check.XXXXXX)}  # logs, results.jsonl, table.md
DATA=$(mktemp -d /tmp/device_check_data.XXXXXX)       # stand-ins and LMDBs (kept out of $OUT)
trap 'rm -rf "$DATA"' EXIT
mkdir -p "$WORK"
: > "$WORK/results.jsonl"

# ---- dependencies ---------------------------------------------------------------------------------
NEEDED="import hydra, omegaconf, antlr4, lmdb, yaml, pytest, pytest_timeout"
if ! "$PY" -c "$NEEDED" 2>/dev/null; then
  if ! ls .whl/*.whl > /dev/null 2>&1; then
    echo "device_check.sh: hydra-core, omegaconf, antlr4, lmdb, PyYAML or pytest is missing and .whl/ has no" \
      "wheels: fetch them as the header of benchmarks/device_check.sh says" >&2
    exit 4
  fi
  if "$PY" -m pip --version > /dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  else
    "$PY" -c "import sys, zipfile; [zipfile.ZipFile(w).extractall('/tmp/site') for w in sys.argv[1:]]" .whl/*.whl
  fi
  export PYTHONPATH="$ROOT:/tmp/site${PYTHONPATH#"$ROOT"}"
  "$PY" -c "$NEEDED" || { echo "device_check.sh: the wheels in .whl/ did not provide: $NEEDED" >&2; exit 4; }
fi

# ---- settings -----------------------------------------------------------------------------------
if [ $DRY = 1 ]; then
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} FUSIONVAE_COMPILE_BACKEND=${FUSIONVAE_COMPILE_BACKEND:-aot_eager}
  DEVICE=cpu PRECISION=32 STEPS=2 WARMUP=2 SIZE=(model/size=tiny) CELEBA_SIZE=(model/size=tiny) N_TRAIN=160
  SCALE=4 WORKERS=2  # stage time limits x 4: a 2-core CPU
  TITLE="CPU dry run ($(getconf _NPROCESSORS_ONLN) cores, OMP_NUM_THREADS=$OMP_NUM_THREADS, tiny model, compile backend $FUSIONVAE_COMPILE_BACKEND)"
else
  DEVICE=cuda STEPS=20 WARMUP=3 SIZE=() CELEBA_SIZE=(model/size=celeba) N_TRAIN=800  # 23 batches of 32: one epoch
  SCALE=1 WORKERS=$(( $(getconf _NPROCESSORS_ONLN) > 10 ? 8 : 4 ))  # loader workers: keep the GPU fed
  PRECISION=$("$PY" -c "import torch; print('bf16' if torch.cuda.is_bf16_supported(including_emulation=False) else '32')")
  TITLE=$("$PY" -c "import torch; print(f'{torch.cuda.get_device_name()}, torch {torch.__version__}')")
fi
MNIST_DIR=""
for cand in "${FUSIONVAE_DATA_DIR:-}" "$ROOT/data" "$ROOT/../shared/data"; do
  if [ -n "$cand" ] && [ -d "$cand/MNIST/raw" ]; then MNIST_DIR=$(cd "$cand" && pwd); break; fi
done
if [ -z "$MNIST_DIR" ]; then
  MNIST_DIR="$DATA/mnist_standin"
  echo "device_check.sh: no MNIST found; generating an MNIST-shaped stand-in in $MNIST_DIR"
  "$PY" -c "import sys; sys.path.insert(0, 'tests'); from standins import make_mnist; make_mnist(sys.argv[1])" "$MNIST_DIR"
fi
export FUSIONVAE_DATA_DIR=$MNIST_DIR
CELEBA_DIR="$DATA/celeba_standin"
"$PY" -c "import sys; sys.path.insert(0, 'tests'); from standins import make_celeba
make_celeba(sys.argv[1], n_train=int(sys.argv[2]), n_valid=32, n_test=32)" "$CELEBA_DIR" "$N_TRAIN"
echo "device_check.sh: $TITLE; MNIST from $MNIST_DIR; output in $WORK; budget ${BUDGET} s"
[ $DRY = 1 ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null

left() { echo $((BUDGET - (SECONDS - START))); }
record() {  # label compile status seconds result-json
  printf '{"label": "%s", "compile": %s, "status": "%s", "seconds": %s, "result": %s}\n' \
    "$1" "$2" "$3" "$4" "${5:-null}" >> "$WORK/results.jsonl"
}

# ---- 1. GPU tests ---------------------------------------------------------------------------------
limit=$(( $(left) < 150 * SCALE ? $(left) : 150 * SCALE ))
t0=$SECONDS
# one process, one test at a time on the one GPU: the repository's addopts (-n auto) cleared, so
# that the run is the same whether or not pytest-xdist is installed there
timeout -k 10 "$limit" "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider -p no:xdist -o addopts= --timeout=600 \
  > "$WORK/pytest.log" 2>&1
rc=$?
tail -n 25 "$WORK/pytest.log"
case $rc in 0) status=ok ;; 5) status="no tests ran" ;; 124|137) status="timeout (${limit} s)" ;; *) status="failed (rc $rc)" ;; esac
summary=$(grep -E "passed|skipped|failed|error" "$WORK/pytest.log" | tail -n 1 | tr -d '=' | sed 's/^ *//;s/ *$//;s/"//g')
echo "pytest -m gpu: $status: $summary"
record "pytest -m gpu" false "$status: $summary" $((SECONDS - t0))
PYTEST_STATUS="$status: $summary"
FAILED=0
[ "$status" = ok ] || FAILED=1

# ---- 2. throughput --------------------------------------------------------------------------------
bench() {  # label compile(true|false) limit_s throughput args...
  local label=$1 compiled=$2 limit=$(($3 * SCALE)); shift 3
  local remaining; remaining=$(left)
  if [ "$remaining" -lt 20 ]; then record "$label" "$compiled" "skipped (time budget)" 0; return; fi
  [ "$limit" -gt "$remaining" ] && limit=$remaining
  local log t0 rc result status
  log="$WORK/bench_$(echo "$label compile=$compiled" | tr -c 'A-Za-z0-9=\n' '_').log"
  t0=$SECONDS
  timeout -k 10 "$limit" "$PY" benchmarks/throughput.py --device "$DEVICE" --precision "$PRECISION" \
    --steps "$STEPS" --warmup "$WARMUP" "model.compile=$compiled" "$@" > "$log" 2>&1
  rc=$?
  result=$(grep '^{' "$log" | tail -n 1)
  case $rc in 0) status=ok ;; 124|137) status="timeout (${limit} s)" ;; *) status="failed (rc $rc)" ;; esac
  if [ $rc != 0 ] || [ -z "$result" ]; then tail -n 15 "$log" >&2; result=null; fi
  case $rc in 0|124|137) ;; *) FAILED=1 ;; esac  # a timeout is a result (too slow), not a failure
  record "$label" "$compiled" "$status" $((SECONDS - t0)) "$result"
  echo "$label compile=$compiled: $status ($((SECONDS - t0)) s) $(grep -v '^{' "$log" | tail -n 1)"
}
MNIST=(dataset=mnist "paths.data_dir=$MNIST_DIR" "dataset.num_workers=$WORKERS" "${SIZE[@]}" --k 3)
CELEBA=(dataset=celeba "paths.data_dir=$CELEBA_DIR" "dataset.num_workers=$WORKERS" "${CELEBA_SIZE[@]}" dataset.batch_size=32)
bench "MNIST b64" false 45 "${MNIST[@]}" dataset.batch_size=64
bench "MNIST b800" false 45 "${MNIST[@]}" dataset.batch_size=800
bench "CelebA-size K=0" false 60 "${CELEBA[@]}" --k 0  # builds the stand-in LMDBs first
bench "CelebA-size K=3" false 45 "${CELEBA[@]}" --k 3
bench "MNIST b64" true 90 "${MNIST[@]}" dataset.batch_size=64
# the whole training step in CUDA graphs (model.compile_mode=reduce-overhead; refused on the CPU)
[ $DRY = 1 ] || bench "MNIST b64 step graph" true 90 "${MNIST[@]}" dataset.batch_size=64 model.compile_mode=reduce-overhead
bench "CelebA-size K=3" true 120 "${CELEBA[@]}" --k 3
bench "MNIST b800" true 90 "${MNIST[@]}" dataset.batch_size=800
bench "CelebA-size K=0" true 120 "${CELEBA[@]}" --k 0

# ---- 3. the table ---------------------------------------------------------------------------------
"$PY" scripts/device_table.py "$WORK/results.jsonl" --title "$TITLE" | tee "$WORK/table.md"
echo
echo "pytest -m gpu: $PYTEST_STATUS ($WORK/pytest.log)"
echo "device_check.sh: done in $((SECONDS - START)) s; $([ $FAILED = 0 ] && echo 'no failures' || echo 'FAILURES above')"
exit $FAILED
