/*
 * TensorRT plugin "SlidingWindowGQA" (namespace "mtx", version "1"): mtx::SlidingWindowGQA of
 * docs/ops.md §2, running libmtx_kernels' mtx_swa_gqa_forward.
 *
 * Inputs:  0 query [B,S,Hq*D]  1 key [B,S,Hkv*D]  2 value [B,S,Hkv*D]  3 past_key [B,Hkv,C,D]
 *          4 past_value [B,Hkv,C,D]  5 start_pos [B] INT64  6 inv_freq [D/2] FLOAT
 * Outputs: 0 output [B,S,Hq*D]  1 present_key  2 present_value (aliased to inputs 3 and 4 through
 *          IPluginV3OneBuildV2::getAliasedInput: the buffers are updated in place; needs the builder
 *          preview feature kALIASED_PLUGIN_IO_10_03. Without aliasing, enqueue copies past -> present
 *          first, then updates present.)
 * Attributes: num_heads, num_kv_heads, window (0 = full attention), scale.
 * Types: query/key/value/buffers/outputs one of FLOAT, HALF, BF16 (linear); start_pos INT64;
 *        inv_freq FLOAT.
 */
#ifndef MTX_SLIDING_WINDOW_GQA_PLUGIN_H
#define MTX_SLIDING_WINDOW_GQA_PLUGIN_H

#include <NvInferRuntime.h>

#include <string>
#include <vector>

namespace mtx
{
namespace trt
{

struct SlidingWindowGQAParams
{
    int32_t numHeads{0};
    int32_t numKvHeads{0};
    int32_t window{0};
    float scale{0.F};
};

class SlidingWindowGQAPlugin : public nvinfer1::IPluginV3,
                               public nvinfer1::IPluginV3OneCore,
                               public nvinfer1::IPluginV3OneBuildV2,
                               public nvinfer1::IPluginV3OneRuntime
{
public:
    explicit SlidingWindowGQAPlugin(SlidingWindowGQAParams const& params);
    ~SlidingWindowGQAPlugin() override = default;

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
    nvinfer1::IPluginV3* clone() noexcept override;

    // IPluginV3OneCore
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;

    // IPluginV3OneBuild / V2
    int32_t getNbOutputs() const noexcept override;
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs,
        nvinfer1::DimsExprs const* shapeInputs, int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs,
        int32_t nbOutputs, nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
        int32_t nbOutputs) noexcept override;
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;
    int32_t getAliasedInput(int32_t outputIndex) noexcept override;
    char const* getMetadataString() noexcept override;

    // IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::PluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

private:
    SlidingWindowGQAParams mParams;
    std::string mMetadata;
    bool mCopyReported{false};
    std::vector<nvinfer1::PluginField> mSerialFields;
    nvinfer1::PluginFieldCollection mSerialCollection{};
};

class SlidingWindowGQAPluginCreator : public nvinfer1::IPluginCreatorV3One
{
public:
    SlidingWindowGQAPluginCreator();
    ~SlidingWindowGQAPluginCreator() override = default;

    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
    nvinfer1::IPluginV3* createPlugin(char const* name, nvinfer1::PluginFieldCollection const* fc,
        nvinfer1::TensorRTPhase phase) noexcept override;

private:
    std::vector<nvinfer1::PluginField> mFields;
    nvinfer1::PluginFieldCollection mFieldCollection{};
};

} // namespace trt
} // namespace mtx

#endif
