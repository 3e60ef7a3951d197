/* The C ABI from C: mtx_c_check EXPORT MAX_NEW [TOKEN ...]
 * Opens EXPORT, appends the tokens, generates MAX_NEW greedy tokens (no stop ids) and prints
 * "ok T1 T2 ...", or "error CODE MESSAGE" with exit status 2 (tests/test_cpp.py drives it).
 * Environment: MTX_C_CHECK_PREFIX=FILE seeds the session from a prefix state file (the tokens are then
 * appended after its own); MTX_C_CHECK_SAVE=FILE saves the state after the append;
 * MTX_C_CHECK_SPECULATIVE=K decodes with K prompt-lookup drafts and prints "speculative V D A" (the
 * counters) on stderr. */
#include <stdio.h>
#include <stdlib.h>

#include "mtx/mtx_c.h"

static int fail(mtx_status st) {
  printf("error %d %s\n", (int)st, mtx_last_error());
  return 2;
}

int main(int argc, char** argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: mtx_c_check EXPORT MAX_NEW [TOKEN ...]\n");
    return 2;
  }
  mtx_model* model = NULL;
  mtx_session* session = NULL;
  mtx_status st = mtx_model_open(argv[1], 1, 1, &model);
  if (st != MTX_OK) return fail(st);
  const char* prefix = getenv("MTX_C_CHECK_PREFIX");
  const char* save = getenv("MTX_C_CHECK_SAVE");
  const char* spec = getenv("MTX_C_CHECK_SPECULATIVE");
  if (prefix)
    st = mtx_session_from_prefix(model, prefix, &session);
  else
    st = mtx_session_new(model, &session);
  if (st != MTX_OK) return fail(st);
  if (spec && (st = mtx_session_set_speculative(session, (int32_t)atoi(spec), 3, 1)) != MTX_OK) return fail(st);
  int n = argc - 3, max_new = atoi(argv[2]);
  int32_t* tokens = malloc(sizeof(int32_t) * (size_t)(n + 1));
  int32_t* out = malloc(sizeof(int32_t) * (size_t)(max_new + 1));
  for (int i = 0; i < n; ++i) tokens[i] = (int32_t)atol(argv[3 + i]);
  if ((st = mtx_session_append(session, tokens, (size_t)n)) != MTX_OK) return fail(st);
  if (save && (st = mtx_session_save_prefix(session, save)) != MTX_OK) return fail(st);
  mtx_sampling greedy;
  mtx_sampling_default(&greedy);
  size_t got = 0;
  int32_t none = 0;
  if ((st = mtx_session_generate(session, max_new, &greedy, &none, 0, NULL, NULL, out, &got)) != MTX_OK) return fail(st);
  printf("ok");
  for (size_t i = 0; i < got; ++i) printf(" %d", out[i]);
  printf("\n");
  if (spec) {
    int64_t v = 0, d = 0, a = 0;
    if ((st = mtx_session_speculative_stats(session, &v, &d, &a)) != MTX_OK) return fail(st);
    fprintf(stderr, "speculative %lld %lld %lld\n", (long long)v, (long long)d, (long long)a);
  }
  mtx_session_free(session);
  mtx_model_free(model);
  free(tokens);
  free(out);
  return 0;
}
