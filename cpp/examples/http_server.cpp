// mtx-http-example OUT [--port 8080] [--host 127.0.0.1]: a minimal HTTP service over the C++ runtime
// (cpp-httplib; one Model shared by the server's threads, one Session per request).
//   POST /generate {"prompt": TEXT | "ids": [..], "max_new_tokens": N, "temperature": T, "top_k": K,
//                   "top_p": P, "repetition_penalty": R, "seed": S}
//     -> 200 {"text": ..., "ids": [...]}, or 400 {"error": "one line"} for bad input
//   with "stream": true -> 200 text/plain, the text sent as it is generated (chunked; mtx::Detokenizer)
//   GET /health -> 200 {"status": "ok"}
#include <httplib.h>

#include <cstdlib>
#include <iostream>
#include <nlohmann/json.hpp>

#include "mtx/mtx.hpp"

using json = nlohmann::json;

int main(int argc, char** argv) {
  if (argc < 2 || std::string(argv[1]) == "--help") {
    std::cerr << "usage: mtx-http-example OUT [--port 8080] [--host 127.0.0.1]\n";
    return argc < 2 ? 2 : 0;
  }
  std::string host = "127.0.0.1";
  int port = 8080;
  for (int i = 2; i + 1 < argc; i += 2) {
    if (std::string(argv[i]) == "--port") {
      char* end = nullptr;
      const long p = std::strtol(argv[i + 1], &end, 10);
      if (!*argv[i + 1] || *end || p < 0 || p > 65535) {
        std::cerr << "mtx-http-example: error: --port: expected an integer in [0, 65535], got '" << argv[i + 1] << "'\n";
        return 2;
      }
      port = int(p);
    } else if (std::string(argv[i]) == "--host") {
      host = argv[i + 1];
    } else {
      std::cerr << "mtx-http-example: error: unknown option " << argv[i] << "\n";
      return 2;
    }
  }
  try {
    mtx::Model model(argv[1]);
    mtx::Tokenizer tok(argv[1]);
    httplib::Server server;
    server.Get("/health", [](const httplib::Request&, httplib::Response& res) {
      res.set_content(R"({"status": "ok"})", "application/json");
    });
    server.Post("/generate", [&](const httplib::Request& req, httplib::Response& res) {
      auto fail = [&](int status, const std::string& msg) {
        res.status = status;
        res.set_content(json{{"error", msg}}.dump(), "application/json");
      };
      try {
        json body = json::parse(req.body);
        if (!body.is_object()) return fail(400, "body: expected a JSON object");
        std::vector<int32_t> ids = body.contains("ids") ? body["ids"].get<std::vector<int32_t>>()
                                                        : tok.encode(body.at("prompt").get<std::string>());
        mtx::SamplingOptions o;
        o.temperature = body.value("temperature", 0.0);
        o.top_k = body.value("top_k", 0);
        o.top_p = body.value("top_p", 1.0);
        o.repetition_penalty = body.value("repetition_penalty", 1.0);
        if (body.contains("seed")) o.seed = body["seed"].get<uint64_t>();
        const int max_new = body.value("max_new_tokens", 64);
        if (body.value("stream", false)) {
          mtx::make_request(model, {ids}, max_new, o);  // bad input is a 400 before the stream starts
          res.set_chunked_content_provider("text/plain; charset=utf-8", [&model, &tok, ids, max_new, o](
                                                                            size_t, httplib::DataSink& sink) {
            try {
              mtx::Session s = model.session();
              s.append(ids);
              mtx::Detokenizer text(tok);
              auto send = [&](const std::string& piece) { return piece.empty() || sink.write(piece.data(), piece.size()); };
              s.generate(max_new, o, std::nullopt, [&](int32_t t) { return send(text.push(t)); });
              send(text.flush());
              sink.done();
              return true;
            } catch (const std::exception& e) {
              std::cerr << "mtx-http-example: stream failed: " << e.what() << "\n";
              return false;
            }
          });
          return;
        }
        mtx::Session s = model.session();
        s.append(ids);
        auto out = s.generate(max_new, o);
        res.set_content(json{{"text", tok.decode(out)}, {"ids", out}}.dump(), "application/json");
      } catch (const mtx::Error& e) {
        fail(e.code() == mtx::ErrorCode::Runtime ? 500 : 400, e.what());
      } catch (const json::exception& e) {
        fail(400, std::string("body: ") + e.what());
      }
    });
    std::cerr << "mtx-http-example: serving " << argv[1] << " on http://" << host << ":" << port << "\n";
    if (!server.listen(host, port)) {
      std::cerr << "mtx-http-example: error: cannot listen on " << host << ":" << port << "\n";
      return 1;
    }
  } catch (const mtx::Error& e) {
    std::cerr << "mtx-http-example: error: " << e.what() << "\n";
    return 2;
  }
}
