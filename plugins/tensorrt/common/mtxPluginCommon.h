/*
 * Shared helpers of the mtx TensorRT plugins (namespace "mtx", version "1"): logging through the
 * ILoggerFinder given to setLoggerFinder(), attribute parsing from PluginFields, dtype mapping.
 * All math lives in libmtx_kernels (plugins/include/mtx_kernels.h); the plugins only adapt.
 */
#ifndef MTX_PLUGIN_COMMON_H
#define MTX_PLUGIN_COMMON_H

#include <NvInferRuntime.h>

#include <cstdint>
#include <string>
#include <vector>

#include "mtx_kernels.h"

namespace mtx
{
namespace trt
{

constexpr char const* kPluginNamespace = "mtx";
constexpr char const* kPluginVersion = "1";

//! Log through the TensorRT logger found by setLoggerFinder(), else to stderr.
void log(nvinfer1::ILogger::Severity severity, std::string const& message) noexcept;
void setLoggerFinder(nvinfer1::ILoggerFinder* finder) noexcept;

//! Report a failed libmtx_kernels call (code and mtx_last_error()) and return the code.
int32_t reportKernelError(char const* pluginName, int32_t code) noexcept;

//! The libmtx_kernels dtype of a TensorRT type; false for anything but kFLOAT, kHALF, kBF16.
bool toMtxDtype(nvinfer1::DataType type, mtx_dtype& out) noexcept;
bool isActivationType(nvinfer1::DataType type) noexcept;

//! Read an integer / float attribute; accepts the int32/int64 and float32/float64 encodings the ONNX
//! parser and applications use. Returns false if the field is absent or of another type.
bool readInt(nvinfer1::PluginFieldCollection const* fc, char const* name, int64_t& out) noexcept;
bool readFloat(nvinfer1::PluginFieldCollection const* fc, char const* name, double& out) noexcept;

//! Number of elements of all dims but the last (tokens of an [..., H] tensor).
int64_t leadingVolume(nvinfer1::Dims const& dims) noexcept;

//! Build time (configurePlugin): can libmtx_kernels run on the current device (driver new enough,
//! architecture compiled)? Logs what is supported and returns false otherwise, so the engine build
//! fails instead of enqueue failing later with "no kernel image".
bool deviceSupported(char const* pluginName) noexcept;

//! Run time (attachToContext, onShapeChange): load every cubin for the current device now, outside
//! any CUDA-graph capture. Logs and returns false on failure.
bool loadKernels(char const* pluginName) noexcept;

} // namespace trt
} // namespace mtx

#endif
