/* SparseConv on the GPU behind a C ABI, so a test harness (ctypes) can drive the kernel without onnxruntime; the same
 * life cycle as PatternConv's (pattern_conv_cuda.h): prepare (check the spec and the index arrays, upload the packed
 * layout to the current device) -> run any number of times on any stream of that device -> release. The onnxruntime
 * op (sparse_conv_op.cc) uses the same calls.
 *
 * Conv: X (N, C, H, W), Y (N, O, OH, OW); FC: X (N, I), Y (N, O) (h = width = 1). W (K, block), B (O) or NULL, Z NULL,
 * one element or Y's shape; all float32, contiguous, on the device. Y = gate(clip(Conv(X, W_dense, B) + Z)), as
 * ops/SparseConv.md specifies, NaN and +-Inf included (a non-finite input met by a pruned weight makes NaN).
 */
#ifndef CTPRUNE_SPARSE_CONV_CUDA_H_
#define CTPRUNE_SPARSE_CONV_CUDA_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The operator's attributes and its index inputs, host memory (ops/SparseConv.md). */
typedef struct CtpruneSparseConvDesc {
  int64_t fc;                                                  /* 1: weight_shape is [O, I] */
  int64_t out_channels, group_channels, kernel_h, kernel_w;    /* weight_shape (an FC: [O, I, 1, 1]) */
  int64_t block, group;
  const int64_t* block_order; /* [num_blocks] */
  int64_t num_blocks;
  const int64_t* pointer; /* P: [num_blocks + 1] */
  const int64_t* columns; /* I: [num_rows] */
  int64_t num_rows;
  int64_t stride_h, stride_w, pad_top, pad_left, pad_bottom, pad_right, dilation_h, dilation_w; /* a Conv's */
  float activation_min, activation_max;                                                           /* the clip */
  int64_t activation;                   /* 0: none, 1: c * HardSigmoid(c), 2: c * Sigmoid(c) */
  float activation_alpha, activation_beta;
} CtpruneSparseConvDesc;

typedef struct CtpruneSparseConvGpu CtpruneSparseConvGpu; /* opaque: packed layout on one device */

#ifndef CTPRUNE_CUDA_INVALID_ATTRIBUTES
#define CTPRUNE_CUDA_INVALID_ATTRIBUTES (-1) /* message in err */
#define CTPRUNE_CUDA_INVALID_SHAPE (-2)
#endif

/* Checks desc and uploads its packed layout to the current device. Returns 0, a cudaError_t, or
 * CTPRUNE_CUDA_INVALID_ATTRIBUTES with a one-sentence reason in err (err_len bytes, NUL-terminated). */
int ctprune_sparse_conv_cuda_prepare(const CtpruneSparseConvDesc* desc, CtpruneSparseConvGpu** out, char* err,
                                     int err_len);

/* Launches on stream (a cudaStream_t; NULL = legacy default stream): the convolution, then a pass that makes NaN the
 * outputs a non-finite input reaches through a pruned weight. c is X's channel count (an FC's I); h and width are 1
 * for an FC. z (may be NULL) holds z_elements floats: 1 or Y's size. Returns cudaGetLastError() after the launches, or
 * CTPRUNE_CUDA_INVALID_SHAPE (X's channels, an empty or too large output, or a Z of another size). */
int ctprune_sparse_conv_cuda(const CtpruneSparseConvGpu* gpu, const float* x, const float* w, const float* b,
                             const float* z, int64_t z_elements, float* y, int64_t n, int64_t c, int64_t h,
                             int64_t width, void* stream);

/* Output height and width for an input of h x width (1 x 1 for an FC), or CTPRUNE_CUDA_INVALID_SHAPE. */
int ctprune_sparse_conv_cuda_output_size(const CtpruneSparseConvGpu* gpu, int64_t h, int64_t width, int64_t* oh,
                                         int64_t* ow);

/* Frees the device layout (safe on NULL). */
void ctprune_sparse_conv_cuda_release(CtpruneSparseConvGpu* gpu);

/* Human-readable name of a status returned above. */
const char* ctprune_sparse_conv_cuda_status_string(int status);

#ifdef __cplusplus
}
#endif

#endif /* CTPRUNE_SPARSE_CONV_CUDA_H_ */
