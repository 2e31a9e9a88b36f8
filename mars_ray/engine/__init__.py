"""Simulated GPU engines: the step-time cost model and its (GPU, model) profiles.

``costmodel`` prices one continuous-batching step (docs/design.md §6) from a data-file
profile; ``calibrate`` fits a profile to measured points; ``cli`` adds the
``costmodel`` and ``calibrate`` commands. Modules are imported on use, not here.
"""
