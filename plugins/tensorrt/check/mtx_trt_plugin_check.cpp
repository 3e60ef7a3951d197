/*
 * mtx_trt_plugin_check: loads libmtx_trt_plugins.so with dlopen — no libnvinfer, no GPU needed — and
 * reports, as one JSON object per line on stdout, what its creators and plugins declare, so that
 * tests/test_plugins_build.py can compare it with what the exporter writes and with mtx/kernels/plan.py.
 *
 *   mtx_trt_plugin_check LIB < cases
 *
 * Output lines: first {"creators": [...]} (name, version, namespace, interface, fields), then one
 * object per case line read from stdin:
 *
 *   swa NUM_HEADS NUM_KV_HEADS WINDOW SCALE BATCH SEQ CAPACITY HEAD_DIM
 *   moe TOP_K TOKENS HIDDEN INTER EXPERTS
 *   bad swa|moe FIELD=VALUE...   (createPlugin with only these int32 fields: expected to fail)
 *
 * For swa/moe: the plugin is created from int32/float32 fields (as the ONNX parser passes node
 * attributes), and the line reports its capability interfaces, aliasing, output types,
 * supportsFormatCombination for every T in {FLOAT, HALF, BF16} (and INT8/INT32, which must be
 * refused), the serialize -> createPlugin(kRUNTIME) round trip, getWorkspaceSize at the given maximum
 * shapes, and configurePlugin's status with the messages the plugin logged (on a machine without a
 * GPU this is the device check's refusal).
 */
#include <NvInferRuntime.h>

#include <dlfcn.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

using namespace nvinfer1;

namespace
{
std::vector<std::string> gLog;

class CaptureLogger : public ILogger
{
public:
    void log(Severity severity, AsciiChar const* msg) noexcept override
    {
        gLog.emplace_back(msg ? msg : "");
    }
};

class Finder : public ILoggerFinder
{
public:
    ILogger* findLogger() override
    {
        return &mLogger;
    }

private:
    CaptureLogger mLogger;
};

std::string quote(std::string const& s)
{
    std::ostringstream os;
    os << '"';
    for (char c : s)
    {
        if (c == '"' || c == '\\')
        {
            os << '\\' << c;
        }
        else if (static_cast<unsigned char>(c) < 0x20)
        {
            char buf[8];
            std::snprintf(buf, sizeof buf, "\\u%04x", c);
            os << buf;
        }
        else
        {
            os << c;
        }
    }
    os << '"';
    return os.str();
}

char const* fieldTypeName(PluginFieldType t)
{
    switch (t)
    {
    case PluginFieldType::kFLOAT16: return "float16";
    case PluginFieldType::kFLOAT32: return "float32";
    case PluginFieldType::kFLOAT64: return "float64";
    case PluginFieldType::kINT8: return "int8";
    case PluginFieldType::kINT16: return "int16";
    case PluginFieldType::kINT32: return "int32";
    case PluginFieldType::kCHAR: return "char";
    case PluginFieldType::kDIMS: return "dims";
    case PluginFieldType::kUNKNOWN: return "unknown";
    default: return "other";
    }
}

std::string fieldValue(PluginField const& f)
{
    std::ostringstream os;
    if (f.data == nullptr || f.length < 1)
    {
        return "null";
    }
    switch (f.type)
    {
    case PluginFieldType::kINT32: os << *static_cast<int32_t const*>(f.data); break;
    case PluginFieldType::kFLOAT32: os.precision(9); os << *static_cast<float const*>(f.data); break;
    case PluginFieldType::kFLOAT64: os.precision(17); os << *static_cast<double const*>(f.data); break;
    default: return "null";
    }
    return os.str();
}

std::string fieldsJson(PluginFieldCollection const* fc, bool values)
{
    std::ostringstream os;
    os << '[';
    for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i)
    {
        PluginField const& f = fc->fields[i];
        os << (i ? "," : "") << "{\"name\":" << quote(f.name ? f.name : "") << ",\"type\":" << quote(fieldTypeName(f.type))
           << ",\"length\":" << f.length;
        if (values)
        {
            os << ",\"value\":" << fieldValue(f);
        }
        os << '}';
    }
    os << ']';
    return os.str();
}

