"""The evaluation harness of vtprune: everything that measures the library, none of which it imports.

Four sub-packages, each one concern; an arrow is "may import":

* :mod:`vtprune.eval.benchmarks`: the public benchmarks, one reader and one scorer per benchmark
  (files on disk or the ``lmms-lab`` hub datasets -> :class:`~vtprune.eval.benchmarks.samples.Sample`
  lists -> metrics). Imports nothing else of ``vtprune.eval``.
* :mod:`vtprune.eval.synthetic`: SynthVQA (the seeded offline VQA task) and the tiny models trained on
  it. Imports nothing else of ``vtprune.eval``.
* :mod:`vtprune.eval.harness`: plans, the runner, generation, records, meters, reports, the
  ``vtprune eval`` command, the fidelity study and the lmms-eval plugin -> benchmarks, synthetic.
* :mod:`vtprune.eval.speed`: prefill / decode / matmul benchmarks and the full-size FLOPs report
  -> harness (plans, meters, report publishing).

The library (``vtprune`` outside its application layer, ``vtprune.cli`` and ``vtprune.demo``) never
imports this package; ``tests/test_eval_layout.py`` checks both rules.
"""
