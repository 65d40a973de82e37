/* PatternConv on the GPU behind a C ABI, so a test harness (ctypes) can drive the kernel without onnxruntime.
 *
 * Life cycle: prepare (validate the attributes, upload the packed layout to the current device) -> run any number of
 * times on any stream of that device -> release. The onnxruntime op (pattern_conv_op.cc) uses the same calls.
 * Shapes: X (N, C, H, W), W (K, 4), B (O) or NULL, Z (the residual of a fused Add) NULL, one element or Y's shape,
 * Y (N, O, OH, OW); all float32, contiguous, on the device. Y = clip(Conv(X, W_dense, B) + Z, activation range).
 */
#ifndef CTPRUNE_PATTERN_CONV_CUDA_H_
#define CTPRUNE_PATTERN_CONV_CUDA_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The operator's attributes (ops/PatternConv.md), host memory; dilations must be 1 and group 1 (checked by the op). */
typedef struct CtprunePatternConvDesc {
  int64_t out_channels, in_channels; /* weight_shape[0], weight_shape[1] */
  const int64_t* patterns;           /* [num_patterns * 4] */
  int64_t num_patterns;
  const int64_t* kernel_filters; /* [num_kernels] each */
  const int64_t* kernel_channels;
  const int64_t* kernel_patterns;
  int64_t num_kernels;
  int64_t stride_h, stride_w;
  int64_t pad_top, pad_left, pad_bottom, pad_right;
  float activation_min, activation_max; /* -inf, +inf: no activation */
} CtprunePatternConvDesc;

typedef struct CtprunePatternConvGpu CtprunePatternConvGpu; /* opaque: packed layout on one device */

/* Status codes besides cudaError_t values (which are >= 0; 0 = success). */
#define CTPRUNE_CUDA_INVALID_ATTRIBUTES (-1) /* message in err */
#define CTPRUNE_CUDA_INVALID_SHAPE (-2)

/* Validates desc and uploads its packed layout to the current device. Returns 0, a cudaError_t, or
 * CTPRUNE_CUDA_INVALID_ATTRIBUTES with a one-sentence reason in err (err_len bytes, NUL-terminated). */
int ctprune_pattern_conv_cuda_prepare(const CtprunePatternConvDesc* desc, CtprunePatternConvGpu** out, char* err,
                                      int err_len);

/* Launches the kernel on stream (a cudaStream_t; NULL = legacy default stream). force_config = 0 lets the launcher
 * choose the tile shape; 100 * channel_splits + 10 * filters_per_thread + pixels_per_thread (each 1, 2 or 4;
 * splits 0 = 1) forces one (tests). Channel-split launches keep partial sums in scratch owned by gpu, per stream.
 * z (may be NULL: no residual) holds z_elements floats: 1 (added to every output) or N * O * OH * OW (Y's layout).
 * Returns cudaGetLastError() after the launch, or CTPRUNE_CUDA_INVALID_SHAPE (bad n/h/w, output size < 1, or
 * z_elements neither 1 nor the output size). */
int ctprune_pattern_conv_cuda(const CtprunePatternConvGpu* gpu, const float* x, const float* w, const float* b,
                              const float* z, int64_t z_elements, float* y, int64_t n, int64_t h, int64_t width,
                              void* stream, int force_config);

/* Output height and width for an input of h x width, or 0 when the output would be empty. */
int ctprune_pattern_conv_cuda_output_size(const CtprunePatternConvGpu* gpu, int64_t h, int64_t width, int64_t* oh,
                                          int64_t* ow);

/* Frees the device layout (safe on NULL). */
void ctprune_pattern_conv_cuda_release(CtprunePatternConvGpu* gpu);

/* Human-readable name of a status returned above. */
const char* ctprune_pattern_conv_cuda_status_string(int status);

#ifdef __cplusplus
}
#endif

#endif /* CTPRUNE_PATTERN_CONV_CUDA_H_ */
