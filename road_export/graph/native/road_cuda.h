// CUDA kernels for road.Rotate / road.RotateTied, compiled at first use with NVRTC and launched through the CUDA
// driver API on onnxruntime's compute stream.
//
// Users of onnxruntime-gpu rarely have nvcc, but they have the NVIDIA driver (libcuda.so.1) and can have NVRTC
// (libnvrtc, the `nvidia-cuda-nvrtc` pip package, or a CUDA toolkit). Both are opened with dlopen and the few
// entries used are declared here by hand, like ort_abi.h does for onnxruntime, so this library still builds with
// the plain C++ compiler and needs no CUDA headers. Where libcuda or NVRTC cannot be opened the CUDA kernels are
// not registered and the library is exactly the CPU library.
//
// The kernel source below is compiled once per GPU architecture to a cubin (sm_XY) and cached on disk next to
// the library (`$ROAD_EXPORT_KERNEL_CACHE`, set by road_export.graph.native); each CUDA context loads it once, at the
// first Compute on that context. After that, Compute only launches: no allocation, no synchronisation, no
// compilation, so onnxruntime's CUDA-graph capture (which runs the model normally first) can record it.
#pragma once

#include <dlfcn.h>

#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <vector>

namespace cuda {

// --- CUDA driver API, the entries used (cuda.h, stable C ABI) ---------------------------------------------------
using CUresult = int;
using CUdevice = int;
struct CUctx_st;
struct CUmod_st;
struct CUfunc_st;
struct CUstream_st;
using CUcontext = CUctx_st*;
using CUmodule = CUmod_st*;
using CUfunction = CUfunc_st*;
using CUstream = CUstream_st*;
constexpr int kComputeCapabilityMajor = 75;  // CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
constexpr int kComputeCapabilityMinor = 76;

struct Driver {
  CUresult (*Init)(unsigned);
  CUresult (*StreamGetCtx)(CUstream, CUcontext*);
  CUresult (*CtxGetCurrent)(CUcontext*);
  CUresult (*CtxPushCurrent)(CUcontext);
  CUresult (*CtxPopCurrent)(CUcontext*);
  CUresult (*CtxGetDevice)(CUdevice*);
  CUresult (*DeviceGetAttribute)(int*, int, CUdevice);
  CUresult (*ModuleLoadData)(CUmodule*, const void*);
  CUresult (*ModuleGetFunction)(CUfunction*, CUmodule, const char*);
  CUresult (*LaunchKernel)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, CUstream,
                           void**, void**);
  CUresult (*GetErrorString)(CUresult, const char**);
};

// --- NVRTC, the entries used (nvrtc.h) ------------------------------------------------------------------------
struct NvrtcProgram;
struct Nvrtc {
  int (*Version)(int*, int*);
  int (*CreateProgram)(NvrtcProgram**, const char*, const char*, int, const char* const*, const char* const*);
  int (*CompileProgram)(NvrtcProgram*, int, const char* const*);
  int (*GetCUBINSize)(NvrtcProgram*, size_t*);
  int (*GetCUBIN)(NvrtcProgram*, char*);
  int (*GetProgramLogSize)(NvrtcProgram*, size_t*);
  int (*GetProgramLog)(NvrtcProgram*, char*);
  int (*DestroyProgram)(NvrtcProgram**);
};

template <typename Fn>
bool resolve(void* lib, const char* name, Fn* fn) {
  *fn = reinterpret_cast<Fn>(dlsym(lib, name));
  return *fn != nullptr;
}

inline const Driver* driver() {
  static const Driver* loaded = [] () -> const Driver* {
    const char* off = std::getenv("ROAD_EXPORT_CUDA");
    if (off && std::string(off) == "0") return nullptr;
    void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!lib) return nullptr;
    static Driver d{};
    bool ok = resolve(lib, "cuInit", &d.Init) && resolve(lib, "cuStreamGetCtx", &d.StreamGetCtx) &&
              resolve(lib, "cuCtxGetCurrent", &d.CtxGetCurrent) &&
              resolve(lib, "cuCtxPushCurrent_v2", &d.CtxPushCurrent) &&
              resolve(lib, "cuCtxPopCurrent_v2", &d.CtxPopCurrent) && resolve(lib, "cuCtxGetDevice", &d.CtxGetDevice) &&
              resolve(lib, "cuDeviceGetAttribute", &d.DeviceGetAttribute) &&
              resolve(lib, "cuModuleLoadData", &d.ModuleLoadData) &&
              resolve(lib, "cuModuleGetFunction", &d.ModuleGetFunction) &&
              resolve(lib, "cuLaunchKernel", &d.LaunchKernel) && resolve(lib, "cuGetErrorString", &d.GetErrorString);
    if (!ok || d.Init(0) != 0) return nullptr;
    return &d;
  }();
  return loaded;
}

inline const Nvrtc* nvrtc() {
  static const Nvrtc* loaded = [] () -> const Nvrtc* {
    std::vector<std::string> names;
    if (const char* path = std::getenv("ROAD_EXPORT_NVRTC")) names.emplace_back(path);
    for (const char* name : {"libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"}) names.emplace_back(name);
    void* lib = nullptr;
    for (const std::string& name : names)
      if (!name.empty() && (lib = dlopen(name.c_str(), RTLD_NOW | RTLD_LOCAL))) break;
    if (!lib) return nullptr;
    static Nvrtc n{};
    bool ok = resolve(lib, "nvrtcVersion", &n.Version) && resolve(lib, "nvrtcCreateProgram", &n.CreateProgram) &&
              resolve(lib, "nvrtcCompileProgram", &n.CompileProgram) &&
              resolve(lib, "nvrtcGetCUBINSize", &n.GetCUBINSize) && resolve(lib, "nvrtcGetCUBIN", &n.GetCUBIN) &&
              resolve(lib, "nvrtcGetProgramLogSize", &n.GetProgramLogSize) &&
              resolve(lib, "nvrtcGetProgramLog", &n.GetProgramLog) &&
              resolve(lib, "nvrtcDestroyProgram", &n.DestroyProgram);
    return ok ? &n : nullptr;
  }();
  return loaded;
}

// Whether the CUDA kernels can run here: the driver and NVRTC both open.
inline bool available() { return driver() && nvrtc(); }

// --- the kernel ---------------------------------------------------------------------------------------------------
// One thread per pair (i, i + half) of a group; blockIdx.y walks rows, so the coefficient offset of a row (its
// broadcast over X's leading axes) is computed once per thread, not per element. fp16 / bf16 are converted by hand
// (no cuda_fp16.h: NVRTC then needs no include path) and computed in float, rounded once.
constexpr int kMaxRank = 8;
constexpr int kThreads = 256;

struct Params {
  const void* x;
  const void* c1;
  const void* c2;
  void* y;
  long long d, half, pairs, rows;
  long long lead_dims[kMaxRank];
  long long c1_stride[kMaxRank];
  long long c2_stride[kMaxRank];
  int lead;
  const long long* ids;   // per-row adapter ids (device memory) selecting rows of C1/C2 banks [banks, d], or null
  long long rows_per_id;  // rows of X per id (X's rows over the ids' count)
  long long banks;        // rows in C1/C2; ids in [-banks, 0) count from the end (as GatherND); others write NaN
};

constexpr const char* kSource = R"CUDA(
#define ROAD_MAX_RANK 8
struct Params {
  const void* x; const void* c1; const void* c2; void* y;
  long long d, half, pairs, rows;
  long long lead_dims[ROAD_MAX_RANK]; long long c1_stride[ROAD_MAX_RANK]; long long c2_stride[ROAD_MAX_RANK];
  int lead;
  const long long* ids; long long rows_per_id, banks;
};
struct h16 { unsigned short b; };
struct b16 { unsigned short b; };
__device__ __forceinline__ float ld(float v) { return v; }
__device__ __forceinline__ double ld(double v) { return v; }
__device__ __forceinline__ float ld(h16 v) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.b)); return f; }
__device__ __forceinline__ float ld(b16 v) { return __uint_as_float(((unsigned)v.b) << 16); }
__device__ __forceinline__ void st(float* p, float v) { *p = v; }
__device__ __forceinline__ void st(double* p, double v) { *p = v; }
__device__ __forceinline__ void st(h16* p, float v) { unsigned short b; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(b) : "f"(v)); p->b = b; }
__device__ __forceinline__ void st(b16* p, float v) {
  unsigned x = __float_as_uint(v);
  unsigned short b = (x & 0x7fffffffu) > 0x7f800000u ? (unsigned short)((x >> 16) | 0x40u)
                                                      : (unsigned short)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
  p->b = b;
}
template <typename T> struct C { typedef float type; };
template <> struct C<double> { typedef double type; };

