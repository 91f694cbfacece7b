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
// the library (`$ROAD_EXPORT_KERNEL_CACHE`, set by road_export.native); each CUDA context loads it once, at the
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
};

constexpr const char* kSource = R"CUDA(
#define ROAD_MAX_RANK 8
struct Params {
  const void* x; const void* c1; const void* c2; void* y;
  long long d, half, pairs, rows;
  long long lead_dims[ROAD_MAX_RANK]; long long c1_stride[ROAD_MAX_RANK]; long long c2_stride[ROAD_MAX_RANK];
  int lead;
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
    for (int a = p.lead - 1; a >= 0 && r; --a) {
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
)CUDA";

constexpr const char* kNames[4] = {"road_rotate_f32", "road_rotate_f64", "road_rotate_f16", "road_rotate_bf16"};

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
  CUfunction fn[4] = {};
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
  for (int i = 0; ok && i < 4; ++i) {
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
  *out = last = &loaded.emplace(context, functions).first->second;  // std::map: the address stays valid
  last_stream = stream;
  last_current = current;
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

}  // namespace cuda
