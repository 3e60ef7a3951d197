/*
 * libmtx_kernels: launches the ahead-of-time compiled Triton kernels of mtx (see mtx_kernels.h).
 *
 * Launch rules (tiles, splits, grids, workspace layout) are a line-by-line port of
 * mtx/kernels/plan.py and mtx/kernels/launch.py; constants come from the generated
 * mtx_kernels_config.h. tests/test_plugins_build.py checks the workspace sizes against plan.py.
 *
 * Cubins are loaded with cudaLibraryLoadData (CUDA >= 12 runtime) and launched with cudaLaunchKernel
 * on the cudaKernel_t from cudaLibraryGetKernel. mtx_load_kernels() loads every cubin of a device's
 * architecture into the current context ahead of time (the TensorRT plugins call it when a context
 * is created, so no module is loaded inside CUDA-graph capture); otherwise a cubin is loaded on
 * first use. The device of a launch is the device of its stream.
 */
#include "mtx_kernels.h"

#include <cuda_runtime_api.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mtx_kernels_config.h"
#include "mtx_kernels_internal.h"

#define MTX_STR2(x) #x
#define MTX_STR(x) MTX_STR2(x)
#define MTX_LOG2E 1.4426950408889634f
#define MTX_MAX_DEVICES 64
#define MTX_INT32_MAX 2147483647LL

/* ------------------------------------------------------------------ errors */

static __thread char g_error[1024];

static int fail(int code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g_error, sizeof g_error, fmt, ap);
    va_end(ap);
    return code;
}

static int cuda_fail(cudaError_t e, const char *what) {
    return fail(MTX_ERROR_CUDA, "%s failed: %s (%s)", what, cudaGetErrorName(e), cudaGetErrorString(e));
}

MTX_API const char *mtx_last_error(void) { return g_error; }

static char g_version[192];
static pthread_once_t g_version_once = PTHREAD_ONCE_INIT;

static void make_version(void) {
    snprintf(g_version, sizeof g_version, "%s (%s; CUDA %d.%d)",
             MTX_STR(MTX_KERNELS_VERSION_MAJOR) "." MTX_STR(MTX_KERNELS_VERSION_MINOR) "." MTX_STR(
                 MTX_KERNELS_VERSION_PATCH),
             MTX_TRITON_VERSION_STRING, CUDART_VERSION / 1000, CUDART_VERSION % 1000 / 10);
}

/* "0.1.0 (triton X.Y.Z; sm_80 sm_89 sm_90; CUDA 13.0)": the CUDA version the runtime and ptxas are from. */
MTX_API const char *mtx_kernels_version(void) {
    pthread_once(&g_version_once, make_version);
    return g_version;
}

/* ------------------------------------------------------------------ kernels */

typedef struct loaded_kernel {
    cudaLibrary_t lib;
    cudaKernel_t kernel;
    unsigned long long smem_set; /* bit d: dynamic shared memory limit raised on device d */
} loaded_kernel;

static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static loaded_kernel *g_loaded; /* one per mtx_kernel_specs entry, zeroed until loaded */

typedef struct launch_ctx {
    int device;
    int arch;
    mtx_stream_t stream;
} launch_ctx;

/* Which cubin architecture runs on a device: same rule as the CUDA driver's cubin compatibility. */
static int arch_for(int major, int minor) {
    if (major == 9 && minor == 0) return 90; /* sm_90a cubins: H100/H200 only */
    if (major == 8 && minor >= 9) return 89;
    if (major == 8) return 80;               /* sm_80 code runs on 8.0, 8.6, 8.7 */
    return 0;
}

static int arch_compiled(int arch) {
    for (int i = 0; i < mtx_kernel_spec_count; ++i)
        if (mtx_kernel_specs[i].arch == arch) return 1;
    return 0;
}

/* The oldest driver branch that runs a CUDA major version (the static runtime and the cubins need it). */
static int min_driver_branch(int cuda_major) { return cuda_major >= 13 ? 580 : cuda_major == 12 ? 525 : 0; }

#define MTX_CUDA_MAJOR (CUDART_VERSION / 1000)
#define MTX_CUDA_MINOR (CUDART_VERSION % 1000 / 10)
#define MTX_SUPPORTED_FMT                                                                                  \
    "libmtx_kernels runs on NVIDIA GPUs of compute capability 8.0, 8.6, 8.7 (sm_80 code), 8.9 (sm_89) and " \
    "9.0 (sm_90a: H100/H200), compiled here: %s; with a driver for CUDA >= %d.0 (R%d or newer)"