std::string logJson()
{
    std::ostringstream os;
    os << '[';
    for (size_t i = 0; i < gLog.size(); ++i)
    {
        os << (i ? "," : "") << quote(gLog[i]);
    }
    os << ']';
    gLog.clear();
    return os.str();
}

std::string interfaceOf(IVersionedInterface const* p)
{
    if (p == nullptr)
    {
        return "null";
    }
    InterfaceInfo info = p->getInterfaceInfo();
    std::ostringstream os;
    os << quote(std::string(info.kind) + " " + std::to_string(info.major) + "." + std::to_string(info.minor));
    return os.str();
}

char const* typeName(DataType t)
{
    switch (t)
    {
    case DataType::kFLOAT: return "float32";
    case DataType::kHALF: return "float16";
    case DataType::kBF16: return "bfloat16";
    case DataType::kINT8: return "int8";
    case DataType::kINT32: return "int32";
    case DataType::kINT64: return "int64";
    case DataType::kBOOL: return "bool";
    default: return "other";
    }
}

Dims dims(std::vector<int64_t> const& d)
{
    Dims out{};
    out.nbDims = static_cast<int32_t>(d.size());
    for (size_t i = 0; i < d.size(); ++i)
    {
        out.d[i] = d[i];
    }
    return out;
}

DynamicPluginTensorDesc desc(std::vector<int64_t> const& maxDims, DataType t)
{
    DynamicPluginTensorDesc d{};
    d.desc.dims = dims(maxDims);
    d.desc.type = t;
    d.desc.format = TensorFormat::kLINEAR;
    d.desc.scale = 1.F;
    d.min = dims(maxDims);
    d.opt = dims(maxDims);
    d.max = dims(maxDims);
    return d;
}

struct Plugin
{
    IPluginV3* v3{nullptr};
    IPluginV3OneCore* core{nullptr};
    IPluginV3OneBuild* build{nullptr};
    IPluginV3OneRuntime* runtime{nullptr};
    IVersionedInterface* buildIface{nullptr};
};

