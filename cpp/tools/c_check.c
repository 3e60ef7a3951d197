/* The C ABI from C: mtx_c_check EXPORT MAX_NEW [TOKEN ...]
 * Opens EXPORT, appends the tokens, generates MAX_NEW greedy tokens (no stop ids) and prints
 * "ok T1 T2 ...", or "error CODE MESSAGE" with exit status 2 (tests/test_cpp.py drives it). */
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
  if ((st = mtx_session_new(model, &session)) != MTX_OK) return fail(st);
  int n = argc - 3, max_new = atoi(argv[2]);
  int32_t* tokens = malloc(sizeof(int32_t) * (size_t)(n + 1));
  int32_t* out = malloc(sizeof(int32_t) * (size_t)(max_new + 1));
  for (int i = 0; i < n; ++i) tokens[i] = (int32_t)atol(argv[3 + i]);
  if ((st = mtx_session_append(session, tokens, (size_t)n)) != MTX_OK) return fail(st);
  mtx_sampling greedy;
  mtx_sampling_default(&greedy);
  size_t got = 0;
  int32_t none = 0;
  if ((st = mtx_session_generate(session, max_new, &greedy, &none, 0, NULL, NULL, out, &got)) != MTX_OK) return fail(st);
  printf("ok");
  for (size_t i = 0; i < got; ++i) printf(" %d", out[i]);
  printf("\n");
  mtx_session_free(session);
  mtx_model_free(model);
  free(tokens);
  free(out);
  return 0;
}
