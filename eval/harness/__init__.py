"""The evaluation harness: plans on a model, answered, recorded, scored, metered and reported.

``plans`` (plan strings -> configs -> applied), ``tasks`` (benchmarks and SynthVQA as tasks),
``generation``, ``records`` (resumable per-sample files), ``meters`` / ``timers`` (efficiency),
``runner`` and ``cli_eval`` (``vtprune eval``), ``reports``; ``fidelity`` and ``evidence`` (the offline
fidelity study on the tiny models) and ``lmms_plugin`` (the lmms-eval entry point).
"""
