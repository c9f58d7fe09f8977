"""``python -m vtprune.eval`` (and ``accelerate launch -m vtprune.eval``): the ``vtprune eval`` command."""

from vtprune.eval.harness.cli_eval import main

if __name__ == "__main__":
    main()