Plugin open(IPluginV3* p)
{
    Plugin out;
    out.v3 = p;
    if (p == nullptr)
    {
        return out;
    }
    out.core = static_cast<IPluginV3OneCore*>(p->getCapabilityInterface(PluginCapabilityType::kCORE));
    out.buildIface = p->getCapabilityInterface(PluginCapabilityType::kBUILD);
    out.build = static_cast<IPluginV3OneBuild*>(out.buildIface);
    out.runtime = static_cast<IPluginV3OneRuntime*>(p->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    return out;
}

//! supportsFormatCombination at every position for one I/O description; returns e.g. [true,true,...].
std::string formats(Plugin const& p, std::vector<DynamicPluginTensorDesc> io, int32_t nbIn)
{
    std::ostringstream os;
    os << '[';
    for (int32_t pos = 0; pos < static_cast<int32_t>(io.size()); ++pos)
    {
        bool ok = p.build->supportsFormatCombination(pos, io.data(), nbIn, static_cast<int32_t>(io.size()) - nbIn);
        os << (pos ? "," : "") << (ok ? "true" : "false");
    }
    os << ']';
    return os.str();
}

std::string outputTypes(Plugin const& p, std::vector<DataType> const& in, int32_t nbOut)
{
    std::vector<DataType> out(nbOut, DataType::kINT8);
    int32_t rc = p.build->getOutputDataTypes(out.data(), nbOut, in.data(), static_cast<int32_t>(in.size()));
    if (rc != 0)
    {
        return "null";
    }
    std::ostringstream os;
    os << '[';
    for (int32_t i = 0; i < nbOut; ++i)
    {
        os << (i ? "," : "") << quote(typeName(out[i]));
    }
    os << ']';
    return os.str();
}

DataType const kTypes[] = {DataType::kFLOAT, DataType::kHALF, DataType::kBF16, DataType::kINT8, DataType::kINT32};

//! The part of a case report common to both plugins.
void common(std::ostringstream& os, IPluginCreatorV3One* creator, Plugin const& p, int32_t nbOut)
{
    os << ",\"name\":" << quote(p.core->getPluginName()) << ",\"version\":" << quote(p.core->getPluginVersion())
       << ",\"namespace\":" << quote(p.core->getPluginNamespace()) << ",\"core\":" << interfaceOf(p.core)
       << ",\"build\":" << interfaceOf(p.buildIface) << ",\"runtime\":" << interfaceOf(p.runtime)
       << ",\"nb_outputs\":" << p.build->getNbOutputs();
    // Serialize -> deserialize: the runtime phase builds the plugin from getFieldsToSerialize().
    PluginFieldCollection const* ser = p.runtime->getFieldsToSerialize();
    std::string before = fieldsJson(ser, true);
    IPluginV3* back = creator->createPlugin("roundtrip", ser, TensorRTPhase::kRUNTIME);
    std::string after = "null";
    if (back != nullptr)
    {
        Plugin q = open(back);
        after = fieldsJson(q.runtime->getFieldsToSerialize(), true);
        IPluginV3* cloned = back->clone();
        if (cloned != nullptr)
        {
            os << ",\"clone_fields\":" << fieldsJson(open(cloned).runtime->getFieldsToSerialize(), true);
            delete cloned;
        }
        delete back;
    }
    os << ",\"serialized\":" << before << ",\"deserialized\":" << after;
    (void) nbOut;
}

void swaCase(IPluginCreatorV3One* creator, std::istringstream& in)
{
    int32_t hq, hkv, window, batch, seq, cap, d;
    float scale;
    in >> hq >> hkv >> window >> scale >> batch >> seq >> cap >> d;
    std::vector<PluginField> f{{"num_heads", &hq, PluginFieldType::kINT32, 1},
        {"num_kv_heads", &hkv, PluginFieldType::kINT32, 1}, {"window", &window, PluginFieldType::kINT32, 1},
        {"scale", &scale, PluginFieldType::kFLOAT32, 1}};
    PluginFieldCollection fc{static_cast<int32_t>(f.size()), f.data()};
    Plugin p = open(creator->createPlugin("swa", &fc, TensorRTPhase::kBUILD));
    std::ostringstream os;
    os << "{\"case\":\"swa\"";
    if (p.v3 == nullptr)
    {
        os << ",\"created\":false,\"log\":" << logJson() << "}";
        std::cout << os.str() << std::endl;
        return;
    }
    os << ",\"created\":true";
    common(os, creator, p, 3);
    auto* v2 = static_cast<IPluginV3OneBuildV2*>(p.build);
    bool isV2 = p.buildIface->getInterfaceInfo().major >= 2;
    os << ",\"aliased\":[";
    for (int32_t o = 0; o < 3; ++o)
    {
        os << (o ? "," : "") << (isV2 ? v2->getAliasedInput(o) : -1);
    }
    os << "]";
    auto io = [&](DataType t, DataType pos, DataType freq)
    {
        std::vector<DynamicPluginTensorDesc> v{desc({batch, seq, hq * d}, t), desc({batch, seq, hkv * d}, t),
            desc({batch, seq, hkv * d}, t), desc({batch, hkv, cap, d}, t), desc({batch, hkv, cap, d}, t),
            desc({batch}, pos), desc({d / 2}, freq), desc({batch, seq, hq * d}, t), desc({batch, hkv, cap, d}, t),
            desc({batch, hkv, cap, d}, t)};
        return v;
    };
    os << ",\"formats\":{";
    bool first = true;
    for (DataType t : kTypes)
    {
        os << (first ? "" : ",") << quote(typeName(t)) << ":" << formats(p, io(t, DataType::kINT64, DataType::kFLOAT), 7);
        first = false;
    }
    os << ",\"start_pos_int32\":" << formats(p, io(DataType::kHALF, DataType::kINT32, DataType::kFLOAT), 7);
    os << ",\"inv_freq_half\":" << formats(p, io(DataType::kHALF, DataType::kINT64, DataType::kHALF), 7);
    std::vector<DynamicPluginTensorDesc> mixed = io(DataType::kHALF, DataType::kINT64, DataType::kFLOAT);
    mixed[3] = desc({batch, hkv, cap, d}, DataType::kBF16);
    os << ",\"past_key_other_type\":" << formats(p, mixed, 7) << "}";
    os << ",\"output_types\":{";
    first = true;
    for (DataType t : {DataType::kFLOAT, DataType::kHALF, DataType::kBF16})
    {
        os << (first ? "" : ",") << quote(typeName(t)) << ":"
           << outputTypes(p, {t, t, t, t, t, DataType::kINT64, DataType::kFLOAT}, 3);
        first = false;
    }
    os << "},\"workspace\":{";
    first = true;
    for (DataType t : {DataType::kFLOAT, DataType::kHALF, DataType::kBF16})
    {
        std::vector<DynamicPluginTensorDesc> v = io(t, DataType::kINT64, DataType::kFLOAT);
        os << (first ? "" : ",") << quote(typeName(t)) << ":" << p.build->getWorkspaceSize(v.data(), 7, v.data() + 7, 3);
        first = false;
    }
    gLog.clear();
    std::vector<DynamicPluginTensorDesc> v = io(DataType::kHALF, DataType::kINT64, DataType::kFLOAT);
    int32_t rc = p.build->configurePlugin(v.data(), 7, v.data() + 7, 3);
    os << "},\"configure\":" << rc << ",\"configure_log\":" << logJson();
    // Shape checks come before the device check: a head size outside {64, 128} names itself.
    std::vector<DynamicPluginTensorDesc> bad = v;
    for (int i : {3, 4, 8, 9})
    {
        bad[i] = desc({batch, hkv, cap, 96}, DataType::kHALF);
    }
    bad[0] = desc({batch, seq, hq * 96}, DataType::kHALF);
    rc = p.build->configurePlugin(bad.data(), 7, bad.data() + 7, 3);
    os << ",\"configure_head_dim_96\":" << rc << ",\"configure_head_dim_96_log\":" << logJson();
    os << ",\"metadata\":" << quote(p.build->getMetadataString() ? p.build->getMetadataString() : "") << "}";
    delete p.v3;
    std::cout << os.str() << std::endl;
}

void moeCase(IPluginCreatorV3One* creator, std::istringstream& in)
{
    int32_t k, tokens, h, inter, e;
    in >> k >> tokens >> h >> inter >> e;
    std::vector<PluginField> f{{"top_k", &k, PluginFieldType::kINT32, 1}};
    PluginFieldCollection fc{1, f.data()};
    Plugin p = open(creator->createPlugin("moe", &fc, TensorRTPhase::kBUILD));
    std::ostringstream os;
    os << "{\"case\":\"moe\"";
    if (p.v3 == nullptr)
    {
        os << ",\"created\":false,\"log\":" << logJson() << "}";
        std::cout << os.str() << std::endl;
        return;
    }
    os << ",\"created\":true";
    common(os, creator, p, 1);
    auto io = [&](DataType t)
    {
        std::vector<DynamicPluginTensorDesc> v{desc({tokens, h}, t), desc({e, h}, t), desc({e, inter, h}, t),
            desc({e, inter, h}, t), desc({e, h, inter}, t), desc({tokens, h}, t)};
        return v;
    };
    os << ",\"formats\":{";
    bool first = true;
    for (DataType t : kTypes)
    {
        os << (first ? "" : ",") << quote(typeName(t)) << ":" << formats(p, io(t), 5);
        first = false;
    }
    std::vector<DynamicPluginTensorDesc> mixed = io(DataType::kHALF);
    mixed[2] = desc({e, inter, h}, DataType::kFLOAT);
    os << ",\"w1_other_type\":" << formats(p, mixed, 5) << "},\"output_types\":{";
    first = true;
    for (DataType t : {DataType::kFLOAT, DataType::kHALF, DataType::kBF16})
    {
        os << (first ? "" : ",") << quote(typeName(t)) << ":" << outputTypes(p, {t, t, t, t, t}, 1);
        first = false;
    }
    os << "},\"workspace\":{";
    first = true;
    for (DataType t : {DataType::kFLOAT, DataType::kHALF, DataType::kBF16})
    {
        std::vector<DynamicPluginTensorDesc> v = io(t);
        os << (first ? "" : ",") << quote(typeName(t)) << ":" << p.build->getWorkspaceSize(v.data(), 5, v.data() + 5, 1);
        first = false;
    }
    gLog.clear();
    std::vector<DynamicPluginTensorDesc> v = io(DataType::kHALF);
    int32_t rc = p.build->configurePlugin(v.data(), 5, v.data() + 5, 1);
    os << "},\"configure\":" << rc << ",\"configure_log\":" << logJson() << "}";
    delete p.v3;
    std::cout << os.str() << std::endl;
}

void badCase(IPluginCreatorV3One* const* creators, int32_t n, std::istringstream& in)
{
    std::string which, kv;
    in >> which;
    std::vector<std::string> names;
    std::vector<int32_t> values;
    names.reserve(8);
    values.reserve(8);
    while (in >> kv)
    {
        size_t eq = kv.find('=');
        names.push_back(kv.substr(0, eq));
        values.push_back(std::atoi(kv.substr(eq + 1).c_str()));
    }
    std::vector<PluginField> f;
    for (size_t i = 0; i < names.size(); ++i)
    {
        f.emplace_back(names[i].c_str(), &values[i], PluginFieldType::kINT32, 1);
    }
    PluginFieldCollection fc{static_cast<int32_t>(f.size()), f.data()};
    char const* want = which == "swa" ? "SlidingWindowGQA" : "MoE";
    for (int32_t i = 0; i < n; ++i)
    {
        if (std::strcmp(creators[i]->getPluginName(), want) == 0)
        {
            IPluginV3* p = creators[i]->createPlugin("bad", &fc, TensorRTPhase::kBUILD);
            std::cout << "{\"case\":\"bad\",\"plugin\":" << quote(want) << ",\"created\":" << (p ? "true" : "false")
                      << ",\"log\":" << logJson() << "}" << std::endl;
            delete p;
        }
    }
}
} // namespace