template <typename T>
__device__ __forceinline__ void rotate(const Params& p) {
  typedef typename C<T>::type F;
  const long long pair = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (pair >= p.pairs) return;
  const long long half = p.half, group = pair / half, i = pair - group * half;
  const long long k = group * 2 * half + i;
  for (long long row = blockIdx.y; row < p.rows; row += gridDim.y) {
    long long o1 = 0, o2 = 0, r = row;
    if (p.ids) {  // a bank row per id: X's rows [ids, rows_per_id]; negative ids count from the end (GatherND)
      long long id = p.ids[row / p.rows_per_id];
      if (id < 0) id += p.banks;
      if (id < 0 || id >= p.banks) {
        T* y = (T*)p.y + row * p.d + k;
        st(y, __int_as_float(0x7fc00000));
        st(y + half, __int_as_float(0x7fc00000));
        continue;
      }
      o1 = o2 = id * p.d;
    }
    for (int a = p.lead - 1; a >= 0 && r && !p.ids; --a) {
      const long long q = r / p.lead_dims[a], idx = r - q * p.lead_dims[a];
      o1 += idx * p.c1_stride[a];
      o2 += idx * p.c2_stride[a];
      r = q;
    }
    const T* x = (const T*)p.x + row * p.d + k;
    const T* a = (const T*)p.c1 + o1 + k;
    const T* b = (const T*)p.c2 + o2 + k;
    T* y = (T*)p.y + row * p.d + k;
    const F x1 = ld(x[0]), x2 = ld(x[half]);
    st(y, ld(a[0]) * x1 - ld(b[0]) * x2);
    st(y + half, ld(b[half]) * x1 + ld(a[half]) * x2);
  }
}
extern "C" __global__ void __launch_bounds__(256) road_rotate_f32(Params p) { rotate<float>(p); }
extern "C" __global__ void __launch_bounds__(256) road_rotate_f64(Params p) { rotate<double>(p); }
extern "C" __global__ void __launch_bounds__(256) road_rotate_f16(Params p) { rotate<h16>(p); }
extern "C" __global__ void __launch_bounds__(256) road_rotate_bf16(Params p) { rotate<b16>(p); }

// Y = rotate(X @ W) for at most 8 rows of X (a decode step), one launch: block b computes output columns
// [64 b, 64 b + 64) (whole groups: g divides 64) for every row. 256 threads = 32 k-lanes x 8 chunks of 8 columns;
// a thread takes 8 consecutive k at a time: 8 rows of 8 weights and the rows' 8 inputs, as 16-byte loads, and keeps
// rows x 8 sums in float. The k-lanes are reduced by warp shuffles and shared memory, then the rotation pairs
// columns inside the tile. K must be a multiple of 8 (`gemv_fits`).
#define GEMV_ROWS 8
#define GEMV_TILE 64
#define GEMV_THREADS 256
#define GEMV_KLANES (GEMV_THREADS / 8)
struct GemvParams { Params p; const void* w; long long k; };
__device__ __forceinline__ bool coef_offset(const Params& p, long long row, long long* o1, long long* o2) {
  *o1 = 0; *o2 = 0;
  if (p.ids) {
    long long id = p.ids[row / p.rows_per_id];
    if (id < 0) id += p.banks;
    if (id < 0 || id >= p.banks) return false;
    *o1 = *o2 = id * p.d;
    return true;
  }
  long long r = row;
  for (int a = p.lead - 1; a >= 0 && r; --a) {
    const long long q = r / p.lead_dims[a], idx = r - q * p.lead_dims[a];
    *o1 += idx * p.c1_stride[a];
    *o2 += idx * p.c2_stride[a];
    r = q;
  }
  return true;
}
template <typename T>
__device__ __forceinline__ void gemv(const GemvParams& g) {
  typedef float F;
  constexpr int kVec = sizeof(T) * 8 / 16;  // 16-byte loads per 8 values
  const Params& p = g.p;
  __shared__ F part[GEMV_THREADS / 32][GEMV_ROWS][GEMV_TILE];
  __shared__ F sum[GEMV_ROWS][GEMV_TILE];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int chunk = lane & 7, klane = tid >> 3;
  const long long n = p.d, k = g.k;
  const int rows = (int)p.rows;
  const long long col0 = (long long)blockIdx.x * GEMV_TILE + chunk * 8;
  F acc[GEMV_ROWS][8];
#pragma unroll
  for (int m = 0; m < GEMV_ROWS; ++m)
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[m][j] = 0;
  const T* x = (const T*)p.x;
  const T* w = (const T*)g.w;
  if (col0 < n) {
    for (long long k0 = (long long)klane * 8; k0 < k; k0 += GEMV_KLANES * 8) {
      uint4 wraw[8][kVec];
#pragma unroll
      for (int r = 0; r < 8; ++r)
#pragma unroll
        for (int v = 0; v < kVec; ++v) wraw[r][v] = __ldg((const uint4*)(w + (k0 + r) * n + col0) + v);
      uint4 xraw[GEMV_ROWS][kVec];
#pragma unroll
      for (int m = 0; m < GEMV_ROWS; ++m)
        if (m < rows)
#pragma unroll
          for (int v = 0; v < kVec; ++v) xraw[m][v] = __ldg((const uint4*)(x + m * k + k0) + v);
#pragma unroll
      for (int r = 0; r < 8; ++r) {
        F wf[8];  // one k-row of weights, converted once for every row of X
        const T* wv = (const T*)wraw[r];
#pragma unroll
        for (int j = 0; j < 8; ++j) wf[j] = ld(wv[j]);
#pragma unroll
        for (int m = 0; m < GEMV_ROWS; ++m) {
          if (m < rows) {
            const F xm = ld(((const T*)xraw[m])[r]);
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[m][j] += xm * wf[j];
          }
        }
      }
    }
  }
  // the 4 k-lanes of a warp (lanes 8 apart), then the warps
#pragma unroll
  for (int m = 0; m < GEMV_ROWS; ++m)
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      F v = acc[m][j];
      v += __shfl_xor_sync(0xffffffffu, v, 8);
      v += __shfl_xor_sync(0xffffffffu, v, 16);
      acc[m][j] = v;
    }
  if (lane < 8)
#pragma unroll
    for (int m = 0; m < GEMV_ROWS; ++m)
