#include "mtxPluginCommon.h"

#include <atomic>
#include <cstdio>
#include <cstring>
#include <sstream>

namespace mtx
{
namespace trt
{
namespace
{
std::atomic<nvinfer1::ILoggerFinder*> gLoggerFinder{nullptr};

nvinfer1::PluginField const* findField(nvinfer1::PluginFieldCollection const* fc, char const* name) noexcept
{
    if (fc == nullptr || fc->fields == nullptr)
    {
        return nullptr;
    }
    for (int32_t i = 0; i < fc->nbFields; ++i)
    {
        nvinfer1::PluginField const& f = fc->fields[i];
        if (f.name != nullptr && std::strcmp(f.name, name) == 0 && f.data != nullptr && f.length >= 1)
        {
            return &f;
        }
    }
    return nullptr;
}
} // namespace

void setLoggerFinder(nvinfer1::ILoggerFinder* finder) noexcept
{
    gLoggerFinder.store(finder);
}

void log(nvinfer1::ILogger::Severity severity, std::string const& message) noexcept
{
    nvinfer1::ILoggerFinder* finder = gLoggerFinder.load();
    nvinfer1::ILogger* logger = finder != nullptr ? finder->findLogger() : nullptr;
    if (logger != nullptr)
    {
        logger->log(severity, message.c_str());
    }
    else if (severity <= nvinfer1::ILogger::Severity::kWARNING)
    {
        std::fprintf(stderr, "[mtx plugin] %s\n", message.c_str());
    }
}

int32_t reportKernelError(char const* pluginName, int32_t code) noexcept
{
    if (code != MTX_SUCCESS)
    {
        std::ostringstream os;
        os << pluginName << ": libmtx_kernels error " << code << ": " << mtx_last_error();
        log(nvinfer1::ILogger::Severity::kERROR, os.str());
    }
    return code;
}

bool toMtxDtype(nvinfer1::DataType type, mtx_dtype& out) noexcept
{
    switch (type)
    {
    case nvinfer1::DataType::kFLOAT: out = MTX_FLOAT32; return true;
    case nvinfer1::DataType::kHALF: out = MTX_FLOAT16; return true;
    case nvinfer1::DataType::kBF16: out = MTX_BFLOAT16; return true;
    default: return false;
    }
}

bool isActivationType(nvinfer1::DataType type) noexcept
{
    mtx_dtype unused;
    return toMtxDtype(type, unused);
}

bool readInt(nvinfer1::PluginFieldCollection const* fc, char const* name, int64_t& out) noexcept
{
    nvinfer1::PluginField const* f = findField(fc, name);
    if (f == nullptr)
    {
        return false;
    }
    switch (f->type)
    {
    case nvinfer1::PluginFieldType::kINT32: out = *static_cast<int32_t const*>(f->data); return true;
    case nvinfer1::PluginFieldType::kINT64: out = *static_cast<int64_t const*>(f->data); return true;
    case nvinfer1::PluginFieldType::kINT16: out = *static_cast<int16_t const*>(f->data); return true;
    case nvinfer1::PluginFieldType::kINT8: out = *static_cast<int8_t const*>(f->data); return true;
    default: return false;
    }
}

bool readFloat(nvinfer1::PluginFieldCollection const* fc, char const* name, double& out) noexcept
{
    nvinfer1::PluginField const* f = findField(fc, name);
    if (f == nullptr)
    {
        return false;
    }
    switch (f->type)
    {
    case nvinfer1::PluginFieldType::kFLOAT32: out = *static_cast<float const*>(f->data); return true;
    case nvinfer1::PluginFieldType::kFLOAT64: out = *static_cast<double const*>(f->data); return true;
    default: return false;
    }
}

bool deviceSupported(char const* pluginName) noexcept
{
    int32_t const rc = mtx_check_device(-1);
    if (rc != MTX_SUCCESS)
    {
        reportKernelError(pluginName, rc);
        return false;
    }
    return true;
}

bool loadKernels(char const* pluginName) noexcept
{
    int32_t const rc = mtx_load_kernels(-1);
    if (rc != MTX_SUCCESS)
    {
        reportKernelError(pluginName, rc);
        return false;
    }
    return true;
}

int64_t leadingVolume(nvinfer1::Dims const& dims) noexcept
{
    int64_t n = 1;
    for (int32_t i = 0; i + 1 < dims.nbDims; ++i)
    {
        n *= dims.d[i];
    }
    return n;
}

} // namespace trt
} // namespace mtx
