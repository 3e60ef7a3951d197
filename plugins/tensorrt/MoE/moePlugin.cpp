#include "moePlugin.h"

#include "mtxPluginCommon.h"

#include <sstream>

using namespace nvinfer1;

namespace mtx
{
namespace trt
{
namespace
{
constexpr char const* kName = "MoE";
constexpr int32_t kNbInputs = 5;
enum Input : int32_t
{
    kINPUT = 0,
    kROUTER = 1,
    kW1 = 2,
    kW3 = 3,
    kW2 = 4
};

void logError(std::string const& msg)
{
    log(ILogger::Severity::kERROR, std::string(kName) + ": " + msg);
}
} // namespace

MoEPlugin::MoEPlugin(int32_t topK)
    : mTopK(topK)
{
    std::ostringstream os;
    os << "top_k=" << topK << " (" << mtx_kernels_version() << ")";
    mMetadata = os.str();
}

IPluginCapability* MoEPlugin::getCapabilityInterface(PluginCapabilityType type) noexcept
{
    switch (type)
    {
    case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
    case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
    case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    }
    return nullptr;
}

IPluginV3* MoEPlugin::clone() noexcept
{
    try
    {
        return new MoEPlugin(mTopK);
    }
    catch (...)
    {
        return nullptr;
    }
}

char const* MoEPlugin::getPluginName() const noexcept { return kName; }
char const* MoEPlugin::getPluginVersion() const noexcept { return kPluginVersion; }
char const* MoEPlugin::getPluginNamespace() const noexcept { return kPluginNamespace; }
int32_t MoEPlugin::getNbOutputs() const noexcept { return 1; }

int32_t MoEPlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    if (nbInputs != kNbInputs || nbOutputs != 1)
    {
        return -1;
    }
    outputTypes[0] = inputTypes[kINPUT];
    return 0;
}

int32_t MoEPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* /*shapeInputs*/,
    int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs, IExprBuilder& /*exprBuilder*/) noexcept
{
    if (nbInputs != kNbInputs || nbOutputs != 1 || inputs[kINPUT].nbDims < 2)
    {
        logError("expects 5 inputs (input [..., H], router_weight, w1, w3, w2) and 1 output");
        return -1;
    }
    outputs[0] = inputs[kINPUT];
    return 0;
}

bool MoEPlugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    if (nbInputs != kNbInputs || nbOutputs != 1 || pos < 0 || pos > kNbInputs)
    {
        return false;
    }
    PluginTensorDesc const& d = inOut[pos].desc;
    if (d.format != TensorFormat::kLINEAR)
    {
        return false;
    }
    return pos == 0 ? isActivationType(d.type) : d.type == inOut[0].desc.type;
}