#pragma unroll
      for (int j = 0; j < 8; ++j) part[warp][m][chunk * 8 + j] = acc[m][j];
  __syncthreads();
  for (int o = tid; o < rows * GEMV_TILE; o += GEMV_THREADS) {
    const int m = o / GEMV_TILE, c = o % GEMV_TILE;
    F total = 0;
#pragma unroll
    for (int v = 0; v < GEMV_THREADS / 32; ++v) total += part[v][m][c];
    sum[m][c] = total;
  }
  __syncthreads();
  for (int o = tid; o < rows * GEMV_TILE; o += GEMV_THREADS) {
    const int m = o / GEMV_TILE, c = o % GEMV_TILE;
    const long long col = (long long)blockIdx.x * GEMV_TILE + c;
    if (col >= n) continue;
    T* y = (T*)p.y + m * n + col;
    long long o1, o2;
    if (!coef_offset(p, m, &o1, &o2)) {
      st(y, __int_as_float(0x7fc00000));
      continue;
    }
    const long long half = p.half, j = col % (2 * half);
    const F a = ld(((const T*)p.c1)[o1 + col]), b = ld(((const T*)p.c2)[o2 + col]);
    st(y, j < half ? a * sum[m][c] - b * sum[m][c + half] : b * sum[m][c - half] + a * sum[m][c]);
  }
}
extern "C" __global__ void __launch_bounds__(GEMV_THREADS) road_gemv_f32(GemvParams p) { gemv<float>(p); }
extern "C" __global__ void __launch_bounds__(GEMV_THREADS) road_gemv_f16(GemvParams p) { gemv<h16>(p); }
extern "C" __global__ void __launch_bounds__(GEMV_THREADS) road_gemv_bf16(GemvParams p) { gemv<b16>(p); }
// Y = rotate(X @ W^T) with W [n, k] row-major, one launch for any number of rows: W is a Linear weight ([out, in],
// as torch and onnxruntime's MatMulNBits keep it) or MatMulNBits' 4/8-bit blocks [n, k / bs, bs * bits / 8] with
// scales [n, k / bs] (symmetric: zero point 2^(bits-1)). One warp per rotation pair: columns c1 = group * g + i and
// c2 = c1 + g/2, so the rotation needs no shared memory; 8 pairs (8 warps) per block, n/16 blocks, so a decode
// step's product spreads over every SM. A lane takes 16 bytes of each of the two weight rows at a time, strided by
// 32 lanes along k (coalesced: the warp reads 512 contiguous bytes of a row), and keeps up to 8 rows of X in
// float sums; blockIdx.y walks chunks of 8 rows (a prefill reads the weights once per chunk).
#define LIN_ROWS 8
struct LinParams { Params p; const void* w; const void* scales; long long k, blocks_per_col; int block_size, bits; };
// The rotation coefficients of row `row` at columns c1 and c2, as floats: a[c1], b[c1], b[c2], a[c2] (its bank
// row for adapter ids); false for an id outside the banks.
template <typename T>
__device__ __forceinline__ float ldg1(const T* v) { return ld(T{__ldg((const unsigned short*)v)}); }
template <>
__device__ __forceinline__ float ldg1<float>(const float* v) { return __ldg(v); }
template <typename T>
__device__ __forceinline__ bool load_coefs(const Params& p, long long row, long long c1, long long c2, float* cf) {
  long long o1, o2;
  if (!coef_offset(p, row, &o1, &o2)) return false;
  const T* a = (const T*)p.c1 + o1;
  const T* b = (const T*)p.c2 + o2;
  cf[0] = ldg1(a + c1);
  cf[1] = ldg1(b + c1);
  cf[2] = ldg1(b + c2);
  cf[3] = ldg1(a + c2);
  return true;
}
template <typename T>
__device__ __forceinline__ void store_rotated(const Params& p, long long row, long long c1, long long c2, float s1,
                                              float s2, const float* cf, bool ok) {
  T* y = (T*)p.y + row * p.d;
  st(y + c1, ok ? cf[0] * s1 - cf[1] * s2 : __int_as_float(0x7fc00000));
  st(y + c2, ok ? cf[2] * s1 + cf[3] * s2 : __int_as_float(0x7fc00000));
}
// Row `row` of Y at the rotation pair (c1, c2) from the product's sums s1 (column c1) and s2 (column c2): the
// coefficients of that row (its bank row for adapter ids: NaN for an id outside the banks), rounded once.
template <typename T>
__device__ __forceinline__ void store_pair(const Params& p, long long row, long long c1, long long c2, float s1,
                                           float s2) {
  float cf[4];
  const bool ok = load_coefs<T>(p, row, c1, c2, cf);
  store_rotated<T>(p, row, c1, c2, s1, s2, cf, ok);
}
template <typename T>
__device__ __forceinline__ void linear_dot8(const T* x, long long k, int rows, long long kk, const float* w1,
                                            const float* w2, float* acc1, float* acc2) {
  // 8 consecutive k of up to LIN_ROWS rows of X against two weight rows (already floats)
#pragma unroll
  for (int m = 0; m < LIN_ROWS; ++m) {
    if (m < rows) {
      float xv[8];
      if (sizeof(T) == 2) {
        uint4 raw = __ldg((const uint4*)(x + m * k + kk));
        const T* v = (const T*)&raw;
#pragma unroll
        for (int j = 0; j < 8; ++j) xv[j] = ld(v[j]);
      } else {
        uint4 r0 = __ldg((const uint4*)(x + m * k + kk)), r1 = __ldg((const uint4*)(x + m * k + kk) + 1);
        const T* v0 = (const T*)&r0; const T* v1 = (const T*)&r1;
#pragma unroll
        for (int j = 0; j < 4; ++j) { xv[j] = ld(v0[j]); xv[j + 4] = ld(v1[j]); }
      }
      float s1 = 0, s2 = 0;
#pragma unroll
      for (int j = 0; j < 8; ++j) { s1 += xv[j] * w1[j]; s2 += xv[j] * w2[j]; }
      acc1[m] += s1;
      acc2[m] += s2;
    }
  }
}
template <typename T>
__device__ __forceinline__ void load8(const T* w, float* out) {  // 8 weights of a float row, as floats
  if (sizeof(T) == 2) {
    uint4 raw = __ldg((const uint4*)w);
    const T* v = (const T*)&raw;
#pragma unroll
    for (int j = 0; j < 8; ++j) out[j] = ld(v[j]);
  } else {
    uint4 r0 = __ldg((const uint4*)w), r1 = __ldg((const uint4*)w + 1);
    const T* v0 = (const T*)&r0; const T* v1 = (const T*)&r1;
#pragma unroll
    for (int j = 0; j < 4; ++j) { out[j] = ld(v0[j]); out[j + 4] = ld(v1[j]); }
  }
}
template <typename T, int BITS>
__device__ __forceinline__ void linear(const LinParams& g) {
  const Params& p = g.p;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const long long pair = (long long)blockIdx.x * 8 + warp;
  if (pair * 2 >= p.d) return;
  const long long half = p.half, group = pair / half;
  const long long c1 = group * 2 * half + (pair - group * half), c2 = c1 + half;
  const long long k = g.k, row0 = (long long)blockIdx.y * LIN_ROWS;
  const int rows = (int)(p.rows - row0 < LIN_ROWS ? p.rows - row0 : LIN_ROWS);
  const T* x = (const T*)p.x + row0 * k;
  float acc1[LIN_ROWS], acc2[LIN_ROWS];
#pragma unroll
  for (int m = 0; m < LIN_ROWS; ++m) { acc1[m] = 0; acc2[m] = 0; }
  if constexpr (BITS == 0) {  // float weights: 8 values (16 or 32 bytes) per lane and step
    const T* w1 = (const T*)g.w + c1 * k;
    const T* w2 = (const T*)g.w + c2 * k;
    for (long long kk = (long long)lane * 8; kk < k; kk += 32 * 8) {
      float a[8], b[8];
      load8<T>(w1 + kk, a);
      load8<T>(w2 + kk, b);
      linear_dot8<T>(x, k, rows, kk, a, b, acc1, acc2);
    }
  } else {  // 16 bytes of quantized blocks per lane and step: 128 / BITS values, dequantized 8 at a time
    constexpr int kPer = 128 / BITS;
    const long long row_bytes = g.blocks_per_col * (long long)g.block_size * BITS / 8;
    const unsigned char* w1 = (const unsigned char*)g.w + c1 * row_bytes;
    const unsigned char* w2 = (const unsigned char*)g.w + c2 * row_bytes;
    const T* s1 = (const T*)g.scales + c1 * g.blocks_per_col;
    const T* s2 = (const T*)g.scales + c2 * g.blocks_per_col;
    const float zero = (float)(1 << (BITS - 1));
    for (long long kk = (long long)lane * kPer; kk < k; kk += 32 * kPer) {
      const uint4 q1 = __ldg((const uint4*)(w1 + kk * BITS / 8));
      const uint4 q2 = __ldg((const uint4*)(w2 + kk * BITS / 8));
      const unsigned* u1 = (const unsigned*)&q1;
      const unsigned* u2 = (const unsigned*)&q2;
#pragma unroll
      for (int part = 0; part < kPer / 8; ++part) {
        const long long at = kk + part * 8;
        const float f1 = ld(s1[at / g.block_size]), f2 = ld(s2[at / g.block_size]);
        float a[8], b[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          unsigned v1, v2;
          if constexpr (BITS == 4) {  // 8 nibbles in one 32-bit word, low nibble first (MatMulNBits' order)
            v1 = (u1[part] >> (4 * j)) & 15u;
            v2 = (u2[part] >> (4 * j)) & 15u;
          } else {          // 8 bytes in two words
            v1 = (u1[part * 2 + j / 4] >> (8 * (j & 3))) & 255u;
            v2 = (u2[part * 2 + j / 4] >> (8 * (j & 3))) & 255u;
          }
          a[j] = ((float)v1 - zero) * f1;
          b[j] = ((float)v2 - zero) * f2;
        }
        if (at < k) linear_dot8<T>(x, k, rows, at, a, b, acc1, acc2);
      }
    }
  }
#pragma unroll
  for (int m = 0; m < LIN_ROWS; ++m) {
    if (m < rows) {
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        acc1[m] += __shfl_xor_sync(0xffffffffu, acc1[m], o);
        acc2[m] += __shfl_xor_sync(0xffffffffu, acc2[m], o);
      }
    }
  }
