"""OpenAI-compatible backends: the router in front of existing vLLM / SGLang OpenAI servers.

- :mod:`.openai_http`: one backend's request path, shaped like the engine gRPC stub the router already
  streams from (``Generate(GenerateRequest)`` -> ``GenerateChunk`` s), over ``/v1/completions`` SSE, with
  HTTP errors mapped to the gRPC codes the router's retry and error mapping already handle; dynamic LoRA
  loading through ``/v1/load_lora_adapter``;
- :mod:`.scrape`: parsing ``/metrics`` (vLLM's names) and ``/v1/models``;
- :mod:`.pool`: :class:`~.pool.BackendPool`, the :class:`~corral.router.engine_client.EnginePool` of HTTP
  backends: health checks, ejection and re-admission, load samples from ``/metrics``, adapter residency;
- :mod:`.discovery`: static URLs and a Kubernetes Service's EndpointSlices;
- :mod:`.cli`: ``corral router --backend URL ... --policy FILE``.
"""
