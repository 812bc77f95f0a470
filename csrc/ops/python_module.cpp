// `import gmamba_ext._C` loads this library, which runs the op registrations linked into it. The module
// has no Python functions of its own: everything is reached through torch.ops.gmamba_ext.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
