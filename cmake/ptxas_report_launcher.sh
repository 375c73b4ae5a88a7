#!/usr/bin/env bash
# CMake compiler launcher for .cu files: runs the compile (through ccache when it is installed) and
# keeps the compiler's output, which holds ptxas's --resource-usage report (registers, stack, spill
# bytes per kernel), in <object>.ptxas.txt. The static checks in tests/test_sass.py read it.
set -o pipefail
obj=""
prev=""
for arg in "$@"; do
  [ "$prev" = "-o" ] && obj="$arg"
  prev="$arg"
done
launcher=()
command -v ccache >/dev/null 2>&1 && launcher=(ccache)
if [ -z "$obj" ]; then
  exec "${launcher[@]}" "$@"
fi
"${launcher[@]}" "$@" > "$obj.ptxas.txt" 2>&1
rc=$?
cat "$obj.ptxas.txt" >&2
exit $rc
