// Native onnxruntime kernels for the `road` domain: road.Rotate and road.RotateTied in one pass over X.
//
//   Y = X * C1 + rot(X) * C2,  rot maps each group [x1 | x2] of X's last axis to [-x2 | x1]
//
// The ONNX files road-export writes carry standard-op function bodies for these ops, so they run anywhere;
// registering this library (SessionOptions.register_custom_ops_library) makes onnxruntime run one kernel per
// rotation instead, which reads X once and writes Y once, like a single elementwise Mul.
// C1 and C2 broadcast against X the numpy way, their last axis equal to X's (shape [d], or [batch, 1, d] for
// per-row adapters). Half-precision inputs are computed in float and rounded once.
// The CUDA kernels (road_cuda.h) register for the CUDA execution provider where the CUDA driver and NVRTC open.
#include <climits>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <string>

#include "ort_abi.h"
#include "road_cuda.h"

namespace {

constexpr int kMaxRank = 8;

// The library is built once and may run on other x86 CPUs: the row loop is compiled for AVX-512, AVX2 and
// baseline SSE2, and the loader picks the best one the CPU has (wider vectors are what bring it to Mul speed).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ROAD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define ROAD_CLONES
#endif

// --- element types: load as the compute type, store back --------------------------------------------------
struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

// Half <-> float without branches (every case computed, then selected), so that the row loop vectorizes with
// integer SIMD on any x86 (after F. Giesen's half_to_float_fast5 / float_to_half_fast3_rtne, public domain).
inline uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float load(Half h) {
  const uint32_t shifted = (static_cast<uint32_t>(h.bits) & 0x7fffu) << 13;  // exponent and mantissa
  const uint32_t exponent = shifted & 0x0f800000u;
  const uint32_t normal = shifted + ((127u - 15u) << 23);
  const uint32_t special = normal + ((128u - 16u) << 23);  // inf / NaN
  const uint32_t tiny = bits_of(float_of(normal + (1u << 23)) - float_of(113u << 23));  // zero / subnormal
  const uint32_t out = exponent == 0x0f800000u ? special : exponent == 0 ? tiny : normal;
  return float_of(out | ((static_cast<uint32_t>(h.bits) & 0x8000u) << 16));
}

inline Half store_half(float value) {  // round to nearest even; NaN stays NaN, overflow gives inf
  const uint32_t all = bits_of(value);
  const uint32_t sign = all & 0x80000000u, f = all ^ sign;
  const float magic = float_of(((127u - 15u) + (23u - 10u) + 1u) << 23);
  const uint32_t subnormal = bits_of(float_of(f) + magic) - bits_of(magic);
  const uint32_t rounded = (f + ((15u - 127u) << 23) + 0xfffu + ((f >> 13) & 1u)) >> 13;
  const uint32_t big = f > 0x7f800000u ? 0x7e00u : 0x7c00u;
  const uint32_t out = f >= ((127u + 16u) << 23) ? big : f < (113u << 23) ? subnormal : rounded;
  return Half{static_cast<uint16_t>(out | (sign >> 16))};
}

inline float load(BFloat16 b) {
  uint32_t bits = static_cast<uint32_t>(b.bits) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline BFloat16 store_bf16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return BFloat16{static_cast<uint16_t>((x >> 16) | 0x40u)};  // NaN stays NaN
  x += 0x7fffu + ((x >> 16) & 1u);  // round to nearest even
  return BFloat16{static_cast<uint16_t>(x >> 16)};
}

inline float load(float v) { return v; }
inline double load(double v) { return v; }
template <typename T> struct Store;
template <> struct Store<float> { static float put(float v) { return v; } };
template <> struct Store<double> { static double put(double v) { return v; } };
template <> struct Store<Half> { static Half put(float v) { return store_half(v); } };
template <> struct Store<BFloat16> { static BFloat16 put(float v) { return store_bf16(v); } };
template <typename T> struct Compute { using type = float; };
template <> struct Compute<double> { using type = double; };

// --- shapes -------------------------------------------------------------------------------------------------
struct Shape {
  int rank = 0;
  int64_t dims[kMaxRank] = {};
  int type = 0;
  size_t count() const {
    size_t n = 1;
    for (int i = 0; i < rank; ++i) n *= static_cast<size_t>(dims[i]);
    return n;
  }
  std::string str() const {
    std::string s = "[";
    for (int i = 0; i < rank; ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
    return s + "]";
  }
};

// One rotation call: rows of X (all axes but the last flattened), and for each coefficient tensor the row
// stride of every leading axis of X (0 where the coefficient broadcasts).
template <typename T>
struct Job {
  const T* x;
  const T* c1;
  const T* c2;
  T* y;
  int64_t d, half, rows, rows_per_task;
  int lead;  // number of leading axes of X
  int64_t lead_dims[kMaxRank];
  int64_t c1_stride[kMaxRank], c2_stride[kMaxRank];

  int64_t offset(const int64_t* stride, int64_t row) const {
    int64_t off = 0;
    for (int a = lead - 1; a >= 0 && row; --a) {
      off += (row % lead_dims[a]) * stride[a];
      row /= lead_dims[a];
    }
    return off;
  }

