// The portable SparseConv tier at 16 lanes with the AVX-512 tile sizes (generic16): sparse_conv_generic.cc built a
// second time in a translation unit of its own, so that the two long compiles run in parallel.
#define CTPRUNE_SPARSE_GENERIC16 1
#include "cpu/sparse_conv_generic.cc"
