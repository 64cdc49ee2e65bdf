#!/bin/bash
# alternate: base auto, new auto, none — 3 rounds
for r in 1 2 3; do
  (cd /tmp/s16/base && PYTHONPATH=/tmp/s16/base /work/main/.venv/bin/python /tmp/s16/grounded.py 6 auto 2>&1 | grep "tok/s" | sed 's/^/base /')
  (cd /work/main && .venv/bin/python /tmp/s16/grounded.py 6 auto 2>&1 | grep "tok/s" | sed 's/^/new /')
  (cd /work/main && .venv/bin/python /tmp/s16/grounded.py 6 none 2>&1 | grep "tok/s" | sed 's/^/new /')
done
