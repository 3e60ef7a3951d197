#include "slidingWindowGQAPlugin.h"

#include "mtxPluginCommon.h"

#include <cuda_runtime_api.h>

#include <sstream>

using namespace nvinfer1;

namespace mtx
{
namespace trt
{
namespace
{
constexpr char const* kName = "SlidingWindowGQA";
constexpr int32_t kNbInputs = 7;
constexpr int32_t kNbOutputs = 3;
enum Input : int32_t
{
    kQUERY = 0,
    kKEY = 1,
    kVALUE = 2,
    kPAST_KEY = 3,
    kPAST_VALUE = 4,
    kSTART_POS = 5,
    kINV_FREQ = 6
};

void logError(std::string const& msg)
{
    log(ILogger::Severity::kERROR, std::string(kName) + ": " + msg);
}

int64_t bytesOf(Dims const& d, DataType t)
{
    int64_t n = t == DataType::kFLOAT ? 4 : 2;
    for (int32_t i = 0; i < d.nbDims; ++i)
    {
        n *= d.d[i];
    }
    return n;
}
} // namespace

SlidingWindowGQAPlugin::SlidingWindowGQAPlugin(SlidingWindowGQAParams const& params)
    : mParams(params)
{
    std::ostringstream os;
    os << "num_heads=" << params.numHeads << " num_kv_heads=" << params.numKvHeads << " window=" << params.window
       << " scale=" << params.scale << " (" << mtx_kernels_version() << ")";
    mMetadata = os.str();
}

IPluginCapability* SlidingWindowGQAPlugin::getCapabilityInterface(PluginCapabilityType type) noexcept
{
    switch (type)
    {
    case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
    case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuildV2*>(this);
    case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    }
    return nullptr;
}

IPluginV3* SlidingWindowGQAPlugin::clone() noexcept
{
    try
    {
        return new SlidingWindowGQAPlugin(mParams);
    }
    catch (...)
    {
        return nullptr;
    }
}

char const* SlidingWindowGQAPlugin::getPluginName() const noexcept { return kName; }
char const* SlidingWindowGQAPlugin::getPluginVersion() const noexcept { return kPluginVersion; }
char const* SlidingWindowGQAPlugin::getPluginNamespace() const noexcept { return kPluginNamespace; }
int32_t SlidingWindowGQAPlugin::getNbOutputs() const noexcept { return kNbOutputs; }

int32_t SlidingWindowGQAPlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    if (nbInputs != kNbInputs || nbOutputs != kNbOutputs)
    {
        return -1;
    }
    outputTypes[0] = inputTypes[kQUERY];
    outputTypes[1] = inputTypes[kPAST_KEY];
    outputTypes[2] = inputTypes[kPAST_VALUE];
    return 0;
}

int32_t SlidingWindowGQAPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs,
    DimsExprs const* /*shapeInputs*/, int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs,
    IExprBuilder& /*exprBuilder*/) noexcept
{
    if (nbInputs != kNbInputs || nbOutputs != kNbOutputs || inputs[kQUERY].nbDims != 3 || inputs[kPAST_KEY].nbDims != 4)
    {
        logError("expects 7 inputs (query [B,S,Hq*D], ..., past_key [B,Hkv,C,D], ...) and 3 outputs");
        return -1;
    }
    outputs[0] = inputs[kQUERY];     // output: same shape as query
    outputs[1] = inputs[kPAST_KEY];  // present_key: the buffer, same shape
    outputs[2] = inputs[kPAST_VALUE];
    return 0;
}

bool SlidingWindowGQAPlugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    if (nbInputs != kNbInputs || nbOutputs != kNbOutputs || pos < 0 || pos >= kNbInputs + kNbOutputs)
    {
        return false;
    }
    PluginTensorDesc const& d = inOut[pos].desc;
    if (d.format != TensorFormat::kLINEAR)
    {
        return false;
    }
    switch (pos)
    {
    case kQUERY: return isActivationType(d.type);
    case kSTART_POS: return d.type == DataType::kINT64; // TensorRT >= 10 passes INT64 tensors to plugins
    case kINV_FREQ: return d.type == DataType::kFLOAT;
    default: return d.type == inOut[kQUERY].desc.type; // key, value, buffers and all outputs: T
    }
}

