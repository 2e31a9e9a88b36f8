"""MARS inside vLLM 0.29: ``MarsScheduler`` (``scheduler_cls``), ``SimulatedExecutor``
(``distributed_executor_backend``), session hints in ``SamplingParams.extra_args``;
``bench_runtime`` (``mars-ray bench --runtime vllm``) and ``agreement`` (vLLM vs the
simulator); ``serve_llm`` and ``session_router`` (MARS in Ray Serve LLM).

Importing this package does not import vLLM; its modules do (``hints``,
``session_router``, and ``bench_runtime`` / ``agreement`` until they run, excepted).
"""
