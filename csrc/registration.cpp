// The one place where mamlpp_fast's operator schemas are defined.
//
// Each op's kernels live in csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu; each of those files ends with
// its own TORCH_LIBRARY_IMPL(mamlpp_fast, CPU|CUDA, m). Autograd and fake (meta) kernels are
// registered from Python in mamlpp_fast/ops/<op>.py. To add an op, add one m.def line below.
#include <torch/library.h>

TORCH_LIBRARY(mamlpp_fast, m) {
  // out[k] = params[k] - lr[k] * grads[k]; params[k] may be shared across the task dim (see ops/lslr_update.py).
  m.def("lslr_update(Tensor[] params, Tensor[] grads, Tensor lr) -> Tensor[]");
  // batch_norm(batch stats) -> leaky_relu -> max_pool2d(2, 2) of the grouped [n, G, H, W] layout,
  // its backward and the backward's backward (see ops/bn_lrelu_pool.py). indices: uint8 argmax 0..3.
  m.def("bn_lrelu_pool_forward(Tensor x, Tensor weight, Tensor bias, float eps, float negative_slope)"
        " -> (Tensor y, Tensor mean, Tensor invstd, Tensor indices)");
  m.def("bn_lrelu_pool_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor bias, Tensor mean,"
        " Tensor invstd, Tensor indices, float negative_slope)"
        " -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)");
  m.def("bn_lrelu_pool_double_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor bias,"
        " Tensor mean, Tensor invstd, Tensor indices, Tensor? grad_grad_x, Tensor? grad_grad_weight,"
        " Tensor? grad_grad_bias, float negative_slope)"
        " -> (Tensor grad_grad_y, Tensor grad_x, Tensor grad_weight)");
  // The weight [B, C_out, C_in, 3, 3] and bias [B, C_out] gradients of the task-batched 3x3
  // convolution (stride 1, padding 1) of x [n, B*C_in, H, W] with cotangent grad_out
  // [n, B*C_out, H, W], in one pass over grad_out (see ops/task_conv.py; CPU only).
  m.def("task_conv_weight_grad(Tensor x, Tensor grad_out, int num_tasks)"
        " -> (Tensor grad_weight, Tensor grad_bias)");
  // Per-task mean cross-entropy and accuracy of logits [B, n, N] with labels [B, n] (see
  // ops/task_cross_entropy.py); lse [B, n] is saved for the backward.
  m.def("task_cross_entropy_forward(Tensor logits, Tensor labels)"
        " -> (Tensor loss, Tensor accuracy, Tensor lse)");
  m.def("task_cross_entropy_backward(Tensor grad_loss, Tensor logits, Tensor labels, Tensor lse)"
        " -> Tensor grad_logits");
  // The backward's backward for second-order MAML (its own derivative is a torch composition).
  m.def("task_cross_entropy_double_backward(Tensor grad_grad_logits, Tensor grad_loss, Tensor logits,"
        " Tensor labels, Tensor lse) -> (Tensor grad_grad_loss, Tensor grad_logits)");
}

// `import mamlpp_fast._C` only has to load this library so that the static registrars above run.
// No pybind11: an empty module is enough, and it keeps the stub within Python's stable ABI.
// The guard keeps the CMake build (a plain shared library for torch.ops.load_library) free of Python.
#ifdef TORCH_EXTENSION_NAME
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "mamlpp_fast compiled ops (registered with torch.ops.mamlpp_fast)",
      -1, nullptr,
  };
  return PyModule_Create(&module_def);
}
#endif
