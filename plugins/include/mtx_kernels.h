/*
 * libmtx_kernels: the mtx GPU kernels (Triton, compiled ahead of time) behind a plain C ABI.
 *
 * Semantics: docs/ops.md (mtx::SlidingWindowGQA and mtx::MoE, version 1). All pointers are CUDA
 * device pointers to contiguous row-major tensors, 16-byte aligned; `stream` is a cudaStream_t
 * (NULL = legacy default stream); a call runs on the device of its stream. Calls are asynchronous on
 * `stream`; they only enqueue work.
 * The library uses the CUDA runtime only (statically linked) and embeds cubins for sm_80, sm_89 and
 * sm_90 (sm_86/sm_87 use the sm_80 code). It is thread-safe.
 *
 * Every function returning int returns MTX_SUCCESS (0) or an mtx_status code; mtx_last_error()
 * then describes the failure (per thread).
 */
#ifndef MTX_KERNELS_H
#define MTX_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define MTX_API __declspec(dllexport)
#else
#define MTX_API __attribute__((visibility("default")))
#endif

#define MTX_KERNELS_VERSION_MAJOR 0
#define MTX_KERNELS_VERSION_MINOR 1
#define MTX_KERNELS_VERSION_PATCH 0

/* Same memory layout as cudaStream_t (struct CUstream_st *), without including CUDA headers. */
typedef struct CUstream_st *mtx_stream_t;

typedef enum mtx_dtype {
    MTX_FLOAT32 = 0,
    MTX_FLOAT16 = 1,
    MTX_BFLOAT16 = 2
} mtx_dtype;

typedef enum mtx_status {
    MTX_SUCCESS = 0,
    MTX_ERROR_INVALID_ARGUMENT = 1, /* bad shape, null or misaligned pointer, window > capacity, ... */
    MTX_ERROR_UNSUPPORTED = 2,      /* valid for the op but not compiled in (head_dim, top_k, ...) */
    MTX_ERROR_NO_KERNEL_IMAGE = 3,  /* the current device's architecture has no cubin */
    MTX_ERROR_WORKSPACE = 4,        /* workspace too small */
    MTX_ERROR_CUDA = 5,             /* a CUDA runtime call failed (no driver or device, launch failure, ...) */
    MTX_ERROR_DRIVER = 6            /* the driver is older than the CUDA toolkit the library was built with */
} mtx_status;

/* "MAJOR.MINOR.PATCH (triton X.Y.Z; sm_80 sm_89 sm_90; CUDA 13.0)": CUDA = the toolkit it was built with. */
MTX_API const char *mtx_kernels_version(void);

/* Message of the last failed call on this thread ("" if none). */
MTX_API const char *mtx_last_error(void);

/*
 * Can this library run on `device` (-1: the current device)? Checks the driver (it must support the
 * CUDA major version the library was built with: CUDA 13 needs R580+) and the architecture (cubins
 * for sm_80, sm_89, sm_90a; Blackwell and older GPUs have no kernel image). MTX_SUCCESS, or
 * MTX_ERROR_CUDA / MTX_ERROR_DRIVER / MTX_ERROR_NO_KERNEL_IMAGE with mtx_last_error() saying what is
 * supported. Loads nothing.
 */
MTX_API int mtx_check_device(int device);

/*
 * Check `device` (-1: current) as mtx_check_device does, then load every cubin of its architecture
 * into the current context now (not at the first launch, which may be inside CUDA-graph capture).
 * Idempotent and cheap after the first successful call per device.
 */
MTX_API int mtx_load_kernels(int device);

/*
 * mtx::SlidingWindowGQA over the rolling KV buffer, buffers updated in place.
 *   query  [B, S, Hq*D]    key, value [B, S, Hkv*D]   (pre-RoPE, dtype)
 *   k_buf, v_buf [B, Hkv, C, D]  read (slots resident before the call) then the chunk written
 *   start_pos [B] int64   inv_freq [D/2] float32     output [B, S, Hq*D] (must not alias inputs)
 *   window: the op attribute (0 = full attention, W = C); C >= W.
 * Supported: head_dim 64 or 128; dtype float32/float16/bfloat16; B*Hkv <= 65535.
 * Four kernel launches: RoPE, attention (reads the buffer), split combine, write (rule 5).
 */
MTX_API size_t mtx_swa_gqa_workspace_size(int batch, int seq, int num_heads, int num_kv_heads, int head_dim,
                                          int capacity, int window, mtx_dtype dtype);

MTX_API int mtx_swa_gqa_forward(const void *query, const void *key, const void *value, void *k_buf, void *v_buf,
                                const int64_t *start_pos, const float *inv_freq, void *output, int batch, int seq,
                                int num_heads, int num_kv_heads, int head_dim, int capacity, int window,
                                float scale, mtx_dtype dtype, void *workspace, size_t workspace_size,
                                mtx_stream_t stream);

/*
 * mtx::MoE (softmax top-k router, SwiGLU experts).
 *   x [N, H]   router_weight [E, H]   w1, w3 [E, I, H]   w2 [E, H, I]   output [N, H]   (all dtype)
 * Supported: H and I multiples of 16, E <= 256, 1 <= top_k <= min(E, 8).
 * Tokens run in passes of at most 4096; the workspace is that of one pass.
 */
MTX_API size_t mtx_moe_workspace_size(int64_t tokens, int hidden, int inter, int num_experts, int top_k,
                                      mtx_dtype dtype);

MTX_API int mtx_moe_forward(const void *x, const void *router_weight, const void *w1, const void *w3,
                            const void *w2, void *output, int64_t tokens, int hidden, int inter, int num_experts,
                            int top_k, mtx_dtype dtype, void *workspace, size_t workspace_size,
                            mtx_stream_t stream);

#ifdef __cplusplus
}
#endif

#endif /* MTX_KERNELS_H */