#pragma unroll
  for (int m = 0; m < LIN_ROWS; ++m) {
    if (m < rows && lane == m) store_pair<T>(p, row0 + m, c1, c2, acc1[m], acc2[m]);
  }
}
extern "C" __global__ void __launch_bounds__(256) road_linear_f32(LinParams p) { linear<float, 0>(p); }
extern "C" __global__ void __launch_bounds__(256) road_linear_f16(LinParams p) { linear<h16, 0>(p); }
extern "C" __global__ void __launch_bounds__(256) road_linear_bf16(LinParams p) { linear<b16, 0>(p); }
extern "C" __global__ void __launch_bounds__(256) road_nbits4_f32(LinParams p) { linear<float, 4>(p); }
extern "C" __global__ void __launch_bounds__(256) road_nbits4_f16(LinParams p) { linear<h16, 4>(p); }
extern "C" __global__ void __launch_bounds__(256) road_nbits4_bf16(LinParams p) { linear<b16, 4>(p); }
extern "C" __global__ void __launch_bounds__(256) road_nbits8_f32(LinParams p) { linear<float, 8>(p); }
extern "C" __global__ void __launch_bounds__(256) road_nbits8_f16(LinParams p) { linear<h16, 8>(p); }
extern "C" __global__ void __launch_bounds__(256) road_nbits8_bf16(LinParams p) { linear<b16, 8>(p); }
// The block form of the same product (the default; `linear` above stays for ROAD_EXPORT_LINEAR=warp): a block of 8
// warps takes 4 rotation pairs (8 columns: c1 and c2 of each) and splits k among its 256 threads, 8 values a thread
// and step. A thread issues its 8 columns' weight loads before using any (8 loads in flight), converts its rows' 8
// inputs once for all 8 columns, and keeps R x 8 sums; a warp reduces them by a reduce-scatter of shuffles (each
// step halves what a lane holds), the 8 warps through shared memory. n/8 blocks; R = 1 (a decode step at batch 1)
// or 8 rows a chunk, chunks on the grid's second axis.
template <typename T, int BITS> struct WRaw;
template <> struct WRaw<h16, 0> { uint4 v; };
template <> struct WRaw<b16, 0> { uint4 v; };
template <> struct WRaw<float, 0> { uint4 v[2]; };
template <typename T> struct WRaw<T, 4> { unsigned v; float scale; };
template <typename T> struct WRaw<T, 8> { uint2 v; float scale; };
template <typename T, int BITS>
__device__ __forceinline__ void wload(const LinParams& g, long long col, long long kk, WRaw<T, BITS>* r) {
  if constexpr (BITS == 0) {
    const uint4* at = (const uint4*)((const T*)g.w + col * g.k + kk);
    if constexpr (sizeof(T) == 4) { r->v[0] = __ldg(at); r->v[1] = __ldg(at + 1); } else { r->v = __ldg(at); }
  } else {
    const long long row_bytes = g.blocks_per_col * (long long)g.block_size * BITS / 8;
    const unsigned char* at = (const unsigned char*)g.w + col * row_bytes + kk * BITS / 8;
    if constexpr (BITS == 4) r->v = __ldg((const unsigned*)at); else r->v = __ldg((const uint2*)at);
    r->scale = ld(((const T*)g.scales)[col * g.blocks_per_col + kk / g.block_size]);
  }
}
template <typename T, int BITS>
__device__ __forceinline__ void wdecode(const WRaw<T, BITS>& r, float* w) {
  if constexpr (BITS == 0) {
    const T* v = (const T*)&r.v;
#pragma unroll
    for (int j = 0; j < 8; ++j) w[j] = ld(v[j]);
  } else if constexpr (BITS == 4) {
#pragma unroll
    for (int j = 0; j < 8; ++j) w[j] = ((float)((r.v >> (4 * j)) & 15u) - 8.0f) * r.scale;
  } else {
    const unsigned* u = (const unsigned*)&r.v;
#pragma unroll
    for (int j = 0; j < 8; ++j) w[j] = ((float)((u[j >> 2] >> (8 * (j & 3))) & 255u) - 128.0f) * r.scale;
  }
}
template <int N, int O>
__device__ __forceinline__ void scatter(float* acc, int lane) {
  const bool upper = (lane & O) != 0;
#pragma unroll
  for (int i = 0; i < N / 2; ++i) {
    const float send = upper ? acc[i] : acc[i + N / 2];
    const float keep = upper ? acc[i + N / 2] : acc[i];
    acc[i] = keep + __shfl_xor_sync(0xffffffffu, send, O);
  }
}
__device__ __forceinline__ long long pair_column(long long pair, long long half) {  // c1 of a rotation pair
  const long long group = pair / half;
  return group * 2 * half + (pair - group * half);
}
template <typename T, int BITS, int R>
__device__ __forceinline__ void tile(const LinParams& g) {
  const Params& p = g.p;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const long long pairs = p.d / 2, half = p.half;
  long long cols[8];
  int valid = 0;  // pairs of this block inside the output (a last block may hold fewer than 4)
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    long long pair = (long long)blockIdx.x * 4 + j;
    if (pair < pairs) valid = j + 1; else pair = (long long)blockIdx.x * 4;  // read again, never written
    cols[2 * j] = pair_column(pair, half);
    cols[2 * j + 1] = cols[2 * j] + half;
  }
  const long long k = g.k, row0 = (long long)blockIdx.y * R;
  const int rows = (int)(p.rows - row0 < R ? p.rows - row0 : R);
  const T* x = (const T*)p.x + row0 * k;
  float acc[R * 8];
#pragma unroll
  for (int i = 0; i < R * 8; ++i) acc[i] = 0;
  for (long long kk = (long long)tid * 8; kk < k; kk += 256 * 8) {
    WRaw<T, BITS> raw[8];
#pragma unroll
    for (int c = 0; c < 8; ++c) wload<T, BITS>(g, cols[c], kk, &raw[c]);
    float xf[R][8];
#pragma unroll
    for (int m = 0; m < R; ++m) {
      if (m < rows) {
        float v[8];
        load8<T>(x + m * k + kk, v);
#pragma unroll
        for (int j = 0; j < 8; ++j) xf[m][j] = v[j];
      } else {
#pragma unroll
        for (int j = 0; j < 8; ++j) xf[m][j] = 0;
      }
    }
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      float w[8];
      wdecode<T, BITS>(raw[c], w);
#pragma unroll
      for (int m = 0; m < R; ++m) {
        float s = 0;
#pragma unroll
        for (int j = 0; j < 8; ++j) s += xf[m][j] * w[j];
        acc[m * 8 + c] += s;
      }
    }
  }
  // reduce-scatter across the warp: at offset o a lane keeps the half its bit o selects and adds the partner's copy
  // of it; after the steps that halve R * 8 values down to 2 (R = 8) or 1 (R = 1), the rest are plain sums
  // (`scatter` takes the counts as template arguments, so every index is static and acc stays in registers).
  if constexpr (R == 1) {
    scatter<8, 16>(acc, lane);
    scatter<4, 8>(acc, lane);
    scatter<2, 4>(acc, lane);
    acc[0] += __shfl_xor_sync(0xffffffffu, acc[0], 2);
    acc[0] += __shfl_xor_sync(0xffffffffu, acc[0], 1);
  } else {
    scatter<64, 16>(acc, lane);
    scatter<32, 8>(acc, lane);
    scatter<16, 4>(acc, lane);
    scatter<8, 2>(acc, lane);
    scatter<4, 1>(acc, lane);
  }
  __shared__ float part[8][R * 8];
  if constexpr (R == 1) {
    if ((lane & 3) == 0) part[warp][lane >> 2] = acc[0];   // lane L holds value L / 4
  } else {
    part[warp][2 * lane] = acc[0];                          // lane L holds values 2L and 2L + 1
    part[warp][2 * lane + 1] = acc[1];
  }
  __syncthreads();
  if (tid < R * 4) {
    const int m = tid / 4, j = tid % 4;  // (row, pair)
    if (m < rows && j < valid) {
      float s1 = 0, s2 = 0;
#pragma unroll
      for (int w = 0; w < 8; ++w) { s1 += part[w][m * 8 + 2 * j]; s2 += part[w][m * 8 + 2 * j + 1]; }
      const long long c1 = pair_column((long long)blockIdx.x * 4 + j, half);
      store_pair<T>(p, row0 + m, c1, c1 + half, s1, s2);
    }
  }
}
#define ROAD_TILE(R, BITS, NAME, T) \
  extern "C" __global__ void __launch_bounds__(256) road_tile##R##_##NAME(LinParams p) { tile<T, BITS, R>(p); }
ROAD_TILE(1, 0, f32, float) ROAD_TILE(1, 0, f16, h16) ROAD_TILE(1, 0, bf16, b16)
ROAD_TILE(1, 4, nb4_f32, float) ROAD_TILE(1, 4, nb4_f16, h16) ROAD_TILE(1, 4, nb4_bf16, b16)
ROAD_TILE(1, 8, nb8_f32, float) ROAD_TILE(1, 8, nb8_f16, h16) ROAD_TILE(1, 8, nb8_bf16, b16)
ROAD_TILE(8, 0, f32, float) ROAD_TILE(8, 0, f16, h16) ROAD_TILE(8, 0, bf16, b16)
ROAD_TILE(8, 4, nb4_f32, float) ROAD_TILE(8, 4, nb4_f16, h16) ROAD_TILE(8, 4, nb4_bf16, b16)
ROAD_TILE(8, 8, nb8_f32, float) ROAD_TILE(8, 8, nb8_f16, h16) ROAD_TILE(8, 8, nb8_bf16, b16)
// The tensor-core form (sm_80 and newer; float16 / bfloat16 X, float or 4-bit weights): mma.sync m16n8k16 with
// weight rows as A and up to 8 rows of X as B. A's 16 rows are 8 rotation pairs:
// row gq (a thread's group in the warp) is column c1 of pair gq and row gq + 8 its c2, so both columns of a pair land
// in one thread's accumulators and the rotation needs no exchange. k may be permuted freely inside a product as long
// as A and B agree, so a thread feeds its fragment slots from its own contiguous 16-byte runs of W and X (no shared
// memory staging, no ldmatrix): float W 16 values of a row per step (4 threads: 128 bytes of the row), 4-bit W 32
// values (16 bytes; dequantized with the 0x6400 / 0x4300 exponent trick, scaled in the element type as onnxruntime's
// MatMulNBits does, the matching X pairs gathered by byte permutes). A block's 8 warps split k and meet in shared
// memory (16 warps with ROAD_EXPORT_MMA_WARPS=16); TM tiles of 8 pairs per block share each X load. Rows beyond 8
// take the grid's second axis. The rotation's coefficients (and, for adapter ids, the row's id) are loaded before
// the k loop, so that their latency hides behind the product's instead of adding a round trip to memory after it
// (4-8 % of a decode-size product). The default where it fits (see `LinearForm`).
template <typename T> struct IsBf { static constexpr bool v = false; };
template <> struct IsBf<b16> { static constexpr bool v = true; };
template <typename T>
__device__ __forceinline__ void mma(float* c, unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0,
                                    unsigned b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (IsBf<T>::v)
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3]) : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  else
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3]) : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
  __trap();  // the host launches this form only on sm_80 and newer