int32_t SlidingWindowGQAPlugin::configurePlugin(
    DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept
{
    if (nbInputs != kNbInputs || nbOutputs != kNbOutputs)
    {
        return -1;
    }
    Dims const& q = in[kQUERY].desc.dims;
    Dims const& kb = in[kPAST_KEY].desc.dims;
    if (q.nbDims != 3 || kb.nbDims != 4 || in[kSTART_POS].desc.dims.nbDims != 1)
    {
        logError("query must be 3-D, past_key 4-D and start_pos 1-D");
        return -1;
    }
    int64_t const headDim = kb.d[3];
    int64_t const capacity = kb.d[2];
    if (headDim > 0 && headDim != 64 && headDim != 128)
    {
        logError("head size " + std::to_string(headDim) + " is not compiled into libmtx_kernels (64, 128)");
        return -1;
    }
    if (kb.d[1] > 0 && kb.d[1] != mParams.numKvHeads)
    {
        logError("past_key has " + std::to_string(kb.d[1]) + " heads, num_kv_heads is " + std::to_string(mParams.numKvHeads));
        return -1;
    }
    if (headDim > 0 && q.d[2] > 0 && q.d[2] != mParams.numHeads * headDim)
    {
        logError("query width " + std::to_string(q.d[2]) + " != num_heads * head_dim");
        return -1;
    }
    if (capacity > 0 && mParams.window > capacity)
    {
        logError("window " + std::to_string(mParams.window) + " exceeds the buffer capacity " + std::to_string(capacity));
        return -1;
    }
    return deviceSupported(kName) ? 0 : -1;
}

size_t SlidingWindowGQAPlugin::getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
    DynamicPluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept
{
    mtx_dtype dt;
    if (nbInputs != kNbInputs || !toMtxDtype(inputs[kQUERY].desc.type, dt))
    {
        return 0;
    }
    // The size for the profile's largest batch and chunk is enough for every smaller one.
    Dims const& q = inputs[kQUERY].max;
    Dims const& kb = inputs[kPAST_KEY].max;
    return mtx_swa_gqa_workspace_size(static_cast<int>(q.d[0]), static_cast<int>(q.d[1]), mParams.numHeads,
        mParams.numKvHeads, static_cast<int>(kb.d[3]), static_cast<int>(kb.d[2]), mParams.window, dt);
}

int32_t SlidingWindowGQAPlugin::getAliasedInput(int32_t outputIndex) noexcept
{
    // docs/ops.md §2: present_key / present_value are past_key / past_value updated in place.
    return outputIndex == 1 ? kPAST_KEY : outputIndex == 2 ? kPAST_VALUE : -1;
}

char const* SlidingWindowGQAPlugin::getMetadataString() noexcept { return mMetadata.c_str(); }

int32_t SlidingWindowGQAPlugin::onShapeChange(
    PluginTensorDesc const* /*in*/, int32_t nbInputs, PluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept
{
    if (nbInputs != kNbInputs || nbOutputs != kNbOutputs)
    {
        return -1;
    }
    return loadKernels(kName) ? 0 : -1; // a no-op once attachToContext has loaded them
}

int32_t SlidingWindowGQAPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* /*outputDesc*/,
    void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept
{
    mtx_dtype dt;
    if (!toMtxDtype(inputDesc[kQUERY].type, dt))
    {
        return -1;
    }
    Dims const& q = inputDesc[kQUERY].dims;
    Dims const& kb = inputDesc[kPAST_KEY].dims;
    int const batch = static_cast<int>(q.d[0]);
    int const seq = static_cast<int>(q.d[1]);
    int const capacity = static_cast<int>(kb.d[2]);
    int const headDim = static_cast<int>(kb.d[3]);
    // Not aliased (TensorRT inserted a copy, or the preview feature is off): present starts as past.
    // That costs a read and a write of both buffers per call (docs/ops.md §4); say so once.
    for (int32_t i = 0; i < 2; ++i)
    {
        void const* past = inputs[kPAST_KEY + i];
        void* present = outputs[1 + i];
        if (present != past)
        {
            if (!mCopyReported)
            {
                mCopyReported = true;
                log(ILogger::Severity::kWARNING, std::string(kName) + ": present_key/present_value are not aliased to "
                    "past_key/past_value in this engine: copying " + std::to_string(2 * bytesOf(inputDesc[kPAST_KEY].dims,
                    inputDesc[kPAST_KEY].type)) + " bytes per call before the in-place update");
            }
            cudaError_t e = cudaMemcpyAsync(present, past, static_cast<size_t>(bytesOf(inputDesc[kPAST_KEY + i].dims,
                inputDesc[kPAST_KEY + i].type)), cudaMemcpyDeviceToDevice, stream);
            if (e != cudaSuccess)
            {
                logError(std::string("cudaMemcpyAsync past -> present: ") + cudaGetErrorString(e));
                return -1;
            }
        }
    }
    size_t const wsSize = mtx_swa_gqa_workspace_size(
        batch, seq, mParams.numHeads, mParams.numKvHeads, headDim, capacity, mParams.window, dt);
    int const rc = mtx_swa_gqa_forward(inputs[kQUERY], inputs[kKEY], inputs[kVALUE], outputs[1], outputs[2],
        static_cast<int64_t const*>(inputs[kSTART_POS]), static_cast<float const*>(inputs[kINV_FREQ]), outputs[0],
        batch, seq, mParams.numHeads, mParams.numKvHeads, headDim, capacity, mParams.window, mParams.scale, dt,
        workspace, wsSize, reinterpret_cast<mtx_stream_t>(stream));
    return reportKernelError(kName, rc);
}

IPluginV3* SlidingWindowGQAPlugin::attachToContext(IPluginResourceContext* /*context*/) noexcept
{
    // An execution context is being created: load the kernels now, not inside a captured enqueue.
    return loadKernels(kName) ? clone() : nullptr;
}

PluginFieldCollection const* SlidingWindowGQAPlugin::getFieldsToSerialize() noexcept
{
    mSerialFields.clear();
    mSerialFields.emplace_back("num_heads", &mParams.numHeads, PluginFieldType::kINT32, 1);
    mSerialFields.emplace_back("num_kv_heads", &mParams.numKvHeads, PluginFieldType::kINT32, 1);
    mSerialFields.emplace_back("window", &mParams.window, PluginFieldType::kINT32, 1);
    mSerialFields.emplace_back("scale", &mParams.scale, PluginFieldType::kFLOAT32, 1);
    mSerialCollection.nbFields = static_cast<int32_t>(mSerialFields.size());
    mSerialCollection.fields = mSerialFields.data();
    return &mSerialCollection;
}

// ---------------------------------------------------------------- creator

SlidingWindowGQAPluginCreator::SlidingWindowGQAPluginCreator()
{
    mFields.emplace_back("num_heads", nullptr, PluginFieldType::kINT32, 1);
    mFields.emplace_back("num_kv_heads", nullptr, PluginFieldType::kINT32, 1);
    mFields.emplace_back("window", nullptr, PluginFieldType::kINT32, 1);
    mFields.emplace_back("scale", nullptr, PluginFieldType::kFLOAT32, 1);
    mFieldCollection.nbFields = static_cast<int32_t>(mFields.size());
    mFieldCollection.fields = mFields.data();
}

char const* SlidingWindowGQAPluginCreator::getPluginName() const noexcept { return kName; }
char const* SlidingWindowGQAPluginCreator::getPluginVersion() const noexcept { return kPluginVersion; }
char const* SlidingWindowGQAPluginCreator::getPluginNamespace() const noexcept { return kPluginNamespace; }
PluginFieldCollection const* SlidingWindowGQAPluginCreator::getFieldNames() noexcept { return &mFieldCollection; }

IPluginV3* SlidingWindowGQAPluginCreator::createPlugin(
    char const* /*name*/, PluginFieldCollection const* fc, TensorRTPhase /*phase*/) noexcept
{
    try
    {
        int64_t numHeads = 0, numKvHeads = 0, window = 0;
        double scale = 0.0;
        if (!readInt(fc, "num_heads", numHeads) || !readInt(fc, "num_kv_heads", numKvHeads)
            || !readFloat(fc, "scale", scale))
        {
            logError("attributes num_heads, num_kv_heads (int) and scale (float) are required");
            return nullptr;
        }
        readInt(fc, "window", window); // absent = 0 = full attention
        if (numHeads < 1 || numKvHeads < 1 || numHeads % numKvHeads != 0 || window < 0)
        {
            logError("need num_heads a positive multiple of num_kv_heads and window >= 0");
            return nullptr;
        }
        SlidingWindowGQAParams p;
        p.numHeads = static_cast<int32_t>(numHeads);
        p.numKvHeads = static_cast<int32_t>(numKvHeads);
        p.window = static_cast<int32_t>(window);
        p.scale = static_cast<float>(scale);
        return new SlidingWindowGQAPlugin(p);
    }
    catch (...)
    {
        return nullptr;
    }
}

} // namespace trt
} // namespace mtx
