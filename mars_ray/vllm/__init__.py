"""MARS inside vLLM 0.29: ``MarsScheduler`` (``scheduler_cls``), ``SimulatedExecutor``
(``distributed_executor_backend``), session hints in ``SamplingParams.extra_args``.

Importing this package does not import vLLM; its modules do (``hints`` excepted).
"""