#endif
}
// 8 nibbles of one word (k0..k7, low nibble first) as 4 scaled pairs (k0,k4), (k1,k5), (k2,k6), (k3,k7): (q | 1024)
// is 1024 + q exactly in float16 (128 + q in bfloat16); subtracting 1032 (136) leaves q - 8 exactly; one rounding for
// the scale. `s2` holds the block's scale twice.
template <typename T>
__device__ __forceinline__ void dequant4(unsigned w, unsigned s2, unsigned* out) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    unsigned h = ((w >> (4 * i)) & 0x000f000fu);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    if constexpr (IsBf<T>::v) {
      h |= 0x43004300u;
      asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(h) : "r"(h), "r"(0x3f803f80u), "r"(0xc308c308u));
      asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(out[i]) : "r"(h), "r"(s2), "r"(0x80008000u));
    } else {
      h |= 0x64006400u;
      asm("sub.f16x2 %0, %1, %2;" : "=r"(h) : "r"(h), "r"(0x64086408u));
      asm("mul.f16x2 %0, %1, %2;" : "=r"(out[i]) : "r"(h), "r"(s2));
    }
#else
    out[i] = h;
#endif
  }
}
__device__ __forceinline__ unsigned pick(unsigned a, unsigned b, unsigned selector) {
  unsigned r;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(selector));
  return r;
}
// The loads of one round of the k loop: U steps of a warp (a step: each thread KT consecutive k of its A rows and
// of its X row), and the products that use them. For float weights the loop double-buffers rounds: round r + 1's
// loads are written before round r's products, which use registers loaded in the iteration before, so no product
// waits on a load issued in its own iteration. Written as one round's loads then its products, ptxas placed each
// step's loads after the previous step's products (which wait for their own loads), and a warp had one step in
// flight at a time whatever the unrolling (read off the SASS). 4-bit weights keep one buffer: a second costs them
// 24 registers a thread, one resident block of 256 threads fewer per SM, and the gate/up product (352 blocks, more
// than two per SM) a second wave (measured 1.27 x slower). U = 1 by default: 2 steps a round were slower at every
// TinyLlama-size shape measured but down, 4-bit much slower (tools/bench_kernels.py). Loads past k are predicated
// off and multiply zeros.
template <typename T, int BITS, int TM, int U>
struct MmaRound {
  static constexpr int KT = BITS == 0 ? 16 : 32;  // k values per thread and step; a warp covers 4 KT
  static constexpr int WV = BITS == 0 ? 2 : 1;    // 16-byte weight loads per A row and step
  uint4 xv[U][KT / 8];
  uint4 wa[U][TM][WV], wb[U][TM][WV];
  unsigned sa[U][TM], sb[U][TM];  // 4-bit: the block's scale, twice
  __device__ __forceinline__ void load(const LinParams& g, const T* xr, bool xlive, long long kb, int warps, int t,
                                       const long long* ca, int live) {
    const long long k = g.k, half = g.p.half, step = (long long)warps * 4 * KT;
    const uint4 zero = {0u, 0u, 0u, 0u};
#pragma unroll
    for (int s = 0; s < U; ++s) {
      const long long kt = kb + s * step + t * KT;
#pragma unroll
      for (int u = 0; u < KT / 8; ++u)
        xv[s][u] = (xlive && (BITS == 0 ? kt + 8 * u < k : kt < k)) ? __ldg((const uint4*)(xr + kt + 8 * u)) : zero;
#pragma unroll
      for (int j = 0; j < TM; ++j) {
        if constexpr (BITS == 0) {
#pragma unroll
          for (int u = 0; u < WV; ++u) {
            const bool in = j < live && kt + 8 * u < k;
            wa[s][j][u] = in ? __ldg((const uint4*)((const T*)g.w + ca[j] * k + kt + 8 * u)) : zero;
            wb[s][j][u] = in ? __ldg((const uint4*)((const T*)g.w + (ca[j] + half) * k + kt + 8 * u)) : zero;
          }
        } else {
          const long long row_bytes = g.blocks_per_col * (long long)g.block_size / 2;
          const unsigned short* sc = (const unsigned short*)g.scales;
          const bool in = j < live && kt < k;
          const unsigned char* w = (const unsigned char*)g.w + kt / 2;
          wa[s][j][0] = in ? __ldg((const uint4*)(w + ca[j] * row_bytes)) : zero;
          wb[s][j][0] = in ? __ldg((const uint4*)(w + (ca[j] + half) * row_bytes)) : zero;
          const long long block = kt / g.block_size;
          const unsigned s1 = in ? __ldg(sc + ca[j] * g.blocks_per_col + block) : 0u;
          const unsigned s2 = in ? __ldg(sc + (ca[j] + half) * g.blocks_per_col + block) : 0u;
          sa[s][j] = s1 | (s1 << 16);
          sb[s][j] = s2 | (s2 << 16);
        }
      }
    }
  }
  __device__ __forceinline__ void compute(float (*acc)[4]) const {
#pragma unroll
    for (int s = 0; s < U; ++s) {
      if constexpr (BITS == 0) {
#pragma unroll
        for (int j = 0; j < TM; ++j)
#pragma unroll
          for (int u = 0; u < 2; ++u) {
            mma<T>(acc[j], wa[s][j][u].x, wb[s][j][u].x, wa[s][j][u].y, wb[s][j][u].y, xv[s][u].x, xv[s][u].y);
            mma<T>(acc[j], wa[s][j][u].z, wb[s][j][u].z, wa[s][j][u].w, wb[s][j][u].w, xv[s][u].z, xv[s][u].w);
          }
      } else {
        unsigned xp[4][4];  // per word of 8 k: X pairs (x0,x4), (x1,x5), (x2,x6), (x3,x7), as dequant4 pairs W
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          xp[i][0] = pick(xv[s][i].x, xv[s][i].z, 0x5410);
          xp[i][1] = pick(xv[s][i].x, xv[s][i].z, 0x7632);
          xp[i][2] = pick(xv[s][i].y, xv[s][i].w, 0x5410);
          xp[i][3] = pick(xv[s][i].y, xv[s][i].w, 0x7632);
        }
#pragma unroll
        for (int j = 0; j < TM; ++j) {
          const unsigned* ua = (const unsigned*)&wa[s][j][0];
          const unsigned* ub = (const unsigned*)&wb[s][j][0];
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            unsigned a[4], b[4];
            dequant4<T>(ua[i], sa[s][j], a);
            dequant4<T>(ub[i], sb[s][j], b);
            mma<T>(acc[j], a[0], b[0], a[1], b[1], xp[i][0], xp[i][1]);
            mma<T>(acc[j], a[2], b[2], a[3], b[3], xp[i][2], xp[i][3]);
          }
        }
      }
    }
  }
};
template <typename T, int BITS, int TM, int W, int U = 1>
__device__ __forceinline__ void mma_tile(const LinParams& g) {
  const Params& p = g.p;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, gq = lane >> 2, t = lane & 3;
  const long long half = p.half, k = g.k, tiles = p.d / 16;
  const long long row0 = (long long)blockIdx.y * 8;
  const int rows = (int)(p.rows - row0 < 8 ? p.rows - row0 : 8);
  const bool xlive = gq < rows;  // this thread's B column: row row0 + gq of X
  const T* xr = (const T*)p.x + (row0 + (xlive ? gq : 0)) * k;
  long long ca[TM];  // this thread's A rows: c1 of pair 8 (tile) + gq, and c1 + half
  int live = 0;      // tiles of this block inside the output (uniform over the block)
#pragma unroll
  for (int j = 0; j < TM; ++j) {
    const long long tile = (long long)blockIdx.x * TM + j;
    if (tile < tiles) live = j + 1;
    ca[j] = pair_column((tile < tiles ? tile : 0) * 8 + gq, half);
  }
  float acc[TM][4];
#pragma unroll
  for (int j = 0; j < TM; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[j][i] = 0;
  // The coefficients this thread's stores need, loaded now so that their latency hides behind the product's (after
  // it they would be one more round trip to memory on the step's critical path): warp j < live finishes tile j.
  float cf[2][4];
  bool cok[2] = {false, false};
  const long long cw = pair_column(((long long)blockIdx.x * TM + (warp < TM ? warp : 0)) * 8 + gq, half);
  if (warp < live) {
#pragma unroll
    for (int r = 0; r < 2; ++r)
      if (2 * t + r < rows) cok[r] = load_coefs<T>(p, row0 + 2 * t + r, cw, cw + half, cf[r]);
  }
  MmaRound<T, BITS, TM, U> cur, next;
  constexpr long long kRound = (long long)U * W * 4 * MmaRound<T, BITS, TM, U>::KT;  // k values a block's round covers
  long long kb = (long long)warp * 4 * MmaRound<T, BITS, TM, U>::KT;
  if constexpr (BITS == 4) {  // one buffer: a second round's registers cost 4-bit products blocks on the SM
    for (; kb < k; kb += kRound) {
      cur.load(g, xr, xlive, kb, W, t, ca, live);
      cur.compute(acc);
    }
  } else {
    cur.load(g, xr, xlive, kb, W, t, ca, live);
    for (; kb < k; kb += kRound) {
      next.load(g, xr, xlive, kb + kRound, W, t, ca, live);  // predicated off past k
      cur.compute(acc);
      cur = next;
    }
  }
  __shared__ float part[W][TM * 4][32];
#pragma unroll
  for (int j = 0; j < TM; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) part[warp][j * 4 + i][lane] = acc[j][i];
  __syncthreads();
  if (warp < live) {  // warp j finishes tile j: rows 2t and 2t + 1 of the chunk at columns c1 and c1 + half
    float s[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      s[i] = 0;
#pragma unroll
      for (int w = 0; w < W; ++w) s[i] += part[w][warp * 4 + i][lane];
    }
    if (2 * t < rows) store_rotated<T>(p, row0 + 2 * t, cw, cw + half, s[0], s[2], cf[0], cok[0]);
    if (2 * t + 1 < rows) store_rotated<T>(p, row0 + 2 * t + 1, cw, cw + half, s[1], s[3], cf[1], cok[1]);
  }
}
#define ROAD_MMA(TM, BITS, NAME, T) \
  extern "C" __global__ void __launch_bounds__(256) road_mma##TM##_##NAME(LinParams p) { mma_tile<T, BITS, TM, 8>(p); }
#define ROAD_MMA_W16(BITS, NAME, T) \
  extern "C" __global__ void __launch_bounds__(512) road_mma1w16_##NAME(LinParams p) { mma_tile<T, BITS, 1, 16>(p); }
ROAD_MMA(1, 0, f16, h16) ROAD_MMA(1, 0, bf16, b16) ROAD_MMA(1, 4, nb4_f16, h16) ROAD_MMA(1, 4, nb4_bf16, b16)
ROAD_MMA(2, 0, f16, h16) ROAD_MMA(2, 0, bf16, b16) ROAD_MMA(2, 4, nb4_f16, h16) ROAD_MMA(2, 4, nb4_bf16, b16)
ROAD_MMA(4, 0, f16, h16) ROAD_MMA(4, 0, bf16, b16) ROAD_MMA(4, 4, nb4_f16, h16) ROAD_MMA(4, 4, nb4_bf16, b16)
ROAD_MMA_W16(0, f16, h16) ROAD_MMA_W16(0, bf16, b16) ROAD_MMA_W16(4, nb4_f16, h16) ROAD_MMA_W16(4, nb4_bf16, b16)
)CUDA";

