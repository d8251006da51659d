"""corral.serve: the simulated and vLLM engines, Ray Serve app builder, adapter paging."""
