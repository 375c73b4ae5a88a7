# Post-build step: gather the ptxas report of every kernel object that tkpy._C links (OBJECTS, a
# list) into ptxas_report.txt in the build folder. tkpy._C.ptxas_report holds its path for the
# static checks (tests/test_sass.py).
set(reports "")
foreach(object IN LISTS OBJECTS)
  list(APPEND reports "${object}.ptxas.txt")
endforeach()
list(SORT reports)
set(combined "")
foreach(report IN LISTS reports)
  file(READ "${report}" text)
  string(APPEND combined "# ${report}\n${text}\n")
endforeach()
file(WRITE "${BUILD_DIR}/ptxas_report.txt" "${combined}")
