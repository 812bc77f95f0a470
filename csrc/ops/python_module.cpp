// `import gmamba_ext._C` loads this library, which runs the op registrations linked into it. The module
// has no Python functions of its own: everything is reached through torch.ops.gmamba_ext. It carries one
// build fact as a constant: CPU_SCAN_LANES, the CPU scan's channels per vector (cpu/scan_lanes.h).
#include <Python.h>

#include "cpu/scan_lanes.h"

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module && PyModule_AddIntConstant(module, "CPU_SCAN_LANES", gmamba::cpu::kLanes) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