#define MTX_SUPPORTED_ARGS MTX_ARCH_NAMES, MTX_CUDA_MAJOR, min_driver_branch(MTX_CUDA_MAJOR)

/* Driver and architecture of a device (-1: the current one); *arch_out gets the cubin arch. */
static int check_device(int device, int *device_out, int *arch_out) {
    int drv = 0;
    cudaError_t e = cudaDriverGetVersion(&drv);
    if (e != cudaSuccess || drv == 0)
        return fail(MTX_ERROR_CUDA, "no NVIDIA driver found (libcuda.so.1 cannot be loaded); " MTX_SUPPORTED_FMT,
                    MTX_SUPPORTED_ARGS);
    if (drv / 1000 < MTX_CUDA_MAJOR)
        return fail(MTX_ERROR_DRIVER,
                    "the NVIDIA driver supports CUDA %d.%d, but libmtx_kernels was built with CUDA %d.%d; " MTX_SUPPORTED_FMT,
                    drv / 1000, drv % 1000 / 10, MTX_CUDA_MAJOR, MTX_CUDA_MINOR, MTX_SUPPORTED_ARGS);
    if (device < 0) {
        e = cudaGetDevice(&device);
        if (e != cudaSuccess) return cuda_fail(e, "cudaGetDevice (is there a CUDA GPU?)");
    }
    int major = 0, minor = 0;
    e = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    if (e == cudaSuccess) e = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
    if (e != cudaSuccess) return cuda_fail(e, "cudaDeviceGetAttribute");
    int arch = arch_for(major, minor);
    if (!arch || !arch_compiled(arch))
        return fail(MTX_ERROR_NO_KERNEL_IMAGE, "device %d is sm_%d%d, which has no kernel image; " MTX_SUPPORTED_FMT,
                    device, major, minor, MTX_SUPPORTED_ARGS);
    if (device >= MTX_MAX_DEVICES) return fail(MTX_ERROR_UNSUPPORTED, "device ordinal %d >= 64", device);
    if (device_out) *device_out = device;
    if (arch_out) *arch_out = arch;
    return MTX_SUCCESS;
}

MTX_API int mtx_check_device(int device) { return check_device(device, NULL, NULL); }

/* The device a stream belongs to (the current device for the legacy default stream). */
static int stream_device(mtx_stream_t stream, int *device) {
#if CUDART_VERSION >= 12080
    if (stream) {
        cudaError_t e = cudaStreamGetDevice((cudaStream_t)stream, device);
        if (e == cudaSuccess) return MTX_SUCCESS;
        if (e != cudaErrorCallRequiresNewerDriver) return cuda_fail(e, "cudaStreamGetDevice");
        (void)cudaGetLastError(); /* a driver before CUDA 12.8: fall back to the current device */
    }
#endif
    cudaError_t e = cudaGetDevice(device);
    if (e != cudaSuccess) return cuda_fail(e, "cudaGetDevice");
    return MTX_SUCCESS;
}

static int make_ctx(launch_ctx *ctx, mtx_stream_t stream) {
    int device = -1;
    int rc = stream_device(stream, &device);
    if (rc) return rc;
    rc = check_device(device, &ctx->device, &ctx->arch);
    if (rc) return rc;
    ctx->stream = stream;
    return MTX_SUCCESS;
}

static int find_spec(int kind, int dtype, int p0, int p1, int arch) {
    for (int i = 0; i < mtx_kernel_spec_count; ++i) {
        const mtx_kernel_spec *s = &mtx_kernel_specs[i];
        if (s->kind == kind && s->dtype == dtype && s->p0 == p0 && s->p1 == p1 && s->arch == arch) return i;
    }
    return -1;
}