int main(int argc, char** argv)
{
    if (argc != 2)
    {
        std::fprintf(stderr, "usage: %s libmtx_trt_plugins.so < cases\n", argv[0]);
        return 2;
    }
    void* lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (lib == nullptr)
    {
        std::fprintf(stderr, "dlopen %s: %s\n", argv[1], dlerror());
        return 1;
    }
    using GetCreators = IPluginCreatorInterface* const* (*) (int32_t&);
    using SetLoggerFinder = void (*)(ILoggerFinder*);
    auto getCreators = reinterpret_cast<GetCreators>(dlsym(lib, "getCreators"));
    auto setLoggerFinder = reinterpret_cast<SetLoggerFinder>(dlsym(lib, "setLoggerFinder"));
    if (getCreators == nullptr || setLoggerFinder == nullptr)
    {
        std::fprintf(stderr, "%s does not export getCreators and setLoggerFinder\n", argv[1]);
        return 1;
    }
    static Finder finder;
    setLoggerFinder(&finder);
    int32_t n = 0;
    IPluginCreatorInterface* const* creators = getCreators(n);
    std::vector<IPluginCreatorV3One*> v3;
    std::ostringstream os;
    os << "{\"creators\":[";
    for (int32_t i = 0; i < n; ++i)
    {
        InterfaceInfo info = creators[i]->getInterfaceInfo();
        std::string kind = info.kind;
        os << (i ? "," : "") << "{\"interface\":" << interfaceOf(creators[i]);
        if (kind == "PLUGIN CREATOR_V3ONE")
        {
            auto* c = static_cast<IPluginCreatorV3One*>(creators[i]);
            v3.push_back(c);
            os << ",\"name\":" << quote(c->getPluginName()) << ",\"version\":" << quote(c->getPluginVersion())
               << ",\"namespace\":" << quote(c->getPluginNamespace()) << ",\"fields\":" << fieldsJson(c->getFieldNames(), false);
        }
        os << "}";
    }
    os << "]}";
    std::cout << os.str() << std::endl;
    std::string line;
    while (std::getline(std::cin, line))
    {
        std::istringstream in(line);
        std::string what;
        if (!(in >> what))
        {
            continue;
        }
        gLog.clear();
        for (IPluginCreatorV3One* c : v3)
        {
            bool swa = std::strcmp(c->getPluginName(), "SlidingWindowGQA") == 0;
            if (what == "swa" && swa)
            {
                swaCase(c, in);
            }
            else if (what == "moe" && !swa)
            {
                moeCase(c, in);
            }
        }
        if (what == "bad")
        {
            badCase(v3.data(), static_cast<int32_t>(v3.size()), in);
        }
    }
    return 0;
}
