// The small part of onnxruntime's C ABI that the road kernels use, declared here so that the library builds
// with a plain C++ compiler: the onnxruntime wheels on PyPI ship no headers.
//
// onnxruntime hands a custom-op library an OrtApiBase; GetApi(version) returns the OrtApi table, an
// append-only array of function pointers whose slot numbers never change between releases. Only the slots
// named in `slot` below are called. OrtCustomOp is the op description the library fills in; its layout is
// append-only as well, and `version` tells onnxruntime how many of its fields to read.
#pragma once

#include <stddef.h>
#include <stdint.h>

extern "C" {

struct OrtStatus;
struct OrtValue;
struct OrtKernelInfo;
struct OrtKernelContext;
struct OrtSessionOptions;
struct OrtCustomOpDomain;
struct OrtTensorTypeAndShapeInfo;
struct OrtShapeInferContext;
struct OrtApi;  // opaque here: reached through ort::call

enum OrtErrorCode { ORT_OK = 0, ORT_FAIL = 1, ORT_INVALID_ARGUMENT = 2 };

// ONNX TensorProto element types, the ones the kernels handle.
enum OrtElementType : int {
  ORT_TYPE_FLOAT = 1,
  ORT_TYPE_FLOAT16 = 10,
  ORT_TYPE_DOUBLE = 11,
  ORT_TYPE_BFLOAT16 = 16,
};

struct OrtApiBase {
  const OrtApi* (*GetApi)(uint32_t version) noexcept;
  const char* (*GetVersionString)() noexcept;
};

// The op description; field order is the ABI. Fields from version 18 on stay null.
struct OrtCustomOp {
  uint32_t version;
  void* (*CreateKernel)(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo*);
  const char* (*GetName)(const OrtCustomOp*);
  const char* (*GetExecutionProviderType)(const OrtCustomOp*);
  int (*GetInputType)(const OrtCustomOp*, size_t index);
  size_t (*GetInputTypeCount)(const OrtCustomOp*);
  int (*GetOutputType)(const OrtCustomOp*, size_t index);
  size_t (*GetOutputTypeCount)(const OrtCustomOp*);
  void (*KernelCompute)(void* kernel, OrtKernelContext*);
  void (*KernelDestroy)(void* kernel);
  int (*GetInputCharacteristic)(const OrtCustomOp*, size_t index);
  int (*GetOutputCharacteristic)(const OrtCustomOp*, size_t index);
  int (*GetInputMemoryType)(const OrtCustomOp*, size_t index);
  int (*GetVariadicInputMinArity)(const OrtCustomOp*);
  int (*GetVariadicInputHomogeneity)(const OrtCustomOp*);
  int (*GetVariadicOutputMinArity)(const OrtCustomOp*);
  int (*GetVariadicOutputHomogeneity)(const OrtCustomOp*);
  OrtStatus* (*CreateKernelV2)(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo*, void** kernel);
  OrtStatus* (*KernelComputeV2)(void* kernel, OrtKernelContext*);
  OrtStatus* (*InferOutputShapeFn)(const OrtCustomOp*, OrtShapeInferContext*);
  int (*GetStartVersion)(const OrtCustomOp*);
  int (*GetEndVersion)(const OrtCustomOp*);
  size_t (*GetMayInplace)(int** input_index, int** output_index);
  void (*ReleaseMayInplace)(int* input_index, int* output_index);
  size_t (*GetAliasMap)(int** input_index, int** output_index);
  void (*ReleaseAliasMap)(int* input_index, int* output_index);
};

}  // extern "C"

namespace ort {

// The API version requested: 17 (onnxruntime 1.17) added KernelContext_ParallelFor, the newest call used.
constexpr uint32_t kApiVersion = 17;

// Slot numbers in the OrtApi table, and the signature of the function in each.
namespace slot {
constexpr size_t CreateStatus = 0;                  // (OrtErrorCode, const char*) -> OrtStatus*
constexpr size_t CreateCustomOpDomain = 26;         // (const char*, OrtCustomOpDomain**)
constexpr size_t CustomOpDomain_Add = 27;           // (OrtCustomOpDomain*, const OrtCustomOp*)
constexpr size_t AddCustomOpDomain = 28;            // (OrtSessionOptions*, OrtCustomOpDomain*)
constexpr size_t GetTensorMutableData = 51;         // (OrtValue*, void**)
constexpr size_t GetTensorElementType = 60;         // (const OrtTensorTypeAndShapeInfo*, int*)
constexpr size_t GetDimensionsCount = 61;           // (const OrtTensorTypeAndShapeInfo*, size_t*)
constexpr size_t GetDimensions = 62;                // (const OrtTensorTypeAndShapeInfo*, int64_t*, size_t)
constexpr size_t GetTensorTypeAndShape = 65;        // (const OrtValue*, OrtTensorTypeAndShapeInfo**)
constexpr size_t KernelInfoGetAttribute_int64 = 86; // (const OrtKernelInfo*, const char*, int64_t*)
constexpr size_t KernelContext_GetInput = 90;       // (const OrtKernelContext*, size_t, const OrtValue**)
constexpr size_t KernelContext_GetOutput = 91;      // (OrtKernelContext*, size_t, const int64_t*, size_t, OrtValue**)
constexpr size_t ReleaseStatus = 93;                // (OrtStatus*) -> void
constexpr size_t ReleaseTensorTypeAndShapeInfo = 99;  // (OrtTensorTypeAndShapeInfo*) -> void
constexpr size_t KernelContext_GetGPUComputeStream = 193;  // (const OrtKernelContext*, void**): the EP's stream
// (const OrtKernelContext*, void (*)(void*, size_t), size_t total, size_t num_batch, void*)
constexpr size_t KernelContext_ParallelFor = 274;
}  // namespace slot

// Call the function in `index` of the table with the signature R(Args...).
template <typename R, typename... Args>
inline R call(const OrtApi* api, size_t index, Args... args) {
  using Fn = R (*)(Args...) noexcept;
  return reinterpret_cast<Fn const*>(api)[index](args...);
}

}  // namespace ort