/* Load (once) the cubin of spec i and prepare it for ctx's device. */
static int get_kernel(int i, const launch_ctx *ctx, cudaKernel_t *out, int force_load) {
    const mtx_kernel_spec *s = &mtx_kernel_specs[i];
    int rc = MTX_SUCCESS;
    pthread_mutex_lock(&g_lock);
    if (!g_loaded) g_loaded = (loaded_kernel *)calloc((size_t)mtx_kernel_spec_count, sizeof(loaded_kernel));
    if (!g_loaded) {
        rc = fail(MTX_ERROR_CUDA, "out of host memory");
        goto done;
    }
    loaded_kernel *k = &g_loaded[i];
    if (!k->kernel) {
        cudaError_t e = cudaLibraryLoadData(&k->lib, s->cubin, NULL, NULL, 0, NULL, NULL, 0);
        if (e != cudaSuccess) {
            rc = cuda_fail(e, "cudaLibraryLoadData");
            goto done;
        }
        e = cudaLibraryGetKernel(&k->kernel, k->lib, s->entry);
        if (e != cudaSuccess) {
            k->kernel = NULL;
            rc = cuda_fail(e, "cudaLibraryGetKernel");
            goto done;
        }
    }
    if (force_load) {
        /* Loads the module into the current context now rather than at the first launch. */
        struct cudaFuncAttributes attr;
        cudaError_t e = cudaFuncGetAttributes(&attr, (const void *)k->kernel);
        if (e != cudaSuccess) {
            rc = cuda_fail(e, "cudaFuncGetAttributes");
            goto done;
        }
    }
    if (s->shared > 48 * 1024 && !(k->smem_set & (1ULL << ctx->device))) {
        cudaError_t e = cudaKernelSetAttributeForDevice(k->kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                        s->shared, ctx->device);
        if (e != cudaSuccess) {
            rc = cuda_fail(e, "cudaKernelSetAttributeForDevice(MaxDynamicSharedMemorySize)");
            goto done;
        }
        k->smem_set |= 1ULL << ctx->device;
    }
    *out = k->kernel;
done:
    pthread_mutex_unlock(&g_lock);
    return rc;
}

static int launch(const launch_ctx *ctx, int kind, int dtype, int p0, int p1, unsigned gx, unsigned gy,
                  unsigned gz, void **args, int nargs) {
    int i = find_spec(kind, dtype, p0, p1, ctx->arch);
    if (i < 0)
        return fail(MTX_ERROR_UNSUPPORTED, "no compiled kernel of kind %d for dtype %d, p0 %d, p1 %d on sm_%d", kind,
                    dtype, p0, p1, ctx->arch);
    const mtx_kernel_spec *s = &mtx_kernel_specs[i];
    if (nargs != s->num_params)
        return fail(MTX_ERROR_INVALID_ARGUMENT, "internal: %s takes %d parameters, %d given", s->entry,
                    s->num_params, nargs);
    if (gx == 0 || gy == 0 || gz == 0) return MTX_SUCCESS;
    if (gy > 65535 || gz > 65535)
        return fail(MTX_ERROR_UNSUPPORTED, "%s: grid (%u, %u, %u) exceeds 65535 in y or z", s->entry, gx, gy, gz);
    cudaKernel_t kernel;
    int rc = get_kernel(i, ctx, &kernel, 0);
    if (rc) return rc;
    dim3 grid = {gx, gy, gz};
    dim3 block = {(unsigned)(32 * s->num_warps), 1, 1};
    cudaError_t e = cudaLaunchKernel((const void *)kernel, grid, block, args, (size_t)s->shared,
                                     (cudaStream_t)ctx->stream);
    if (e != cudaSuccess) return cuda_fail(e, s->entry);
    return MTX_SUCCESS;
}

static unsigned long long g_preloaded; /* bit d: every cubin of device d's arch loaded (mtx_load_kernels) */

MTX_API int mtx_load_kernels(int device) {
    launch_ctx ctx;
    memset(&ctx, 0, sizeof ctx);
    int rc = check_device(device, &ctx.device, &ctx.arch);
    if (rc) return rc;
    pthread_mutex_lock(&g_lock);
    int done = (g_preloaded >> ctx.device) & 1ULL;
    pthread_mutex_unlock(&g_lock);
    if (done) return MTX_SUCCESS;
    int current = -1;
    cudaError_t e = cudaGetDevice(&current);
    if (e != cudaSuccess) return cuda_fail(e, "cudaGetDevice");
    if (current != ctx.device && (e = cudaSetDevice(ctx.device)) != cudaSuccess) return cuda_fail(e, "cudaSetDevice");
    for (int i = 0; i < mtx_kernel_spec_count && !rc; ++i) {
        if (mtx_kernel_specs[i].arch != ctx.arch) continue;
        cudaKernel_t kernel;
        rc = get_kernel(i, &ctx, &kernel, 1);
    }
    if (current != ctx.device) cudaSetDevice(current);
    if (rc) return rc;
    pthread_mutex_lock(&g_lock);
    g_preloaded |= 1ULL << ctx.device;
    pthread_mutex_unlock(&g_lock);
    return MTX_SUCCESS;
}

