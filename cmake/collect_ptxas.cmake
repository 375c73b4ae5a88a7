# Post-build step: gather every kernel object's ptxas report into ptxas_report.txt in the build
# folder. tkpy._C.ptxas_report holds its path for the static checks (tests/test_sass.py).
file(GLOB_RECURSE reports "${BUILD_DIR}/*.ptxas.txt")
list(SORT reports)
set(combined "")
foreach(report IN LISTS reports)
  file(READ "${report}" text)
  string(APPEND combined "# ${report}\n${text}\n")
endforeach()
file(WRITE "${BUILD_DIR}/ptxas_report.txt" "${combined}")