// kernel names, by index: rotations 0-3 and GEMVs 4-7 by type index (f32, f64, f16, bf16); then the W^T products:
// the warp form 8-16, the block form 17-34 and the tensor-core form: 35-46 (1, 2 or 4 tiles a block, 8 warps) and
// 47-50 (one tile, 16 warps) (`launch_linear`)
constexpr int kKernels = 51;
constexpr const char* kNames[kKernels] = {
    "road_rotate_f32", "road_rotate_f64", "road_rotate_f16", "road_rotate_bf16",
    "road_gemv_f32",   "road_gemv_f32",   "road_gemv_f16",   "road_gemv_bf16",
    "road_linear_f32", "road_linear_f16", "road_linear_bf16",
    "road_nbits4_f32", "road_nbits4_f16", "road_nbits4_bf16",
    "road_nbits8_f32", "road_nbits8_f16", "road_nbits8_bf16",
    "road_tile1_f32", "road_tile1_f16", "road_tile1_bf16",
    "road_tile1_nb4_f32", "road_tile1_nb4_f16", "road_tile1_nb4_bf16",
    "road_tile1_nb8_f32", "road_tile1_nb8_f16", "road_tile1_nb8_bf16",
    "road_tile8_f32", "road_tile8_f16", "road_tile8_bf16",
    "road_tile8_nb4_f32", "road_tile8_nb4_f16", "road_tile8_nb4_bf16",
    "road_tile8_nb8_f32", "road_tile8_nb8_f16", "road_tile8_nb8_bf16",
    "road_mma1_f16", "road_mma1_bf16", "road_mma1_nb4_f16", "road_mma1_nb4_bf16",
    "road_mma2_f16", "road_mma2_bf16", "road_mma2_nb4_f16", "road_mma2_nb4_bf16",
    "road_mma4_f16", "road_mma4_bf16", "road_mma4_nb4_f16", "road_mma4_nb4_bf16",
    "road_mma1w16_f16", "road_mma1w16_bf16", "road_mma1w16_nb4_f16", "road_mma1w16_nb4_bf16"};
// (no float64 GEMV: its shared sums would not fit in 48 KB; float64 products take cuBLAS)
constexpr int kGemvRows = 8, kGemvTile = 64, kGemvThreads = 256;  // as GEMV_ROWS, GEMV_TILE, GEMV_THREADS above

struct GemvParams {
  Params p;
  const void* w;
  long long k;
};

inline uint64_t fnv1a(const std::string& s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
  return h;
}

// The cubin for one architecture: from memory, else the disk cache, else NVRTC (then written to the cache).
inline bool cubin_for(int arch, std::vector<char>* out, std::string* why) {
  const Nvrtc* nv = nvrtc();
  if (!nv) {
    *why = "NVRTC (libnvrtc) cannot be opened; pip install nvidia-cuda-nvrtc or set ROAD_EXPORT_NVRTC";
    return false;
  }
  int major = 0, minor = 0;
  nv->Version(&major, &minor);
  char key[64];
  std::snprintf(key, sizeof key, "%016llx-nvrtc%d.%d-sm_%d", static_cast<unsigned long long>(fnv1a(kSource)), major,
                minor, arch);
  std::string path;
  if (const char* dir = std::getenv("ROAD_EXPORT_KERNEL_CACHE"); dir && *dir)
    path = std::string(dir) + "/road_cuda-" + key + ".cubin";
  if (!path.empty()) {
    if (FILE* f = std::fopen(path.c_str(), "rb")) {
      std::fseek(f, 0, SEEK_END);
      const long size = std::ftell(f);
      std::fseek(f, 0, SEEK_SET);
      out->resize(size > 0 ? static_cast<size_t>(size) : 0);
      const bool read = size > 0 && std::fread(out->data(), 1, out->size(), f) == out->size();
      std::fclose(f);
      if (read) return true;
    }
  }
  NvrtcProgram* program = nullptr;
  if (nv->CreateProgram(&program, kSource, "road_cuda.cu", 0, nullptr, nullptr) != 0) {
    *why = "nvrtcCreateProgram failed";
    return false;
  }
  const std::string target = "--gpu-architecture=sm_" + std::to_string(arch);
  const char* options[] = {target.c_str(), "--std=c++17", "-default-device"};
  const int compiled = nv->CompileProgram(program, 3, options);
  size_t size = 0;
  if (compiled != 0) {
    nv->GetProgramLogSize(program, &size);
    std::string log(size, '\0');
    if (size) nv->GetProgramLog(program, &log[0]);
    *why = "NVRTC could not compile the kernels for sm_" + std::to_string(arch) + ": " + log.substr(0, 300);
    nv->DestroyProgram(&program);
    return false;
  }
  nv->GetCUBINSize(program, &size);
  out->resize(size);
  nv->GetCUBIN(program, out->data());
  nv->DestroyProgram(&program);
  if (!path.empty()) {  // write a temp file and rename: a concurrent writer writes the same bytes
    const std::string tmp = path + "." + std::to_string(reinterpret_cast<uintptr_t>(out->data())) + ".tmp";
    if (FILE* f = std::fopen(tmp.c_str(), "wb")) {
      const bool written = std::fwrite(out->data(), 1, out->size(), f) == out->size();
      if (std::fclose(f) == 0 && written)
        std::rename(tmp.c_str(), path.c_str());
      else
        std::remove(tmp.c_str());
    }
  }
  return true;
}

