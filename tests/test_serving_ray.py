"""The Ray Serve deployment (one engine per replica) on a local Ray instance on CPU, driven by the
official openai client: the same tokens as Generator.generate alone."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODEL = "tiny"


@pytest.fixture(scope="module")
def export(parity_export):
    return parity_export("mistral", "onnxruntime")


@pytest.fixture(scope="module")
def ray_url(export):
    """Ray (2 CPUs, no dashboard) with the mtx application on a free port; shut down after the module."""
    ray = pytest.importorskip("ray")
    from ray import serve

    from mtx.serving.server import ServeOptions
    from mtx.serving.ray_app import application

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env}, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(application(export, ServeOptions(max_batch=4, threads=1, model_name=MODEL), replicas=1),
                  name="mtx", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_ray_deployment_answers_with_offline_tokens(ray_url, export):
    import openai

    import mtx.runtime

    gen = mtx.runtime.load(export)
    client = openai.OpenAI(base_url=ray_url + "/v1", api_key="none", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == [MODEL]
    prompt = [5, 17, 99, 3, 42, 8, 11]
    greedy = gen.generate([prompt], max_new_tokens=16, stop_token_ids=[])[0]
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == gen.decode(greedy) and r.usage.completion_tokens == 16
    sampled = gen.generate([prompt], max_new_tokens=16, temperature=0.9, top_p=0.9, seed=11, stop_token_ids=[])[0]
    chunks = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0.9, top_p=0.9,
                                       seed=11, stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in chunks) == gen.decode(sampled)
    with pytest.raises(openai.BadRequestError, match="unknown model"):
        client.completions.create(model="other", prompt="w5")