  // The group loop, with the half group size a compile-time constant H for the common sizes (H = 0: any size, read
  // from `half`): a constant trip count lets the compiler unroll and vectorize it with no remainder loop per group.
  template <int64_t H>
  ROAD_CLONES void rows_of(int64_t first, int64_t last) const {
    const int64_t h = H ? H : half;
    for (int64_t r = first; r < last; ++r) {
      const T* xr = x + r * d;
      const T* a = c1 + offset(c1_stride, r);
      const T* b = c2 + offset(c2_stride, r);
      T* yr = y + r * d;
      for (int64_t k = 0; k < d; k += 2 * h) group(xr + k, a + k, b + k, yr + k, H ? H : h);
    }
  }

  void run_rows(int64_t first, int64_t last) const {
    switch (half) {
      case 8: return rows_of<8>(first, last);
      case 16: return rows_of<16>(first, last);
      case 32: return rows_of<32>(first, last);
      case 64: return rows_of<64>(first, last);
      case 128: return rows_of<128>(first, last);
      default: return rows_of<0>(first, last);
    }
  }

  // One group: pairs (i, i + half). Restrict-qualified and branch-free so that the compiler vectorizes it.
  static inline __attribute__((always_inline)) void group(const T* __restrict x, const T* __restrict a,
                                                         const T* __restrict b, T* __restrict y, int64_t half) {
    using C = typename Compute<T>::type;
    const T* __restrict x2 = x + half;
    const T* __restrict a2 = a + half;
    const T* __restrict b2 = b + half;
    T* __restrict y2 = y + half;
    for (int64_t i = 0; i < half; ++i) {
      const C xi = load(x[i]), xj = load(x2[i]);
      y[i] = Store<T>::put(load(a[i]) * xi - load(b[i]) * xj);
      y2[i] = Store<T>::put(load(b2[i]) * xi + load(a2[i]) * xj);
    }
  }