/* ------------------------------------------------------------------ helpers */

static long long cdivll(long long a, long long b) { return (a + b - 1) / b; }
static size_t align_up(size_t n) { return (n + MTX_ALIGN - 1) / MTX_ALIGN * MTX_ALIGN; }
static long long min_ll(long long a, long long b) { return a < b ? a : b; }
static long long max_ll(long long a, long long b) { return a > b ? a : b; }

static int elem_size(mtx_dtype dt) { return dt == MTX_FLOAT32 ? 4 : (dt == MTX_FLOAT16 || dt == MTX_BFLOAT16) ? 2 : 0; }

static int check_ptr(const void *p, const char *name) {
    if (!p) return fail(MTX_ERROR_INVALID_ARGUMENT, "%s is NULL", name);
    if ((uintptr_t)p % 16) return fail(MTX_ERROR_INVALID_ARGUMENT, "%s is not 16-byte aligned", name);
    return MTX_SUCCESS;
}

#define CHECK(expr)               \
    do {                          \
        int rc_ = (expr);         \
        if (rc_) return rc_;      \
    } while (0)

/* ------------------------------------------------------------------ SlidingWindowGQA */

typedef struct swa_plan {
    int group, rows, block_m, m_blocks, num_splits, split;
    size_t q_rot, k_rot, part_acc, part_ml; /* region bytes */
} swa_plan;

/* Port of plan.swa_gqa_plan (window = effective W). */
static swa_plan swa_gqa_plan(long long batch, long long seq, long long num_heads, long long num_kv_heads,
                             long long head_dim, long long window, int eb) {
    swa_plan p;
    memset(&p, 0, sizeof p);
    p.group = (int)(num_heads / num_kv_heads);
    long long rows = seq * p.group;
    p.rows = (int)rows;
    long long big_ctas = cdivll(rows, 64) * batch * num_kv_heads;
    if (rows > 32 && big_ctas >= MTX_ATTN_TARGET_CTAS) {
        p.block_m = MTX_ATTN_DIRECT_BLOCK_M(eb, (int)head_dim);
        p.split = 0;
        p.num_splits = 1;
    } else {
        p.block_m = 16;
        p.split = 1;
        long long ctas = cdivll(rows, 16) * batch * num_kv_heads;
        long long key_bound = window - 1 + min_ll(seq, cdivll(16, p.group) + 1);
        long long ns = min_ll(MTX_ATTN_MAX_SPLITS, cdivll(MTX_ATTN_TARGET_CTAS, ctas));
        ns = min_ll(ns, cdivll(key_bound, MTX_ATTN_MIN_KEYS_PER_SPLIT));
        p.num_splits = (int)max_ll(1, ns);
    }
    p.m_blocks = (int)cdivll(rows, p.block_m);
    long long part_rows = p.split ? batch * num_kv_heads * p.num_splits * rows : 0;
    p.q_rot = (size_t)(batch * seq * num_heads * head_dim * eb);
    p.k_rot = (size_t)(batch * seq * num_kv_heads * head_dim * eb);
    p.part_acc = (size_t)(part_rows * head_dim * 4);
    p.part_ml = (size_t)(part_rows * 2 * 4);
    return p;
}

static size_t swa_workspace(const swa_plan *p) {
    return align_up(p->q_rot) + align_up(p->k_rot) + align_up(p->part_acc) + align_up(p->part_ml);
}

