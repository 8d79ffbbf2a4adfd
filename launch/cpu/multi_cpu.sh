#!/usr/bin/env bash
# Several training processes on one CPU-only machine (gloo backend), e.g. to check the
# distributed path (cross-device negatives, sharded batches) without a GPU.
# Run: bash launch/cpu/multi_cpu.sh RECIPE [key.sub=value ...] [--resume]
# NPROC (default 2) sets the number of processes, PORT (default 29512) the rendezvous port.
# Accelerate's own launcher needs MPI for multi-CPU runs; torchrun sets the same environment
# (RANK, WORLD_SIZE, MASTER_ADDR) that Accelerate reads, without MPI.
set -euo pipefail
NPROC=${NPROC:-2}
PORT=${PORT:-29512}
export ACCELERATE_USE_CPU=true  # lets Accelerate pick the gloo backend for these processes
# each process gets its share of the cores
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}
exec python -m torch.distributed.run --nnodes 1 --nproc_per_node "$NPROC" --master_addr 127.0.0.1 \
  --master_port "$PORT" -m trainer.cli train "$@"
