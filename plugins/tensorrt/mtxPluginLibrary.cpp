/*
 * Entry points of libmtx_trt_plugins.so for IPluginRegistry::loadLibrary() and
 * `trtexec --dynamicPlugins`: getCreators() and setLoggerFinder(). The creators register under
 * namespace "mtx", version "1", names "SlidingWindowGQA" and "MoE" — the ONNX op types, so the
 * TensorRT ONNX parser maps nodes with plugin_namespace="mtx", plugin_version="1" to them.
 */
#include "MoE/moePlugin.h"
#include "SlidingWindowGQA/slidingWindowGQAPlugin.h"
#include "common/mtxPluginCommon.h"

#define MTX_TRT_EXPORT extern "C" __attribute__((visibility("default")))

MTX_TRT_EXPORT nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    static mtx::trt::SlidingWindowGQAPluginCreator swaCreator;
    static mtx::trt::MoEPluginCreator moeCreator;
    static nvinfer1::IPluginCreatorInterface* const creators[] = {&swaCreator, &moeCreator};
    nbCreators = 2;
    return creators;
}

MTX_TRT_EXPORT void setLoggerFinder(nvinfer1::ILoggerFinder* finder)
{
    mtx::trt::setLoggerFinder(finder);
}