static int swa_validate(int batch, int seq, int num_heads, int num_kv_heads, int head_dim, int capacity, int window,
                        mtx_dtype dtype, long long *w_eff) {
    if (!elem_size(dtype)) return fail(MTX_ERROR_INVALID_ARGUMENT, "dtype %d is not an mtx_dtype", (int)dtype);
    if (batch < 0 || seq < 0) return fail(MTX_ERROR_INVALID_ARGUMENT, "batch %d and seq %d must be >= 0", batch, seq);
    if (num_kv_heads < 1 || num_heads < 1 || num_heads % num_kv_heads)
        return fail(MTX_ERROR_INVALID_ARGUMENT, "num_heads %d must be a positive multiple of num_kv_heads %d",
                    num_heads, num_kv_heads);
    if (head_dim != 64 && head_dim != 128)
        return fail(MTX_ERROR_UNSUPPORTED, "head_dim %d: libmtx_kernels is compiled for 64 and 128", head_dim);
    if (capacity < 1 || window < 0)
        return fail(MTX_ERROR_INVALID_ARGUMENT, "capacity %d must be >= 1 and window %d >= 0", capacity, window);
    *w_eff = window > 0 ? window : capacity;
    if (capacity < *w_eff)
        return fail(MTX_ERROR_INVALID_ARGUMENT, "capacity %d is smaller than the window %d", capacity, window);
    long long row_q = (long long)seq * num_heads * head_dim, buf_row = (long long)num_kv_heads * capacity * head_dim;
    if (row_q > MTX_INT32_MAX || buf_row > MTX_INT32_MAX || (long long)seq * num_heads > MTX_INT32_MAX)
        return fail(MTX_ERROR_UNSUPPORTED, "one batch row of query or buffer exceeds 2^31 elements");
    if ((long long)batch * num_kv_heads > 65535)
        return fail(MTX_ERROR_UNSUPPORTED, "batch * num_kv_heads = %lld exceeds 65535",
                    (long long)batch * num_kv_heads);
    return MTX_SUCCESS;
}

/* Port of plan.swa_gqa_partial_rows_bound: non-decreasing in batch and seq. */
static long long swa_partial_rows_bound(long long batch, long long seq, long long num_heads, long long num_kv_heads) {
    long long x = batch * num_kv_heads, xr = x * seq * (num_heads / num_kv_heads);
    long long b = 16LL * MTX_ATTN_TARGET_CTAS + min_ll(xr, max_ll(64LL * MTX_ATTN_TARGET_CTAS, 32 * x));
    return min_ll(xr * MTX_ATTN_MAX_SPLITS, b);
}

/* Port of plan.swa_gqa_workspace_bytes: enough for every call with batch' <= batch, seq' <= seq. */
MTX_API size_t mtx_swa_gqa_workspace_size(int batch, int seq, int num_heads, int num_kv_heads, int head_dim,
                                          int capacity, int window, mtx_dtype dtype) {
    long long w;
    if (swa_validate(batch, seq, num_heads, num_kv_heads, head_dim, capacity, window, dtype, &w)) return 0;
    if (batch == 0 || seq == 0) return 0;
    long long eb = elem_size(dtype), d = head_dim;
    long long rows = swa_partial_rows_bound(batch, seq, num_heads, num_kv_heads);
    return align_up((size_t)((long long)batch * seq * num_heads * d * eb)) +
           align_up((size_t)((long long)batch * seq * num_kv_heads * d * eb)) + align_up((size_t)(rows * d * 4)) +
           align_up((size_t)(rows * 2 * 4));
}