  static void task(void* self, size_t index) {
    const Job* job = static_cast<const Job*>(self);
    const int64_t first = static_cast<int64_t>(index) * job->rows_per_task;
    const int64_t last = first + job->rows_per_task < job->rows ? first + job->rows_per_task : job->rows;
    job->run_rows(first, last);
  }
};

// What a node computes: a rotation of X, or (CUDA only) the rotation of X @ W (W [k, n]), of X @ W^T (LinearRotate:
// W [n, k]) or of MatMulNBits(X, B, scales), its coefficients given per position or as banks selected per row by
// adapter ids.
enum class Kind { kRotate, kMatMul, kMatMulRows, kLinear, kLinearRows, kNBits, kNBitsRows };

inline bool rows_kind(Kind kind) {
  return kind == Kind::kMatMulRows || kind == Kind::kLinearRows || kind == Kind::kNBitsRows;
}
// The op's input count, and the element type of input `index` (adapter_ids int64, MatMulNBits' B uint8).
inline size_t input_count(Kind kind) {
  switch (kind) {
    case Kind::kRotate: return 3;
    case Kind::kMatMul: case Kind::kLinear: return 4;
    case Kind::kMatMulRows: case Kind::kLinearRows: case Kind::kNBits: return 5;
    case Kind::kNBitsRows: return 6;
  }
  return 3;
}
inline int input_type(Kind kind, size_t index, int type) {
  if (rows_kind(kind) && index + 1 == input_count(kind)) return 7;  // ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64
  if ((kind == Kind::kNBits || kind == Kind::kNBitsRows) && index == 1) return 2;  // UINT8
  return type;
}

struct Kernel {
  const OrtApi* api;
  int64_t group_size;
  std::string name;
  bool cuda;  // runs on the CUDA execution provider: X, C1, C2 and Y are device memory
  Kind kind;
  bool gemv;  // MatMul forms: decode-sized products in one launch (ROAD_EXPORT_GEMV=0: always cuBLAS + rotation)
  cuda::LinearForm linear_form = cuda::LinearForm::kAuto;  // Linear / NBits forms: ROAD_EXPORT_LINEAR=warp|tile|mma
  int64_t k = 0, n = 0, bits = 0, block_size = 0;  // MatMulNBits forms: its attributes K, N, bits, block_size
};

OrtStatus* fail(const OrtApi* api, const std::string& message) {
  return ort::call<OrtStatus*>(api, ort::slot::CreateStatus, ORT_INVALID_ARGUMENT, message.c_str());
}

// Return the status of a failed onnxruntime call.
#define ROAD_TRY(expr)                                 \
  do {                                                 \
    if (OrtStatus* status_ = (expr)) return status_;   \
  } while (0)

OrtStatus* shape_of(const OrtApi* api, const OrtValue* value, Shape* shape) {
  OrtTensorTypeAndShapeInfo* info = nullptr;
  ROAD_TRY((ort::call<OrtStatus*>(api, ort::slot::GetTensorTypeAndShape, value, &info)));
  size_t rank = 0;
  OrtStatus* status = ort::call<OrtStatus*>(api, ort::slot::GetDimensionsCount,
                                            static_cast<const OrtTensorTypeAndShapeInfo*>(info), &rank);
  if (!status && rank > static_cast<size_t>(kMaxRank))
    status = fail(api, "road: tensors of rank > 8 are not supported");
  if (!status) {
    shape->rank = static_cast<int>(rank);
    status = ort::call<OrtStatus*>(api, ort::slot::GetDimensions, static_cast<const OrtTensorTypeAndShapeInfo*>(info),
                                   shape->dims, rank);
  }
  if (!status)
    status = ort::call<OrtStatus*>(api, ort::slot::GetTensorElementType,
                                   static_cast<const OrtTensorTypeAndShapeInfo*>(info), &shape->type);
  ort::call<void>(api, ort::slot::ReleaseTensorTypeAndShapeInfo, info);
  return status;
}

// Row strides of a coefficient tensor against X's leading axes; an error names the mismatch.
bool coefficient_strides(const Shape& x, const Shape& c, int64_t* stride, std::string* why) {
  const int64_t d = x.dims[x.rank - 1];
  if (c.rank < 1 || c.rank > x.rank || c.dims[c.rank - 1] != d) {
    *why = "coefficients of shape " + c.str() + " do not broadcast against X " + x.str() +
           " (want [d], or leading axes of size 1 or of X's size, with d = " + std::to_string(d) + ")";
    return false;
  }
  int64_t step = d;
  const int lead = x.rank - 1, shift = x.rank - c.rank;
  for (int a = lead - 1; a >= 0; --a) {
    const int ca = a - shift;
    const int64_t size = ca >= 0 ? c.dims[ca] : 1;
    if (size == x.dims[a] && size != 1) {
      stride[a] = step;
      step *= size;
    } else if (size == 1) {
      stride[a] = 0;
    } else {
      *why = "coefficients of shape " + c.str() + " do not broadcast against X " + x.str();
      return false;
    }
  }
  return true;
}

template <typename T>
OrtStatus* rotate(const Kernel& kernel, OrtKernelContext* context, const Shape& x, const Shape& c1, const Shape& c2,
                  const OrtValue* const* in, OrtValue* out) {
  const OrtApi* api = kernel.api;
  Job<T> job{};
  void* data[4] = {};
  for (int i = 0; i < 3; ++i)
    ROAD_TRY((ort::call<OrtStatus*>(api, ort::slot::GetTensorMutableData, const_cast<OrtValue*>(in[i]), &data[i])));
  ROAD_TRY((ort::call<OrtStatus*>(api, ort::slot::GetTensorMutableData, out, &data[3])));
  job.x = static_cast<const T*>(data[0]);
  job.c1 = static_cast<const T*>(data[1]);
  job.c2 = static_cast<const T*>(data[2]);
  job.y = static_cast<T*>(data[3]);
  job.d = x.dims[x.rank - 1];
  job.half = kernel.group_size / 2;
  job.lead = x.rank - 1;
  for (int a = 0; a < job.lead; ++a) job.lead_dims[a] = x.dims[a];
  job.rows = job.d ? static_cast<int64_t>(x.count()) / job.d : 0;
  std::string why;
  if (!coefficient_strides(x, c1, job.c1_stride, &why) || !coefficient_strides(x, c2, job.c2_stride, &why))
    return fail(api, kernel.name + ": " + why);
  if (job.rows == 0) return nullptr;
  // Tasks of at least 32K elements: smaller ones cost more in scheduling than they save.
  const int64_t per_task = (int64_t{1} << 15) / job.d;
  job.rows_per_task = per_task > 1 ? per_task : 1;
  const int64_t tasks = (job.rows + job.rows_per_task - 1) / job.rows_per_task;
  if (tasks == 1) {
    job.run_rows(0, job.rows);
    return nullptr;
  }
  return ort::call<OrtStatus*>(api, ort::slot::KernelContext_ParallelFor, static_cast<const OrtKernelContext*>(context),
                               &Job<T>::task, static_cast<size_t>(tasks), size_t{0}, static_cast<void*>(&job));
}

// The CUDA kernels' leading axes of X and the coefficients' row strides against them (see coefficient_strides).
bool broadcast_params(const Shape& x, const Shape& c1, const Shape& c2, cuda::Params* params, std::string* why) {
  int64_t s1[kMaxRank] = {}, s2[kMaxRank] = {};
  if (!coefficient_strides(x, c1, s1, why) || !coefficient_strides(x, c2, s2, why)) return false;
  for (int a = 0; a < x.rank - 1; ++a) {
    params->lead_dims[a] = x.dims[a];
    params->c1_stride[a] = s1[a];
    params->c2_stride[a] = s2[a];
  }
  return true;
}

// The CUDA kernels' type index (road_cuda.h: f32, f64, f16, bf16) of an element type; -1 for other types.
int cuda_type_index(int type) {
  switch (type) {
    case ORT_TYPE_FLOAT: return 0;
    case ORT_TYPE_DOUBLE: return 1;
    case ORT_TYPE_FLOAT16: return 2;
    case ORT_TYPE_BFLOAT16: return 3;
    default: return -1;
  }
}

// onnxruntime's compute stream for this run and the kernels' type index of `type`.
OrtStatus* cuda_target(const Kernel& kernel, OrtKernelContext* context, int type, cuda::CUstream* stream,
                       int* type_index) {
  void* raw = nullptr;
  ROAD_TRY((ort::call<OrtStatus*>(kernel.api, ort::slot::KernelContext_GetGPUComputeStream,
                                  static_cast<const OrtKernelContext*>(context), &raw)));
  *stream = static_cast<cuda::CUstream>(raw);
  *type_index = cuda_type_index(type);
  if (*type_index < 0)
    return fail(kernel.api, kernel.name + ": element type " + std::to_string(type) + " is not a float type");
  return nullptr;
}

// The CUDA kernel: one launch on onnxruntime's compute stream (road_cuda.h); the shapes are host metadata.
OrtStatus* rotate_cuda(const Kernel& kernel, OrtKernelContext* context, const Shape& x, const Shape& c1,
                       const Shape& c2, const OrtValue* const* in, OrtValue* out) {
  const OrtApi* api = kernel.api;
  cuda::Params params{};
  void* data[4] = {};
  for (int i = 0; i < 3; ++i)
    ROAD_TRY((ort::call<OrtStatus*>(api, ort::slot::GetTensorMutableData, const_cast<OrtValue*>(in[i]), &data[i])));
  ROAD_TRY((ort::call<OrtStatus*>(api, ort::slot::GetTensorMutableData, out, &data[3])));
  params.x = data[0];
  params.c1 = data[1];
  params.c2 = data[2];
  params.y = data[3];
  params.d = x.dims[x.rank - 1];
  params.half = kernel.group_size / 2;
  params.pairs = params.d / 2;
  params.rows = params.d ? static_cast<long long>(x.count()) / params.d : 0;
  params.lead = x.rank - 1;
  std::string why;
  if (!broadcast_params(x, c1, c2, &params, &why)) return fail(api, kernel.name + ": " + why);
  cuda::CUstream stream = nullptr;
  int type_index = 0;
  ROAD_TRY(cuda_target(kernel, context, x.type, &stream, &type_index));
  if (!cuda::launch(stream, type_index, params, &why))
    return fail(api, kernel.name + " (CUDA): " + why);
  return nullptr;
}

// The node's first `count` inputs and their shapes; an error names a missing one.
OrtStatus* read_inputs(const Kernel& kernel, OrtKernelContext* context, size_t count, const OrtValue** in,
                       Shape* shapes) {
  for (size_t i = 0; i < count; ++i) {
    ROAD_TRY((ort::call<OrtStatus*>(kernel.api, ort::slot::KernelContext_GetInput,
                                    static_cast<const OrtKernelContext*>(context), i, &in[i])));
    if (!in[i]) return fail(kernel.api, kernel.name + ": input " + std::to_string(i) + " is missing");
    ROAD_TRY(shape_of(kernel.api, in[i], &shapes[i]));
  }
  return nullptr;
}

// The per-row form's banks B1, B2 [adapters, n] (n = Y's last axis, `params->d`) and adapter_ids int64 [batch] (or
// [1]) checked against Y, and set in `params` (ids, bank count, rows of Y per id).
OrtStatus* bank_params(const Kernel& kernel, const Shape& b1, const Shape& b2, const Shape& ids, const Shape& y,
                       void* ids_data, cuda::Params* params) {
  const int64_t n = params->d;
  if (b1.rank != 2 || b2.rank != 2 || b1.dims[1] != n || b2.dims[1] != n || b1.dims[0] != b2.dims[0])
    return fail(kernel.api, kernel.name + ": coefficient banks " + b1.str() + " and " + b2.str() +
                                " are not both [adapters, " + std::to_string(n) + "]");
  if (ids.type != 7 || ids.rank != 1 || y.rank < 2 || (ids.dims[0] != y.dims[0] && ids.dims[0] != 1))
    return fail(kernel.api, kernel.name + ": adapter_ids " + ids.str() + " must be int64 [batch] (or [1]) with X's "
                                "batch " + std::to_string(y.rank ? y.dims[0] : 0));
  params->ids = static_cast<const long long*>(ids_data);
  params->banks = b1.dims[0];
  params->rows_per_id = ids.dims[0] ? params->rows / ids.dims[0] : 1;
  if (params->rows_per_id < 1) params->rows_per_id = 1;
  return nullptr;
}

// road.MatMulRotate(X, W, C1, C2) and road.MatMulRotateRows(X, W, C1, C2, adapter_ids) on CUDA: Y = X @ W by
// cuBLAS into Y, then the rotation in place on Y (each thread reads both elements of its pair before writing them),
// both on onnxruntime's stream: one node where the graph had MatMul and road.Rotate.
OrtStatus* matmul_rotate_cuda(const Kernel& kernel, OrtKernelContext* context) {
  const OrtApi* api = kernel.api;
  const size_t count = input_count(kernel.kind);
  const OrtValue* in[6] = {};
  Shape shapes[6];
  ROAD_TRY(read_inputs(kernel, context, count, in, shapes));
  const Shape &x = shapes[0], &w = shapes[1];
  if (x.rank < 1 || w.rank != 2 || x.dims[x.rank - 1] != w.dims[0])
    return fail(api, kernel.name + ": X " + x.str() + " and W " + w.str() + " do not multiply (want W [k, n] with k "
                "X's last axis)");
  for (int i = 1; i < 4; ++i)
    if (shapes[i].type != x.type) return fail(api, kernel.name + ": X, W, C1 and C2 must share one element type");
  const int64_t n = w.dims[1];
  if (n % kernel.group_size)
    return fail(api, kernel.name + ": W's output axis " + std::to_string(n) + " is not a multiple of group_size " +
                         std::to_string(kernel.group_size));
  Shape y = x;
  y.dims[y.rank - 1] = n;
  OrtValue* out = nullptr;
  ROAD_TRY((ort::call<OrtStatus*>(api, ort::slot::KernelContext_GetOutput, context, size_t{0},
                                  static_cast<const int64_t*>(y.dims), static_cast<size_t>(y.rank), &out)));
  cuda::Params params{};
  void* data[5] = {};
  for (size_t i = 0; i < count; ++i)
    ROAD_TRY((ort::call<OrtStatus*>(api, ort::slot::GetTensorMutableData, const_cast<OrtValue*>(in[i]), &data[i])));
  void* result = nullptr;
  ROAD_TRY((ort::call<OrtStatus*>(api, ort::slot::GetTensorMutableData, out, &result)));
  params.x = result;
  params.c1 = data[2];
  params.c2 = data[3];
  params.y = result;
  params.d = n;
  params.half = kernel.group_size / 2;
  params.pairs = n / 2;
  params.rows = n ? static_cast<long long>(y.count()) / n : 0;
  params.lead = y.rank - 1;
  std::string why;
  if (kernel.kind == Kind::kMatMulRows) {
    ROAD_TRY(bank_params(kernel, shapes[2], shapes[3], shapes[4], y, data[4], &params));
  } else {
    if (!broadcast_params(y, shapes[2], shapes[3], &params, &why)) return fail(api, kernel.name + ": " + why);
  }
  cuda::CUstream stream = nullptr;
  int type_index = 0;
  ROAD_TRY(cuda_target(kernel, context, x.type, &stream, &type_index));
  const long long m = params.rows;
  const cuda::CUstream on = stream;
  if (kernel.gemv && cuda::gemv_fits(m, w.dims[0], n, kernel.group_size, type_index, data[0], data[1])) {  // a decode step: one launch
    params.x = data[0];
    if (!cuda::launch_gemv(on, type_index, params, data[1], w.dims[0], &why))
      return fail(api, kernel.name + " (CUDA): " + why);
    return nullptr;
  }
  if (!cuda::gemm(on, type_index, data[0], data[1], result, m, w.dims[0], n, &why) ||
      !cuda::launch(on, type_index, params, &why))
    return fail(api, kernel.name + " (CUDA): " + why);
  return nullptr;
}

// road.LinearRotate(X, W, C1, C2) / road.LinearRotateRows(X, W, B1, B2, adapter_ids), W [n, k] (a Linear weight),
// and road.MatMulNBitsRotate(A, B, scales, C1, C2) / road.MatMulNBitsRotateRows(A, B, scales, B1, B2, adapter_ids)
// (B, scales as onnxruntime's MatMulNBits keeps them, symmetric: no zero points), on CUDA: one launch of `linear`
// (road_cuda.h) for any number of rows; a LinearRotate that does not fit it (float64, unaligned) or a prefill of
// more than 8 rows takes cuBLAS, then the rotation in place.
OrtStatus* linear_rotate_cuda(const Kernel& kernel, OrtKernelContext* context) {
  const OrtApi* api = kernel.api;
  const bool nbits = kernel.kind == Kind::kNBits || kernel.kind == Kind::kNBitsRows;
  const bool banks = rows_kind(kernel.kind);
  const size_t count = input_count(kernel.kind), first_coef = nbits ? 3 : 2;
  const OrtValue* in[6] = {};
  Shape shapes[6];
  ROAD_TRY(read_inputs(kernel, context, count, in, shapes));
  const Shape &x = shapes[0], &w = shapes[1];
  if (x.rank < 1) return fail(api, kernel.name + ": X must have at least one axis");
  const int64_t k = x.dims[x.rank - 1];
  int64_t n = 0, blocks_per_col = 0;
  if (nbits) {
    n = kernel.n;
    blocks_per_col = (kernel.k + kernel.block_size - 1) / kernel.block_size;
    const int64_t blob = kernel.block_size * kernel.bits / 8;
    if (k != kernel.k || w.rank != 3 || w.dims[0] != n || w.dims[1] != blocks_per_col || w.dims[2] != blob ||
        shapes[2].count() != static_cast<size_t>(n * blocks_per_col) || shapes[2].type != x.type)
      return fail(api, kernel.name + ": A " + x.str() + ", B " + w.str() + " and scales " + shapes[2].str() +
                           " do not fit K=" + std::to_string(kernel.k) + ", N=" + std::to_string(n) + ", block_size=" +
                           std::to_string(kernel.block_size) + ", bits=" + std::to_string(kernel.bits));
  } else {
    if (w.rank != 2 || w.dims[1] != k || w.type != x.type)
      return fail(api, kernel.name + ": X " + x.str() + " and W " + w.str() + " do not multiply (want W [n, k] of X's "
                  "type with k X's last axis)");
    n = w.dims[0];
  }
  for (size_t i = first_coef; i < first_coef + 2; ++i)
    if (shapes[i].type != x.type) return fail(api, kernel.name + ": X and the coefficients must share one element type");
  if (n % kernel.group_size)
    return fail(api, kernel.name + ": the output axis " + std::to_string(n) + " is not a multiple of group_size " +
                         std::to_string(kernel.group_size));
  Shape y = x;
  y.dims[y.rank - 1] = n;
  OrtValue* out = nullptr;
  ROAD_TRY((ort::call<OrtStatus*>(api, ort::slot::KernelContext_GetOutput, context, size_t{0},
                                  static_cast<const int64_t*>(y.dims), static_cast<size_t>(y.rank), &out)));
  void* data[6] = {};
  for (size_t i = 0; i < count; ++i)
    ROAD_TRY((ort::call<OrtStatus*>(api, ort::slot::GetTensorMutableData, const_cast<OrtValue*>(in[i]), &data[i])));
  void* result = nullptr;
  ROAD_TRY((ort::call<OrtStatus*>(api, ort::slot::GetTensorMutableData, out, &result)));
  cuda::Params params{};
  params.x = data[0];
  params.c1 = data[first_coef];
  params.c2 = data[first_coef + 1];
  params.y = result;
  params.d = n;
  params.half = kernel.group_size / 2;
  params.pairs = n / 2;
  params.rows = n ? static_cast<long long>(y.count()) / n : 0;
  params.lead = y.rank - 1;
  std::string why;
  if (banks) {
    ROAD_TRY(bank_params(kernel, shapes[first_coef], shapes[first_coef + 1], shapes[count - 1], y, data[count - 1],
                         &params));
  } else if (!broadcast_params(y, shapes[first_coef], shapes[first_coef + 1], &params, &why)) {
    return fail(api, kernel.name + ": " + why);
  }
  cuda::CUstream stream = nullptr;
  int type_index = 0;
  ROAD_TRY(cuda_target(kernel, context, x.type, &stream, &type_index));
  const int bits = nbits ? static_cast<int>(kernel.bits) : 0;
  const bool fits = cuda::linear_fits(type_index, k, n, kernel.group_size, bits, static_cast<int>(kernel.block_size),
                                      blocks_per_col, data[0], data[1]);
  if (nbits && !fits)
    return fail(api, kernel.name + " (CUDA): a product of K=" + std::to_string(k) + ", block_size=" +
                         std::to_string(kernel.block_size) + ", bits=" + std::to_string(bits) + " in element type " +
                         std::to_string(x.type) + " is not one the kernel takes (float, float16 or bfloat16; "
                         "rows of whole 16-byte loads)");
  if (fits && (nbits || (kernel.gemv && params.rows <= 8))) {
    if (!cuda::launch_linear(stream, type_index, params, data[1], nbits ? data[2] : nullptr, k, blocks_per_col,
                             static_cast<int>(kernel.block_size), bits, kernel.linear_form, &why))
      return fail(api, kernel.name + " (CUDA): " + why);
    return nullptr;
  }
  params.x = result;
  if (!cuda::gemm(stream, type_index, data[0], data[1], result, params.rows, k, n, &why, true) ||
      !cuda::launch(stream, type_index, params, &why))
    return fail(api, kernel.name + " (CUDA): " + why);
  return nullptr;
}

OrtStatus* compute(void* self, OrtKernelContext* context) noexcept {
  const Kernel& kernel = *static_cast<Kernel*>(self);
  const OrtApi* api = kernel.api;
  if (kernel.kind != Kind::kRotate) {
    try {
      if (kernel.kind != Kind::kMatMul && kernel.kind != Kind::kMatMulRows) return linear_rotate_cuda(kernel, context);
      return matmul_rotate_cuda(kernel, context);
    } catch (const std::exception& e) {
      return fail(api, kernel.name + ": " + e.what());
    }
  }
  const OrtValue* in[3] = {};
  Shape shapes[3];
  for (size_t i = 0; i < 3; ++i) {
    ROAD_TRY((ort::call<OrtStatus*>(api, ort::slot::KernelContext_GetInput,
                                    static_cast<const OrtKernelContext*>(context), i, &in[i])));
    if (!in[i]) return fail(api, kernel.name + ": input " + std::to_string(i) + " is missing");
    ROAD_TRY(shape_of(api, in[i], &shapes[i]));
  }
  const Shape& x = shapes[0];
  if (x.rank < 1) return fail(api, kernel.name + ": X must have at least one axis");
  if (shapes[1].type != x.type || shapes[2].type != x.type)
    return fail(api, kernel.name + ": X, C1 and C2 must share one element type");
  const int64_t d = x.dims[x.rank - 1];
  if (d % kernel.group_size)
    return fail(api, kernel.name + ": last axis " + std::to_string(d) + " of X " + x.str() +
                         " is not a multiple of group_size " + std::to_string(kernel.group_size));
  OrtValue* out = nullptr;
  ROAD_TRY((ort::call<OrtStatus*>(api, ort::slot::KernelContext_GetOutput, context, size_t{0},
                                  static_cast<const int64_t*>(x.dims), static_cast<size_t>(x.rank), &out)));
  try {
    if (kernel.cuda) return rotate_cuda(kernel, context, x, shapes[1], shapes[2], in, out);
    switch (x.type) {
      case ORT_TYPE_FLOAT: return rotate<float>(kernel, context, x, shapes[1], shapes[2], in, out);
      case ORT_TYPE_DOUBLE: return rotate<double>(kernel, context, x, shapes[1], shapes[2], in, out);
      case ORT_TYPE_FLOAT16: return rotate<Half>(kernel, context, x, shapes[1], shapes[2], in, out);
      case ORT_TYPE_BFLOAT16: return rotate<BFloat16>(kernel, context, x, shapes[1], shapes[2], in, out);
      default: return fail(api, kernel.name + ": element type " + std::to_string(x.type) + " is not a float type");
    }
  } catch (const std::exception& e) {
    return fail(api, kernel.name + ": " + e.what());
  }
}

// --- the op descriptions --------------------------------------------------------------------------------------
// One description per op name and element type: onnxruntime merges them into one schema whose type
// constraint lists the four types (a type-agnostic op would need a shape-inference callback for its output).
struct RoadOp : OrtCustomOp {
  const char* name;
  int type;
  bool cuda;
  Kind kind;
  size_t inputs;
};

OrtStatus* create_kernel(const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info, void** out) noexcept {
  const RoadOp* road = static_cast<const RoadOp*>(op);
  const char* name = road->name;
  int64_t group = 0;
  ROAD_TRY((ort::call<OrtStatus*>(api, ort::slot::KernelInfoGetAttribute_int64, info, "group_size", &group)));
  if (group < 2 || group % 2)
    return fail(api, std::string("road.") + name + ": group_size must be even and >= 2, got " + std::to_string(group));
  try {
    const char* gemv = std::getenv("ROAD_EXPORT_GEMV");
    Kernel* kernel = new Kernel{api, group, std::string("road.") + name, road->cuda, road->kind,
                                !(gemv && std::string(gemv) == "0")};
    *out = kernel;
    const char* form = std::getenv("ROAD_EXPORT_LINEAR");
    const std::string chosen = form ? form : "";
    kernel->linear_form = chosen == "warp"   ? cuda::LinearForm::kWarp
                          : chosen == "tile" ? cuda::LinearForm::kTile
                          : chosen == "mma"  ? cuda::LinearForm::kMma
                                             : cuda::LinearForm::kAuto;
    if (road->kind == Kind::kNBits || road->kind == Kind::kNBitsRows) {
      for (auto [attribute, value] : {std::pair<const char*, int64_t*>{"K", &kernel->k}, {"N", &kernel->n},
                                      {"bits", &kernel->bits}, {"block_size", &kernel->block_size}}) {
        if (OrtStatus* status = ort::call<OrtStatus*>(api, ort::slot::KernelInfoGetAttribute_int64, info, attribute,
                                                      value)) {
          delete kernel;
          *out = nullptr;
          return status;
        }
      }
      if ((kernel->bits != 4 && kernel->bits != 8) || kernel->block_size < 16 || kernel->k < 1 || kernel->n < 1) {
        const std::string message = std::string("road.") + name + ": bits must be 4 or 8, block_size >= 16, K and "
                                    "N >= 1; got bits " + std::to_string(kernel->bits) + ", block_size " +
                                    std::to_string(kernel->block_size);
        delete kernel;
        *out = nullptr;
        return fail(api, message);
      }
    }
  } catch (const std::exception& e) {
    return fail(api, e.what());
  }
  return nullptr;
}

RoadOp make_op(const char* name, int type, bool cuda = false, Kind kind = Kind::kRotate) {
  RoadOp op{};
  op.version = ort::kApiVersion;
  op.name = name;
  op.type = type;
  op.cuda = cuda;
  op.kind = kind;
  op.inputs = input_count(kind);
  op.GetName = [](const OrtCustomOp* self) { return static_cast<const RoadOp*>(self)->name; };
  op.GetExecutionProviderType = [](const OrtCustomOp* self) -> const char* {
    return static_cast<const RoadOp*>(self)->cuda ? "CUDAExecutionProvider" : "CPUExecutionProvider";
  };
  op.GetInputType = [](const OrtCustomOp* self, size_t index) {  // adapter_ids int64, MatMulNBits' B uint8
    const RoadOp* road = static_cast<const RoadOp*>(self);
    return input_type(road->kind, index, road->type);
  };
  op.GetInputTypeCount = [](const OrtCustomOp* self) -> size_t { return static_cast<const RoadOp*>(self)->inputs; };
  op.GetOutputType = [](const OrtCustomOp* self, size_t) { return static_cast<const RoadOp*>(self)->type; };
  op.GetOutputTypeCount = [](const OrtCustomOp*) -> size_t { return 1; };
  op.KernelDestroy = [](void* kernel) { delete static_cast<Kernel*>(kernel); };
  op.GetInputCharacteristic = [](const OrtCustomOp*, size_t) { return 0; };   // required
  op.GetOutputCharacteristic = [](const OrtCustomOp*, size_t) { return 0; };  // required
  op.GetInputMemoryType = [](const OrtCustomOp*, size_t) { return 0; };       // the provider's own memory
  op.GetVariadicInputMinArity = [](const OrtCustomOp*) { return 1; };
  op.GetVariadicInputHomogeneity = [](const OrtCustomOp*) { return 1; };
  op.GetVariadicOutputMinArity = [](const OrtCustomOp*) { return 1; };
  op.GetVariadicOutputHomogeneity = [](const OrtCustomOp*) { return 1; };
  op.CreateKernelV2 = create_kernel;
  op.KernelComputeV2 = compute;
  op.GetStartVersion = [](const OrtCustomOp*) { return 1; };
  op.GetEndVersion = [](const OrtCustomOp*) { return INT_MAX; };
  return op;
}

RoadOp ops[] = {
    make_op("Rotate", ORT_TYPE_FLOAT),         make_op("Rotate", ORT_TYPE_FLOAT16),
    make_op("Rotate", ORT_TYPE_DOUBLE),        make_op("Rotate", ORT_TYPE_BFLOAT16),
    make_op("RotateTied", ORT_TYPE_FLOAT),     make_op("RotateTied", ORT_TYPE_FLOAT16),
    make_op("RotateTied", ORT_TYPE_DOUBLE),    make_op("RotateTied", ORT_TYPE_BFLOAT16),
};
// The same ops for the CUDA execution provider, added where the CUDA driver and NVRTC open (road_cuda.h).
RoadOp cuda_ops[] = {
    make_op("Rotate", ORT_TYPE_FLOAT, true),       make_op("Rotate", ORT_TYPE_FLOAT16, true),
    make_op("Rotate", ORT_TYPE_DOUBLE, true),      make_op("Rotate", ORT_TYPE_BFLOAT16, true),
    make_op("RotateTied", ORT_TYPE_FLOAT, true),   make_op("RotateTied", ORT_TYPE_FLOAT16, true),
    make_op("RotateTied", ORT_TYPE_DOUBLE, true),  make_op("RotateTied", ORT_TYPE_BFLOAT16, true),
};
// X @ W (or X @ W^T, or MatMulNBits) then the rotation, one node (passes/matmul_rotate.py and passes/linear_rotate.py
// write them); CUDA only, with cuBLAS.
RoadOp matmul_ops[] = {
    make_op("MatMulRotate", ORT_TYPE_FLOAT, true, Kind::kMatMul),
    make_op("MatMulRotate", ORT_TYPE_FLOAT16, true, Kind::kMatMul),
    make_op("MatMulRotate", ORT_TYPE_DOUBLE, true, Kind::kMatMul),
    make_op("MatMulRotate", ORT_TYPE_BFLOAT16, true, Kind::kMatMul),
    make_op("MatMulRotateRows", ORT_TYPE_FLOAT, true, Kind::kMatMulRows),
    make_op("MatMulRotateRows", ORT_TYPE_FLOAT16, true, Kind::kMatMulRows),
    make_op("MatMulRotateRows", ORT_TYPE_DOUBLE, true, Kind::kMatMulRows),
    make_op("MatMulRotateRows", ORT_TYPE_BFLOAT16, true, Kind::kMatMulRows),
    make_op("LinearRotate", ORT_TYPE_FLOAT, true, Kind::kLinear),
    make_op("LinearRotate", ORT_TYPE_FLOAT16, true, Kind::kLinear),
    make_op("LinearRotate", ORT_TYPE_DOUBLE, true, Kind::kLinear),
    make_op("LinearRotate", ORT_TYPE_BFLOAT16, true, Kind::kLinear),
    make_op("LinearRotateRows", ORT_TYPE_FLOAT, true, Kind::kLinearRows),
    make_op("LinearRotateRows", ORT_TYPE_FLOAT16, true, Kind::kLinearRows),
    make_op("LinearRotateRows", ORT_TYPE_DOUBLE, true, Kind::kLinearRows),
    make_op("LinearRotateRows", ORT_TYPE_BFLOAT16, true, Kind::kLinearRows),
    make_op("MatMulNBitsRotate", ORT_TYPE_FLOAT, true, Kind::kNBits),
    make_op("MatMulNBitsRotate", ORT_TYPE_FLOAT16, true, Kind::kNBits),
    make_op("MatMulNBitsRotate", ORT_TYPE_BFLOAT16, true, Kind::kNBits),
    make_op("MatMulNBitsRotateRows", ORT_TYPE_FLOAT, true, Kind::kNBitsRows),
    make_op("MatMulNBitsRotateRows", ORT_TYPE_FLOAT16, true, Kind::kNBitsRows),
    make_op("MatMulNBitsRotateRows", ORT_TYPE_BFLOAT16, true, Kind::kNBitsRows),
};
OrtCustomOpDomain* road_domain = nullptr;
std::mutex domain_mutex;

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* RegisterCustomOps(OrtSessionOptions* options,
                                                                                const OrtApiBase* base) {
  const OrtApi* api = base->GetApi(ort::kApiVersion);
  if (!api) {
    const OrtApi* oldest = base->GetApi(1);
    std::string message = std::string("road kernels need onnxruntime >= 1.17, this is ") + base->GetVersionString();
    return oldest ? ort::call<OrtStatus*>(oldest, ort::slot::CreateStatus, ORT_FAIL, message.c_str()) : nullptr;
  }
  std::lock_guard<std::mutex> lock(domain_mutex);
  if (!road_domain) {  // one domain for every session; onnxruntime keeps a pointer to it
    OrtCustomOpDomain* domain = nullptr;
    ROAD_TRY((ort::call<OrtStatus*>(api, ort::slot::CreateCustomOpDomain, "road", &domain)));
    for (const RoadOp& op : ops)
      ROAD_TRY((ort::call<OrtStatus*>(api, ort::slot::CustomOpDomain_Add, domain,
                                      static_cast<const OrtCustomOp*>(&op))));
    if (cuda::available())
      for (const RoadOp& op : cuda_ops)
        ROAD_TRY((ort::call<OrtStatus*>(api, ort::slot::CustomOpDomain_Add, domain,
                                        static_cast<const OrtCustomOp*>(&op))));
    if (cuda::available() && cuda::cublas_opens())
      for (const RoadOp& op : matmul_ops)
        ROAD_TRY((ort::call<OrtStatus*>(api, ort::slot::CustomOpDomain_Add, domain,
                                        static_cast<const OrtCustomOp*>(&op))));
    road_domain = domain;
  }
  return ort::call<OrtStatus*>(api, ort::slot::AddCustomOpDomain, options, road_domain);
}