int32_t MoEPlugin::configurePlugin(
    DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept
{
    if (nbInputs != kNbInputs || nbOutputs != 1)
    {
        return -1;
    }
    Dims const& r = in[kROUTER].desc.dims;
    Dims const& w1 = in[kW1].desc.dims;
    Dims const& w2 = in[kW2].desc.dims;
    if (r.nbDims != 2 || w1.nbDims != 3 || w2.nbDims != 3)
    {
        logError("router_weight must be [E, H], w1/w3 [E, I, H] and w2 [E, H, I]");
        return -1;
    }
    int64_t const experts = r.d[0];
    if (experts > 0 && (mTopK > experts || experts > 256 || mTopK > 8))
    {
        logError("top_k " + std::to_string(mTopK) + " with " + std::to_string(experts)
            + " experts: libmtx_kernels supports E <= 256 and top_k <= min(E, 8)");
        return -1;
    }
    int64_t const hidden = r.d[1], inter = w1.d[1];
    if ((hidden > 0 && hidden % 16 != 0) || (inter > 0 && inter % 16 != 0))
    {
        logError("hidden and intermediate sizes must be multiples of 16");
        return -1;
    }
    return deviceSupported(kName) ? 0 : -1;
}

size_t MoEPlugin::getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
    DynamicPluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept
{
    mtx_dtype dt;
    if (nbInputs != kNbInputs || !toMtxDtype(inputs[kINPUT].desc.type, dt))
    {
        return 0;
    }
    Dims const& w1 = inputs[kW1].max;
    return mtx_moe_workspace_size(leadingVolume(inputs[kINPUT].max), static_cast<int>(w1.d[2]),
        static_cast<int>(w1.d[1]), static_cast<int>(w1.d[0]), mTopK, dt);
}

char const* MoEPlugin::getMetadataString() noexcept { return mMetadata.c_str(); }

int32_t MoEPlugin::onShapeChange(
    PluginTensorDesc const* /*in*/, int32_t nbInputs, PluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept
{
    if (nbInputs != kNbInputs || nbOutputs != 1)
    {
        return -1;
    }
    return loadKernels(kName) ? 0 : -1; // a no-op once attachToContext has loaded them
}

int32_t MoEPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* /*outputDesc*/,
    void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept
{
    mtx_dtype dt;
    if (!toMtxDtype(inputDesc[kINPUT].type, dt))
    {
        return -1;
    }
    Dims const& w1 = inputDesc[kW1].dims;
    int64_t const tokens = leadingVolume(inputDesc[kINPUT].dims);
    int const experts = static_cast<int>(w1.d[0]), inter = static_cast<int>(w1.d[1]), hidden = static_cast<int>(w1.d[2]);
    size_t const wsSize = mtx_moe_workspace_size(tokens, hidden, inter, experts, mTopK, dt);
    int const rc = mtx_moe_forward(inputs[kINPUT], inputs[kROUTER], inputs[kW1], inputs[kW3], inputs[kW2], outputs[0],
        tokens, hidden, inter, experts, mTopK, dt, workspace, wsSize, reinterpret_cast<mtx_stream_t>(stream));
    return reportKernelError(kName, rc);
}

IPluginV3* MoEPlugin::attachToContext(IPluginResourceContext* /*context*/) noexcept
{
    // An execution context is being created: load the kernels now, not inside a captured enqueue.
    return loadKernels(kName) ? clone() : nullptr;
}

PluginFieldCollection const* MoEPlugin::getFieldsToSerialize() noexcept
{
    mSerialFields.clear();
    mSerialFields.emplace_back("top_k", &mTopK, PluginFieldType::kINT32, 1);
    mSerialCollection.nbFields = static_cast<int32_t>(mSerialFields.size());
    mSerialCollection.fields = mSerialFields.data();
    return &mSerialCollection;
}

// ---------------------------------------------------------------- creator

MoEPluginCreator::MoEPluginCreator()
{
    mFields.emplace_back("top_k", nullptr, PluginFieldType::kINT32, 1);
    mFieldCollection.nbFields = static_cast<int32_t>(mFields.size());
    mFieldCollection.fields = mFields.data();
}

char const* MoEPluginCreator::getPluginName() const noexcept { return kName; }
char const* MoEPluginCreator::getPluginVersion() const noexcept { return kPluginVersion; }
char const* MoEPluginCreator::getPluginNamespace() const noexcept { return kPluginNamespace; }
PluginFieldCollection const* MoEPluginCreator::getFieldNames() noexcept { return &mFieldCollection; }

IPluginV3* MoEPluginCreator::createPlugin(char const* /*name*/, PluginFieldCollection const* fc, TensorRTPhase /*phase*/) noexcept
{
    try
    {
        int64_t topK = 0;
        if (!readInt(fc, "top_k", topK) || topK < 1)
        {
            logError("attribute top_k (int >= 1) is required");
            return nullptr;
        }
        return new MoEPlugin(static_cast<int32_t>(topK));
    }
    catch (...)
    {
        return nullptr;
    }
}

} // namespace trt
} // namespace mtx