MTX_API int mtx_swa_gqa_forward(const void *query, const void *key, const void *value, void *k_buf, void *v_buf,
                                const int64_t *start_pos, const float *inv_freq, void *output, int batch, int seq,
                                int num_heads, int num_kv_heads, int head_dim, int capacity, int window,
                                float scale, mtx_dtype dtype, void *workspace, size_t workspace_size,
                                mtx_stream_t stream) {
    long long w;
    CHECK(swa_validate(batch, seq, num_heads, num_kv_heads, head_dim, capacity, window, dtype, &w));
    if (batch == 0 || seq == 0) return MTX_SUCCESS;
    CHECK(check_ptr(query, "query"));
    CHECK(check_ptr(key, "key"));
    CHECK(check_ptr(value, "value"));
    CHECK(check_ptr(k_buf, "k_buf"));
    CHECK(check_ptr(v_buf, "v_buf"));
    CHECK(check_ptr(start_pos, "start_pos"));
    CHECK(check_ptr(inv_freq, "inv_freq"));
    CHECK(check_ptr(output, "output"));
    int eb = elem_size(dtype);
    swa_plan p = swa_gqa_plan(batch, seq, num_heads, num_kv_heads, head_dim, w, eb);
    size_t need = swa_workspace(&p);
    if (workspace_size < need)
        return fail(MTX_ERROR_WORKSPACE, "workspace of %zu bytes, need %zu (mtx_swa_gqa_workspace_size)",
                    workspace_size, need);
    CHECK(check_ptr(workspace, "workspace"));
    launch_ctx ctx;
    CHECK(make_ctx(&ctx, stream));

    char *ws = (char *)workspace;
    void *q_rot = ws;
    void *k_rot = ws + align_up(p.q_rot);
    void *part_acc = ws + align_up(p.q_rot) + align_up(p.k_rot);
    void *part_ml = (char *)part_acc + align_up(p.part_acc);
    void *null_ptr = NULL;
    int dt = (int)dtype, d = head_dim;
    int s = seq, hq = num_heads, hkv = num_kv_heads, cap = capacity, win = (int)w;
    int stride_qb = seq * hq * d, stride_qs = hq * d, stride_kb = seq * hkv * d, stride_ks = hkv * d;
    int stride_cb = hkv * cap * d, stride_ch = cap * d, stride_cs = d;
    int group = p.group, num_splits = p.num_splits;
    float qk_scale = scale * MTX_LOG2E;

    /* 1. RoPE on q and k (docs/ops.md §2), into the workspace. */
    {
        void *args[] = {&query, &key, &q_rot, &k_rot, &start_pos, &inv_freq, &s, &hq, &hkv,
                        &stride_qb, &stride_qs, &stride_kb, &stride_ks, &null_ptr, &null_ptr};
        CHECK(launch(&ctx, MTX_K_SWA_ROPE, dt, d, 0, (unsigned)cdivll(s, MTX_ATTN_BLOCK_T), (unsigned)batch, 1,
                     args, (int)(sizeof args / sizeof *args)));
    }
    /* 2. Attention over the resident buffer (read only) and the chunk. */
    {
        void *args[] = {&q_rot, &k_rot, &value, &k_buf, &v_buf, &start_pos, &output, &part_acc, &part_ml,
                        &s, &cap, &win, &hkv, &group, &num_splits, &qk_scale,
                        &stride_kb, &stride_ks, &stride_cb, &stride_ch, &stride_cs, &stride_qb, &stride_qs,
                        &null_ptr, &null_ptr};
        CHECK(launch(&ctx, MTX_K_SWA_ATTN, dt, d, p.split, (unsigned)p.m_blocks, (unsigned)(batch * hkv),
                     (unsigned)p.num_splits, args, (int)(sizeof args / sizeof *args)));
    }
    /* 3. Merge the split partials. */
    if (p.split) {
        void *args[] = {&part_acc, &part_ml, &output, &s, &hkv, &group, &num_splits, &stride_qb, &stride_qs,
                        &null_ptr, &null_ptr};
        CHECK(launch(&ctx, MTX_K_SWA_COMBINE, dt, d, 0, (unsigned)cdivll(p.rows, MTX_ATTN_COMBINE_BLOCK_R),
                     (unsigned)(batch * hkv), 1, args, (int)(sizeof args / sizeof *args)));
    }
    /* 4. Write the chunk's last min(S, C) tokens into their slots: after all reads (rule 5). */
    {
        int n_write = s < cap ? s : cap;
        void *args[] = {&k_rot, &value, &k_buf, &v_buf, &start_pos, &s, &cap, &hkv, &n_write,
                        &stride_kb, &stride_ks, &stride_cb, &stride_ch, &stride_cs, &null_ptr, &null_ptr};
        CHECK(launch(&ctx, MTX_K_SWA_WRITE, dt, d, 0, (unsigned)cdivll(n_write, MTX_ATTN_BLOCK_T), (unsigned)batch, 1,
                     args, (int)(sizeof args / sizeof *args)));
    }
    return MTX_SUCCESS;
}

/* ------------------------------------------------------------------ MoE */

typedef struct moe_plan {
    long long pairs, max_tiles;
    int tile_m, block_e;
    size_t region[8]; /* topk_weight, topk_ids, sorted_pair, tile_expert, tile_start, tile_end, act, y */
} moe_plan;

static int router_block_e(int e) {
    static const int list[] = MTX_MOE_ROUTER_BLOCK_E_LIST;
    for (int i = 0; i < MTX_MOE_ROUTER_BLOCK_E_COUNT; ++i)
        if (e <= list[i]) return list[i];
    return 0;
}

