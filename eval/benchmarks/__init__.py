"""Public benchmarks: one reader (``readers_*``) and one scorer (``scoring_*``) per benchmark family.

``readers.load_benchmark(name, data_dir)`` and ``scoring.score(name, samples, predictions)`` are the
registries; ``samples`` holds the shared record and file helpers, ``hub`` the ``lmms-lab/*`` datasets.
Families: multiple choice (ScienceQA-IMG, MMBench, SEED-Bench), short-answer VQA (GQA, TextVQA) and
yes/no (POPE, MME). Nothing here runs a model.
"""
