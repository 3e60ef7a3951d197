/* Configure-time check: the ONNX Runtime library provides the headers' C API version. */
#include <onnxruntime_c_api.h>
#include <stdio.h>
int main(void) {
  const OrtApiBase* base = OrtGetApiBase();
  if (!base->GetApi(ORT_API_VERSION)) {
    printf("ONNX Runtime %s does not provide C API version %d of the headers", base->GetVersionString(), ORT_API_VERSION);
    return 1;
  }
  printf("ONNX Runtime %s provides C API version %d of the headers", base->GetVersionString(), ORT_API_VERSION);
  return 0;
}