/* Port of plan.moe_plan (tile_m 0: chosen by the plan's rule). */
static moe_plan moe_plan_for(long long tokens, long long hidden, long long inter, long long e, long long top_k,
                             int eb, int tile_m) {
    moe_plan p;
    memset(&p, 0, sizeof p);
    p.pairs = tokens * top_k;
    p.tile_m = tile_m ? tile_m : (p.pairs < 32 * e ? 16 : 64);
    p.max_tiles = cdivll(p.pairs, p.tile_m) + min_ll(e, p.pairs);
    p.block_e = router_block_e((int)e);
    size_t r[8] = {(size_t)p.pairs * 4, (size_t)p.pairs * 4, (size_t)p.pairs * 4, (size_t)p.max_tiles * 4,
                   (size_t)p.max_tiles * 4, (size_t)p.max_tiles * 4, (size_t)(p.pairs * inter * eb),
                   (size_t)(p.pairs * hidden * eb)};
    memcpy(p.region, r, sizeof r);
    return p;
}

static int moe_validate(long long tokens, int hidden, int inter, int num_experts, int top_k, mtx_dtype dtype) {
    if (!elem_size(dtype)) return fail(MTX_ERROR_INVALID_ARGUMENT, "dtype %d is not an mtx_dtype", (int)dtype);
    if (tokens < 0 || hidden < 1 || inter < 1 || num_experts < 1)
        return fail(MTX_ERROR_INVALID_ARGUMENT, "tokens %lld, hidden %d, inter %d, experts %d: bad shape", tokens,
                    hidden, inter, num_experts);
    if (top_k < 1 || top_k > num_experts)
        return fail(MTX_ERROR_INVALID_ARGUMENT, "top_k %d must be in 1..%d", top_k, num_experts);
    if (top_k > MTX_MOE_ROUTER_BLOCK_K)
        return fail(MTX_ERROR_UNSUPPORTED, "top_k %d: libmtx_kernels supports top_k <= %d", top_k,
                    MTX_MOE_ROUTER_BLOCK_K);
    if (!router_block_e(num_experts))
        return fail(MTX_ERROR_UNSUPPORTED, "%d experts: libmtx_kernels supports up to 256", num_experts);
    if (hidden % 16 || inter % 16)
        return fail(MTX_ERROR_UNSUPPORTED, "hidden %d and inter %d must be multiples of 16", hidden, inter);
    long long pairs = min_ll(tokens, MTX_MOE_TOKENS_PER_PASS) * top_k;
    if ((long long)hidden * inter > MTX_INT32_MAX || pairs * inter > MTX_INT32_MAX || pairs * hidden > MTX_INT32_MAX)
        return fail(MTX_ERROR_UNSUPPORTED, "one expert matrix or one pass exceeds 2^31 elements");
    return MTX_SUCCESS;
}

/* Port of plan.moe_workspace_bytes: one pass, max_tiles at the smallest tile (16 rows). Arguments validated. */
static size_t moe_workspace_bound(long long tokens, int hidden, int inter, int num_experts, int top_k, int eb) {
    moe_plan p = moe_plan_for(min_ll(tokens, MTX_MOE_TOKENS_PER_PASS), hidden, inter, num_experts, top_k, eb, 16);
    size_t total = 0;
    for (int i = 0; i < 8; ++i) total += align_up(p.region[i]);
    return total;
}

MTX_API size_t mtx_moe_workspace_size(int64_t tokens, int hidden, int inter, int num_experts, int top_k,
                                      mtx_dtype dtype) {
    if (moe_validate(tokens, hidden, inter, num_experts, top_k, dtype) || tokens == 0) return 0;
    return moe_workspace_bound(tokens, hidden, inter, num_experts, top_k, elem_size(dtype));
}

