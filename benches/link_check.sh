#!/bin/bash
# usage: benches/link_check.sh KEEP RUNS: builds KEEP+1 releases with each of /tmp/flip-old and
# /tmp/flip-new from the tree /dev/shm/flbench/src (targets in $TDIR, default /dev/shm/flbench),
# then interleaves old/new: a no-op deploy and a one-file deploy each, wall ms.
set -e
KEEP=$1; RUNS=$2; B=/dev/shm/flbench; SRC=$B/src
for bin in old new; do
  T=${TDIR:-$B}/t-$bin-$KEEP; rm -rf $T
  for i in $(seq 0 $KEEP); do
    echo "v$i" > $SRC/pkg0/mod0/changing.txt
    /tmp/flip-$bin deploy --quiet $SRC $T --keep $KEEP >/dev/null
  done
done
ms() { local s=$(date +%s%N); "$@" >/dev/null; echo $(( ($(date +%s%N)-s)/1000000 )); }
declare -A last=([old]="v$KEEP" [new]="v$KEEP")
for r in $(seq 1 $RUNS); do
  for bin in old new; do
    T=${TDIR:-$B}/t-$bin-$KEEP
    echo "${last[$bin]}" > $SRC/pkg0/mod0/changing.txt
    noop=$(ms /tmp/flip-$bin deploy --quiet $SRC $T --keep $KEEP)
    last[$bin]="x$bin$r"; echo "${last[$bin]}" > $SRC/pkg0/mod0/changing.txt
    one=$(ms /tmp/flip-$bin deploy --quiet $SRC $T --keep $KEEP)
    echo "keep=$KEEP run=$r bin=$bin noop_ms=$noop onefile_ms=$one"
  done
done