struct Functions {
  CUfunction fn[kKernels] = {};
  int arch = 0;  // compute capability, 10 * major + minor
};

inline std::string error_text(const Driver* d, CUresult r) {
  const char* text = nullptr;
  d->GetErrorString(r, &text);
  return text ? text : ("CUDA error " + std::to_string(r));
}

// The kernels loaded into the stream's context, loading them on the first call for that context.
inline bool functions_for(CUstream stream, const Functions** out, std::string* why) {
  static std::mutex mutex;
  static std::map<CUcontext, Functions> loaded;
  const Driver* d = driver();
  // The last stream this thread launched on, with the thread's current context: the common case costs no lock
  // and no driver call beyond cuCtxGetCurrent (a thread-local read).
  thread_local CUstream last_stream = nullptr;
  thread_local CUcontext last_current = nullptr;
  thread_local const Functions* last = nullptr;
  CUcontext current = nullptr;
  d->CtxGetCurrent(&current);
  if (last && stream == last_stream && current == last_current) {
    *out = last;
    return true;
  }
  CUcontext context = nullptr;
  CUresult r = d->StreamGetCtx(stream, &context);
  if (r != 0) {
    *why = "cuStreamGetCtx: " + error_text(d, r);
    return false;
  }
  std::lock_guard<std::mutex> lock(mutex);
  auto found = loaded.find(context);
  if (found != loaded.end()) {
    *out = last = &found->second;
    last_stream = stream;
    last_current = current;
    return true;
  }
  const bool push = current != context;
  if (push) d->CtxPushCurrent(context);
  CUdevice device = 0;
  int major = 0, minor = 0;
  Functions functions;
  std::vector<char> cubin;
  CUmodule module = nullptr;
  bool ok = d->CtxGetDevice(&device) == 0 && d->DeviceGetAttribute(&major, kComputeCapabilityMajor, device) == 0 &&
            d->DeviceGetAttribute(&minor, kComputeCapabilityMinor, device) == 0;
  if (!ok) *why = "cannot read the GPU's compute capability";
  ok = ok && cubin_for(major * 10 + minor, &cubin, why);
  if (ok && (r = d->ModuleLoadData(&module, cubin.data())) != 0) {
    *why = "cuModuleLoadData: " + error_text(d, r);
    ok = false;
  }
  for (int i = 0; ok && i < kKernels; ++i) {
    if ((r = d->ModuleGetFunction(&functions.fn[i], module, kNames[i])) != 0) {
      *why = std::string("cuModuleGetFunction ") + kNames[i] + ": " + error_text(d, r);
      ok = false;
    }
  }
  if (push) {
    CUcontext popped = nullptr;
    d->CtxPopCurrent(&popped);
  }
  if (!ok) return false;
  functions.arch = major * 10 + minor;
  *out = last = &loaded.emplace(context, functions).first->second;  // std::map: the address stays valid
  last_stream = stream;
  last_current = current;
  return true;
}

// --- cuBLAS, the entries used (cublas_api.h), for road.MatMulRotate ---------------------------------------------
// Opened at the first product, when onnxruntime's CUDA provider (linked to cuBLAS) has been loaded: the copy already
// in the process is taken (RTLD_NOLOAD) before `ROAD_EXPORT_CUBLAS` (road_export.graph.native points it at the nvidia
// wheel's) and the system's. Registration only checks that some libcublas opens (`cublas_opens`).
struct Cublas {
  int (*Create)(void** handle);
  int (*SetStream)(void* handle, CUstream stream);
  int (*GemmEx)(void* handle, int transa, int transb, int m, int n, int k, const void* alpha, const void* a,
                int a_type, int lda, const void* b, int b_type, int ldb, const void* beta, void* c, int c_type,
                int ldc, int compute_type, int algo);
};
constexpr int kCudaR32F = 0, kCudaR64F = 1, kCudaR16F = 2, kCudaR16BF = 14;  // cudaDataType_t
constexpr int kCompute32F = 68, kCompute64F = 70;                               // cublasComputeType_t
constexpr int kGemmDefault = -1;                                                // CUBLAS_GEMM_DEFAULT
constexpr int kOpN = 0, kOpT = 1;                                               // CUBLAS_OP_N, _T
constexpr const char* kCublasNames[] = {"libcublas.so.13", "libcublas.so.12", "libcublas.so.11", "libcublas.so"};

inline void* open_cublas() {
  void* lib = nullptr;
  for (const char* name : kCublasNames)
    if (!lib) lib = dlopen(name, RTLD_NOW | RTLD_LOCAL | RTLD_NOLOAD);
  if (const char* path = std::getenv("ROAD_EXPORT_CUBLAS"); !lib && path && *path)
    lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  for (const char* name : kCublasNames)
    if (!lib) lib = dlopen(name, RTLD_NOW | RTLD_LOCAL);
  return lib;
}

// Whether a libcublas can be opened here (checked at registration, without keeping it open).
inline bool cublas_opens() {
  void* lib = open_cublas();
  if (lib) dlclose(lib);
  return lib != nullptr;
}

inline const Cublas* cublas() {
  static const Cublas* loaded = [] () -> const Cublas* {
    void* lib = open_cublas();
    if (!lib) return nullptr;
    static Cublas c{};
    const bool ok = resolve(lib, "cublasCreate_v2", &c.Create) && resolve(lib, "cublasSetStream_v2", &c.SetStream) &&
                    resolve(lib, "cublasGemmEx", &c.GemmEx);
    return ok ? &c : nullptr;
  }();
  return loaded;
}

// Y [m, n] = X [m, k] @ W [k, n] (W [n, k] with `trans_w`), all row-major, on `stream` (column-major cuBLAS computes
// Y^T = W^T X^T);
// fp32 accumulation (fp64 for double; TF32 is not used, whatever onnxruntime's use_tf32), `type_index` as for
// `launch`. One cuBLAS handle per CUDA context for the process, created at its first product and used under a lock
// (setting the stream and enqueueing the GEMM take microseconds), so threads that come and go leak nothing.
inline bool gemm(CUstream stream, int type_index, const void* x, const void* w, void* y, long long m, long long k,
                 long long n, std::string* why, bool trans_w = false) {
  const Cublas* cb = cublas();
  const Driver* d = driver();
  if (!cb || !d) {
    *why = "cuBLAS (libcublas) cannot be opened";
    return false;
  }
  if (m == 0 || n == 0) return true;
  if (m > 0x7fffffffLL || n > 0x7fffffffLL || k > 0x7fffffffLL) {
    *why = "a matrix axis is over 2^31 - 1";
    return false;
  }
  CUcontext context = nullptr;
  CUresult r = d->StreamGetCtx(stream, &context);
  if (r != 0) {
    *why = "cuStreamGetCtx: " + error_text(d, r);
    return false;
  }
  static std::mutex mutex;
  static std::map<CUcontext, void*> handles;
  std::lock_guard<std::mutex> lock(mutex);
  void*& handle = handles[context];
  if (!handle) {
    CUcontext current = nullptr;
    d->CtxGetCurrent(&current);
    if (current != context) d->CtxPushCurrent(context);
    const int status = cb->Create(&handle);
    if (current != context) d->CtxPopCurrent(&current);
    if (status != 0) {
      handle = nullptr;
      *why = "cublasCreate failed with status " + std::to_string(status);
      return false;
    }
  }
  int status = cb->SetStream(handle, stream);
  static const int types[4] = {kCudaR32F, kCudaR64F, kCudaR16F, kCudaR16BF};
  const int type = types[type_index];
  const float alpha = 1.0f, beta = 0.0f;
  const double alpha64 = 1.0, beta64 = 0.0;
  const bool wide = type_index == 1;
  if (status == 0)
    status = cb->GemmEx(handle, trans_w ? kOpT : kOpN, kOpN, static_cast<int>(n), static_cast<int>(m),
                        static_cast<int>(k), wide ? static_cast<const void*>(&alpha64) : &alpha, w, type,
                        static_cast<int>(trans_w ? k : n), x, type,
                        static_cast<int>(k > 0 ? k : 1), wide ? static_cast<const void*>(&beta64) : &beta, y, type,
                        static_cast<int>(n), wide ? kCompute64F : kCompute32F, kGemmDefault);
  if (status != 0) {
    *why = "cublasGemmEx failed with status " + std::to_string(status);
    return false;
  }
  return true;
}

