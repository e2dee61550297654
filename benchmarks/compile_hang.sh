#!/bin/bash
# Diagnostic (GPU): does torch.compile of Fuxi-MME with 4 layers and 4 streams (Amazon Beauty)
# finish? Each run trains one epoch under the default train.compile=auto and is stopped after
# T seconds; while they run, the ptxas processes still going after 110 s are listed and their
# PTX files copied. benchmarks/results/compile-hang-NVIDIA_H200.md gives what it found.
#   usage: benchmarks/compile_hang.sh DATA_DIR [T] [OUT_DIR] [MODE]
#   DATA_DIR: the folder holding the Amazon 5-core files (../shared/data/amazon_s3rec)
#   MODE: "diagnose" (default): four Inductor settings side by side, persistent reductions
#         forced on (as before the library turned them off for MoE models);
#         "fix": the library's default (persistent reductions off for MoE models) beside
#         TORCHINDUCTOR_PERSISTENT_REDUCTIONS=1 (the old default).
set -u
DATA=${1:?usage: benchmarks/compile_hang.sh DATA_DIR [T] [OUT_DIR] [MODE]}; T=${2:-170}; O=${3:-compile-hang-out}; MODE=${4:-diagnose}
mkdir -p "$O"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
run() { # name, environment, Python run before training
  local name=$1 envs=$2 pre=$3
  ( start=$(date +%s); env $envs timeout "$T" python -c "
import sys
$pre
from fuxi_mme.cli import main
sys.exit(main(sys.argv[1:]))" train --preset amazon-beauty-fuxi-mme-base --data-path "$DATA" --run-dir "$O/run-$name" --no-progress \
      --set train.epochs=1 --set model.num_layers=4 --set model.num_embeddings=4 > "$O/$name.log" 2>&1
    echo "$name: exit $? after $(( $(date +%s) - start )) s (124: stopped after $T s)" ) &
}
if [ "$MODE" = fix ]; then
  run library_default "X=1" ""
  run persistent_on "TORCHINDUCTOR_PERSISTENT_REDUCTIONS=1" ""
else
  run base "TORCHINDUCTOR_PERSISTENT_REDUCTIONS=1 TORCHINDUCTOR_COMPILE_THREADS=1" ""
  run mix_order_off "TORCHINDUCTOR_PERSISTENT_REDUCTIONS=1 TORCHINDUCTOR_MIX_ORDER_REDUCTION=0" ""
  run persistent_off "TORCHINDUCTOR_PERSISTENT_REDUCTIONS=0" ""
  run fusion16 "TORCHINDUCTOR_PERSISTENT_REDUCTIONS=1" "import torch._inductor.config as c; c.max_fusion_size = 16"
fi
sleep 110
ps -eo pid,etimes,args | grep '[p]txas' | tee "$O/ptxas_ps.txt"
for p in $(grep -o '/tmp/[^ ]*\.ptx' "$O/ptxas_ps.txt" | sort -u); do cp "$p" "$O/" 2>/dev/null; done
wait
for f in "$O"/*.log; do echo "== $f"; grep -E "graph recorded|epoch 1|Traceback|persistent" "$f" | tail -4; done