MTX_API int mtx_moe_forward(const void *x, const void *router_weight, const void *w1, const void *w3,
                            const void *w2, void *output, int64_t tokens, int hidden, int inter, int num_experts,
                            int top_k, mtx_dtype dtype, void *workspace, size_t workspace_size,
                            mtx_stream_t stream) {
    CHECK(moe_validate(tokens, hidden, inter, num_experts, top_k, dtype));
    if (tokens == 0) return MTX_SUCCESS;
    CHECK(check_ptr(x, "x"));
    CHECK(check_ptr(router_weight, "router_weight"));
    CHECK(check_ptr(w1, "w1"));
    CHECK(check_ptr(w3, "w3"));
    CHECK(check_ptr(w2, "w2"));
    CHECK(check_ptr(output, "output"));
    size_t need = moe_workspace_bound(tokens, hidden, inter, num_experts, top_k, elem_size(dtype));
    if (workspace_size < need)
        return fail(MTX_ERROR_WORKSPACE, "workspace of %zu bytes, need %zu (mtx_moe_workspace_size)", workspace_size,
                    need);
    CHECK(check_ptr(workspace, "workspace"));
    launch_ctx ctx;
    CHECK(make_ctx(&ctx, stream));

    int eb = elem_size(dtype), dt = (int)dtype;
    int h = hidden, inter_ = inter, e = num_experts, k = top_k, stride = hidden;
    void *null_ptr = NULL;
    for (long long n0 = 0; n0 < tokens; n0 += MTX_MOE_TOKENS_PER_PASS) {
        int n = (int)min_ll(tokens - n0, MTX_MOE_TOKENS_PER_PASS);
        moe_plan p = moe_plan_for(n, hidden, inter, num_experts, top_k, eb, 0);
        char *ws = (char *)workspace;
        void *reg[8];
        size_t off = 0;
        for (int i = 0; i < 8; ++i) {
            reg[i] = ws + off;
            off += align_up(p.region[i]);
        }
        const void *xs = (const char *)x + (size_t)n0 * hidden * eb;
        void *os = (char *)output + (size_t)n0 * hidden * eb;
        int pairs = (int)p.pairs, max_tiles = (int)p.max_tiles, tile_m = p.tile_m;
        /* 1. router: softmax top-k (docs/ops.md §3 steps 1-4) */
        {
            void *args[] = {&xs, &router_weight, &reg[0], &reg[1], &n, &h, &e, &k, &stride, &null_ptr, &null_ptr};
            CHECK(launch(&ctx, MTX_K_MOE_ROUTER, dt, p.block_e, 0, (unsigned)cdivll(n, MTX_MOE_ROUTER_BLOCK_T), 1, 1,
                         args, (int)(sizeof args / sizeof *args)));
        }
        /* 2. group the (token, expert) pairs by expert, cut into tiles */
        {
            void *args[] = {&reg[1], &reg[2], &reg[3], &reg[4], &reg[5], &pairs, &e, &max_tiles, &tile_m,
                            &null_ptr, &null_ptr};
            CHECK(launch(&ctx, MTX_K_MOE_ALIGN, -1, p.block_e, 0, 1, 1, 1, args, (int)(sizeof args / sizeof *args)));
        }
        /* 3. grouped GEMM with w1 and w3 fused, SwiGLU epilogue */
        {
            void *args[] = {&xs, &w1, &w3, &reg[6], &reg[2], &reg[3], &reg[4], &reg[5], &h, &inter_, &k, &stride,
                            &null_ptr, &null_ptr};
            CHECK(launch(&ctx, MTX_K_MOE_GEMM13, dt, tile_m, 0, (unsigned)max_tiles, (unsigned)cdivll(inter, MTX_MOE_BLOCK_N), 1,
                         args, (int)(sizeof args / sizeof *args)));
        }
        /* 4. grouped GEMM with w2, times the routing weight */
        {
            void *args[] = {&reg[6], &w2, &reg[7], &reg[2], &reg[0], &reg[3], &reg[4], &reg[5], &h, &inter_,
                            &null_ptr, &null_ptr};
            CHECK(launch(&ctx, MTX_K_MOE_GEMM2, dt, tile_m, 0, (unsigned)max_tiles, (unsigned)cdivll(hidden, MTX_MOE_BLOCK_N), 1,
                         args, (int)(sizeof args / sizeof *args)));
        }
        /* 5. sum each token's top_k expert outputs (NaN for a token without a valid expert) */
        {
            void *args[] = {&reg[7], &reg[1], &os, &n, &h, &e, &k, &stride, &null_ptr, &null_ptr};
            CHECK(launch(&ctx, MTX_K_MOE_COMBINE, dt, 0, 0, (unsigned)cdivll(n, MTX_MOE_COMBINE_BLOCK_T),
                         (unsigned)cdivll(hidden, MTX_MOE_COMBINE_BLOCK_H), 1, args, (int)(sizeof args / sizeof *args)));
        }
    }
    return MTX_SUCCESS;
}