// Launch one rotation on `stream`; `type_index` 0..3 is f32, f64, f16, bf16.
inline bool launch(CUstream stream, int type_index, const Params& params, std::string* why) {
  const Functions* functions = nullptr;
  if (!functions_for(stream, &functions, why)) return false;
  if (params.rows == 0 || params.pairs == 0) return true;
  const long long blocks = (params.pairs + kThreads - 1) / kThreads;
  if (blocks > 0x7fffffffLL) {
    *why = "the last axis is too long for one launch";
    return false;
  }
  const unsigned grid_y = static_cast<unsigned>(params.rows < 65535 ? params.rows : 65535);
  Params copy = params;
  void* args[] = {&copy};
  const Driver* d = driver();
  const CUresult r = d->LaunchKernel(functions->fn[type_index], static_cast<unsigned>(blocks), grid_y, 1, kThreads,
                                     1, 1, 0, stream, args, nullptr);
  if (r != 0) {
    *why = "cuLaunchKernel: " + error_text(d, r);
    return false;
  }
  return true;
}

// Whether `gemv` takes a product: at most kGemvRows rows, whole groups in a tile, X and W 16-byte aligned with rows
// in 16-byte steps (k and n multiples of 8; onnxruntime's own buffers are 256-byte aligned, a bound input may not be).
inline bool gemv_fits(long long rows, long long k, long long n, long long group_size, int type_index, const void* x,
                      const void* w) {
  return type_index != 1 && rows <= kGemvRows && group_size <= kGemvTile && kGemvTile % group_size == 0 &&
         n % 8 == 0 && k % 8 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0 &&
         reinterpret_cast<uintptr_t>(w) % 16 == 0;
}

// Y = rotate(X @ W) in one launch for a decode-sized X (see `gemv_fits`): `params` as for `launch`, with x = X.
inline bool launch_gemv(CUstream stream, int type_index, const Params& params, const void* w, long long k,
                        std::string* why) {
  const Functions* functions = nullptr;
  if (!functions_for(stream, &functions, why)) return false;
  if (params.rows == 0 || params.d == 0) return true;
  GemvParams copy{params, w, k};
  void* args[] = {&copy};
  const Driver* d = driver();
  const unsigned blocks = static_cast<unsigned>((params.d + kGemvTile - 1) / kGemvTile);
  const CUresult r = d->LaunchKernel(functions->fn[4 + type_index], blocks, 1, 1, kGemvThreads, 1, 1, 0, stream,
                                     args, nullptr);
  if (r != 0) {
    *why = "cuLaunchKernel: " + error_text(d, r);
    return false;
  }
  return true;
}

// --- road.LinearRotate / road.MatMulNBitsRotate: Y = rotate(X @ W^T), W [n, k] ------------------------------------
struct LinParams {  // as in kSource
  Params p;
  const void* w;
  const void* scales;
  long long k, blocks_per_col;
  int block_size, bits;
};

// Whether `linear` takes a product of W [n, k] (bits 0: float W of X's type; 4 or 8: MatMulNBits blocks of
// `block_size` with `blocks_per_col` blocks a row): whole groups (g even), k a multiple of 8 and, for blocks, each
// row a whole number of 16-byte loads; X, W and scales aligned as the 16-byte loads need. float64 is not taken.
inline bool linear_fits(int type_index, long long k, long long n, long long group_size, int bits, int block_size,
                        long long blocks_per_col, const void* x, const void* w) {
  if (type_index == 1 || k % 8 || n % group_size || group_size % 2) return false;
  if (reinterpret_cast<uintptr_t>(x) % 16 || reinterpret_cast<uintptr_t>(w) % 16) return false;
  if (bits == 0) return true;
  if ((bits != 4 && bits != 8) || block_size < 8 || block_size % 8) return false;
  const long long values = blocks_per_col * block_size, per_load = 128 / bits;
  return values >= k && values % per_load == 0 && (values * bits / 8) % 16 == 0;
}

// The forms of the W^T product (ROAD_EXPORT_LINEAR): by default (kAuto) and with `mma`, the tensor-core form where it
// fits (float16 / bfloat16 X, float or 4-bit W, whole tiles of 8 pairs, sm_80 and newer), else the block form;
// `tile` and `warp` force those. Measured on an H100 (tools/bench_linear.py, each / onnxruntime's own product,
// 1 row / 8 rows): the tensor-core form 0.97-1.03 / 1.01-1.07 for float16 and 0.93-1.17 / 0.50-0.74 for 4-bit
// (2026-12-06, with the coefficients loaded first; before: 1.03-1.10 / 1.11-1.23 and 1.03-1.22 / 0.56-0.82), where
// the block form took 0.88-1.19 / 1.46-2.48 and 1.41-2.20 / 0.93-2.71 (docs/benchmarks.md).
enum class LinearForm { kAuto, kWarp, kTile, kMma };

// Whether the tensor-core form takes a product (beyond `linear_fits`): float16 or bfloat16, half a group a multiple
// of 8 (a tile's 8 pairs inside one group), 4-bit blocks of a multiple of 32 values with k a multiple of 32.
inline bool mma_fits(int arch, int type_index, long long k, long long half, int bits, int block_size) {
  if (arch < 80 || (type_index != 2 && type_index != 3) || half % 8) return false;
  if (bits == 0) return true;
  return bits == 4 && block_size % 32 == 0 && k % 32 == 0;
}

// Tiles of 8 pairs per block for the tensor-core form: ROAD_EXPORT_MMA_TM (1, 2 or 4), else 1 (2 and 4 share X
// loads but leave too few blocks: slower at every TinyLlama-size projection measured, 1 and 8 rows).
inline int mma_tiles_per_block() {
  if (const char* env = std::getenv("ROAD_EXPORT_MMA_TM"); env && *env) {
    const int tm = std::atoi(env);
    if (tm == 1 || tm == 2 || tm == 4) return tm;
  }
  return 1;
}

// Warps splitting k in the tensor-core form with one tile a block: ROAD_EXPORT_MMA_WARPS (8 or 16), else 8. 16 were
// 9-16 % faster on an H100 where the tiles fit the SMs at once and each warp still takes several k steps (float16 o
// and down, 4-bit down), and 17-41 % slower where they do not (qkv, gate/up: a second wave), so 8 stays the default.
inline int mma_warps() {
  if (const char* env = std::getenv("ROAD_EXPORT_MMA_WARPS"); env && *env && std::atoi(env) == 16) return 16;
  return 8;
}


// Launch the W^T product on `stream`: `params` as for `launch`, with x = X and y = Y; every row of X, in chunks of 8
// on the grid's second axis. `form` picks the kernel (see kSource): the block form (4 pairs a block; R = 1 for one
// row), or the warp form, or (by default and with `mma`) the tensor-core form where `mma_fits`.
inline bool launch_linear(CUstream stream, int type_index, const Params& params, const void* w, const void* scales,
                          long long k, long long blocks_per_col, int block_size, int bits, LinearForm form,
                          std::string* why) {
  const Functions* functions = nullptr;
  if (!functions_for(stream, &functions, why)) return false;
  if (params.rows == 0 || params.d == 0) return true;
  const long long chunks = (params.rows + 7) / 8, blocks = (params.d / 2 + 7) / 8;
  if (chunks > 65535 || (params.d / 2 + 3) / 4 > 0x7fffffffLL) {
    *why = "too many rows for one launch (" + std::to_string(params.rows) + ")";
    return false;
  }
  const int by_type = type_index == 0 ? 0 : type_index == 2 ? 1 : 2;
  const int variant = 3 * (bits == 0 ? 0 : bits == 4 ? 1 : 2) + by_type;
  LinParams copy{params, w, scales, k, blocks_per_col, block_size, bits};
  void* args[] = {&copy};
  const Driver* d = driver();
  const bool mma = (form == LinearForm::kMma || form == LinearForm::kAuto) &&
                   mma_fits(functions->arch, type_index, k, params.half, bits, block_size);
  unsigned grid = 0, threads = 256;
  int index = 0;
  if (mma) {
    const long long tiles = params.d / 16;
    const int tm = mma_tiles_per_block();
    grid = static_cast<unsigned>((tiles + tm - 1) / tm);
    index = 35 + 4 * (tm == 1 ? 0 : tm == 2 ? 1 : 2) + 2 * (bits == 4) + (type_index == 3);
    if (tm == 1 && mma_warps() == 16) {
      index = 47 + 2 * (bits == 4) + (type_index == 3);
      threads = 512;
    }
  } else if (form == LinearForm::kWarp) {
    grid = static_cast<unsigned>(blocks);
    index = 8 + variant;
  } else {  // the block form: 4 pairs a block; one row (a decode step at batch 1) or chunks of 8
    grid = static_cast<unsigned>((params.d / 2 + 3) / 4);
    index = (params.rows == 1 ? 17 : 26) + variant;
  }
  const CUresult r = d->LaunchKernel(functions->fn[index], grid, static_cast<unsigned>(chunks), 1, threads, 1, 1, 0,
                                     stream, args, nullptr);
  if (r != 0) {
    *why = "cuLaunchKernel: " + error_text(d, r);
    return false;
  }
  return true;
}

}  // namespace cuda
